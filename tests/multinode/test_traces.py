"""Access traces between real nodes over iroh: a read order recorded on one node reaches
the others, a cold open prefetches it, `blixfs pull --trace` fetches exactly it."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from tests.conftest import MountedNode, fetched_bytes, visible, wait_for
from tests.multinode.test_replication import joined

pytestmark = pytest.mark.mounted
Factory = Callable[..., MountedNode]

CS = 256 * 1024
CHUNKS = 96  # 24 MiB
# Far apart (> 4 MiB: the VFS's sequential read-ahead never starts) and out of order.
ORDER = [80, 3, 50, 20, 95, 60, 35, 8, 70, 42, 88, 14, 27, 65, 1, 55]


def _direct_read(path: Path, chunks: list[int], hold: Callable[[], None] | None = None) -> None:
    """Read 4 KiB of each chunk in ``chunks`` through O_DIRECT (never the page cache, no
    kernel read-ahead: each read reaches the daemon in this order). ``hold`` runs once the
    file is open, before the first read."""
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        if hold is not None:
            hold()
        for i in chunks:
            assert os.preadv(fd, [buf], i * CS + 8192) == 4096
    finally:
        os.close(fd)


def _data_chunks(node: MountedNode) -> set[str]:
    """Ids (hex) of the full-size chunks in ``node``'s store (manifests are smaller)."""
    root = node.home / "chunks"
    return {f.name for d in root.glob("[0-9a-f][0-9a-f]") for f in d.iterdir() if f.stat().st_size >= CS}


def _arrival(node: MountedNode, ids: list[str]) -> list[int]:
    return [(node.home / "chunks" / h[:2] / h).stat().st_mtime_ns for h in ids]


def _trace(node: MountedNode) -> dict[str, object]:
    reply: dict[str, object] = json.loads(node.cli("trace", "--json", "img").stdout)
    return reply


def test_a_trace_recorded_on_a_is_prefetched_in_order_on_b_and_pulled_on_c(make_node: Factory) -> None:
    a = make_node("a", "--copies", "1")  # no replicas: b and c hold nothing of the image
    data = os.urandom(CHUNKS * CS)
    (a.mnt / "img").write_bytes(data)
    ids = [blake3.blake3(data[i * CS:(i + 1) * CS]).hexdigest() for i in range(CHUNKS)]
    traced = [ids[i] for i in ORDER]
    b = joined(make_node, "b", a)
    c = joined(make_node, "c", a)

    _direct_read(a.mnt / "img", ORDER)  # recorded on a; published when it closes
    wait_for(lambda: visible(b, "img", CHUNKS * CS) and _trace(b)["chunks"] == ORDER, 60, "a's trace on b")
    assert _trace(b)["records"] == 1

    # b opens the image cold: the traced chunks arrive before the guest reads them, and only they.
    before: dict[str, int] = {}

    def wait_prefetched() -> None:
        wait_for(lambda: set(traced) <= _data_chunks(b), 60, "the traced chunks in b's store")
        before["fetched"] = fetched_bytes(b)
    _direct_read(b.mnt / "img", ORDER, hold=wait_prefetched)
    assert fetched_bytes(b) == before["fetched"]  # every read was served from b's store
    assert _data_chunks(b) == set(traced)
    # In trace order as far as a few fetches in flight let it show: the first half arrived
    # (on the whole) before the second.
    times = _arrival(b, traced)
    half = len(times) // 2
    assert sum(times[:half]) / half < sum(times[half:]) / (len(times) - half)

    # c warms itself with pull --trace: exactly the traced chunks, nothing else.
    wait_for(lambda: visible(c, "img", CHUNKS * CS) and _trace(c)["chunks"] == ORDER, 60, "the trace on c")
    out = c.cli("pull", "--trace", "img").stdout
    assert f"(trace: {len(ORDER)} chunks)" in out
    assert _data_chunks(c) == set(traced)

"""Replication to R nodes, the last copy, and cleanup, between real nodes."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MountedNode, visible, wait_for
from tests.multinode.test_fetch import MiB, sha256, write_random
from tests.multinode.test_replication import ticket

pytestmark = pytest.mark.mounted
Factory = Callable[..., MountedNode]


def status(node: MountedNode) -> dict[str, object]:
    result: dict[str, object] = json.loads(node.cli("status", "--json").stdout)
    return result


def replication(node: MountedNode, path: str) -> dict[str, object] | None:
    daemon = status(node)["daemon"]
    assert isinstance(daemon, dict)
    return next((r for r in daemon["replication"] if r["path"] == path), None)


def durable(node: MountedNode, path: str) -> bool:
    r = replication(node, path)
    return r is not None and r["state"] == "durable"


def served(node: MountedNode) -> int:
    daemon = status(node)["daemon"]
    assert isinstance(daemon, dict)
    return int(daemon["served"]["bytes"])


def chunk_files(node: MountedNode) -> set[str]:
    return {p.name for p in (node.home / "chunks").glob("[0-9a-f][0-9a-f]/*")}


def node(make_node: Factory, name: str, source: MountedNode | None, *extra: str) -> MountedNode:
    n = make_node(name, start=False)
    n.extra_args = list(extra)
    if source is not None:
        n.cli("join", ticket(source))
    n.start()
    return n


def test_a_durable_image_survives_its_writer_for_good(make_node: Factory, tmp_path: Path) -> None:
    a = node(make_node, "a", None)
    b = node(make_node, "b", a)
    c = node(make_node, "c", a)
    digest = write_random(tmp_path / "src", 1024 * MiB)
    os.system(f"cp {tmp_path / 'src'} {a.mnt / 'golden.img'}")
    wait_for(lambda: durable(a, "golden.img"), 180, "golden.img durable with 2 copies")
    assert replication(a, "golden.img")["copies"] == 2  # type: ignore[index]
    assert a.stop() == 0  # the writer powers off for good
    assert sha256(b.mnt / "golden.img") == digest
    assert sha256(c.mnt / "golden.img") == digest  # from the replica, the only holder left


def test_overwriting_4k_moves_one_chunk(make_node: Factory) -> None:
    a = node(make_node, "a", None)
    b = node(make_node, "b", a)
    write_random(a.mnt / "disk.img", 64 * MiB)
    wait_for(lambda: durable(a, "disk.img"), 60, "the image durable")
    wait_for(lambda: visible(b, "disk.img", 64 * MiB), 60, "the image on b")
    before = served(a)
    old = replication(a, "disk.img")["manifest"]  # type: ignore[index]  # before the write, not after
    fd = os.open(a.mnt / "disk.img", os.O_WRONLY)
    os.pwrite(fd, os.urandom(4096), 32 * MiB + 1000)
    os.fsync(fd)
    os.close(fd)
    wait_for(lambda: durable(a, "disk.img") and replication(a, "disk.img")["manifest"] != old,  # type: ignore[index]
             60, "the new version durable")
    sent = served(a) - before
    manifest = 256 * 36 + 20
    assert sent <= 256 * 1024 + manifest + 4096, f"{sent} bytes sent for one dirty chunk"
    assert sent >= 256 * 1024  # the dirty chunk itself did go


def test_a_cache_full_of_unreplicated_data_refuses_writes_until_replicated(make_node: Factory) -> None:
    a = node(make_node, "a", None, "--cache-size", "64M")
    first = write_random(a.mnt / "first.img", 40 * MiB)
    with pytest.raises(OSError) as info:
        write_random(a.mnt / "second.img", 40 * MiB)
    assert info.value.errno == errno.ENOSPC
    assert sha256(a.mnt / "first.img") == first  # nothing was lost or evicted
    b = node(make_node, "b", a)
    wait_for(lambda: durable(a, "first.img"), 60, "first.img durable once b holds it")
    second = write_random(a.mnt / "second.img", 40 * MiB)  # room again: replicated data may be evicted
    assert sha256(a.mnt / "second.img") == second
    assert sha256(b.mnt / "first.img") == first


def test_gc_frees_deleted_images_on_every_node_and_keeps_shared_chunks(make_node: Factory) -> None:
    gc = ("--gc-interval", "1", "--gc-grace", "0")
    a = node(make_node, "a", None, *gc)
    b = node(make_node, "b", a, *gc)
    shared = os.urandom(256 * 1024)
    (a.mnt / "old.img").write_bytes(shared + os.urandom(8 * MiB))
    (a.mnt / "live.img").write_bytes(shared + os.urandom(8 * MiB))
    wait_for(lambda: durable(a, "old.img") and durable(a, "live.img"), 60, "both images durable")
    wait_for(lambda: len(chunk_files(b)) >= 2 * 33 - 1, 60, "b to hold both (one chunk shared)")
    with_old = chunk_files(a)
    os.unlink(a.mnt / "old.img")
    wait_for(lambda: len(chunk_files(a)) <= len(with_old) - 33 and len(chunk_files(b)) <= len(with_old) - 33, 60,
             "every node to free the deleted image's chunks")
    assert (a.mnt / "live.img").read_bytes()[:256 * 1024] == shared  # the shared chunk stayed
    assert (b.mnt / "live.img").read_bytes()[:256 * 1024] == shared


def test_replication_resumes_after_the_writer_is_killed(make_node: Factory) -> None:
    a = node(make_node, "a", None)
    b = node(make_node, "b", a)
    digest = write_random(a.mnt / "big.img", 256 * MiB)
    a.kill9()  # while b is still pulling it
    a.start()
    wait_for(lambda: durable(a, "big.img"), 180, "replication to resume and finish after the restart")
    assert a.stop() == 0
    assert sha256(b.mnt / "big.img") == digest

"""A node that holds none of a file writes into it; every node reads the result (real mounts, real iroh)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from tests.conftest import MountedNode, visible, wait_for
from tests.helpers import MiB, sha256
from tests.multinode.test_fetch import write_random
from tests.multinode.test_replication import joined

pytestmark = pytest.mark.mounted
Factory = Callable[..., MountedNode]


def test_dd_notrunc_on_a_node_holding_nothing_then_every_node_reads_the_new_version(make_node: Factory) -> None:
    a = make_node("a", "--copies", "1")  # nothing replicated: c and d hold nothing of it
    c = joined(make_node, "c", a)
    d = joined(make_node, "d", a)
    write_random(a.mnt / "img", 32 * MiB)
    for n in (c, d):
        wait_for(lambda n=n: visible(n, "img", 32 * MiB), 60, f"the image on {n.mnt.parent.name}")
    assert json.loads(c.cli("status", "--json").stdout)["store"]["chunks"] == 0
    patch = os.urandom(4096)
    with open(c.mnt / "img", "r+b") as f:  # dd conv=notrunc bs=4k seek=...
        f.seek(5 * MiB + 4096)
        f.write(patch)
    expected = bytearray((a.mnt / "img").read_bytes())
    expected[5 * MiB + 4096 : 5 * MiB + 8192] = patch
    digest = sha256_of(bytes(expected))
    assert sha256(c.mnt / "img") == digest  # the unchanged chunks come from a, found by content
    wait_for(lambda: sha256(a.mnt / "img") == digest, 60, "c's version on a")
    wait_for(lambda: sha256(d.mnt / "img") == digest, 60, "c's version on d, which never read the old one")


def sha256_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()

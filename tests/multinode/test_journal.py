"""A VM's fsync'd writes reach peers when published: `blixfs commit` or the timer, exactly."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blixfs.node import Node
from tests.conftest import MountedNode, visible, wait_for
from tests.helpers import MiB, sha256
from tests.multinode.test_replication import joined

pytestmark = pytest.mark.mounted
Factory = Callable[..., MountedNode]
SIZE = 8 * MiB

# A guest in a process of its own: it keeps the image open and never forks. (A fork of the
# test process would close a copy of the fd at exec, and a close publishes.)
GUEST = """
import hashlib, os, random, sys
path, count = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
data = bytearray(os.pread(fd, 1 << 30, 0))
rng = random.Random(count)
for _ in range(count):
    offset = rng.randrange(0, len(data) - 4096) // 4096 * 4096
    block = os.urandom(4096)
    os.pwrite(fd, block, offset)
    data[offset : offset + 4096] = block
    os.fdatasync(fd)
print(hashlib.sha256(data).hexdigest(), flush=True)
sys.stdin.read()
os.close(fd)
"""


@contextmanager
def guest(path: Path, count: int) -> Iterator[str]:
    """Run a guest that makes ``count`` fdatasync'd 4 KiB writes and keeps ``path`` open;
    yields the sha256 the image has after them."""
    proc = subprocess.Popen([sys.executable, "-c", GUEST, str(path), str(count)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        digest = proc.stdout.readline().strip()
        assert len(digest) == 64, "the guest failed"
        yield digest
    finally:
        proc.communicate(timeout=60)


def current_version(node: MountedNode, path: str) -> bytes | None:
    """The manifest of ``node``'s current version of ``path`` (read beside the running daemon)."""
    opened = Node.open(node.home, lock=False)
    try:
        e = opened.namespace.get(path)
        return e.manifest if e is not None else None
    finally:
        opened.close()


def test_a_peer_sees_fsynced_writes_after_blixfs_commit_exactly(make_node: Factory) -> None:
    a = make_node("a", "--publish-interval", "3600")
    b = joined(make_node, "b", a)
    data = os.urandom(SIZE)
    (a.mnt / "vm.img").write_bytes(data)
    wait_for(lambda: visible(b, "vm.img", SIZE), 60, "the image on b")
    old = hashlib.sha256(data).hexdigest()
    assert sha256(b.mnt / "vm.img") == old
    published = current_version(a, "vm.img")
    with guest(a.mnt / "vm.img", 20) as new:
        # fsync published no version: a's current version and b's view are the old ones
        assert current_version(a, "vm.img") == published
        assert sha256(b.mnt / "vm.img") == old
        assert "published vm.img" in a.cli("commit", str(a.mnt / "vm.img")).stdout
        wait_for(lambda: sha256(b.mnt / "vm.img") == new, 60, "the committed version on b")
        assert "nothing to publish" in a.cli("commit", "vm.img").stdout
        missing = a.cli("commit", "nope.img", check=False)
        assert missing.returncode != 0 and "nope.img" in missing.stderr


def test_the_publish_timer_brings_a_running_vms_writes_to_peers(make_node: Factory) -> None:
    a = make_node("a", "--publish-interval", "1")
    b = joined(make_node, "b", a)
    (a.mnt / "vm.img").write_bytes(os.urandom(SIZE))
    wait_for(lambda: visible(b, "vm.img", SIZE), 60, "the image on b")
    with guest(a.mnt / "vm.img", 10) as new:
        wait_for(lambda: sha256(b.mnt / "vm.img") == new, 60, "the timer's version on b (the image still open)")

"""fsync through the journal on a real mount: kill -9 after fsync, remount, the same bytes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable

import pytest

from tests.conftest import MountedNode, wait_unmount_helpers
from tests.helpers import MiB, sha256

pytestmark = pytest.mark.mounted


def test_guest_writes_fsynced_into_an_image_survive_kill9(make_node: Callable[..., MountedNode]) -> None:
    node = make_node("a")
    image = node.mnt / "vm.img"
    expected = bytearray(os.urandom(16 * MiB))
    image.write_bytes(bytes(expected))  # the image, published on close
    rng = random.Random(7)
    fd = os.open(image, os.O_RDWR)
    for _ in range(50):  # a guest: 4 KiB writes at scattered places, each flushed
        offset = rng.randrange(0, len(expected) - 4096) // 512 * 512
        block = os.urandom(4096)
        os.pwrite(fd, block, offset)
        expected[offset : offset + 4096] = block
        os.fdatasync(fd)
    os.ftruncate(fd, len(expected) + 3 * MiB)  # the disk grows, and is written past its old end
    expected += bytes(3 * MiB)
    os.pwrite(fd, b"tail", len(expected) - 4)
    expected[-4:] = b"tail"
    os.fsync(fd)
    assert list((node.home / "journal").glob("*.jnl"))  # fsync went to the journal
    helpers = node.unmount_helpers()
    node.kill9()  # no flush, no release: only the journal stands behind the writes
    with contextlib.suppress(OSError):
        os.close(fd)
    wait_unmount_helpers(helpers)
    node.start()
    assert sha256(image) == hashlib.sha256(expected).hexdigest()
    assert not list((node.home / "journal").glob("*.jnl"))  # replayed, published, dropped

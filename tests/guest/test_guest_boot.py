"""A real Linux guest boots under qemu (TCG) from blixfs mounts, reads its disk and writes to it.

The guest (scripts/build_guest.sh) checks the sha256 of 8 MiB baked into its ext4 root,
writes 4 MiB with conv=fsync, reads them back past its page cache, and reports
``BLIXFS-GUEST-OK <sha256 of what it wrote>`` on its serial console. Each test checks that
report, then checks independently (qemu-img check, debugfs on the image read back through
a mount) that the writes reached the image.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MountedNode, fetched_bytes, visible, wait_for
from tests.guest.qemu import Guest, boot, written_in_image
from tests.helpers import sh, sha256
from tests.multinode.test_replication import joined, ticket

pytestmark = [pytest.mark.mounted, pytest.mark.slow,
              # A boot takes ~6-15 s here and maybe 3x that elsewhere; the fetches, checks and nodes come on top.
              pytest.mark.timeout(900)]
Factory = Callable[..., MountedNode]
IMAGE = "root.qcow2"
BOOT_TIMEOUT = 300  # a boot is seconds; minutes mean it hangs






def sha256_when_readable(path: Path, want: str, timeout: float) -> str:
    """The sha256 of ``path`` once it equals ``want`` (a peer's new version arrives by sync),
    else the last digest or read error seen at the deadline, as a failure."""
    deadline = time.monotonic() + timeout
    last = "nothing read"
    while True:
        try:
            digest = sha256(path)
            if digest == want:
                return digest
            last = f"sha256 {digest}"
        except OSError as exc:
            last = f"read error {exc!r}"
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never read as {want} within {timeout:.0f} s; last: {last}")
        time.sleep(1)


def test_the_writer_boots_the_guest_from_its_own_mount(make_node: Factory, guest: Guest, tmp_path: Path) -> None:
    a = make_node("a")
    sh("cp", guest.image, a.mnt / IMAGE)
    before = sha256(a.mnt / IMAGE)
    assert before == sha256(guest.image)
    result = boot(guest, a.mnt / IMAGE, tmp_path / "serial-a.log", timeout=BOOT_TIMEOUT)
    assert result.ok, result.explain()
    assert result.returncode == 0, result.explain()
    sh("qemu-img", "check", a.mnt / IMAGE)  # non-zero exit (a corrupt or leaky image) fails
    assert sha256(a.mnt / IMAGE) != before  # the guest wrote to its disk, through the mount
    assert written_in_image(a.mnt / IMAGE, tmp_path) == result.written


def test_a_node_that_held_nothing_boots_the_guest_writing_and_another_reads_its_result(
        make_node: Factory, guest: Guest, tmp_path: Path) -> None:
    # --copies 1 everywhere: nothing is replicated, so c holds none of the image when it boots,
    # and b, reading last, must fetch c's new chunks from c and the unchanged ones from a.
    a = make_node("a", "--copies", "1")
    b = joined(make_node, "b", a)
    sh("cp", guest.image, a.mnt / IMAGE)
    size = (a.mnt / IMAGE).stat().st_size
    wait_for(lambda: visible(b, IMAGE, size), 30, "the image on b")
    c = make_node("c", start=False)
    c.cli("join", ticket(a))  # c joins after the write
    c.extra_args = ["--copies", "1"]
    c.start()
    wait_for(lambda: visible(c, IMAGE, size), 30, "the image on c")
    assert fetched_bytes(c) == 0 and fetched_bytes(b) == 0, "a node holds part of the image before reading it"

    result = boot(guest, c.mnt / IMAGE, tmp_path / "serial-c.log", timeout=BOOT_TIMEOUT)
    assert result.ok, result.explain() + f"\n--- c's log (tail) ---\n{c.log()[-4000:]}"
    assert result.returncode == 0, result.explain()
    assert fetched_bytes(c) > 0  # it booted from what it fetched
    on_c = sha256(c.mnt / IMAGE)
    assert on_c != sha256(guest.image)  # the guest wrote to its disk, through c's mount

    # b sees c's version once the sync brings it, and reads it whole, over the network.
    sha256_when_readable(b.mnt / IMAGE, on_c, timeout=120)
    sh("qemu-img", "check", b.mnt / IMAGE)
    assert written_in_image(b.mnt / IMAGE, tmp_path) == result.written

"""Real FUSE mounts served by real ``blixfs mount`` processes."""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MountedNode, is_mounted, process_gone, wait_for, wait_unmount_helpers
from tests.helpers import MiB, sh, sha256

pytestmark = pytest.mark.mounted




def status(node: MountedNode) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = json.loads(node.cli("status", "--json").stdout)
    return result


def test_cp_256mib_in_and_out(mounted: MountedNode, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    sh("cp", src, mounted.mnt / "disk.img")
    sh("cp", mounted.mnt / "disk.img", tmp_path / "back.img")
    assert sha256(tmp_path / "back.img") == sha256(src)
    assert (mounted.mnt / "disk.img").stat().st_size == 256 * MiB
    st = status(mounted)
    assert st["namespace"]["files"] == 1 and st["namespace"]["file_bytes"] == 256 * MiB
    assert st["store"]["bytes"] >= 256 * MiB  # random data: nothing dedups, nothing is a hole


def test_random_4k_reads_return_the_right_bytes(make_node: Callable[..., MountedNode]) -> None:
    """O_DIRECT 4-8 KiB reads (each reaches the daemon, served by block from the chunk files
    after a remount emptied its memory) and unaligned cached reads return the file's bytes."""
    node = make_node("a")
    data = os.urandom(6 * MiB + 12345)
    (node.mnt / "img").write_bytes(data)
    node.stop()
    node.start()
    rng = random.Random(5)
    buf = mmap.mmap(-1, 8192)
    fd = os.open(node.mnt / "img", os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(300):
            off = rng.randrange(len(data) // 4096 + 1) * 4096
            n = os.preadv(fd, [buf], off)
            assert n == min(8192, len(data) - off) and buf[:n] == data[off : off + n], off
    finally:
        os.close(fd)
    with open(node.mnt / "img", "rb") as f:
        for _ in range(300):
            off = rng.randrange(len(data))
            f.seek(off)
            n = rng.randrange(1, 20000)
            assert f.read(n) == data[off : off + n], off


def test_coreutils(mounted: MountedNode) -> None:
    m = mounted.mnt
    sh("mkdir", "-p", m / "a/b/c")
    (m / "a/b/c/f.txt").write_text("hello\n")
    sh("ln", "-s", "b/c/f.txt", m / "a/link")
    assert (m / "a/link").read_text() == "hello\n" and os.readlink(m / "a/link") == "b/c/f.txt"
    listing = sh("ls", "-l", m / "a/b/c")
    assert "f.txt" in listing and "-rw-r--r--" in listing
    sh("mv", m / "a/b", m / "moved")
    assert (m / "moved/c/f.txt").read_text() == "hello\n" and not (m / "a/b").exists()
    sh("truncate", "-s", "10M", m / "moved/c/f.txt")
    assert (m / "moved/c/f.txt").stat().st_size == 10 * MiB
    with open(m / "moved/c/f.txt", "rb") as f:
        assert f.read(6) == b"hello\n" and f.read(100) == bytes(100)
    sh("truncate", "-s", "3", m / "moved/c/f.txt")
    assert (m / "moved/c/f.txt").read_bytes() == b"hel"
    (m / "over").write_text("new")
    sh("mv", "-f", m / "over", m / "moved/c/f.txt")  # rename over an existing file
    assert (m / "moved/c/f.txt").read_text() == "new"
    os.chmod(m / "moved/c/f.txt", 0o600)
    os.utime(m / "moved/c/f.txt", ns=(1_000_000_000, 2_000_000_000))
    st = (m / "moved/c/f.txt").stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_mtime_ns == 2_000_000_000
    sh("rm", "-r", m / "moved", m / "a")
    assert os.listdir(m) == []
    with pytest.raises(OSError) as info:
        os.rmdir(m / "nope")
    assert info.value.errno == errno.ENOENT


def test_state_persists_across_remount(make_node: Callable[..., MountedNode]) -> None:
    node = make_node("a")
    data = os.urandom(3 * MiB + 5)
    (node.mnt / "d").mkdir()
    (node.mnt / "d/f").write_bytes(data)
    os.setxattr(node.mnt / "d/f", "user.blixfs.os", b"linux")
    os.setxattr(node.mnt / "d/f", "user.origin", b"test")
    assert node.stop() == 0
    assert not is_mounted(node.mnt)
    node.start()
    assert (node.mnt / "d/f").read_bytes() == data
    assert os.getxattr(node.mnt / "d/f", "user.blixfs.os") == b"linux"
    assert set(os.listxattr(node.mnt / "d/f")) == {"user.blixfs.os", "user.origin"}


def test_kill9_after_fsync_then_remount_keeps_the_data(make_node: Callable[..., MountedNode]) -> None:
    node = make_node("a")
    data = os.urandom(5 * MiB + 123)
    fd = os.open(node.mnt / "vm.img", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    helpers = node.unmount_helpers()
    node.kill9()  # no flush, no release, no clean unmount: only fsync stands behind the data
    with pytest.raises(OSError) as info:
        os.close(fd)  # the daemon is gone: close reports it rather than hanging
    assert info.value.errno == errno.ENOTCONN
    wait_unmount_helpers(helpers)
    node.start()
    assert (node.mnt / "vm.img").read_bytes() == data


def test_stale_mount_of_a_killed_daemon_is_cleaned_up(make_node: Callable[..., MountedNode]) -> None:
    node = make_node("a")
    (node.mnt / "f").write_bytes(b"data")
    # Kill the auto_unmount helper first, then the daemon: the mount is left stale (ENOTCONN).
    helpers = node.unmount_helpers()
    for pid in helpers:
        os.kill(pid, signal.SIGKILL)
    # SIGKILL is delivered asynchronously: a helper still alive when the daemon dies unmounts.
    wait_for(lambda: all(process_gone(pid) for pid in helpers), 60, "the auto_unmount helper to die")
    node.kill9()
    if not is_mounted(node.mnt):
        pytest.skip("no stale mount could be produced (auto_unmount helper not found)")
    with pytest.raises(OSError) as info:
        os.statvfs(node.mnt)  # stat() could still be answered from the kernel's attribute cache
    assert info.value.errno == errno.ENOTCONN
    node.start()
    assert "stale mount" in node.log()
    assert (node.mnt / "f").read_bytes() == b"data"


def test_sparse_file_reads_zeros_and_stores_no_holes(mounted: MountedNode) -> None:
    path = mounted.mnt / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 * MiB)
        f.write(b"\xab" * 4096)
    with open(path, "rb") as f:
        assert f.read(MiB) == bytes(MiB)
        f.seek(512 * MiB - 10)
        assert f.read(4106 + 10) == bytes(10) + b"\xab" * 4096 + bytes(10)
        f.seek((1 << 30) - MiB)
        assert f.read() == bytes(MiB)
    st = status(mounted)
    assert st["namespace"]["file_bytes"] == 1 << 30
    assert st["store"]["bytes"] < 1 * MiB  # one data chunk and the manifest
    assert path.stat().st_blocks * 512 < MiB


def test_xattrs_image_metadata(mounted: MountedNode) -> None:
    p = mounted.mnt / "ubuntu.qcow2"
    p.write_bytes(b"x")
    for key, value in {"name": "ubuntu", "version": "24.04", "os": "linux", "arch": "x86_64",
                       "tags": "lts,cloud", "uploaded_by": "ci"}.items():
        os.setxattr(p, f"user.blixfs.{key}", value.encode())
    assert os.getxattr(p, "user.blixfs.version") == b"24.04"
    with pytest.raises(OSError) as info:
        os.getxattr(p, "user.blixfs.missing")
    assert info.value.errno == errno.ENODATA
    with pytest.raises(OSError) as info:
        os.setxattr(p, "user.blixfs.colour", b"red")
    assert info.value.errno == errno.EINVAL


def _qemu_steps(directory: Path) -> dict[str, object]:
    """The same qemu steps anywhere; returns `qemu-img check`'s findings."""
    img = directory / "guest.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 5M 64k",
       "-c", "write -P 0x11 33M 4k", "-c", "write -z 5M 4k", "-c", "discard 0 64k", img)
    check: dict[str, object] = json.loads(sh("qemu-img", "check", "--output=json", img))
    check.pop("filename")
    sh("qemu-img", "convert", "-O", "raw", img, directory / "guest.raw")
    return check


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-utils missing: run scripts/install.sh")
def test_qemu_img_through_the_mount_matches_local_disk(mounted: MountedNode, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    assert _qemu_steps(mounted.mnt) == _qemu_steps(local)
    assert sha256(mounted.mnt / "guest.raw") == sha256(local / "guest.raw")
    # The qcow2 containers differ in one freed cluster: on local disk qemu's discard
    # punches a hole, pyfuse3 has no fallocate, so the freed cluster keeps old bytes.
    # What the guest sees is identical:
    assert "identical" in sh("qemu-img", "compare", mounted.mnt / "guest.qcow2", local / "guest.qcow2")
    out = sh("qemu-img", "info", "--output=json", mounted.mnt / "guest.qcow2")
    assert json.loads(out)["virtual-size"] == 64 * MiB
    # O_DIRECT, as qemu uses with cache=none
    sh("qemu-io", "-t", "none", "-f", "qcow2", "-c", "read -P 0xab 64k 960k", "-c", "read -P 0 0 64k",
       mounted.mnt / "guest.qcow2")


def test_random_operations_match_local_disk(mounted: MountedNode, tmp_path: Path) -> None:
    rng = random.Random(20261124)
    here, there = tmp_path / "model.bin", mounted.mnt / "model.bin"
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in (here, there)]
    limit = 6 * MiB
    try:
        for step in range(250):
            op = rng.choices(["write", "truncate", "read", "fsync", "reopen"], [50, 10, 25, 5, 10])[0]
            if op == "write":
                off, n = rng.randrange(limit), rng.choice([1, 4096, 65536, 300_000, MiB])
                data = rng.randbytes(n) if rng.random() < 0.8 else bytes(n)
                for fd in fds:
                    assert os.pwrite(fd, data, off) == n
            elif op == "truncate":
                size = rng.randrange(limit)
                for fd in fds:
                    os.ftruncate(fd, size)
            elif op == "read":
                off, n = rng.randrange(limit), rng.randrange(2 * MiB)
                assert os.pread(fds[1], n, off) == os.pread(fds[0], n, off), f"step {step}"
            elif op == "fsync":
                os.fsync(fds[1])
            else:
                os.close(fds[1])
                fds[1] = os.open(there, os.O_RDWR)
            assert os.fstat(fds[1]).st_size == os.fstat(fds[0]).st_size, f"step {step}"
    finally:
        for fd in fds:
            os.close(fd)
    assert sha256(there) == sha256(here)


def test_full_disk_gives_enospc_and_corrupts_nothing(make_node: Callable[..., MountedNode], tmp_path: Path) -> None:
    home = tmp_path / "small-home"
    home.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(home)], check=False).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    node = make_node("a", start=False, home=home)
    try:
        node.start()
        keep = os.urandom(4 * MiB)
        (node.mnt / "keep").write_bytes(keep)
        with pytest.raises(OSError) as info, open(node.mnt / "big", "wb") as f:
            for _ in range(80):
                f.write(os.urandom(MiB))
        assert info.value.errno == errno.ENOSPC
        assert (node.mnt / "keep").read_bytes() == keep
        os.unlink(node.mnt / "big")
        assert node.stop() == 0
        node.start()
        assert (node.mnt / "keep").read_bytes() == keep
    finally:
        node.cleanup()  # before the tmpfs under its home goes away
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_cli_status_identity_and_errors(make_node: Callable[..., MountedNode], tmp_path: Path) -> None:
    node = make_node("a")
    key = node.home / "identity.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
    st = status(node)
    assert len(st["node_id"]) == 64  # type: ignore[arg-type]
    human = node.cli("status").stdout
    assert "chunks" in human and "0 files (0 B), 0 directories, 0 symlinks" in human  # the root is not counted
    (node.mnt / "d").mkdir()
    (node.mnt / "d" / "f").write_bytes(b"x")
    assert "1 file (1 B), 1 directory, 0 symlinks" in node.cli("status").stdout
    # a second daemon on the same home is refused with the reason
    second = node.cli("mount", str(tmp_path / "elsewhere"), check=False)
    assert second.returncode == 1 and "another blixfs daemon" in second.stderr
    # a mount point that does not exist
    other = make_node("b", start=False)
    missing = other.cli("mount", str(tmp_path / "no" / "such"), check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    # mounting over a live mount
    over = other.cli("mount", str(node.mnt), check=False)
    assert over.returncode == 1 and "already mounted" in over.stderr
    for args in (["--help"], ["mount", "--help"], ["status", "--help"], ["unmount", "--help"]):
        assert "Usage:" in node.cli(*args).stdout
    bad = node.cli("status", "--bogus", check=False)
    assert bad.returncode == 2 and "No such option" in bad.stderr


def test_huge_sizes_give_efbig_and_the_mount_stays_usable(mounted: MountedNode) -> None:
    path = mounted.mnt / "huge.img"
    path.write_bytes(b"abc")
    with pytest.raises(OSError) as info:
        os.truncate(path, 1 << 50)
    assert info.value.errno == errno.EFBIG
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", 1 << 50)
        assert info.value.errno == errno.EFBIG
        with pytest.raises(OSError) as info:
            os.ftruncate(fd, 1 << 50)
        assert info.value.errno == errno.EFBIG
        assert os.pwrite(fd, b"def", 3) == 3
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abcdef" and path.stat().st_size == 6
    (mounted.mnt / "after").write_bytes(b"still usable")
    assert (mounted.mnt / "after").read_bytes() == b"still usable"

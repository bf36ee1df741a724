"""POSIX behaviour through a real mount, the way a VM host's tools see it (os.* calls, touch):
name and path limits, utimensat, parent directory times, link counts. One mount per test."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import MountedNode
from tests.helpers import sh

pytestmark = pytest.mark.mounted

YEAR_2100_NS = 4_102_444_800 * 10**9 + 123_456_789


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno is not None
    return info.value.errno


@contextmanager
def opened_dir(path: Path, name: str, parent_fd: int) -> Iterator[int]:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent_fd) if parent_fd >= 0 else os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def too_long_everywhere(dir_fd: int, existing: str, name: str) -> None:
    """Every call that names ``name`` (in ``dir_fd``) fails with ENAMETOOLONG, whichever of
    the kernel's lookup or the operation itself meets it first."""
    calls: dict[str, Callable[[], object]] = {
        "mkdir": lambda: os.mkdir(name, dir_fd=dir_fd),
        "create": lambda: os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dir_fd),
        "rename to": lambda: os.rename(existing, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd),
        "rename from": lambda: os.rename(name, existing + ".2", src_dir_fd=dir_fd, dst_dir_fd=dir_fd),
        "symlink": lambda: os.symlink("target", name, dir_fd=dir_fd),
        "unlink": lambda: os.unlink(name, dir_fd=dir_fd),
        "chmod": lambda: os.chmod(name, 0o600, dir_fd=dir_fd),
        "chown": lambda: os.chown(name, 0, 0, dir_fd=dir_fd),
        "truncate": lambda: os.truncate(f"/proc/self/fd/{dir_fd}/{name}", 0),
        "utime": lambda: os.utime(name, ns=(1, 1), dir_fd=dir_fd),
    }
    got = {what: errno_of(call) for what, call in calls.items()}
    assert got == dict.fromkeys(calls, errno.ENAMETOOLONG)


def test_names_up_to_255_bytes_and_paths_up_to_4096_bytes(mounted: MountedNode) -> None:
    with opened_dir(mounted.mnt, "", -1) as root:
        os.mkdir("é" * 127 + "x", dir_fd=root)  # 255 UTF-8 bytes
        os.close(os.open("f" * 255, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=root))
        os.rename("f" * 255, "g" * 255, src_dir_fd=root, dst_dir_fd=root)
        too_long_everywhere(root, "g" * 255, "é" * 128)
        # 15 names of 255 bytes and one of 200: a directory at 4040 bytes below the mount
        fd = os.dup(root)
        for name in [chr(ord("a") + i) * 255 for i in range(15)] + ["p" * 200]:
            os.mkdir(name, dir_fd=fd)
            with opened_dir(mounted.mnt, name, fd) as child:
                os.close(fd)
                fd = os.dup(child)
        try:
            fits = "f" * 55  # 4040 + 1 + 55 = 4096 bytes
            os.close(os.open(fits, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            os.truncate(f"/proc/self/fd/{fd}/{fits}", 100)
            os.chmod(fits, 0o600, dir_fd=fd)
            assert os.stat(fits, dir_fd=fd).st_size == 100
            os.symlink("t", "l" * 55, dir_fd=fd)
            os.mkdir("d" * 55, dir_fd=fd)
            # (a new open of the directory: an open one keeps the listing of its opendir)
            assert sorted(os.listdir(f"/proc/self/fd/{fd}")) == ["d" * 55, fits, "l" * 55]
            too_long_everywhere(fd, fits, "f" * 56)
        finally:
            os.close(fd)
        # Moving the deep tree one level down would push its deepest path past 4096 bytes.
        os.mkdir("x", dir_fd=root)
        assert errno_of(lambda: os.rename("a" * 255, "x/" + "a" * 255, src_dir_fd=root,
                                          dst_dir_fd=root)) == errno.ENAMETOOLONG


def test_utimensat_touch_and_nanosecond_times(mounted: MountedNode) -> None:
    f = mounted.mnt / "f"
    f.write_bytes(b"data")
    os.utime(f, ns=(1_000_000_001, YEAR_2100_NS))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, YEAR_2100_NS)
    sh("touch", "-a", "-d", "@5.000000007", f)  # atime only (mtime UTIME_OMIT)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_007, YEAR_2100_NS)
    sh("touch", "-m", f)  # mtime now (UTIME_NOW), atime UTIME_OMIT
    st = os.stat(f)
    assert st.st_atime_ns == 5_000_000_007 and st.st_mtime_ns > 1_700_000_000 * 10**9
    assert st.st_ctime_ns >= st.st_mtime_ns
    sh("touch", "-a", f)  # atime now, mtime kept
    after = os.stat(f)
    assert after.st_atime_ns > 5_000_000_007 and after.st_mtime_ns == st.st_mtime_ns
    sh("touch", "-d", "2100-01-01 00:00:00.123456789 UTC", f)  # both times, past 2038, to the nanosecond
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (YEAR_2100_NS, YEAR_2100_NS)
    # reads do not change atime (noatime); a read makes the kernel ask the daemon again
    assert os.statvfs(mounted.mnt).f_flag & os.ST_NOATIME
    os.utime(f, ns=(7, 8))
    assert f.read_bytes() == b"data"
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (7, 8)
    # Entries hold times from 1970 to 2262: earlier ones are refused, not silently changed.
    assert errno_of(lambda: os.utime(f, ns=(-10**9, -10**9))) == errno.EINVAL
    assert (os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns) == (7, 8)
    # the times replicate with the entry and survive a remount
    mounted.stop()
    mounted.start()
    st = os.stat(mounted.mnt / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (7, 8)


def test_directory_times_and_link_counts(mounted: MountedNode) -> None:
    m = mounted.mnt
    (m / "d").mkdir()
    (m / "e").mkdir()

    def times(p: Path) -> tuple[int, int]:
        st = os.stat(p)
        return st.st_mtime_ns, st.st_ctime_ns

    def changes(p: Path, op: Callable[[], object]) -> bool:
        before = times(p)
        op()
        after = times(p)
        assert (after[0] > before[0]) == (after[1] > before[1]), (before, after)
        return after[0] > before[0]

    assert changes(m / "d", lambda: (m / "d/f").write_bytes(b"x"))
    assert changes(m / "d", lambda: (m / "d/sub").mkdir())
    assert changes(m / "d", lambda: os.symlink("f", m / "d/l"))
    assert changes(m / "d", lambda: os.unlink(m / "d/l"))
    assert changes(m / "d", lambda: os.rmdir(m / "d/sub"))
    assert changes(m / "e", lambda: os.rename(m / "d/f", m / "e/f"))
    assert changes(m / "d", lambda: os.rename(m / "e/f", m / "d/f"))
    # open(O_CREAT) of an existing file is the kernel's lookup + open: the directory stays
    assert not changes(m / "d", lambda: os.close(os.open(m / "d/f", os.O_WRONLY | os.O_CREAT, 0o644)))
    assert not changes(m / "d", lambda: (m / "d/f").write_bytes(b"more"))
    # nlink: 2 + subdirectories for directories, 1 for files
    (m / "d/a/b").mkdir(parents=True)
    (m / "d/c").mkdir()
    assert [os.stat(p).st_nlink for p in (m, m / "d", m / "e", m / "d/a", m / "d/f")] == [4, 4, 2, 3, 1]
    assert changes(m / "e", lambda: os.rename(m / "d/a", m / "e/a"))
    assert [os.stat(p).st_nlink for p in (m, m / "d", m / "e", m / "e/a")] == [4, 3, 3, 3]
    assert sorted(sh("find", m, "-type", "d").split()) == sorted(
        str(p) for p in (m, m / "d", m / "d/c", m / "e", m / "e/a", m / "e/a/b"))

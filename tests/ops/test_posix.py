"""POSIX details a VM host and its tools rely on, at the Vfs and handler level (no kernel):
name and path limits, utimensat times, parent directory times, directory link counts."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable

import pyfuse3
import pytest

from blixfs.entry import MAX_PATH_BYTES, MAX_TIME_NS
from blixfs.errors import FsError
from blixfs.vfs import ROOT_INO, Attr, Vfs
from mount.ops import BlixOperations
from tests.helpers import make_vfs
from tests.ops.test_operations import CTX, Fields

YEAR_2100_NS = 4_102_444_800 * 10**9 + 123_456_789


class SteppingClock:
    """Each reading is 1 µs after the last, so every change gets a distinct time."""

    def __init__(self) -> None:
        self.now = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        self.now += 1000
        return self.now


@pytest.fixture
def vfs() -> Vfs:
    return make_vfs(clock=SteppingClock())


async def errno_of(call: Awaitable[object]) -> int:
    with pytest.raises(FsError) as info:
        await call
    return info.value.errno


async def mkdirs(vfs: Vfs, names: list[str], parent: int = ROOT_INO) -> int:
    for name in names:
        parent = (await vfs.mkdir(parent, name, 0o755, 0, 0)).ino
    return parent


async def touch(vfs: Vfs, parent: int, name: str) -> int:
    fh, attr = await vfs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await vfs.release(fh)
    return attr.ino


# ------------------------------------------------------------ names and paths


async def test_names_of_255_bytes_work_and_longer_ones_are_enametoolong(vfs: Vfs) -> None:
    ok, long = "é" * 127 + "x", "é" * 128  # 255 and 256 UTF-8 bytes
    d = (await vfs.mkdir(ROOT_INO, ok, 0o755, 0, 0)).ino
    f = await touch(vfs, d, ok)
    await vfs.symlink(d, "l" * 255, ok, 0, 0)
    await vfs.rename(d, ok, d, "r" * 255)
    assert (await vfs.lookup(d, "r" * 255)).ino == f
    for call in (vfs.mkdir(d, long, 0o755, 0, 0), vfs.create(d, long, 0o644, os.O_WRONLY, 0, 0),
                 vfs.symlink(d, long, "t", 0, 0), vfs.rename(d, "r" * 255, d, long),
                 vfs.rename(d, long, d, "x"), vfs.unlink(d, long), vfs.rmdir(d, long), vfs.lookup(d, long)):
        assert await errno_of(call) == errno.ENAMETOOLONG
    assert [e.name for e in vfs.namespace.children(ok)] == ["l" * 255, "r" * 255]


async def deep_dir(vfs: Vfs) -> tuple[int, str]:
    """A directory whose path is 4040 bytes: 15 names of 255 bytes and one of 200."""
    names = [chr(ord("a") + i) * 255 for i in range(15)] + ["p" * 200]
    ino = await mkdirs(vfs, names)
    path = "/".join(names)
    assert len(path) == 4040
    return ino, path


async def test_paths_of_4096_bytes_work_and_longer_ones_are_enametoolong(vfs: Vfs) -> None:
    d, path = await deep_dir(vfs)
    fits, over = "f" * 55, "f" * 56  # the child's path: 4040 + 1 + 55 = 4096 bytes, then 4097
    await touch(vfs, d, fits)
    await vfs.unlink(d, fits)
    await vfs.mkdir(d, fits, 0o755, 0, 0)
    await vfs.rmdir(d, fits)
    await vfs.symlink(d, fits, "t", 0, 0)
    assert len(vfs.namespace.children(path)[0].path) == MAX_PATH_BYTES
    for call in (vfs.mkdir(d, over, 0o755, 0, 0), vfs.create(d, over, 0o644, os.O_WRONLY, 0, 0),
                 vfs.symlink(d, over, "t", 0, 0), vfs.rename(d, fits, d, over), vfs.unlink(d, over),
                 vfs.lookup(d, over)):
        assert await errno_of(call) == errno.ENAMETOOLONG
    assert [e.name for e in vfs.namespace.children(path)] == [fits]


async def test_renaming_a_directory_never_pushes_a_path_past_4096_bytes(vfs: Vfs) -> None:
    d, path = await deep_dir(vfs)
    await touch(vfs, d, "f" * 55)  # 4096 bytes
    top = "a" * 255
    x = (await vfs.mkdir(ROOT_INO, "x", 0o755, 0, 0)).ino
    # The directory's new path is short, but its deepest descendant's would be 4098 bytes:
    # peers refuse such entries, so the rename is refused here.
    assert await errno_of(vfs.rename(ROOT_INO, top, x, top)) == errno.ENAMETOOLONG
    assert await errno_of(vfs.rename(d, "f" * 55, d, "f" * 56)) == errno.ENAMETOOLONG
    assert vfs.namespace.get(path + "/" + "f" * 55) is not None and vfs.namespace.children("x") == []
    await vfs.rename(ROOT_INO, top, ROOT_INO, "b" * 254 + "z")  # same length: fine
    assert vfs.namespace.get("b" * 254 + "z" + path[255:] + "/" + "f" * 55) is not None


# ------------------------------------------------------------------- times


async def test_utimens_keeps_nanoseconds_and_atime_independent_of_mtime(vfs: Vfs) -> None:
    ino = await touch(vfs, ROOT_INO, "f")
    created = await vfs.getattr(ino)
    assert created.atime_ns == created.mtime_ns
    a = await vfs.setattr(ino, atime_ns=1_000_000_001, mtime_ns=YEAR_2100_NS)  # touch -d / os.utime(ns=...)
    assert (a.atime_ns, a.mtime_ns) == (1_000_000_001, YEAR_2100_NS)
    a = await vfs.setattr(ino, atime_ns=5_000_000_007)  # touch -a: mtime kept
    assert (a.atime_ns, a.mtime_ns) == (5_000_000_007, YEAR_2100_NS)
    a = await vfs.setattr(ino, mtime_ns=7_000_000_009)  # touch -m: atime kept
    assert (a.atime_ns, a.mtime_ns) == (5_000_000_007, 7_000_000_009)
    # it is in the entry (so it replicates and survives a remount), and reads do not change it (noatime)
    fh = await vfs.open(ino, os.O_RDONLY)
    await vfs.read(fh, 0, 10)
    await vfs.release(fh)
    e = vfs.namespace.get("f")
    assert e is not None and (e.atime_ns, e.mtime_ns) == (5_000_000_007, 7_000_000_009)
    # writes change mtime and leave an explicitly set atime alone
    fh = await vfs.open(ino, os.O_WRONLY)
    await vfs.write(fh, 0, b"data")
    await vfs.release(fh)
    a = await vfs.getattr(ino)
    assert a.atime_ns == 5_000_000_007 and a.mtime_ns > 7_000_000_009 and a.ctime_ns >= a.mtime_ns


async def test_atime_equal_to_mtime_is_stored_as_unset(vfs: Vfs) -> None:
    ino = await touch(vfs, ROOT_INO, "f")
    await vfs.setattr(ino, atime_ns=YEAR_2100_NS, mtime_ns=YEAR_2100_NS)  # plain `touch`: both now
    e = vfs.namespace.get("f")
    # nodes that predate atime can still verify this entry
    assert e is not None and e.atime_ns is None and b"atime_ns" not in e.canonical()
    assert (await vfs.getattr(ino)).atime_ns == YEAR_2100_NS


async def test_utimens_of_a_directory_and_of_an_open_file(vfs: Vfs) -> None:
    d = (await vfs.mkdir(ROOT_INO, "d", 0o755, 0, 0)).ino
    a = await vfs.setattr(d, atime_ns=3, mtime_ns=4)
    assert (a.atime_ns, a.mtime_ns) == (3, 4)
    fh, attr = await vfs.create(ROOT_INO, "f", 0o644, os.O_RDWR, 0, 0)
    await vfs.write(fh, 0, b"x")
    await vfs.setattr(attr.ino, atime_ns=11, mtime_ns=12)  # before the file's commit: kept by it
    await vfs.release(fh)
    e = vfs.namespace.get("f")
    assert e is not None and (e.atime_ns, e.mtime_ns, e.size) == (11, 12, 1)


async def test_times_an_entry_cannot_hold_are_refused(vfs: Vfs) -> None:
    ino = await touch(vfs, ROOT_INO, "f")
    before = vfs.namespace.get("f")
    assert await errno_of(vfs.setattr(ino, mtime_ns=-1)) == errno.EINVAL
    assert await errno_of(vfs.setattr(ino, atime_ns=-10**18)) == errno.EINVAL
    assert await errno_of(vfs.setattr(ino, mtime_ns=MAX_TIME_NS + 1)) == errno.EOVERFLOW
    assert vfs.namespace.get("f") == before
    a = await vfs.setattr(ino, atime_ns=MAX_TIME_NS, mtime_ns=0)
    assert (a.atime_ns, a.mtime_ns) == (MAX_TIME_NS, 0)


async def test_setattr_handler_passes_atime_and_mtime() -> None:
    ops = BlixOperations(make_vfs())
    fi, attr = await ops.create(ROOT_INO, b"f", 0o644 | stat.S_IFREG, os.O_RDWR, CTX)
    await ops.release(fi.fh)
    new = pyfuse3.EntryAttributes()
    new.st_atime_ns = 1_234_567_891
    new.st_mtime_ns = 2_345_678_912
    out = await ops.setattr(attr.st_ino, new, Fields(update_atime=True), None, CTX)  # type: ignore[arg-type]
    assert out.st_atime_ns == 1_234_567_891 and out.st_mtime_ns == attr.st_mtime_ns
    out = await ops.setattr(attr.st_ino, new, Fields(update_mtime=True), None, CTX)  # type: ignore[arg-type]
    assert (out.st_atime_ns, out.st_mtime_ns) == (1_234_567_891, 2_345_678_912)


# ------------------------------------------------ parent directory times


async def changes_times(vfs: Vfs, ino: int, op: Callable[[], Awaitable[object]]) -> bool:
    before = await vfs.getattr(ino)
    await op()
    after = await vfs.getattr(ino)
    assert (after.mtime_ns > before.mtime_ns) == (after.ctime_ns > before.ctime_ns)
    return after.mtime_ns > before.mtime_ns


async def test_parent_times_follow_every_name_change_and_only_those(vfs: Vfs) -> None:
    d = (await vfs.mkdir(ROOT_INO, "d", 0o755, 0, 0)).ino
    e = (await vfs.mkdir(ROOT_INO, "e", 0o755, 0, 0)).ino
    assert await changes_times(vfs, d, lambda: vfs.mkdir(d, "sub", 0o755, 0, 0))
    assert await changes_times(vfs, d, lambda: touch(vfs, d, "f"))
    assert await changes_times(vfs, d, lambda: vfs.symlink(d, "l", "f", 0, 0))
    assert await changes_times(vfs, d, lambda: vfs.rename(d, "l", d, "l2"))
    assert await changes_times(vfs, d, lambda: vfs.unlink(d, "l2"))
    assert await changes_times(vfs, d, lambda: vfs.rmdir(d, "sub"))
    # a cross-directory rename changes both parents
    assert await changes_times(vfs, e, lambda: vfs.rename(d, "f", e, "f"))
    assert await changes_times(vfs, d, lambda: vfs.rename(e, "f", d, "f"))
    # opening, writing, chmod of a child do not
    f = (await vfs.lookup(d, "f")).ino

    async def write() -> None:
        fh = await vfs.open(f, os.O_WRONLY)
        await vfs.write(fh, 0, b"x")
        await vfs.release(fh)

    assert not await changes_times(vfs, d, write)
    assert not await changes_times(vfs, d, lambda: vfs.setattr(f, mode=0o600))


async def test_create_of_an_existing_name_opens_it_unless_o_excl(vfs: Vfs) -> None:
    # The kernel sends create only after its lookup missed; a peer may have made the name since.
    d = (await vfs.mkdir(ROOT_INO, "d", 0o755, 0, 0)).ino
    ino = await touch(vfs, d, "f")
    fh = await vfs.open(ino, os.O_WRONLY)
    await vfs.write(fh, 0, b"kept")
    await vfs.release(fh)

    async def create_again() -> None:
        fh, attr = await vfs.create(d, "f", 0o600, os.O_RDWR | os.O_CREAT, 0, 0)
        assert attr.ino == ino and attr.size == 4 and stat.S_IMODE(attr.mode) == 0o644
        assert await vfs.read(fh, 0, 10) == b"kept"
        await vfs.release(fh)

    assert not await changes_times(vfs, d, create_again)
    assert await errno_of(vfs.create(d, "f", 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0, 0)) == errno.EEXIST
    assert await errno_of(vfs.create(ROOT_INO, "d", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)) == errno.EISDIR


# ------------------------------------------------------------- link counts


async def nlinks(vfs: Vfs, *inos: int) -> list[int]:
    return [(await vfs.getattr(i)).nlink for i in inos]


async def test_directory_nlink_is_two_plus_subdirectories(vfs: Vfs) -> None:
    a = (await vfs.mkdir(ROOT_INO, "a", 0o755, 0, 0)).ino
    b = (await vfs.mkdir(ROOT_INO, "b", 0o755, 0, 0)).ino
    moving = await mkdirs(vfs, ["m", "inner"], a)  # a/m/inner
    m = (await vfs.lookup(a, "m")).ino
    f = await touch(vfs, a, "file")
    link = (await vfs.symlink(a, "link", "file", 0, 0)).ino
    assert await nlinks(vfs, ROOT_INO, a, b, m, moving, f, link) == [4, 3, 2, 3, 2, 1, 1]
    await vfs.rename(a, "m", b, "m")  # a directory moves between parents: both counts follow
    assert await nlinks(vfs, ROOT_INO, a, b, m) == [4, 2, 3, 3]
    await vfs.rename(ROOT_INO, "b", a, "b")
    assert await nlinks(vfs, ROOT_INO, a, b) == [3, 3, 3]
    await vfs.rmdir(moving_parent := m, "inner")
    assert await nlinks(vfs, moving_parent) == [2]
    listing: dict[str, Attr] = dict(await vfs.readdir(a))
    assert {name: attr.nlink for name, attr in listing.items()} == {"b": 3, "file": 1, "link": 1}

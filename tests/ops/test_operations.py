"""FUSE handlers called directly (no kernel) over in-memory stores."""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest

from blixfs import metrics
from blixfs.chunkstore import BLOCK_SIZE, DiskChunkStore, MemoryChunkStore
from blixfs.entry import Entry, Kind
from blixfs.errors import FsError
from blixfs.manifest import MAX_FILE_SIZE, MIN_CHUNK_SIZE, max_file_size
from blixfs.replica import NamespaceKeys
from blixfs.vfs import ROOT_INO, Vfs
from mount.ops import BlixOperations
from tests.helpers import make_replica, make_vfs, write_file

CS = MIN_CHUNK_SIZE


@dataclass
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


CTX = Ctx()


@dataclass
class Fields:
    """Stands in for pyfuse3.SetattrFields, whose attributes only the kernel side can set."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


@pytest.fixture
def ops() -> BlixOperations:
    vfs = make_vfs(chunk_size=CS, max_dirty_bytes=8 * CS)
    return BlixOperations(vfs)


async def create(ops: BlixOperations, name: bytes, parent: int = ROOT_INO) -> tuple[int, int]:
    fi, attr = await ops.create(parent, name, 0o644 | stat.S_IFREG, os.O_RDWR, CTX)
    return fi.fh, attr.st_ino


async def errno_of(coro: object) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro  # type: ignore[misc]
    return info.value.errno


async def test_write_read_flush_and_second_handle_sees_writes(ops: BlixOperations) -> None:
    fh, ino = await create(ops, b"img")
    data = os.urandom(5 * CS + 17)
    assert await ops.write(fh, 0, data) == len(data)
    fi2 = await ops.open(ino, os.O_RDONLY, CTX)
    assert await ops.read(fi2.fh, 0, len(data) + 100) == data  # not yet flushed, same inode
    await ops.flush(fh)
    await ops.release(fh)
    await ops.release(fi2.fh)
    attr = await ops.getattr(ino, CTX)
    assert attr.st_size == len(data)
    fi3 = await ops.open(ino, os.O_RDONLY, CTX)
    assert await ops.read(fi3.fh, CS - 3, 10) == data[CS - 3 : CS + 7]


async def test_fs_errors_become_fuse_errors(ops: BlixOperations) -> None:
    assert await errno_of(ops.lookup(ROOT_INO, b"missing", CTX)) == errno.ENOENT
    await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)
    assert await errno_of(ops.mkdir(ROOT_INO, b"d", 0o755, CTX)) == errno.EEXIST
    assert await errno_of(ops.lookup(ROOT_INO, b"x" * 256, CTX)) == errno.ENAMETOOLONG
    assert await errno_of(ops.lookup(ROOT_INO, b"\xff\xfe", CTX)) == errno.EINVAL
    assert await errno_of(ops.read(999, 0, 10)) == errno.EBADF


async def test_unexpected_exception_is_logged_as_eio_and_the_mount_stays_up(
    ops: BlixOperations, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(ino: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.vfs, "getattr", boom)
    before = metrics.counter_value(metrics.fuse_errors)
    assert await errno_of(ops.getattr(ROOT_INO, CTX)) == errno.EIO
    assert "unexpected error in FUSE getattr" in caplog.text and "a bug" in caplog.text
    assert metrics.counter_value(metrics.fuse_errors) == before + 1
    monkeypatch.undo()
    assert (await ops.getattr(ROOT_INO, CTX)).st_ino == ROOT_INO


async def test_rename_rules(ops: BlixOperations) -> None:
    d = (await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)).st_ino
    e = (await ops.mkdir(ROOT_INO, b"e", 0o755, CTX)).st_ino
    fh, f = await create(ops, b"f", d)
    await ops.write(fh, 0, b"hello")
    await ops.release(fh)
    fh, _ = await create(ops, b"g", ROOT_INO)
    await ops.release(fh)
    assert await errno_of(ops.rename(ROOT_INO, b"g", ROOT_INO, b"d", 0, CTX)) == errno.EISDIR
    assert await errno_of(ops.rename(ROOT_INO, b"e", ROOT_INO, b"d", 0, CTX)) == errno.ENOTEMPTY
    assert await errno_of(ops.rename(ROOT_INO, b"d", ROOT_INO, b"g", 0, CTX)) == errno.ENOTDIR
    assert await errno_of(ops.rename(ROOT_INO, b"d", d, b"inside", 0, CTX)) == errno.EINVAL
    assert await errno_of(ops.rename(ROOT_INO, b"g", d, b"f", pyfuse3.RENAME_NOREPLACE, CTX)) == errno.EEXIST
    # a directory moves with its content and keeps its inode numbers
    await ops.rename(ROOT_INO, b"d", e, b"moved", 0, CTX)
    assert (await ops.lookup(e, b"moved", CTX)).st_ino == d
    assert (await ops.lookup(d, b"f", CTX)).st_ino == f
    assert await errno_of(ops.lookup(ROOT_INO, b"d", CTX)) == errno.ENOENT
    # rename over an existing file replaces it
    await ops.rename(ROOT_INO, b"g", d, b"f", 0, CTX)
    assert (await ops.getattr(await_ino(await ops.lookup(d, b"f", CTX)), CTX)).st_size == 0
    assert [x.path for x in ops.vfs.namespace.children("e/moved")] == ["e/moved/f"]


def await_ino(attr: pyfuse3.EntryAttributes) -> int:
    return attr.st_ino


async def test_unlinked_open_file_stays_usable_and_is_not_resurrected(ops: BlixOperations) -> None:
    fh, _ino = await create(ops, b"tmp")
    await ops.write(fh, 0, b"abc")
    await ops.unlink(ROOT_INO, b"tmp", CTX)
    await ops.write(fh, 3, b"def")
    assert await ops.read(fh, 0, 10) == b"abcdef"
    await ops.flush(fh)
    await ops.release(fh)
    assert ops.vfs.namespace.get("tmp") is None
    assert await errno_of(ops.rmdir(ROOT_INO, b"tmp", CTX)) == errno.ENOENT


async def test_rmdir_and_unlink_type_checks(ops: BlixOperations) -> None:
    d = (await ops.mkdir(ROOT_INO, b"d", 0o755, CTX)).st_ino
    fh, _ = await create(ops, b"x", d)
    await ops.release(fh)
    assert await errno_of(ops.rmdir(ROOT_INO, b"d", CTX)) == errno.ENOTEMPTY
    assert await errno_of(ops.unlink(ROOT_INO, b"d", CTX)) == errno.EISDIR
    assert await errno_of(ops.rmdir(d, b"x", CTX)) == errno.ENOTDIR
    await ops.unlink(d, b"x", CTX)
    await ops.rmdir(ROOT_INO, b"d", CTX)
    assert ops.vfs.namespace.children("") == []


async def test_xattrs_and_image_metadata(ops: BlixOperations) -> None:
    fh, ino = await create(ops, b"ubuntu.qcow2")
    await ops.release(fh)
    await ops.setxattr(ino, b"user.blixfs.os", b"linux", CTX)
    await ops.setxattr(ino, b"user.blixfs.tags", b"lts,cloud", CTX)
    await ops.setxattr(ino, b"user.note", b"\x00bin", CTX)
    assert await ops.getxattr(ino, b"user.blixfs.os", CTX) == b"linux"
    assert await ops.getxattr(ino, b"user.note", CTX) == b"\x00bin"
    assert set(await ops.listxattr(ino, CTX)) == {b"user.blixfs.os", b"user.blixfs.tags", b"user.note"}
    entry = ops.vfs.namespace.get("ubuntu.qcow2")
    assert entry is not None and entry.meta == {"os": "linux", "tags": "lts,cloud"}
    assert await errno_of(ops.getxattr(ino, b"security.capability", CTX)) == errno.ENODATA
    assert await errno_of(ops.setxattr(ino, b"trusted.x", b"1", CTX)) == errno.ENOTSUP
    assert await errno_of(ops.setxattr(ino, b"user.blixfs.colour", b"red", CTX)) == errno.EINVAL
    assert await errno_of(ops.setxattr(ino, b"user.big", b"x" * (65 * 1024), CTX)) == errno.E2BIG
    await ops.removexattr(ino, b"user.blixfs.os", CTX)
    assert await errno_of(ops.getxattr(ino, b"user.blixfs.os", CTX)) == errno.ENODATA
    assert await errno_of(ops.removexattr(ino, b"user.nothing", CTX)) == errno.ENODATA


async def test_full_store_gives_enospc_and_loses_nothing(ops: BlixOperations) -> None:
    store = ops.vfs.chunks
    assert isinstance(store, MemoryChunkStore)
    fh, ino = await create(ops, b"big")
    data = os.urandom(20 * CS)
    await ops.write(fh, 0, data[: 4 * CS])
    store.fail_with = errno.ENOSPC
    # more than max_dirty_bytes forces a spill to the (full) store
    assert await errno_of(ops.write(fh, 4 * CS, data[4 * CS :])) == errno.ENOSPC
    assert await errno_of(ops.flush(fh)) == errno.ENOSPC
    assert await ops.read(fh, 0, 4 * CS) == data[: 4 * CS]  # the accepted part is still there
    store.fail_with = None
    await ops.write(fh, 4 * CS, data[4 * CS :])
    await ops.flush(fh)
    await ops.release(fh)
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, len(data)) == data


async def test_read_only_capability_refuses_writes_with_erofs(ops: BlixOperations) -> None:
    fh, ino = await create(ops, b"f")
    await ops.release(fh)
    ops.vfs.replica.keys = NamespaceKeys(ops.vfs.replica.keys.id)  # read capability only
    assert await errno_of(ops.open(ino, os.O_WRONLY, CTX)) == errno.EROFS
    assert await errno_of(ops.mkdir(ROOT_INO, b"d", 0o755, CTX)) == errno.EROFS
    assert await errno_of(ops.unlink(ROOT_INO, b"f", CTX)) == errno.EROFS
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 1) == b""


async def test_missing_chunk_reads_eio_never_wrong_bytes(ops: BlixOperations, caplog: pytest.LogCaptureFixture) -> None:
    fh, ino = await create(ops, b"f")
    await ops.write(fh, 0, os.urandom(3 * CS))
    await ops.release(fh)
    entry = ops.vfs.namespace.get("f")
    assert entry is not None and entry.manifest is not None
    manifest = ops.vfs.content.manifest(entry.manifest)
    ops.vfs.chunks.delete(manifest.ids[1])
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    assert len(await ops.read(fi.fh, 0, CS)) == CS
    assert await errno_of(ops.read(fi.fh, CS, CS)) == errno.EIO
    assert "not held by this node" in caplog.text


async def test_truncate_closed_file_commits(ops: BlixOperations) -> None:
    fh, ino = await create(ops, b"t")
    await ops.write(fh, 0, b"x" * (2 * CS))
    await ops.release(fh)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = CS + 1
    fields = Fields(update_size=True)
    assert (await ops.setattr(ino, attr, fields, None, CTX)).st_size == CS + 1  # type: ignore[arg-type]
    entry = ops.vfs.namespace.get("t")
    assert entry is not None and entry.size == CS + 1


async def test_vfs_raises_only_fserror_for_bad_handles() -> None:
    vfs = make_vfs()
    with pytest.raises(FsError):
        await vfs.release(42)


async def test_sizes_beyond_the_maximum_give_efbig_at_once_and_change_nothing(ops: BlixOperations) -> None:
    limit = max_file_size(CS)  # the largest file whose manifest the chunk store can hold
    assert limit <= MAX_FILE_SIZE
    fh, ino = await create(ops, b"f")
    await ops.write(fh, 0, b"abc")
    for size in (1 << 50, MAX_FILE_SIZE + 1, limit + 1):
        attr = pyfuse3.EntryAttributes()
        attr.st_size = size
        fields = Fields(update_size=True)
        assert await errno_of(ops.setattr(ino, attr, fields, fh, CTX)) == errno.EFBIG  # type: ignore[arg-type]
        assert await errno_of(ops.write(fh, size - 1, b"x")) == errno.EFBIG
    assert await errno_of(ops.write(fh, limit - 1, b"xy")) == errno.EFBIG
    assert (await ops.getattr(ino, CTX)).st_size == 3
    assert await ops.read(fh, 0, 10) == b"abc"
    await ops.release(fh)
    entry = ops.vfs.namespace.get("f")
    assert entry is not None and entry.size == 3
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 1 << 50
    assert await errno_of(ops.setattr(ino, attr, Fields(update_size=True), None, CTX)) == errno.EFBIG  # type: ignore[arg-type]
    assert (await ops.getattr(ino, CTX)).st_size == 3


async def test_a_file_of_the_maximum_size_commits(tmp_path: Path) -> None:
    vfs = Vfs(make_replica(), DiskChunkStore(tmp_path / "c"), chunk_size=CS)
    limit = max_file_size(CS)
    fh, attr = await vfs.create(ROOT_INO, "big", 0o644, os.O_RDWR, 0, 0)
    await vfs.setattr(attr.ino, size=limit - 1)
    await vfs.write(fh, limit - 1, b"z")  # the last byte the maximum allows
    await vfs.release(fh)
    entry = vfs.namespace.get("big")
    assert entry is not None and entry.size == limit


async def test_large_sparse_files_within_the_maximum_are_accepted() -> None:
    vfs = make_vfs()  # 256 KiB chunks: the bound is about 114 GiB
    fh, attr = await vfs.create(ROOT_INO, "disk.img", 0o644, os.O_RDWR, 0, 0)
    await vfs.setattr(attr.ino, size=100 << 30)
    await vfs.write(fh, (100 << 30) - 1, b"z")
    await vfs.release(fh)
    entry = vfs.namespace.get("disk.img")
    assert entry is not None and entry.size == 100 << 30


async def test_a_stored_root_that_is_not_a_directory_never_replaces_the_root() -> None:
    # A store can hold one from a peer older than the check that now refuses it (replica.check_entry).
    vfs = make_vfs()
    await write_file(vfs, "kept", b"data")
    ts = time.time_ns()
    vfs.namespace.apply([Entry(path="", kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=0, mtime_ns=ts,
                               ctime_ns=ts, author=bytes(32), timestamp_ns=ts)])
    attr = await vfs.getattr(ROOT_INO)
    assert stat.S_ISDIR(attr.mode)
    assert [name for name, _ in await vfs.readdir(ROOT_INO)] == ["kept"]
    await vfs.setattr(ROOT_INO, mode=0o700)  # a local change of the root supersedes it with a directory
    root = vfs.namespace.get("")
    assert root is not None and root.kind is Kind.DIR and stat.S_IMODE(root.mode) == 0o700


async def test_small_reads_of_clean_chunks_read_only_their_blocks(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 KiB read of a 256 KiB chunk held here reads the blocks covering it, not the whole chunk;
    a block found corrupt makes the read EIO (no peer here), never other bytes."""
    store = DiskChunkStore(tmp_path / "c")
    vfs = Vfs(make_replica(), store, chunk_size=256 * 1024)
    data = os.urandom(3 * 256 * 1024 + 1000)
    await write_file(vfs, "img", data)
    fh = await vfs.open((await vfs.lookup(ROOT_INO, "img")).ino, os.O_RDONLY)
    whole: list[object] = []
    real_get = store.get
    monkeypatch.setattr(store, "get", lambda cid: whole.append(cid) or real_get(cid))
    for off in (0, 4096, 256 * 1024 - 2048, 700_000, 3 * 256 * 1024 - 4096):
        assert await vfs.read(fh, off, 4096) == data[off : off + 4096]
    assert whole == []
    # A part of a quarter of its chunk or more (here the 1000-byte last chunk) reads it whole, kept in memory.
    assert await vfs.read(fh, len(data) - 4096, 4096) == data[-4096:] and len(whole) == 1
    for cid in store.ids():  # one bit of block 1 of every full chunk
        path = store.root / cid.hex()[:2] / cid.hex()
        raw = bytearray(path.read_bytes())
        if len(raw) > 256 * 1024:
            raw[16 + BLOCK_SIZE + 8 + 8 + 5] ^= 1
            path.write_bytes(raw)
    assert await vfs.read(fh, 0, 4096) == data[:4096]  # block 0 checks
    with pytest.raises(FsError) as info:
        await vfs.read(fh, 256 * 1024 + BLOCK_SIZE, 4096)
    assert info.value.errno == errno.EIO
    await vfs.release(fh)

"""pyfuse3 handlers: translate each FUSE request into one `blixfs.vfs.Vfs` call.

Handlers hold no filesystem logic. Errors leave through `_translated`, the one
place that turns `FsError` into `pyfuse3.FUSEError(errno)` and any other
exception into a logged EIO, so an unexpected bug fails one request, never the
mount; it also times every request (``blixfs_fuse_request_duration_seconds{op}``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from blixfs import metrics
from blixfs.errors import FsError
from blixfs.vfs import Attr, Vfs

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Local changes go through the kernel, which updates its caches itself; peers'
# changes (the replication issue) invalidate explicitly. So caching long is safe.
ATTR_TIMEOUT = 60.0
ENTRY_TIMEOUT = 60.0


def _translated(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    # Every answer, error or not, is timed under the handler's name (a fixed set of labels).
    timer = metrics.fuse_request_seconds.labels(fn.__name__)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except FsError as exc:
            level = logging.WARNING if exc.errno in (errno.EIO, errno.ENOSPC) else logging.DEBUG
            log.log(level, "%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            metrics.fuse_errors.inc()
            log.exception("unexpected error in FUSE %s; answering EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            timer.observe(time.perf_counter() - started)

    return wrapper


def _name(raw: bytes) -> str:
    # surrogateescape keeps non-UTF-8 bytes visible to the core, which rejects them with EINVAL.
    return raw.decode("utf-8", "surrogateescape")


def to_entry_attributes(attr: Attr) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = pyfuse3.InodeT(attr.ino)
    out.generation = 0
    out.entry_timeout = ENTRY_TIMEOUT
    out.attr_timeout = ATTR_TIMEOUT
    out.st_mode = pyfuse3.ModeT(attr.mode)
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = 0
    out.st_size = attr.size
    out.st_blksize = 128 * 1024
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.atime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.ctime_ns
    return out


class BlixOperations(pyfuse3.Operations):
    """The FUSE face of a `Vfs`. ``direct_io`` forces FOPEN_DIRECT_IO on every open;
    otherwise only opens with O_DIRECT (qemu cache=none) bypass the page cache."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, vfs: Vfs, *, direct_io: bool = False) -> None:
        super().__init__()
        self.vfs = vfs
        self.direct_io = direct_io
        self._listings: dict[int, list[tuple[str, Attr]]] = {}
        self._next_dir_fh = 1

    def _file_info(self, fh: int, flags: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(fh),
            direct_io=self.direct_io or bool(flags & os.O_DIRECT),
            keep_cache=True,
        )

    @_translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return to_entry_attributes(await self.vfs.lookup(parent_inode, _name(name)))

    @_translated
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return to_entry_attributes(await self.vfs.getattr(inode))

    @_translated
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        result = await self.vfs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return to_entry_attributes(result)

    @_translated
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(await self.vfs.readlink(inode))

    @_translated
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return to_entry_attributes(await self.vfs.mkdir(parent_inode, _name(name), mode, ctx.uid, ctx.gid))

    @_translated
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        attr = await self.vfs.symlink(parent_inode, _name(name), os.fsdecode(target), ctx.uid, ctx.gid)
        return to_entry_attributes(attr)

    @_translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.unlink(parent_inode, _name(name))

    @_translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.rmdir(parent_inode, _name(name))

    @_translated
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        await self.vfs.rename(
            parent_inode_old, _name(name_old), parent_inode_new, _name(name_new),
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE), exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
        )

    @_translated
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.vfs.create(parent_inode, _name(name), mode, flags, ctx.uid, ctx.gid)
        return self._file_info(fh, flags), to_entry_attributes(attr)

    @_translated
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return self._file_info(await self.vfs.open(inode, flags), flags)

    @_translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.vfs.read(fh, off, size)

    @_translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    @_translated
    async def flush(self, fh: int) -> None:
        await self.vfs.flush(fh)

    @_translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(fh, datasync)

    @_translated
    async def release(self, fh: int) -> None:
        await self.vfs.release(fh)

    @_translated
    async def opendir(self, inode: int, ctx: Any) -> int:
        # Snapshot the listing so a directory read in several requests is consistent.
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._listings[fh] = await self.vfs.readdir(inode)
        return pyfuse3.FileHandleT(fh)

    @_translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._listings.get(fh, [])
        for i in range(start_id, len(listing)):
            name, attr = listing[i]
            if not pyfuse3.readdir_reply(token, name.encode("utf-8", "surrogateescape"),
                                         to_entry_attributes(attr), i + 1):
                break

    @_translated
    async def releasedir(self, fh: int) -> None:
        self._listings.pop(fh, None)

    @_translated
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # Namespace changes are committed as they happen; nothing is buffered per directory.
        return None

    @_translated
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await self.vfs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.block_size
        out.f_frsize = st.block_size
        out.f_blocks = st.blocks
        out.f_bfree = st.blocks_free
        out.f_bavail = st.blocks_avail
        out.f_files = st.files + st.files_free
        out.f_ffree = st.files_free
        out.f_favail = st.files_free
        out.f_namemax = st.name_max
        return out

    @_translated
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.vfs.getxattr(inode, _name(name))

    @_translated
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.vfs.setxattr(inode, _name(name), value)

    @_translated
    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return [n.encode() for n in await self.vfs.listxattr(inode)]

    @_translated
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.removexattr(inode, _name(name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inode numbers live as long as the mount (see InodeTable): nothing to release.
        return None

#!/usr/bin/env python3
"""The FUSE floor: a pyfuse3 file system on trio that does nothing but answer.

    .venv/bin/python scripts/fuse_floor.py MOUNTPOINT [--size-mib 1024]

One file, ``bench.bin``, of ``--size-mib`` MiB of zeros: a read is answered from one
constant buffer, with no disk and no blixfs code. `scripts/bench_mount.py` mounts it beside
the blixfs mount and the local disk, so a run shows how much of a 4 KiB O_DIRECT read's time
is the FUSE round trip itself (the kernel, pyfuse3, trio, waking two processes) before any
work of blixfs's. Unmounts on SIGTERM/SIGINT. Needs root (FUSE). Not part of blixfs.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
from typing import Any

import pyfuse3
import trio

FILE_INO = 2
NAME = b"bench.bin"
ZEROS = bytes(1 << 20)


class FloorOperations(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(inode)
        attr.st_mode = pyfuse3.ModeT((stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644))
        attr.st_size = self.size if inode == FILE_INO else 0
        attr.st_nlink = 1
        attr.attr_timeout = attr.entry_timeout = 60.0
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == NAME:
            return await self.getattr(FILE_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(inode), direct_io=bool(flags & os.O_DIRECT))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return ZEROS[: max(0, min(size, self.size - off))]


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mountpoint")
    ap.add_argument("--size-mib", type=int, default=1024, help="size of bench.bin (default 1024)")
    args = ap.parse_args()
    pyfuse3.init(FloorOperations(args.size_mib << 20), args.mountpoint, ["fsname=fuse-floor", "default_permissions"])
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The FUSE floor: a pyfuse3 file system on trio that does nothing but answer.

    .venv/bin/python scripts/fuse_floor.py MOUNTPOINT [--size-mib 1024] [--disk FILE]

One file, ``bench.bin``, of ``--size-mib`` MiB of zeros: a read is answered from one
constant buffer, with no disk and no blixfs code. `scripts/bench_mount.py` mounts it beside
the blixfs mount and the local disk, so a run shows how much of a 4 KiB O_DIRECT read's time
is the FUSE round trip itself (the kernel, pyfuse3, trio, waking two processes) before any
work of blixfs's.

With ``--disk FILE``, each read first reads from FILE what a blixfs range read of the same
bytes reads from a chunk file: the 16 KiB block around them and its 8-byte digest, with
the chunk store's own polled read (`blixfs.chunkstore.PolledReads`, on a descriptor
without read-ahead), and answers with those bytes. That is the ceiling of any daemon that
reads the disk once per request on this stack: the FUSE round trip plus one disk read, and
none of blixfs's lookups, checks or bookkeeping.

Unmounts on SIGTERM/SIGINT. Needs root (FUSE). Not part of blixfs.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from blixfs.chunkstore import BLOCK_SIZE, PolledReads

FILE_INO = 2
NAME = b"bench.bin"
ZEROS = bytes(1 << 20)


class FloorOperations(pyfuse3.Operations):
    def __init__(self, size: int, disk: Path | None = None) -> None:
        super().__init__()
        self.size = size
        self.disk_fd = -1
        if disk is not None:
            self.disk_fd = os.open(disk, os.O_RDONLY)
            os.posix_fadvise(self.disk_fd, 0, 0, os.POSIX_FADV_RANDOM)  # as the chunk store's range reads
        self.polled = PolledReads()

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
        size = max(0, min(size, self.size - off))
        if self.disk_fd < 0:
            return ZEROS[:size]
        first = off // BLOCK_SIZE * BLOCK_SIZE  # the blocks a range read covers, each with its digest
        count = -(-(off + size - first) // BLOCK_SIZE) * (BLOCK_SIZE + 8)
        buf = self.polled.pread(self.disk_fd, count, 16 + first // BLOCK_SIZE * (BLOCK_SIZE + 8))  # past a header
        return bytes(memoryview(buf)[8 + off - first : 8 + off - first + size])


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
    ap.add_argument("--disk", type=Path, default=None,
                    help="answer each read with a read of this file (at least --size-mib MiB), as blixfs reads a chunk")
    args = ap.parse_args()
    ops = FloorOperations(args.size_mib << 20, args.disk)
    pyfuse3.init(ops, args.mountpoint, {"fsname=fuse-floor", "default_permissions"})
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()

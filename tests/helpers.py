"""Builders shared by the test layers."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from blixfs.chunkstore import MemoryChunkStore
from blixfs.crypto import generate_secret
from blixfs.errors import FsError
from blixfs.namespace import MemoryNamespaceStore, NamespaceStore
from blixfs.replica import NamespaceKeys, Replica
from blixfs.vfs import ROOT_INO, Vfs


def make_replica(store: NamespaceStore | None = None, keys: NamespaceKeys | None = None,
                 node_secret: bytes | None = None) -> Replica:
    return Replica(store or MemoryNamespaceStore(), keys or NamespaceKeys.generate(),
                   node_secret or generate_secret())


def make_vfs(**kwargs: Any) -> Vfs:
    """A Vfs over in-memory stores with its own namespace (write capability)."""
    return Vfs(make_replica(), MemoryChunkStore(), **kwargs)


MiB = 1 << 20


def sha256(path: Path) -> str:
    """The sha256 of a file, read in 4 MiB blocks (files here reach 1 GiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def sh(*cmd: str | Path, cwd: Path | None = None) -> str:
    """Run a command (cp, qemu-img, ...), fail on a non-zero exit, return its output."""
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, cwd=cwd).stdout


async def write_file(vfs: Vfs, name: str, data: bytes) -> None:
    """Write ``data`` as the whole content of ``name`` in the root (created if missing), through the VFS."""
    try:
        ino = (await vfs.lookup(ROOT_INO, name)).ino
        fh = await vfs.open(ino, os.O_WRONLY | os.O_TRUNC)
    except FsError:
        fh, _ = await vfs.create(ROOT_INO, name, 0o644, os.O_WRONLY, 0, 0)
    await vfs.write(fh, 0, data)
    await vfs.release(fh)

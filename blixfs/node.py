"""A blixfs node's local state: its home directory, identity and stores.

Home layout (``--home``, ``$BLIXFS_HOME``, else ``$XDG_DATA_HOME/blixfs``)::

    identity.key     the node's iroh secret key (ed25519, 32 bytes, mode 0600)
    chunks/          the DiskChunkStore (one file per chunk + index.db)
    namespace.db     the SqliteNamespaceStore
    daemon.lock      held (flock) by the one daemon using this home

Callers: the CLI (`blixfs mount` opens a `Node` read-write and holds the lock;
`blixfs status` opens the stores without it, since SQLite WAL readers do not
block the writer).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blixfs.chunkstore import DiskChunkStore
from blixfs.errors import FsError
from blixfs.manifest import DEFAULT_CHUNK_SIZE
from blixfs.namespace import SqliteNamespaceStore
from blixfs.net.iroh_transport import load_or_create_secret_key, node_id_from_secret_key
from blixfs.vfs import Vfs

log = logging.getLogger(__name__)


def default_home() -> Path:
    env = os.environ.get("BLIXFS_HOME")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "blixfs"


class HomeLocked(Exception):
    """Another daemon holds this home directory."""


@dataclass
class Node:
    home: Path
    chunks: DiskChunkStore
    namespace: SqliteNamespaceStore
    node_id: bytes
    _lock_fd: int | None = None

    @classmethod
    def open(cls, home: Path, *, lock: bool = True) -> Node:
        """Open (creating on first use) the node at ``home``.

        With ``lock`` the caller becomes the home's one daemon; raises `HomeLocked`
        naming the holder's pid if another process is.
        """
        home.mkdir(parents=True, exist_ok=True)
        lock_fd = cls._lock(home) if lock else None
        try:
            secret = load_or_create_secret_key(home / "identity.key")
            return cls(
                home=home,
                chunks=DiskChunkStore(home / "chunks"),
                namespace=SqliteNamespaceStore(home / "namespace.db"),
                node_id=bytes.fromhex(node_id_from_secret_key(secret)),
                _lock_fd=lock_fd,
            )
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @staticmethod
    def _lock(home: Path) -> int:
        fd = os.open(home / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise HomeLocked(f"another blixfs daemon (pid {holder}) is using {home}; "
                                 f"stop it, or give this one its own --home") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def vfs(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Vfs:
        return Vfs(self.namespace, self.chunks, self.node_id, chunk_size=chunk_size, statfs_path=str(self.home))

    def status(self) -> dict[str, Any]:
        """Figures for `blixfs status`: store size, chunks, files."""
        cs = self.chunks.stats()
        ns = self.namespace.stats()
        return {
            "home": str(self.home),
            "node_id": self.node_id.hex(),
            "store": {"chunks": cs.chunks, "bytes": cs.bytes},
            "namespace": {"files": ns.files, "directories": ns.dirs, "symlinks": ns.symlinks,
                          "file_bytes": ns.file_bytes},
        }

    def close(self) -> None:
        self.namespace.close()
        self.chunks.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def check_home_writable(home: Path) -> None:
    """Raise FsError(EACCES) with a useful message if ``home`` cannot be used."""
    probe = home if home.exists() else home.parent
    if not os.access(probe, os.W_OK):
        raise FsError(errno.EACCES, f"cannot write to {probe}: choose another --home or fix its permissions")

"""A blixfs node's local state: its home directory, identity, namespace and stores.

Home layout (``--home``, ``$BLIXFS_HOME``, else ``$XDG_DATA_HOME/blixfs``)::

    identity.key          the node's iroh secret key (ed25519, 32 bytes, mode 0600)
    chunks/               the DiskChunkStore (one file per chunk + index.db)
    namespace/            the namespace this node serves:
        namespace.id      its id (public key, hex)
        namespace.key     its secret (mode 0600): present only with write capability
        namespace.db      the SqliteNamespaceStore
    peers.json            nodes to sync with (from tickets), "<node id>@ip:port,..." each
    pins.json             namespace paths whose content is never evicted (`blixfs pin`)
    replicas.json         versions this node holds for other nodes' durability (never evicted)
    node.json             settings kept across restarts: the listen address (so tickets stay
                          valid), the cache budget
    daemon.lock           held (flock) by the one daemon using this home
    control.sock          the running daemon's control socket (`blixfs.daemon`)
    journal/              write-ahead journals of files with fsync'd, unpublished writes
                          (`blixfs.journal`), replayed at the next start after a crash

The JSON files are written atomically and durably, each keeping its previous version as
``NAME.bak``; a torn one is logged and its backup read (`blixfs.statefile`). When neither is
readable, peers and settings fall back to defaults (the damaged file is kept as
``NAME.corrupt`` by the next write), while pins and replicas refuse to change and the cache
evicts nothing: forgetting them would drop copies this node promised to keep.

A home created without a ticket starts its own namespace with write capability:
the embedded default, a complete local node with no configuration.

Callers: the CLI (`blixfs mount` opens a `Node` and holds the lock; `blixfs status`
and friends open it without the lock: SQLite WAL readers do not block the writer).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blixfs.cache import CachePolicy
from blixfs.chunkstore import DiskChunkStore
from blixfs.content import read_manifest
from blixfs.errors import FsError
from blixfs.hashing import ChunkId
from blixfs.journal import DEFAULT_MAX_JOURNAL_BYTES, Journal
from blixfs.manifest import DEFAULT_CHUNK_SIZE, ManifestError, iter_tree
from blixfs.namespace import SqliteNamespaceStore
from blixfs.net.iroh_transport import load_or_create_secret_key
from blixfs.net.transport import NodeAddr
from blixfs.replica import NamespaceKeys, Replica
from blixfs.statefile import StateFileError, read_json, write_json
from blixfs.ticket import Ticket
from blixfs.vfs import Vfs

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 10 << 30


def default_home() -> Path:
    env = os.environ.get("BLIXFS_HOME")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "blixfs"


class HomeLocked(Exception):
    """Another daemon holds this home directory."""


class JoinError(Exception):
    """A ticket that cannot be joined on this home, with what to do instead."""


def _valid_replicas(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    try:
        return all(len(bytes.fromhex(k)) == 32 for k in value)
    except ValueError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    home: Path
    chunks: DiskChunkStore
    replica: Replica
    secret: bytes = field(repr=False)
    _lock_fd: int | None = None
    cache: CachePolicy | None = None  # set by `open_cache` (the daemon)

    @property
    def node_id(self) -> bytes:
        return self.replica.author

    @property
    def namespace(self) -> SqliteNamespaceStore:
        store = self.replica.store
        assert isinstance(store, SqliteNamespaceStore)
        return store

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
            chunks = DiskChunkStore(home / "chunks")
            return cls(home=home, chunks=chunks, replica=cls._open_replica(home, secret), secret=secret,
                       _lock_fd=lock_fd)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @staticmethod
    def _open_replica(home: Path, secret: bytes) -> Replica:
        nsdir = home / "namespace"
        if not (nsdir / "namespace.id").exists():
            keys = NamespaceKeys.generate()
            keys.save(nsdir)
            log.info("created namespace %s (this node can write it)", keys.id.hex())
        keys = NamespaceKeys.load(nsdir)
        return Replica(SqliteNamespaceStore(nsdir / "namespace.db"), keys, secret)

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

    # ------------------------------------------------------------ settings

    def _settings(self) -> dict[str, Any]:
        """node.json; unreadable (logged): the defaults, and the next write keeps it as node.json.corrupt."""
        try:
            data: dict[str, Any] = read_json(self.home / "node.json", {}, lambda v: isinstance(v, dict))
        except StateFileError:
            return {}
        return data

    def listen_addr(self) -> str:
        """Where the daemon binds its endpoint: chosen once, then kept so tickets stay valid."""
        settings = self._settings()
        addr = settings.get("listen")
        if not isinstance(addr, str):
            addr = f"127.0.0.1:{_free_port()}"
            self.set_listen_addr(addr)
        return addr

    def set_listen_addr(self, addr: str) -> None:
        settings = self._settings()
        settings["listen"] = addr
        write_json(self.home / "node.json", settings)

    def cache_size(self) -> int:
        """The chunk cache's byte budget (fetched chunks beyond it are evicted, LRU first)."""
        value = self._settings().get("cache_size")
        return int(value) if isinstance(value, int) and value > 0 else DEFAULT_CACHE_SIZE

    def set_cache_size(self, size: int) -> None:
        settings = self._settings()
        settings["cache_size"] = size
        write_json(self.home / "node.json", settings)

    def pins(self) -> list[str]:
        """Namespace paths whose content is never evicted (`blixfs pin`).

        Raises StateFileError when pins.json and its backup are unreadable: then nothing is
        evicted and no pin changes, rather than forgetting them."""
        raw = read_json(self.home / "pins.json", [], lambda v: isinstance(v, list))
        return [str(p) for p in raw]

    def set_pinned(self, path: str, pinned: bool) -> bool:
        """Pin or unpin ``path``; False if nothing changed."""
        pins = self.pins()
        if (path in pins) == pinned:
            return False
        pins = [*pins, path] if pinned else [p for p in pins if p != path]
        write_json(self.home / "pins.json", sorted(pins))
        return True

    def protected_chunks(self) -> set[ChunkId]:
        """Chunks (and manifests) never to evict (`blixfs.cache`): the pinned paths' current
        versions, the replicas this node holds for others, and the versions this node wrote
        that are not durable yet (every chunk of them, cache copies of older versions' too)."""
        manifests = {ChunkId(m) for m in self.replicas()}
        manifests.update(ChunkId(m) for m, durable in self.chunks.written_versions().items() if not durable)
        for path in self.pins():
            e = self.namespace.get(path)
            if e is not None and e.manifest is not None:
                manifests.add(ChunkId(e.manifest))
        protected: set[ChunkId] = set()
        for mid in manifests:
            protected.add(mid)
            m = read_manifest(self.chunks, mid)
            if m is not None:
                # Pages not held here are not here to evict: the walk skips their subtrees.
                try:
                    protected.update(cid for _, _, cid in iter_tree(m, self.chunks.get, on_missing=lambda _: None))
                except ManifestError as exc:
                    log.error("version %s held here has an invalid page: %s", mid.hex()[:12], exc)
        return protected

    def open_cache(self) -> CachePolicy:
        """The cache policy over this node's store, with the budget from node.json; from then
        on a write of unreplicated data over the budget fails with ENOSPC."""
        self.cache = CachePolicy(self.chunks, self.cache_size(), self.protected_chunks)
        return self.cache

    def replicas(self) -> dict[bytes, str]:
        """Manifests this node holds for others' durability (manifest id -> path), kept from eviction.

        Raises StateFileError when replicas.json and its backup are unreadable: this node
        promised to keep those versions, so while they are unknown nothing is evicted, no
        replica is dropped and no new one is accepted (callers' errors are logged)."""
        raw = read_json(self.home / "replicas.json", {}, _valid_replicas)
        return {bytes.fromhex(k): str(v) for k, v in raw.items()}

    def set_replicas(self, replicas: dict[bytes, str]) -> None:
        """Record ``replicas``. Raises StateFileError instead of replacing an unreadable record
        (callers read, change and write: they would drop what they could not read)."""
        self.replicas()
        write_json(self.home / "replicas.json", {k.hex(): v for k, v in sorted(replicas.items())})

    def peers(self) -> list[NodeAddr]:
        """The nodes to sync with. peers.json unreadable (logged): none (LAN discovery still finds
        peers), and the next `add_peer` keeps the damaged file as peers.json.corrupt."""
        try:
            raw = read_json(self.home / "peers.json", [], lambda v: isinstance(v, list))
        except StateFileError:
            return []
        peers = []
        for text in raw:
            try:
                peers.append(NodeAddr.parse(str(text)))
            except ValueError as exc:
                log.warning("ignoring unreadable peer %r in peers.json: %s", text, exc)
        return peers

    def add_peer(self, peer: NodeAddr) -> bool:
        """Remember ``peer`` (replacing its old addresses); False if it is this node."""
        if peer.node_id == self.node_id.hex():
            return False
        peers = [p for p in self.peers() if p.node_id != peer.node_id] + [peer]
        write_json(self.home / "peers.json", [str(p) for p in peers])
        return True

    # ---------------------------------------------------------- namespaces

    def join(self, ticket: Ticket) -> str:
        """Adopt the ticket's namespace (or its capability) and remember its node.

        Raises JoinError when this home already serves another namespace that holds
        entries (one home serves one namespace), or for a ticket bound to another node.
        """
        if ticket.bound is not None and ticket.bound != self.node_id:
            raise JoinError(f"this ticket was made for node {ticket.bound.hex()[:16]}, and this node is "
                            f"{self.node_id.hex()[:16]}: ask for a ticket for this node (blixfs allow)")
        keys = self.replica.keys
        message: str
        if ticket.keys.id == keys.id:
            if ticket.keys.secret is not None and keys.secret is None:
                ticket.keys.save(self.home / "namespace")
                self.replica.keys = ticket.keys
                message = f"namespace {keys.id.hex()[:16]}: write capability added"
            else:
                message = f"namespace {keys.id.hex()[:16]}: already joined"
        else:
            held = sum(1 for _ in self.namespace.entries())
            if held:
                raise JoinError(
                    f"this home already serves namespace {keys.id.hex()} with {held} entries; "
                    f"join with another --home (one home serves one namespace)")
            self.namespace.close()
            shutil.rmtree(self.home / "namespace")
            ticket.keys.save(self.home / "namespace")
            self.replica = self._open_replica(self.home, self.secret)
            mode = "read-write" if ticket.keys.writable else "read-only"
            message = f"joined namespace {ticket.keys.id.hex()[:16]} ({mode})"
        if self.add_peer(ticket.peer):
            message += f"; will sync with {ticket.peer.node_id[:16]}"
        return message

    def vfs(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE, journal_bytes: int = DEFAULT_MAX_JOURNAL_BYTES) -> Vfs:
        """The node's VFS, with its write-ahead journal (``journal/``: fsync without publishing)."""
        return Vfs(self.replica, self.chunks, chunk_size=chunk_size, statfs_path=str(self.home),
                   journal=Journal(self.home / "journal", max_bytes=journal_bytes))

    def status(self) -> dict[str, Any]:
        """Figures for `blixfs status`: store size, chunks, files, namespace, peers."""
        cs = self.chunks.stats()
        ns = self.namespace.stats()
        try:
            pins: list[str] | str = self.pins()
        except StateFileError as exc:  # logged by the read: status still answers
            pins = str(exc)
        keys = self.replica.keys
        return {
            "home": str(self.home),
            "node_id": self.node_id.hex(),
            "namespace": {"id": keys.id.hex(), "capability": "write" if keys.writable else "read",
                          "files": ns.files, "directories": ns.dirs, "symlinks": ns.symlinks,
                          "file_bytes": ns.file_bytes},
            "store": {"chunks": cs.chunks, "bytes": cs.bytes, "cache_budget": self.cache_size(),
                      "pinned": pins},
            "peers": [str(p) for p in self.peers()],
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

"""The virtual filesystem: POSIX operations on a namespace and a chunk store.

`Vfs` is what the FUSE layer (mount/) calls, one method per FUSE operation, in
inode and file-handle terms. It never imports pyfuse3: every failure is an
`FsError` carrying the errno to answer, and attributes are plain `Attr` records.

Concurrency and locking invariants (see docs/design.md, "Locking"):

* Every method runs on the one trio thread of the node. None of them awaits
  between reading and updating shared state (inode table, open contents,
  namespace), so each operation is atomic with respect to the others without
  locks. The methods are ``async`` so that fetching a chunk from a peer (the
  lazy-fetch issue) can await without changing this interface; that await will
  happen before any state is touched.
* All handles of one inode share one `OpenContent`: a write through one fd is
  seen by a read through another at once.
* Written data lives in per-chunk dirty buffers until a commit (flush, fsync,
  release, truncate of a closed file) stores the dirty chunks, then the new
  manifest, then the new entry. Chunks are content-addressed, so storing them
  before the entry commits is harmless if the commit never comes: they are
  unreferenced garbage, never a half-visible file. A commit that fails (ENOSPC)
  leaves the dirty buffers in place, so the next flush can try again.
* fsync is durable. With a journal (`blixfs.journal`, every daemon's Vfs) it appends the
  writes since the last fsync to the file's journal and syncs that: no version is
  published. Versions are published (`_publish`: stored, synced, committed with SQLite
  synchronous=FULL, then the journal dropped) on close, by the daemon's timer
  (`publish_due`), past the journal's bound, before a rename and on `commit_path`.
  Without a journal, fsync publishes. Journals left by a crash are replayed
  (`recover_journals`, and before a file's content is loaded) over the version they name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
from lru import LRU

from blixfs import metrics
from blixfs.chunkstore import ChunkStore
from blixfs.content import Content
from blixfs.entry import (
    COPIES_KEY,
    MAX_COPIES,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    MAX_TIME_NS,
    MAX_XATTR_TOTAL,
    MAX_XATTR_VALUE,
    META_KEYS,
    Entry,
    Kind,
    dominates,
    join,
    parent_of,
    shown_as_conflict,
    write_context,
)
from blixfs.errors import FsError, storage_errno
from blixfs.hashing import HOLE, ChunkId, short
from blixfs.journal import FileJournal, Journal, JournalError, Truncate, read_journal
from blixfs.manifest import (
    DEFAULT_CHUNK_SIZE,
    FANOUT,
    Manifest,
    ManifestError,
    MissingPage,
    check_file_size,
    chunk_count,
    chunk_length,
    lookup,
    path_pages,
    update,
)
from blixfs.namespace import NamespaceStore
from blixfs.replica import Replica
from blixfs.traces import Tracer

log = logging.getLogger(__name__)

ROOT_INO = 1
META_XATTR_PREFIX = "user.blixfs."
USER_XATTR_PREFIX = "user."
DEFAULT_MAX_DIRTY_BYTES = 64 << 20
OPEN_PAGES = 64  # manifest pages an open file keeps for its reads (512 Ki chunk ids: 8 GiB at 256 KiB)
_T = TypeVar("_T")
PATCH_BLOCK = 4096  # a guest's block: writes of whole blocks into a clean chunk are kept as patches
READ_AHEAD_BYTES = 4 << 20  # like the mount's read_ahead_kb: chunks loaded ahead of a sequential reader
_ZEROS = memoryview(bytes(DEFAULT_CHUNK_SIZE * 4))


class _NoJournal:
    """Where the changes of a file without a journal are recorded: nowhere."""

    def record_write(self, offset: int, data: bytes | memoryview) -> None:
        pass

    def record_truncate(self, size: int) -> None:
        pass


_NO_JOURNAL = _NoJournal()


def _available(cid: ChunkId, data: bytes | None) -> bytes:
    """``data``, the bytes of chunk ``cid`` the content layer had; EIO (logged) when it had none:
    not held here and no peer known to hold it."""
    if data is None:
        log.error("chunk %s is not held by this node and no peer is known to hold it", short(cid))
        raise FsError(errno.EIO, f"chunk {short(cid)} is not available")
    return data


def _zeros(n: int) -> bytes | memoryview:
    return _ZEROS[:n] if n <= len(_ZEROS) else bytes(n)


@dataclass(frozen=True, slots=True)
class Attr:
    """What getattr reports for an inode."""

    ino: int
    mode: int  # st_mode, type bits included
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int  # 512-byte units actually stored (holes take none)
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True, slots=True)
class FsStats:
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int


@dataclass(slots=True)
class Patch:
    """Whole `PATCH_BLOCK` blocks written over stored chunk ``base`` (``length`` bytes long),
    kept without loading ``base``: a guest's 4 KiB write into a clean 256 KiB chunk costs
    4 KiB of memory, not a read of the chunk and 256 KiB of dirty buffer. The chunk is
    made whole (``base`` read, blocks laid over it) only when it is stored (spill, commit)
    or written other than by whole blocks (`Vfs._load_chunk`). ``base`` is a hole or held
    here, and kept from eviction and GC while patched (`Vfs.open_chunk_ids`)."""

    base: ChunkId
    length: int
    blocks: dict[int, bytes] = field(default_factory=dict)  # block index -> its bytes

    def nbytes(self) -> int:
        return len(self.blocks) * PATCH_BLOCK


@dataclass(frozen=True, slots=True)
class PatchRead:
    """A read's plan for [within, within + n) of patched chunk ``index``: the base's bytes
    there, with the written blocks (copied when planned) laid over them."""

    index: int
    base: ChunkId
    length: int
    within: int
    n: int
    over: tuple[tuple[int, bytes], ...]  # (offset in the range, bytes)
    covered: bool  # the written blocks cover the whole range: the base is not read

    @classmethod
    def of(cls, index: int, patch: Patch, within: int, n: int) -> PatchRead:
        over, covered = [], 0
        for block in range(within // PATCH_BLOCK, (within + n - 1) // PATCH_BLOCK + 1):
            data = patch.blocks.get(block)
            if data is None:
                continue
            start = max(within, block * PATCH_BLOCK)
            stop = min(within + n, block * PATCH_BLOCK + len(data))
            if start < stop:
                over.append((start - within, data[start - block * PATCH_BLOCK : stop - block * PATCH_BLOCK]))
                covered += stop - start
        return cls(index, patch.base, patch.length, within, n, tuple(over), covered == n)


@dataclass(slots=True)
class OpenContent:
    """The mutable content of one file inode while it has open handles (or is being truncated).

    Never a list of every chunk id (64 Mi of them at 16 TiB): chunk i is ``dirty[i]``
    (written since, exactly ``chunk_length(i, size)`` long), else ``overlay[i]`` (stored
    since: spilled), else a hole if ``i >= limit`` (a truncate cut it), else chunk i of
    ``root``, the stored version it came from, whose pages are read lazily (`Vfs._ids`).
    ``pinned`` keeps the pages on the paths to changed chunks and to the ends a resize
    moves, until the commit that rewrites them (`Vfs._pin`): a commit never awaits.
    """

    chunk_size: int
    size: int
    mtime_ns: int
    root: Manifest | None = None  # None: a new (empty) file
    limit: int = 0  # chunks of ``root`` at or past this index are holes (cut by a truncate)
    overlay: dict[int, ChunkId] = field(default_factory=dict)
    pinned: dict[ChunkId, bytes] = field(default_factory=dict)
    pages: LRU[ChunkId, bytes] = field(default_factory=lambda: LRU(OPEN_PAGES))
    dirty: dict[int, bytearray] = field(default_factory=dict)
    patches: dict[int, Patch] = field(default_factory=dict)  # chunk i is in dirty or patches, never both
    patch_bytes: int = 0  # of all patches' blocks: `dirty_bytes` is asked at every write
    changed: bool = False  # differs from the committed entry (dirty, spilled, or resized)
    handles: int = 0
    unlinked: bool = False  # its path is gone: nothing is committed any more
    last_read_end: int = -1  # a read starting here continues a sequential pattern
    read_ahead_end: int = 0  # chunks below this index were already read ahead
    manifest: bytes | None = None  # the stored version ``root`` came from (for holders and holdings)
    author: bytes = b""  # who wrote that version: it holds the content
    # The entry this content was read from or last committed as. A commit supersedes only
    # what this node had seen: a peer's version that arrived meanwhile with other content
    # stays a concurrent version (a conflict copy), never silently overwritten.
    base: Entry | None = None
    journal: FileJournal | None = None  # writes since the last publish, for fsync (blixfs.journal)
    changed_at: float | None = None  # monotonic time of the first change since the last publish
    base_synced: bool = False  # ``base`` was published durably here: a journal over it needs no syncfs

    def reset(self, root: Manifest | None) -> None:
        """Now exactly stored version ``root`` (opened, followed, or just committed)."""
        self.root = root
        self.limit = root.count if root is not None else 0
        self.overlay.clear()
        self.pinned.clear()
        self.pages.clear()

    def dirty_bytes(self) -> int:
        return sum(map(len, self.dirty.values())) + self.patch_bytes

    def drop_patch(self, index: int) -> Patch | None:
        """Chunk ``index``'s patch, no longer kept (made whole, stored, or cut)."""
        patch = self.patches.pop(index, None)
        if patch is not None:
            self.patch_bytes -= patch.nbytes()
        return patch

    def drop_patches(self) -> None:
        self.patches.clear()
        self.patch_bytes = 0

    def written(self, index: int) -> bool:
        """Whether chunk ``index`` has bytes written since it was stored (dirty or patched)."""
        return index in self.dirty or index in self.patches


@dataclass(slots=True)
class Handle:
    ino: int
    content: OpenContent
    writable: bool


class InodeTable:
    """Inode numbers for paths, stable for the life of the mount.

    Numbers are never reused while the process lives, so the kernel can never
    confuse an old inode with a new file. Renames move a whole subtree's numbers.
    """

    def __init__(self) -> None:
        self._by_path: dict[str, int] = {"": ROOT_INO}
        self._by_ino: dict[int, str] = {ROOT_INO: ""}
        self._next = ROOT_INO + 1

    def ino(self, path: str) -> int:
        ino = self._by_path.get(path)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_path[path] = ino
            self._by_ino[ino] = path
        return ino

    def known_path(self, ino: int) -> str | None:
        return self._by_ino.get(ino)

    def known(self, path: str) -> int | None:
        """The inode number of ``path`` if the kernel may know it (never allocates one)."""
        return self._by_path.get(path)

    def path(self, ino: int) -> str:
        try:
            return self._by_ino[ino]
        except KeyError:
            raise FsError(errno.ENOENT, f"inode {ino} is unknown (stale handle)") from None

    def drop(self, path: str) -> int | None:
        ino = self._by_path.pop(path, None)
        if ino is not None:
            del self._by_ino[ino]
        return ino

    def move(self, old: str, new: str) -> None:
        """Rename ``old`` and everything below it to ``new``; ``new`` must be dropped first."""
        prefix = old + "/"
        moving = [p for p in self._by_path if p == old or p.startswith(prefix)]
        for p in moving:
            ino = self._by_path.pop(p)
            q = new + p[len(old) :]
            self._by_path[q] = ino
            self._by_ino[ino] = q


class Vfs:
    """POSIX semantics over a `NamespaceStore` and a `ChunkStore`. See the module docstring."""

    def __init__(
        self,
        replica: Replica,
        chunks: ChunkStore,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        statfs_path: str = "/",
        max_dirty_bytes: int = DEFAULT_MAX_DIRTY_BYTES,
        clock: Callable[[], int] = time.time_ns,
        owner: tuple[int, int] = (os.getuid(), os.getgid()),
        journal: Journal | None = None,
    ) -> None:
        self.replica = replica
        self.namespace: NamespaceStore = replica.store
        self.chunks = chunks
        self.author = replica.author
        self.chunk_size = chunk_size
        # Called with (parent inode, name, inode or None) for every path a peer changed,
        # so the FUSE layer can drop the kernel's caches. None: nobody to tell.
        self.invalidator: Callable[[int, str, int | None], None] | None = None
        replica.listeners.append(self._on_namespace_change)
        self._statfs_path = statfs_path
        self._max_dirty = max_dirty_bytes
        self._clock = clock
        self._owner = owner
        self._started_ns = clock()
        self.inodes = InodeTable()
        self._contents: dict[int, OpenContent] = {}
        self.patch_generation = 0  # bumped by each new `Patch`: the cache policy keeps its base at once
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        # Manifests, holders by content, fetching (attached to the network by the daemon). A
        # FUSE read is at most 1 MiB and usually 128 KiB, so a sequential reader asks for each
        # chunk several times in a row: the content layer keeps recent chunks in memory.
        self.content = Content(chunks, cache_chunks=max(16, (64 << 20) // chunk_size))
        # Journals left by the last run, by path, oldest first: replayed before the file is read.
        self.journal = journal
        self._unrecovered: dict[str, list[Path]] = {}
        self._recovering: dict[str, trio.Event] = {}
        self._replaying: set[int] = set()  # inodes being replayed: their writes are not journaled again
        if journal is not None:
            self._find_journals(journal)
        self.on_read: Callable[[str | None, int, list[Any]], object] | None = None  # blixfs.analytics
        self.tracer: Tracer | None = None  # access traces (blixfs.traces): set once by the daemon

    # ----------------------------------------------------------------- helpers

    @property
    def read_only(self) -> bool:
        return not self.replica.writable

    def _successor(self, prev: Entry, **changes: Any) -> Entry:
        """The next version of ``prev`` by this node: a later timestamp, and a causal
        context that has seen ``prev`` (so it replaces it rather than conflicting)."""
        versions = self.namespace.versions(prev.path)
        changes.setdefault("seen", write_context(prev, versions, self.author, self.replica.last_stamp))
        return prev.evolve(**changes, timestamp_ns=self.replica.stamp(prev, changes["seen"], versions),
                           author=self.author)

    def _placed(self, content: Entry, path: str, **changes: Any) -> Entry:
        """``content`` as this node's new version at ``path``, over whatever version is there."""
        prev = self.namespace.get_any(path)
        versions = self.namespace.versions(path)
        seen = write_context(prev, versions, self.author, self.replica.last_stamp)
        return content.evolve(path=path, deleted=False, author=self.author,
                              timestamp_ns=self.replica.stamp(prev, seen, versions), seen=seen, **changes)

    def _entry(self, path: str) -> Entry:
        """The live entry at ``path`` (a kept conflict version for a conflict file name); ENOENT."""
        if path == "":
            root = self.namespace.get("")  # not a directory only in a store older than replica._root_problem
            return root if root is not None and root.kind is Kind.DIR else self._root_entry()
        e = self.namespace.get(path)
        if e is None:
            version = self._conflict_version(path)
            if version is None:
                raise FsError(errno.ENOENT, f"no such entry: {path}")
            e = version.evolve(path=path)  # shown under its conflict name; never committed as is
        return e

    def _mutable_entry(self, path: str) -> Entry:
        """`_entry` for an operation that changes it: EROFS for conflict versions."""
        self._writable()
        if self.namespace.get(path) is None and self._conflict_version(path) is not None:
            raise FsError(errno.EROFS, f"{path} is a kept conflict version: rename it to keep it, delete it to drop it")
        return self._entry(path)

    def _shown_conflicts(self, parent: str) -> list[Entry]:
        """Kept versions under ``parent`` that are shown as conflict files."""
        shown = []
        for sibling in self.namespace.conflicts_under(parent):
            winner = self.namespace.get_any(sibling.path)
            if winner is not None and shown_as_conflict(winner, sibling):
                shown.append(sibling)
        return shown

    def _conflict_version(self, path: str) -> Entry | None:
        """The kept version a conflict file name stands for (``NAME.conflict-<author>-<time>``)."""
        parent, _, name = path.rpartition("/")
        if ".conflict-" not in name:
            return None
        return next((v for v in self._shown_conflicts(parent) if v.conflict_name() == name), None)

    def _root_entry(self) -> Entry:
        uid, gid = self._owner
        return Entry(
            path="", kind=Kind.DIR, mode=0o755, uid=uid, gid=gid, size=0, mtime_ns=self._started_ns,
            ctime_ns=self._started_ns, author=self.author, timestamp_ns=0,
        )

    def _child_path(self, parent_ino: int, name: str) -> str:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise FsError(errno.EINVAL, f"invalid name {name!r}")
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise FsError(errno.EINVAL, f"name {name!r} is not UTF-8: blixfs names are UTF-8") from None
        if size > MAX_NAME_BYTES:
            raise FsError(errno.ENAMETOOLONG, f"name of {size} bytes")
        parent = self.inodes.path(parent_ino)
        if parent and self._entry(parent).kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR, f"{parent} is not a directory")
        path = join(parent, name)
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            raise FsError(errno.ENAMETOOLONG, f"path of more than {MAX_PATH_BYTES} bytes")
        return path

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS, "this node holds a read-only capability for the namespace")

    def _commit_entries(self, entries: list[Entry], *, durable: bool = False, resolving: Entry | None = None) -> None:
        """Commit this node's new versions, plus a file of its own for each of this node's
        conflict copies they supersede (see `_kept_own_conflicts`); ``resolving`` is the
        conflict version a delete or rename of its conflict file means to drop."""
        entries = [*entries, *self._kept_own_conflicts(entries, resolving)]
        try:
            self.replica.commit_local(entries, durable=durable)
        except FsError:
            raise
        except Exception as exc:
            err = storage_errno(exc)
            log.error("namespace commit of %s failed: %s", [e.path for e in entries], exc)
            raise FsError(err, f"namespace commit failed: {exc}") from exc

    async def _load_manifest(self, e: Entry) -> Manifest:
        """The manifest of file entry ``e``, fetched from its holders when not held here."""
        assert e.manifest is not None
        return await self.content.load(e.manifest, e.author)

    def _stored_bytes(self, e: Entry) -> int:
        """Bytes the file's chunks take (holes none); its size while the manifest is on peers only
        (and pages not here count whole: `Content.stored_bytes`).

        Attributes never need content: listing a directory must work before any chunk is here.
        """
        assert e.manifest is not None
        cached = self.content.cached_manifest(e.manifest)
        if cached is None and self.chunks.has(ChunkId(e.manifest)):
            with contextlib.suppress(FsError):
                cached = self.content.manifest(e.manifest)
        return self.content.stored_bytes(e.manifest, cached) if cached is not None else e.size

    def _open_stored_bytes(self, content: OpenContent) -> int:
        """Bytes an open file's stored chunks take: its version's, then what changed since
        (an estimate when the version is a tree: chunks replaced count on both sides)."""
        cs, root = content.chunk_size, content.root
        stored = sum(chunk_length(i, content.size, cs) for i, cid in content.overlay.items()
                     if cid != HOLE and i not in content.dirty)
        if root is None:
            return stored
        if root.depth == 0:
            return stored + sum(chunk_length(i, content.size, cs) for i, cid in enumerate(root.entries[:content.limit])
                                if cid != HOLE and i not in content.dirty and i not in content.overlay)
        base = self.content.stored_bytes(content.manifest, root) if content.manifest is not None else 0
        return min(content.size, stored + base)

    def _attr(self, ino: int, e: Entry) -> Attr:
        size, mtime, blocks = e.size, e.mtime_ns, 0
        content = self._contents.get(ino)
        if e.kind is Kind.FILE:
            if content is not None:
                size, mtime = content.size, content.mtime_ns
                blocks = -(-(self._open_stored_bytes(content) + content.dirty_bytes()) // 512)
            elif e.manifest is not None:
                blocks = -(-self._stored_bytes(e) // 512)
        elif e.kind is Kind.SYMLINK:
            size = len(e.target.encode())
        mode = e.st_mode & ~0o222 if ".conflict-" in e.path and self.namespace.get(e.path) is None else e.st_mode
        # A directory's links: its name, its '.', and each subdirectory's '..' (find relies on it).
        nlink = 2 + self.namespace.count_subdirs(e.path) if e.kind is Kind.DIR else 1
        return Attr(
            ino=ino, mode=mode, nlink=nlink, uid=e.uid, gid=e.gid, size=size, blocks=blocks,
            atime_ns=e.atime_ns if e.atime_ns is not None else mtime, mtime_ns=mtime,
            ctime_ns=max(e.ctime_ns, mtime),
        )

    def _new_entry(self, path: str, kind: Kind, mode: int, uid: int, gid: int, **extra: Any) -> Entry:
        now = self._clock()
        blank = Entry(path=path, kind=kind, mode=stat.S_IMODE(mode), uid=uid, gid=gid, size=0, mtime_ns=now,
                      ctime_ns=now, author=self.author, timestamp_ns=0)
        return self._placed(blank, path, **extra)

    def _touch_parent(self, *paths: str) -> list[Entry]:
        """The new entries of the parent directories of ``paths`` (each once) with mtime/ctime
        now: adding or removing a name changes them (mkdir, create, symlink, unlink, rmdir,
        both sides of a rename; never an open of an existing file). Committed in the same
        batch as the change itself."""
        now = self._clock()
        parents = dict.fromkeys(parent_of(p) for p in paths)
        return [self._successor(self._entry(p), mtime_ns=now, ctime_ns=now) for p in parents]

    @staticmethod
    def _check_time(what: str, ns: int | None) -> None:
        """Times an entry can hold (protocol.md 5.1): EINVAL before 1970, EOVERFLOW after 2262."""
        if ns is None:
            return
        if ns < 0:
            raise FsError(errno.EINVAL, f"{what} {ns} is before 1970: entries hold times from 1970 on")
        if ns > MAX_TIME_NS:
            raise FsError(errno.EOVERFLOW, f"{what} {ns} is past 2262: entries hold 64-bit nanoseconds")

    # ------------------------------------------------------- lookup and attrs

    async def lookup(self, parent_ino: int, name: str) -> Attr:
        """Called by FUSE lookup; ENOENT if absent."""
        if name == ".":
            return await self.getattr(parent_ino)
        if name == "..":
            return await self.getattr(self.inodes.ino(parent_of(self.inodes.path(parent_ino))))
        path = self._child_path(parent_ino, name)
        e = self._entry(path)
        return self._attr(self.inodes.ino(path), e)

    async def getattr(self, ino: int) -> Attr:
        content = self._contents.get(ino)
        if content is not None and content.unlinked:
            return self._orphan_attr(ino, content)
        return self._attr(ino, self._entry(self.inodes.path(ino)))

    def _orphan_attr(self, ino: int, content: OpenContent) -> Attr:
        uid, gid = self._owner
        return Attr(ino=ino, mode=stat.S_IFREG | 0o600, nlink=0, uid=uid, gid=gid, size=content.size,
                    blocks=0, atime_ns=content.mtime_ns, mtime_ns=content.mtime_ns, ctime_ns=content.mtime_ns)

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Attr:
        """chmod, chown, utimensat and truncate (FUSE setattr, after the kernel's lookup).

        Times are nanoseconds, kept exactly; UTIME_NOW arrives as the current time (pyfuse3
        fills it in) and UTIME_OMIT as None. EINVAL for a time before 1970, EOVERFLOW past
        2262 (`_check_time`), EISDIR/EINVAL for truncating a non-file, EROFS when read-only.
        An access time is kept only when set here: reads never change it (``noatime``), and
        while it was never set it reads as mtime. Setting mtime alone therefore keeps the
        access time the file had (``touch -m``); an access time equal to the new mtime is
        stored as "same as mtime" so the entry stays readable by nodes that predate atime.
        """
        self._check_time("atime", atime_ns)
        self._check_time("mtime", mtime_ns)
        path = self.inodes.path(ino)
        e = self._mutable_entry(path)
        now = self._clock()
        if size is not None:
            if e.kind is not Kind.FILE:
                raise FsError(errno.EISDIR if e.kind is Kind.DIR else errno.EINVAL, f"cannot truncate {path}")
            check_file_size(size)  # before loading anything for an absurd size
            content, temporary = await self._content_for(ino, e, emptied=size == 0)
            try:
                check_file_size(size, content.chunk_size)
                await self._truncate(content, size)
                content.mtime_ns = mtime_ns if mtime_ns is not None else now
                if not temporary:
                    self._journal_of(ino, content).record_truncate(size)
                if temporary:
                    self._commit(ino, content)
            finally:
                if temporary:
                    del self._contents[ino]
            e = self._entry(path)
        changes: dict[str, object] = {"ctime_ns": now}
        if mode is not None:
            changes["mode"] = stat.S_IMODE(mode)
        if uid is not None:
            changes["uid"] = uid
        if gid is not None:
            changes["gid"] = gid
        if atime_ns is not None or mtime_ns is not None:
            open_content = self._contents.get(ino)
            current_mtime = open_content.mtime_ns if open_content is not None else e.mtime_ns
            new_mtime = mtime_ns if mtime_ns is not None else current_mtime
            new_atime = atime_ns if atime_ns is not None else (
                e.atime_ns if e.atime_ns is not None else current_mtime)
            changes["atime_ns"] = None if new_atime == new_mtime else new_atime
            if mtime_ns is not None:
                changes["mtime_ns"] = mtime_ns
                if open_content is not None:
                    open_content.mtime_ns = mtime_ns
        if len(changes) > 1 or size is None:
            self._commit_entries([self._successor(e, **changes)])
        return await self.getattr(ino)

    async def readlink(self, ino: int) -> str:
        e = self._entry(self.inodes.path(ino))
        if e.kind is not Kind.SYMLINK:
            raise FsError(errno.EINVAL, f"{e.path} is not a symlink")
        return e.target

    async def readdir(self, ino: int) -> list[tuple[str, Attr]]:
        """The live children of directory ``ino``, sorted by name ('.' and '..' are the kernel's)."""
        path = self.inodes.path(ino)
        if self._entry(path).kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR, f"{path} is not a directory")
        listing = [(e.name, self._attr(self.inodes.ino(e.path), e)) for e in self.namespace.children(path)]
        for version in self._shown_conflicts(path):
            shown = join(path, version.conflict_name())
            listing.append((version.conflict_name(), self._attr(self.inodes.ino(shown), version.evolve(path=shown))))
        return listing

    async def statfs(self) -> FsStats:
        st = os.statvfs(self._statfs_path)
        ns = self.namespace.stats()
        return FsStats(
            block_size=st.f_frsize, blocks=st.f_blocks, blocks_free=st.f_bfree, blocks_avail=st.f_bavail,
            files=ns.files + ns.dirs + ns.symlinks, files_free=max(st.f_ffree, 1 << 20),
            name_max=MAX_NAME_BYTES,
        )

    # ------------------------------------------------------ namespace changes

    async def mkdir(self, parent_ino: int, name: str, mode: int, uid: int, gid: int) -> Attr:
        self._writable()
        path = self._child_path(parent_ino, name)
        if self.namespace.get(path) is not None:
            raise FsError(errno.EEXIST, f"{path} exists")
        e = self._new_entry(path, Kind.DIR, mode, uid, gid)
        self._commit_entries([e, *self._touch_parent(path)])
        return self._attr(self.inodes.ino(path), e)

    async def symlink(self, parent_ino: int, name: str, target: str, uid: int, gid: int) -> Attr:
        self._writable()
        path = self._child_path(parent_ino, name)
        if self.namespace.get(path) is not None:
            raise FsError(errno.EEXIST, f"{path} exists")
        if len(target.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise FsError(errno.ENAMETOOLONG, "symlink target too long")
        e = self._new_entry(path, Kind.SYMLINK, 0o777, uid, gid, target=target)
        self._commit_entries([e, *self._touch_parent(path)])
        return self._attr(self.inodes.ino(path), e)

    async def create(self, parent_ino: int, name: str, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Attr]:
        """Create and open a file (FUSE create: open(O_CREAT) of a name the kernel's lookup
        did not find); ENAMETOOLONG/EINVAL for bad names, EROFS when read-only.

        If the name exists after all (a peer created it since the lookup): EEXIST with
        O_EXCL, else the existing file is opened as `open` would, and its directory's
        times do not change (only adding a name changes them).
        """
        self._writable()
        path = self._child_path(parent_ino, name)
        if self.namespace.get(path) is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST, f"{path} exists")
            ino = self.inodes.ino(path)
            fh = await self.open(ino, flags)
            return fh, await self.getattr(ino)
        e = self._new_entry(path, Kind.FILE, mode, uid, gid)
        self._commit_entries([e, *self._touch_parent(path)])
        ino = self.inodes.ino(path)
        fh = await self._open_handle(ino, e, flags)
        return fh, self._attr(ino, e)

    def _kept_own_conflicts(self, entries: list[Entry], resolving: Entry | None) -> list[Entry]:
        """This node's conflict copies that ``entries`` supersede, as files of their own.

        A new version covers every earlier version by its author (entry.write_context),
        its conflict copies included: the data of such a copy must not go with it. So a
        copy shown as ``NAME.conflict-<author>-<time>`` becomes a plain file of that name
        in the same commit, as if the user had renamed it (unless that name is taken).
        """
        kept: list[Entry] = []
        now = self._clock()
        for e in entries:
            current = self.namespace.get_any(e.path)
            for sibling in self.namespace.versions(e.path):
                if (sibling is current or sibling.author != self.author
                        or (resolving is not None and sibling.entry_hash() == resolving.entry_hash())
                        or not dominates(e, sibling) or current is None
                        or not shown_as_conflict(current, sibling)):
                    continue
                path = join(parent_of(sibling.path), sibling.conflict_name())
                if len(path.encode("utf-8")) > MAX_PATH_BYTES or len(sibling.conflict_name().encode()) > MAX_NAME_BYTES:
                    log.warning("conflict copy %s of %s is superseded and its name is too long to keep it as a file",
                                sibling.conflict_name(), sibling.path)
                    continue
                if self.namespace.get(path) is None:
                    log.info("%s: this node's conflict copy is superseded by its new version: kept as %s",
                             e.path, path)
                    kept.append(self._placed(sibling, path, ctime_ns=now))
        return kept

    def _resolution(self, version: Entry) -> Entry:
        """A new version of ``version``'s path that has seen it: the conflict is resolved
        (on every node, once this replicates) and the current content stays."""
        current = self.namespace.get_any(version.path)
        assert current is not None
        seen = current.successor_context()
        for author, ts in version.successor_context().items():
            seen[author] = max(seen.get(author, -1), ts)
        # ...and the closure of what that covers, like any new version (entry.write_context).
        base = current.evolve(seen=seen)
        return self._successor(current, seen=write_context(base, self.namespace.versions(version.path), self.author,
                                                           self.replica.last_stamp))

    def _remove(self, path: str, want_dir: bool) -> None:
        version = self._conflict_version(path) if self.namespace.get(path) is None else None
        if version is not None and not want_dir:
            # deleting a conflict file drops that version
            self._commit_entries([self._resolution(version), *self._touch_parent(path)], resolving=version)
            self._forget_path(path)
            return
        e = self._entry(path)
        if want_dir and e.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR, f"{path} is not a directory")
        if not want_dir and e.kind is Kind.DIR:
            raise FsError(errno.EISDIR, f"{path} is a directory")
        if want_dir and self.namespace.has_children(path):
            raise FsError(errno.ENOTEMPTY, f"{path} is not empty")
        tomb = self._successor(e, deleted=True, ctime_ns=self._clock())
        self._commit_entries([tomb, *self._touch_parent(path)])
        self._forget_path(path)

    def _forget_path(self, path: str) -> None:
        ino = self.inodes.drop(path)
        content = self._contents.get(ino) if ino is not None else None
        if content is not None:
            # POSIX: an unlinked file stays readable and writable through open fds,
            # and its data goes away with the last close.
            content.unlinked = True

    async def unlink(self, parent_ino: int, name: str) -> None:
        self._writable()
        self._remove(self._child_path(parent_ino, name), want_dir=False)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self._writable()
        self._remove(self._child_path(parent_ino, name), want_dir=True)

    async def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str, *,
                     noreplace: bool = False, exchange: bool = False) -> None:
        """rename(2), including over an existing file or empty directory, and of directories.

        The moved subtree and the replaced target change in one namespace transaction.
        """
        self._writable()
        if exchange:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        src = self._child_path(old_parent, old_name)
        dst = self._child_path(new_parent, new_name)
        if src != dst:
            await self._publish_journaled_under(src)
        e = self._entry(src)
        if src == dst:
            return
        version = self._conflict_version(src) if self.namespace.get(src) is None else None
        if version is not None:  # keeping a conflict version: it becomes a file of its own
            if self.namespace.get(dst) is not None:
                raise FsError(errno.EEXIST, f"{dst} exists: rename the conflict version to a new name")
            self._commit_entries([self._placed(version, dst, ctime_ns=self._clock()), self._resolution(version),
                                  *self._touch_parent(src, dst)], resolving=version)
            self._forget_path(src)
            return
        if dst.startswith(src + "/"):
            raise FsError(errno.EINVAL, f"cannot move {src} into itself")
        moved = [e, *self.namespace.descendants(src)] if e.kind is Kind.DIR else [e]
        # Every moved path must stay within what an entry may hold (peers refuse longer ones).
        longest = max(len(m.path.encode("utf-8")) for m in moved) - len(src.encode("utf-8"))
        if longest + len(dst.encode("utf-8")) > MAX_PATH_BYTES:
            raise FsError(errno.ENAMETOOLONG, f"moving {src} to {dst} makes paths longer than {MAX_PATH_BYTES} bytes")
        target = self.namespace.get(dst)
        if target is not None:
            if noreplace:
                raise FsError(errno.EEXIST, f"{dst} exists")
            if target.kind is Kind.DIR:
                if e.kind is not Kind.DIR:
                    raise FsError(errno.EISDIR, f"{dst} is a directory")
                if self.namespace.has_children(dst):
                    raise FsError(errno.ENOTEMPTY, f"{dst} is not empty")
            elif e.kind is Kind.DIR:
                raise FsError(errno.ENOTDIR, f"{dst} is not a directory")
        now = self._clock()
        batch: list[Entry] = []
        for old in moved:
            new_path = dst + old.path[len(src) :]
            batch.append(self._successor(old, deleted=True))
            batch.append(self._placed(old, new_path, ctime_ns=now if old is e else old.ctime_ns))
        self._commit_entries([*batch, *self._touch_parent(src, dst)])
        if target is not None:
            self._forget_path(dst)
        self.inodes.move(src, dst)

    # ----------------------------------------------------------- xattrs

    async def getxattr(self, ino: int, name: str) -> bytes:
        """``user.blixfs.<key>`` is image metadata; other ``user.*`` names are stored as given.

        Any other namespace (security.capability, which the kernel asks about on
        every write) answers ENODATA before touching the namespace store.
        """
        if not name.startswith(USER_XATTR_PREFIX):
            raise FsError(errno.ENODATA)
        e = self._entry(self.inodes.path(ino))
        if name.startswith(META_XATTR_PREFIX):
            value = e.meta.get(name[len(META_XATTR_PREFIX) :])
            if value is not None:
                return value.encode()
        elif name in e.xattrs:
            return e.xattrs[name]
        raise FsError(errno.ENODATA)

    async def listxattr(self, ino: int) -> list[str]:
        e = self._entry(self.inodes.path(ino))
        return [META_XATTR_PREFIX + k for k in sorted(e.meta)] + sorted(e.xattrs)

    async def setxattr(self, ino: int, name: str, value: bytes) -> None:
        e = self._mutable_entry(self.inodes.path(ino))
        if len(value) > MAX_XATTR_VALUE or len(name) > MAX_NAME_BYTES:
            raise FsError(errno.E2BIG, f"xattr {name} too large")
        if name.startswith(META_XATTR_PREFIX):
            key = name[len(META_XATTR_PREFIX) :]
            if key not in META_KEYS:
                raise FsError(errno.EINVAL, f"unknown image metadata {key!r}; known: {sorted(META_KEYS)}")
            try:
                text = value.decode()
            except UnicodeDecodeError:
                raise FsError(errno.EINVAL, f"image metadata {key} must be UTF-8") from None
            if key == COPIES_KEY and not (text.isdigit() and 1 <= int(text) <= MAX_COPIES):
                raise FsError(errno.EINVAL, f"copies must be a number from 1 to {MAX_COPIES}")
            changes: dict[str, object] = {"meta": {**e.meta, key: text}}
        elif name.startswith(USER_XATTR_PREFIX):
            xattrs = {**e.xattrs, name: bytes(value)}
            if sum(len(k) + len(v) for k, v in xattrs.items()) > MAX_XATTR_TOTAL:
                raise FsError(errno.ENOSPC, "no room for more xattrs on this entry")
            changes = {"xattrs": xattrs}
        else:
            raise FsError(errno.ENOTSUP, f"only user.* xattrs are supported, not {name}")
        self._commit_entries([self._successor(e, **changes, ctime_ns=self._clock())])

    async def removexattr(self, ino: int, name: str) -> None:
        e = self._mutable_entry(self.inodes.path(ino))
        if name.startswith(META_XATTR_PREFIX) and name[len(META_XATTR_PREFIX) :] in e.meta:
            key = name[len(META_XATTR_PREFIX) :]
            changes: dict[str, object] = {"meta": {k: v for k, v in e.meta.items() if k != key}}
        elif name in e.xattrs:
            changes = {"xattrs": {k: v for k, v in e.xattrs.items() if k != name}}
        else:
            raise FsError(errno.ENODATA)
        self._commit_entries([self._successor(e, **changes, ctime_ns=self._clock())])

    # ------------------------------------------------------- peers' changes

    def _on_namespace_change(self, entries: list[Entry], source: str | None) -> None:
        """Replica listener: a peer's entries changed the namespace (local ones need nothing).

        Open files nobody here has modified follow the new version (their page cache is
        dropped with the invalidation); files with local changes keep them, and their
        next commit is a concurrent version the merge rule keeps. Then the kernel is told.
        """
        if source is None:
            return
        for e in entries:
            ino = self.inodes.known(e.path)
            content = self._contents.get(ino) if ino is not None else None
            current = self.namespace.get(e.path)
            if content is not None and not content.changed and current is not None and current.kind is Kind.FILE:
                self._follow(content, current)
            if self.invalidator is not None:
                parent, _, name = e.path.rpartition("/")
                parent_ino = self.inodes.known(parent)
                if parent_ino is not None:
                    self.invalidator(parent_ino, name, ino)
                    for version in self.namespace.conflicts_under(parent):  # conflict files come and go too
                        if version.path == e.path:
                            self.invalidator(parent_ino, version.conflict_name(), None)

    def _follow(self, content: OpenContent, current: Entry) -> None:
        try:
            m = self.content.manifest(current.manifest) if current.manifest is not None else None
            if current.manifest is not None and m is None:
                raise FsError(errno.EIO, "not held here")
        except FsError as exc:
            log.warning("%s changed on a peer, but its new manifest is not here (%s): open handles keep the "
                        "version they had", current.path, exc)
            return
        content.manifest, content.author, content.base = current.manifest, current.author, current
        content.base_synced = False
        if content.journal is not None:  # no-op truncates only (nothing changed): over the old base
            content.journal.discard()
            content.journal = None
        content.changed_at = None
        content.size = m.size if m is not None else 0
        content.reset(m)
        content.chunk_size = m.chunk_size if m is not None else content.chunk_size
        content.dirty.clear()
        content.drop_patches()
        content.mtime_ns = current.mtime_ns

    # ---------------------------------------------------------- file content

    async def _content_for(self, ino: int, e: Entry, *, emptied: bool = False) -> tuple[OpenContent, bool]:
        """The inode's open content, or a new one (True: nobody else holds it).

        ``emptied``: the caller truncates it to 0 at once, so the old content (maybe only
        on peers) is not loaded.
        """
        existing = self._contents.get(ino)
        if existing is not None:
            return existing, False
        if e.path in self._unrecovered:
            await self._recover_path(e.path)
            e = self._entry(e.path)
            existing = self._contents.get(ino)
            if existing is not None:
                return existing, False
        if e.manifest is None or emptied:
            content = OpenContent(chunk_size=self.chunk_size, size=0, mtime_ns=e.mtime_ns,
                                  changed=e.size > 0, base=e)
        else:
            m = await self._load_manifest(e)
            if m.size != e.size:
                raise FsError(errno.EIO, f"{e.path}: entry size {e.size} != manifest size {m.size}")
            existing = self._contents.get(ino)  # another request may have opened it while we fetched
            if existing is not None:
                return existing, False
            content = OpenContent(chunk_size=m.chunk_size, size=m.size, mtime_ns=e.mtime_ns,
                                  manifest=e.manifest, author=e.author, base=e)
            content.reset(m)
        self._contents[ino] = content
        return content, True

    async def _open_handle(self, ino: int, e: Entry, flags: int) -> int:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        content, new = await self._content_for(ino, e, emptied=writable and bool(flags & os.O_TRUNC))
        if new and self.tracer is not None:
            self.tracer.opened(ino, e.path, content.manifest, content.root, content.author)
        if flags & os.O_TRUNC and writable:
            if content.size:
                self._resize(content, 0, {})  # truncating to 0 needs no stored bytes
                content.mtime_ns = self._clock()
            self._journal_of(ino, content).record_truncate(0)  # emptied already when loaded so
        content.handles += 1
        metrics.open_files.set(len(self._contents))
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(ino, content, writable)
        return fh

    async def open(self, ino: int, flags: int) -> int:
        """Open a file; returns a handle. EISDIR for directories, EROFS for writes when read-only."""
        path = self.inodes.path(ino)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        e = self._mutable_entry(path) if writing else self._entry(path)
        if e.kind is Kind.DIR:
            raise FsError(errno.EISDIR, f"{e.path} is a directory")
        if e.kind is not Kind.FILE:
            raise FsError(errno.EINVAL, f"{e.path} is not a regular file")
        return await self._open_handle(ino, e, flags)

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF, f"file handle {fh} is not open") from None

    async def _chunk_bytes(self, content: OpenContent, index: int, cid: ChunkId, length: int,
                           label: str | None = None) -> bytes | memoryview:
        """Verified bytes of clean chunk ``cid``, ``index`` of ``content`` (zeros for a hole),
        fetched from its holders when not held here; EIO if it cannot be had or has the wrong
        length. ``cid`` and ``length`` come from the caller's plan: ``content`` may change
        while this awaits."""
        if cid == HOLE:
            return _zeros(length)
        data = _available(cid, await self.content.chunk(cid, content.manifest, index, content.author or None, label))
        if len(data) != length:
            raise FsError(errno.EIO, f"chunk {short(cid)} has {len(data)} bytes, manifest says {length}")
        return data

    async def _chunk_range(self, content: OpenContent, index: int, cid: ChunkId, length: int, within: int,
                           n: int, label: str | None) -> bytes | memoryview:
        """Bytes [within, within + n) of clean chunk ``cid`` (``index`` of ``content``, ``length``
        long): only the blocks covering them when held here, else as `_chunk_bytes`. EIO if the
        chunk cannot be had or is shorter than the plan says."""
        if cid == HOLE:
            return _zeros(n)
        if n * 4 >= length:
            # A large part (the kernel's 128 KiB read-ahead of a sequential reader): read the
            # chunk whole once and keep it in memory for the rest, as before ranges existed
            # (measured: sequential cold reads lost ~30% reading each half by range).
            return memoryview(await self._chunk_bytes(content, index, cid, length, label))[within : within + n]
        data = _available(cid, await self.content.chunk_range(cid, content.manifest, index, content.author or None,
                                                              within, n, label))
        if len(data) != n:
            raise FsError(errno.EIO, f"chunk {short(cid)} is shorter than the {length} bytes its manifest says")
        return data

    def _note_held(self, content: OpenContent, index: int, cid: ChunkId) -> None:
        """Holdings: this node now holds chunk ``index`` (``cid``, from the read's plan) of the
        version ``content`` came from (on disk: a chunk served from memory because the disk
        was full is not announced)."""
        holdings = self.content.holdings
        if (holdings is not None and content.manifest is not None and content.root is not None
                and not content.changed and (cid == HOLE or self.chunks.has(cid))):
            holdings.note_chunk(content.manifest, index, content.root.count)

    def _page(self, content: OpenContent, pid: ChunkId) -> bytes | None:
        """A page of ``content``'s version: pinned, kept for reads, or held by this node (sync)."""
        return content.pinned.get(pid) or content.pages.get(pid) or self.content.page(pid)

    def _cid(self, content: OpenContent, index: int) -> ChunkId:
        """The stored id of chunk ``index`` (not its dirty bytes); `MissingPage` when a page
        of the version is not loaded: the caller runs under `_ids`."""
        got = content.overlay.get(index)
        if got is not None:
            return got
        if content.root is None or index >= content.limit:
            return HOLE
        return lookup(content.root, lambda pid: self._page(content, pid), index)

    async def _ids(self, content: OpenContent, fn: Callable[[], _T]) -> _T:
        """``fn()``, which reads chunk ids of ``content`` synchronously (`_cid`), run again
        after loading each page it missed (from this node or the version's holders). The
        caller then acts on the result with no await: the pages stay until it does.
        EIO if a page cannot be had or does not fit its place in the tree."""
        while True:
            try:
                return fn()
            except MissingPage as missing:
                content.pages[missing.pid] = await self.content.load_page(missing.pid, content.manifest,
                                                                          content.author or None)
            except ManifestError as exc:
                raise FsError(errno.EIO, f"the manifest of an open file has an invalid page: {exc}") from exc

    def _pin(self, content: OpenContent, indices: Iterable[int], new_size: int) -> None:
        """Pin the pages a commit will read (`manifest.update`): those on the paths to chunks
        about to change (``indices``) and to the ends a resize to ``new_size`` moves. Sync,
        under `_ids`; one walk per leaf page."""
        root = content.root
        if root is None or root.depth == 0:
            return
        ends = [root.count - 1, min(content.limit, root.count) - 1, chunk_count(new_size, content.chunk_size) - 1,
                chunk_count(content.size, content.chunk_size) - 1]
        leaves = {i // FANOUT: i for i in [*indices, *ends] if 0 <= i < root.count}
        for index in leaves.values():
            for pid, raw in path_pages(root, lambda pid: self._page(content, pid), index):
                content.pinned[pid] = raw

    async def _load_for_update(self, content: OpenContent, indices: Iterable[int], *, changing: Iterable[int] = (),
                               new_size: int | None = None,
                               patchable: Callable[[int], bool] | None = None) -> dict[ChunkId, bytes]:
        """Load the stored bytes of the clean chunks at ``indices`` before a synchronous update,
        and pin the pages its commit will read (`_pin`: chunks ``changing``, a resize to
        ``new_size``). A patched chunk's base is loaded (the update may make it whole); a
        chunk ``patchable`` says the update patches is not (asked in the last round, with no
        await before the caller's update: the caller's answer is the same).

        Awaiting may let other requests change ``content``; the loop re-checks until
        every chunk still needed is loaded, so the caller can then mutate without awaiting.
        """
        loaded: dict[ChunkId, bytes] = {}
        wanted = sorted(set(indices))
        changing = list(changing)

        def plan() -> list[tuple[int, ChunkId, int]]:
            self._pin(content, changing, content.size if new_size is None else new_size)
            count = chunk_count(content.size, content.chunk_size)
            ids = [(i, content.patches[i].base if i in content.patches else self._cid(content, i))
                   for i in wanted if i < count and i not in content.dirty
                   and (patchable is None or not patchable(i))]
            return [(i, cid, chunk_length(i, content.size, content.chunk_size)) for i, cid in ids
                    if cid != HOLE and cid not in loaded]
        while True:
            need = await self._ids(content, plan)
            if not need:
                return loaded
            for i, cid, length in need:
                loaded[cid] = bytes(await self._chunk_bytes(content, i, cid, length))

    def _load_chunk(self, content: OpenContent, index: int, length: int, loaded: dict[ChunkId, bytes]) -> bytearray:
        """The chunk at ``index`` as a dirty buffer, cut or zero-padded to ``length``.

        Its stored bytes must be in ``loaded`` (see `_load_for_update`) unless it is dirty or a hole.
        """
        buf = content.dirty.get(index)
        if buf is None:
            patch = content.drop_patch(index)
            cid = patch.base if patch is not None else self._cid(content, index)
            buf = bytearray(loaded[cid]) if cid != HOLE else bytearray()
            if patch is not None:
                self._lay(buf, patch)
            content.dirty[index] = buf
        if len(buf) > length:
            del buf[length:]
        elif len(buf) < length:
            buf.extend(_zeros(length - len(buf)))
        return buf

    @staticmethod
    def _lay(buf: bytearray, patch: Patch) -> None:
        """Lay ``patch``'s blocks over ``buf``, its base's bytes (zero-padded to its length)."""
        if len(buf) < patch.length:
            buf.extend(_zeros(patch.length - len(buf)))
        for block, data in patch.blocks.items():
            buf[block * PATCH_BLOCK : block * PATCH_BLOCK + len(data)] = data

    def _whole(self, content: OpenContent, index: int) -> bytes:
        """Patched chunk ``index`` made whole, synchronously (a store or commit never awaits):
        its base is a hole or held here (kept so while patched). EIO if the base is gone
        (found corrupt): the patch stays, and a read of the chunk fetches the base again."""
        patch = content.patches[index]
        buf = bytearray()
        if patch.base != HOLE:
            base = self.chunks.get(patch.base)
            if base is None:
                log.error("chunk %s, the base of written blocks, is no longer held here", short(patch.base))
                raise FsError(errno.EIO, f"chunk {short(patch.base)} under written blocks is not held here")
            buf = bytearray(base)
        self._lay(buf, patch)
        del buf[patch.length:]
        return bytes(buf)

    async def _patch_range(self, content: OpenContent, item: PatchRead, label: str | None) -> bytes:
        """The bytes a `PatchRead` planned: the base's range (from here, or its holders if it
        went missing), the written blocks over it."""
        if item.covered:
            buf = bytearray(item.n)
        else:
            buf = bytearray(await self._chunk_range(content, item.index, item.base, item.length, item.within,
                                                    item.n, label))
        for at, data in item.over:
            buf[at : at + len(data)] = data
        return bytes(buf)

    def _patchable(self, content: OpenContent, index: int, offset: int, end: int) -> bool:
        """Whether a write of [offset, end) changes chunk ``index`` by whole blocks only, into a
        chunk not dirty, within the file (no resize), over a hole or a chunk held here: then it
        is kept as a `Patch` and the chunk is not loaded."""
        cs = content.chunk_size
        if index in content.dirty or end > content.size:
            return False
        start = index * cs
        within, stop = max(offset, start) - start, min(end, start + cs) - start
        clen = chunk_length(index, content.size, cs)
        if within % PATCH_BLOCK or (stop % PATCH_BLOCK and stop != clen):
            return False
        patch = content.patches.get(index)
        base = patch.base if patch is not None else self._cid(content, index)
        return base == HOLE or self.chunks.has(base)

    @staticmethod
    def _resize_loads(content: OpenContent, new_size: int) -> list[int]:
        """Chunks whose stored bytes `_resize` to ``new_size`` needs: the one a new end falls in,
        or the old last chunk that grows."""
        cs = content.chunk_size
        if new_size < content.size and new_size % cs:
            return [new_size // cs]
        if new_size > content.size and content.size % cs:
            return [content.size // cs]
        return []

    def _resize(self, content: OpenContent, new_size: int, loaded: dict[ChunkId, bytes]) -> None:
        cs, old = content.chunk_size, content.size
        if new_size == old:
            return
        if new_size < old:
            keep = chunk_count(new_size, cs)
            if new_size % cs:
                self._load_chunk(content, keep - 1, new_size % cs, loaded)
            content.limit = min(content.limit, keep)
            for idx in [i for i in content.dirty if i >= keep]:
                del content.dirty[idx]
            for idx in [i for i in content.patches if i >= keep]:
                content.drop_patch(idx)
            for idx in [i for i in content.overlay if i >= keep]:
                del content.overlay[idx]
        else:
            if old % cs:
                last = old // cs
                self._load_chunk(content, last, chunk_length(last, new_size, cs), loaded)
        content.size = new_size
        content.changed = True

    async def _truncate(self, content: OpenContent, new_size: int) -> None:
        loaded = await self._load_for_update(content, self._resize_loads(content, new_size), new_size=new_size)
        self._resize(content, new_size, loaded)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; short only at end of file. EIO if a chunk is unavailable.

        The plan (dirty bytes copied, clean chunk ids) is taken before any await, so the
        result is the file's content at one instant even if writes arrive meanwhile.
        """
        handle = self._handle(fh)
        content = handle.content
        label = self.inodes.known_path(handle.ino)  # for per-file transfer progress
        cs = content.chunk_size

        def planned() -> tuple[list[bytes | tuple[int, ChunkId, int, int, int] | PatchRead], int]:
            plan: list[bytes | tuple[int, ChunkId, int, int, int] | PatchRead] = []
            end = min(offset + size, content.size)  # as of the plan: loading pages awaits
            pos = offset
            while pos < end:
                idx = pos // cs
                within = pos - idx * cs
                n = min(cs - within, end - pos)
                buf = content.dirty.get(idx)
                patch = content.patches.get(idx)
                if buf is not None:
                    plan.append(bytes(memoryview(buf)[within : within + n]))
                elif patch is not None:
                    plan.append(PatchRead.of(idx, patch, within, n))
                else:
                    plan.append((idx, self._cid(content, idx), chunk_length(idx, content.size, cs), within, n))
                pos += n
            return plan, end
        plan, end = await self._ids(content, planned)
        if self.tracer is not None:  # in the order requested, before the loads below await
            self.tracer.read(handle.ino, [(i[0], i[1], i[2]) for i in plan if isinstance(i, tuple)], end - offset)
        # The kernel's own read-ahead sends several requests at once and they may be served
        # out of order: a read near where the last one ended counts as sequential.
        if end > offset and abs(offset - content.last_read_end) <= READ_AHEAD_BYTES:
            # Only the chunks the window newly covers: each is advised or fetched once.
            first = max((end - 1) // cs + 1, content.read_ahead_end)
            last = (end - 1) // cs + 1 + max(1, READ_AHEAD_BYTES // cs)
            if first < last:
                ahead: dict[ChunkId, int] = {}
                for i in range(first, min(last, chunk_count(content.size, cs))):
                    try:
                        cid = self._cid(content, i)
                    except (MissingPage, ManifestError):  # the next page: read ahead once a read loads it
                        last = i
                        break
                    if cid != HOLE and not content.written(i):
                        ahead[cid] = i
                content.read_ahead_end = max(content.read_ahead_end, last)
                self.content.prefetch(ahead, content.manifest, content.author or None, label)
        content.last_read_end = max(end, content.last_read_end) if content.last_read_end >= 0 else end
        parts: list[bytes | memoryview] = []
        for item in plan:
            if isinstance(item, bytes):
                parts.append(item)
            elif isinstance(item, PatchRead):
                parts.append(await self._patch_range(content, item, label))
            else:
                idx, cid, length, within, n = item
                parts.append(await self._chunk_range(content, idx, cid, length, within, n, label))
                self._note_held(content, idx, cid)
        if self.on_read is not None:
            self.on_read(label, max(0, end - offset), plan)
        return b"".join(parts)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write into the dirty buffers; returns len(data). ENOSPC if memory must spill and the disk is full."""
        handle = self._handle(fh)
        if not handle.writable:
            raise FsError(errno.EBADF, "file handle not open for writing")
        content = handle.content
        end = offset + len(data)
        cs = content.chunk_size
        if not data:
            return 0
        check_file_size(end, cs)
        # The first and last chunk may be partly overwritten: their old bytes are needed,
        # unless the write patches them by whole blocks.
        def patchable(index: int) -> bool:
            return self._patchable(content, index, offset, end)
        loaded = await self._load_for_update(
            content, [offset // cs, (end - 1) // cs, *self._resize_loads(content, max(end, content.size))],
            changing=range(offset // cs, (end - 1) // cs + 1), new_size=max(end, content.size), patchable=patchable)
        # No await from here on: the update below is atomic for other requests.
        if end > content.size:
            self._resize(content, end, loaded)
        view = memoryview(data)
        pos = offset
        while pos < end:
            idx = pos // cs
            within = pos - idx * cs
            n = min(cs - within, end - pos)
            piece = view[pos - offset : pos - offset + n]
            clen = chunk_length(idx, content.size, cs)
            buf = content.dirty.get(idx)
            if buf is None and within == 0 and n == clen:
                content.dirty[idx] = bytearray(piece)  # a whole chunk: no need to read the old one
                content.drop_patch(idx)
            elif buf is None and patchable(idx):
                patch = content.patches.get(idx)
                if patch is None:
                    patch = content.patches[idx] = Patch(self._cid(content, idx), clen)
                    self.patch_generation += 1
                for at in range(0, n, PATCH_BLOCK):
                    block = (within + at) // PATCH_BLOCK
                    if block not in patch.blocks:
                        content.patch_bytes += PATCH_BLOCK
                    patch.blocks[block] = bytes(piece[at : at + PATCH_BLOCK])
            else:
                if buf is None:
                    buf = self._load_chunk(content, idx, clen, loaded)
                buf[within : within + n] = piece
            pos += n
        content.changed = True
        content.mtime_ns = self._clock()
        self._journal_of(handle.ino, content).record_write(offset, data)
        if self.tracer is not None:  # places written are read by the next boot (blixfs.traces)
            self.tracer.wrote(handle.ino, offset // cs, (end - 1) // cs)
        if content.dirty_bytes() > self._max_dirty:
            self._spill(content, keep=end // cs)
        return len(data)

    def _store_dirty(self, content: OpenContent, indices: list[int]) -> None:
        """Store the given dirty chunks and make them clean; all or nothing on failure."""
        stored: dict[int, ChunkId] = {}
        try:
            for idx in indices:
                buf = content.dirty.get(idx)
                stored[idx] = self.chunks.put(bytes(buf) if buf is not None else self._whole(content, idx))
        except OSError as exc:
            log.error("storing %d dirty chunks failed: %s", len(indices), exc)
            raise FsError(storage_errno(exc), f"cannot store written data: {exc.strerror}") from exc
        for idx, cid in stored.items():
            content.overlay[idx] = cid
            content.dirty.pop(idx, None)
            content.drop_patch(idx)

    def _spill(self, content: OpenContent, keep: int) -> None:
        """Bound memory: store every dirty chunk but ``keep`` (the one being written)."""
        self._store_dirty(content, sorted(i for i in [*content.dirty, *content.patches] if i != keep))

    def _commit(self, ino: int, content: OpenContent, *, durable: bool = False) -> None:
        """Store dirty chunks, the manifest and the entry: the file's new version becomes visible."""
        if content.unlinked or not content.changed:
            if durable and not content.unlinked:
                self.chunks.sync()
            return
        path = self.inodes.path(ino)
        e = self.namespace.get_any(path)
        if e is None:
            raise FsError(errno.ENOENT, f"{path} vanished while open")
        self._store_dirty(content, sorted([*content.dirty, *content.patches]))
        manifest = self._manifest_of(content, path)
        manifest_id: bytes | None = None
        try:
            if content.size:
                manifest_id = self.chunks.put(manifest.encode())
            if durable:
                self.chunks.sync()
        except OSError as exc:
            raise FsError(storage_errno(exc), f"cannot store the manifest of {path}: {exc.strerror}") from exc
        # Over a tombstone too: a peer deleted the file while this node was writing it, and
        # the data written here is newer than that delete (the delete stays in history).
        changes: dict[str, Any] = dict(deleted=False, size=content.size, manifest=manifest_id,
                                       mtime_ns=content.mtime_ns, ctime_ns=max(e.ctime_ns, content.mtime_ns))
        base = content.base
        if base is not None and not e.deleted and e.author != self.author and (e.manifest, e.size) != (
                base.manifest, base.size):
            # A peer's version with other content arrived while this was open with unsaved
            # writes: this version supersedes only what was read here, so the peer's stays a
            # concurrent version, shown as a conflict copy (the merge contract), not dropped.
            log.warning("%s: a peer's version arrived while it had unsaved writes here: both are kept "
                        "(the peer's as a conflict copy)", path)
            changes["seen"] = write_context(base, self.namespace.versions(path), self.author, self.replica.last_stamp)
        new = self._successor(e, **changes)
        self._commit_entries([new], durable=durable)
        # Over a version held whole (or none), the new one is whole too: its new chunks were
        # just stored. Only a commit over content partly held here needs a look at each chunk.
        whole = content.manifest is None or self.content.holds_complete(content.manifest)
        content.changed = False
        content.manifest, content.author, content.base = manifest_id, self.author, new
        content.reset(manifest if manifest_id is not None else None)
        if manifest_id is not None:
            self.content.remember(manifest_id, manifest)
            self.content.note_held(manifest_id, manifest, whole=whole)
            self.chunks.note_written_version(manifest_id)
        metrics.commits.inc()

    def _manifest_of(self, content: OpenContent, path: str) -> Manifest:
        """The root of ``content``'s new version, its dirty chunks stored already; the pages it
        adds are stored here (only those on the paths to what changed: `manifest.update`).
        The pages it reads were pinned when the changes were made (`_pin`)."""
        root = content.root if content.root is not None else Manifest.empty(content.chunk_size)
        try:
            manifest, pages = update(root, lambda pid: self._page(content, pid), content.overlay, content.size,
                                     content.limit)
        except (MissingPage, ManifestError) as exc:
            log.error("%s: its new manifest cannot be built: %s", path, exc)
            raise FsError(errno.EIO, f"the manifest of {path} cannot be built: {exc}") from exc
        try:
            for raw in pages.values():
                self.chunks.put(raw)
        except OSError as exc:
            raise FsError(storage_errno(exc), f"cannot store the manifest of {path}: {exc.strerror}") from exc
        return manifest

    async def flush(self, fh: int) -> None:
        """close(2) of one fd: publish so the new version is visible (durable if it was journaled)."""
        h = self._handle(fh)
        if h.writable:
            self._publish(h.ino, h.content)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """fsync(2)/fdatasync(2): returns only when the data survives a crash.

        With a journal, the writes since the last fsync are appended to the file's journal
        and synced: no version is published, and the cost is what changed (see
        `blixfs.journal`). Without one, or when the journal cannot carry it (past its
        bound, not started at the file's first change, renamed since), the file is
        published durably instead. ENOSPC (or EIO) when the disk refuses: nothing
        acknowledged before is lost, and the writes stay in memory for the next try."""
        h = self._handle(fh)
        content = h.content
        if not content.changed and content.base_synced:
            return  # the content is the version published durably here: nothing to make durable
        if content.changed and not content.unlinked and self._journal_sync(h.ino, content):
            return
        self._publish(h.ino, content, durable=True)

    async def release(self, fh: int) -> None:
        """Last close of a handle: commit what is left; forget the content with the last handle.

        If the commit fails the handle is still released (the kernel ignores release
        errors); the failure was already reported to the writer by flush.
        """
        h = self._handles.pop(fh, None)
        if h is None:
            raise FsError(errno.EBADF, f"file handle {fh} is not open")
        h.content.handles -= 1
        try:
            if h.writable:
                self._publish(h.ino, h.content)
        finally:
            if h.content.handles == 0:
                if h.content.changed and not h.content.unlinked:
                    log.error("inode %d closed with %d uncommitted bytes (see earlier errors%s)",
                              h.ino, h.content.dirty_bytes(),
                              "; its fsync'd writes are in its journal" if h.content.journal else "")
                elif h.content.journal is not None:  # unlinked: its data goes with it
                    h.content.journal.discard()
                self._contents.pop(h.ino, None)
                metrics.open_files.set(len(self._contents))
                if self.tracer is not None:
                    self.tracer.closed(h.ino)

    # ------------------------------------------------------- journal and publishing

    def _journal_of(self, ino: int, content: OpenContent) -> FileJournal | _NoJournal:
        """Where a change to ``content`` is recorded: its journal, started at its first change
        since the last publish (so it holds every change over its base). Called after each
        change (write, truncate). A file changed before its journal could start has none
        until its next publish: its fsync publishes."""
        first = content.changed_at is None
        if first:
            content.changed_at = time.monotonic()
        if content.journal is not None:
            return content.journal
        path = self.inodes.known_path(ino)
        if (not first or self.journal is None or ino in self._replaying or content.base is None
                or content.unlinked or path is None):
            return _NO_JOURNAL
        content.journal = self.journal.start(path, content.chunk_size, content.base)
        return content.journal

    def _journal_sync(self, ino: int, content: OpenContent) -> bool:
        """fsync through the journal; False when it cannot carry this one (the caller publishes)."""
        j = content.journal
        if j is None or j.overflowed or j.path != self.inodes.known_path(ino):
            return False
        try:
            if j.file is None and not content.base_synced:
                # The version the journal names must survive a crash with it: a close may have
                # committed it without a sync. syncfs covers the chunks and namespace.db (same
                # home); at most once per journal, not per fsync.
                self.chunks.sync()
                content.base_synced = True
            j.sync()
        except OSError as exc:
            log.error("journal of %s: fsync failed: %s", j.path, exc)
            raise FsError(storage_errno(exc), f"cannot journal the writes of {j.path}: {exc.strerror}") from exc
        metrics.journal_syncs.inc()
        return True

    def _publish(self, ino: int, content: OpenContent, *, durable: bool = False) -> None:
        """Commit ``content`` as a new version, visible to peers; durable when it had a
        journal, which is dropped after (and for an unlinked file, whose data goes).

        Callers: close (flush, release), fsync when the journal cannot carry it, the
        daemon's timer (`publish_due`), `commit_path`, a rename, unmount. On failure
        (ENOSPC) the writes and the journal stay for the next try."""
        j = content.journal
        durable = durable or j is not None
        committed = content.changed and not content.unlinked
        self._commit(ino, content, durable=durable)
        if committed:
            content.base_synced = durable
        if not content.changed:
            content.changed_at = None
        if j is not None and (not content.changed or content.unlinked):
            j.discard()
            content.journal = None

    def publish_due(self, age: float) -> int:
        """Publish (durably) every open file changed more than ``age`` seconds ago and not
        published since: the daemon's timer (``--publish-interval``), so peers see a VM's
        writes coalesced. Failures are logged (the next round tries again). Returns how many."""
        now = time.monotonic()
        published = 0
        for ino, content in list(self._contents.items()):
            if (content.changed and not content.unlinked and content.changed_at is not None
                    and now - content.changed_at >= age):
                try:
                    self._publish(ino, content, durable=True)
                    published += 1
                except FsError as exc:
                    log.error("could not publish %s: %s", self.inodes.known_path(ino), exc)
        return published

    async def commit_path(self, path: str) -> bool:
        """``blixfs commit PATH``: publish ``path``'s unpublished writes now, durably (and
        replay a journal a crash left for it). False if it had none. ENOENT if no such
        entry, EISDIR/EINVAL if not a file, EIO if its journal cannot be replayed yet."""
        replayed = False
        if path in self._unrecovered:
            await self._recover_path(path)
            replayed = True
        e = self._entry(path)
        if e.kind is not Kind.FILE:
            raise FsError(errno.EISDIR if e.kind is Kind.DIR else errno.EINVAL, f"{path} is not a file")
        ino = self.inodes.known(path)
        content = self._contents.get(ino) if ino is not None else None
        if ino is None or content is None or not content.changed or content.unlinked:
            return replayed
        self._publish(ino, content, durable=True)
        return True

    async def _publish_journaled_under(self, src: str) -> None:
        """Before ``src`` (and what is below it) moves: replay journals left for it and publish
        journaled open files, so no journal names a path that no longer holds its file."""
        prefix = src + "/"
        for pending in [p for p in self._unrecovered if p == src or p.startswith(prefix)]:
            await self._recover_path(pending)
        for ino, content in list(self._contents.items()):
            path = self.inodes.known_path(ino)
            if content.journal is not None and path is not None and (path == src or path.startswith(prefix)):
                self._publish(ino, content, durable=True)

    def _find_journals(self, journal: Journal) -> None:
        for file in journal.found:
            try:
                with journal.reader(file) as f:
                    header, _ = read_journal(f, file.name)
            except (JournalError, OSError) as exc:
                log.warning("journal %s holds nothing acknowledged (%s): dropped", file, exc)
                journal.remove(file)
                continue
            self._unrecovered.setdefault(header.path, []).append(file)
        if self._unrecovered:
            log.info("journals of %d files left by the last run: replaying them before they are read",
                     len(self._unrecovered))

    @property
    def unrecovered(self) -> list[str]:
        """Paths with a journal left by the last run, not replayed yet."""
        return list(self._unrecovered)

    async def recover_journals(self) -> list[str]:
        """Replay every journal the last run left (after a crash) over the version it names,
        publish the result durably, drop the journal. The daemon calls it once on the
        network, before the mount serves; a file whose replay fails (its base's chunks on
        peers not reachable) keeps its journal, is retried by the daemon's timer and before
        its content is loaded (open fails with EIO meanwhile). Returns those paths."""
        failed = []
        for path in list(self._unrecovered):
            try:
                await self._recover_path(path)
            except FsError:
                failed.append(path)
        return failed

    async def _recover_path(self, path: str) -> None:
        """Replay ``path``'s journals, oldest first (one replay at a time per path); EIO on failure."""
        pending = self._recovering.get(path)
        if pending is not None:
            await pending.wait()
            if path in self._unrecovered:
                raise FsError(errno.EIO, f"{path} has fsync'd writes that could not be replayed yet")
            return
        done = self._recovering[path] = trio.Event()
        try:
            files = self._unrecovered.get(path, [])
            while files:
                await self._replay(files[0])
                files.pop(0)
            self._unrecovered.pop(path, None)
        except (FsError, OSError) as exc:  # OSError: reading the journal file itself
            log.error("%s: its journal could not be replayed yet (%s): kept, tried again later", path, exc)
            raise FsError(errno.EIO, f"{path} has fsync'd writes that could not be replayed yet "
                                     f"({exc}): its journal is kept and tried again") from exc
        finally:
            del self._recovering[path]
            done.set()

    async def _replay(self, file: Path) -> None:
        """Apply one journal over its base and publish the result durably; then drop it.

        The base is the version the writes were made over. The result is committed as a
        successor of the current version if that is the base (or has its content), and
        over a peer's other version as a concurrent one (the same rule as `_commit`: the
        peer's stays, shown as a conflict copy). A later version of this node that has
        seen the base and differs in content (a publish the journal's removal did not
        outlive, a delete, a rename) means there is nothing to replay."""
        assert self.journal is not None
        with self.journal.reader(file) as f:
            try:
                header, records = read_journal(f, file.name)
            except JournalError as exc:
                log.warning("journal %s holds nothing acknowledged (%s): dropped", file, exc)
                self.journal.remove(file)
                return
            path, base = header.path, header.base
            current = self.namespace.get_any(path)
            if (current is not None and current.author == self.author
                    and current.entry_hash() != base.entry_hash() and dominates(current, base)
                    and (current.deleted or (current.manifest, current.size) != (base.manifest, base.size))):
                log.info("journal %s of %s: superseded by this node's later version: dropped", file.name, path)
                self.journal.remove(file)
                return
            if current is None:
                raise FsError(errno.ENOENT, f"{path}: neither its version nor a later one is in the namespace")
            ino = self.inodes.ino(path)
            if ino in self._contents:
                raise FsError(errno.EBUSY, f"{path} is open while its journal is replayed")
            m = await self._load_manifest(base) if base.manifest is not None else None
            if ino in self._contents:  # opened while the manifest was fetched
                raise FsError(errno.EBUSY, f"{path} is open while its journal is replayed")
            content = OpenContent(chunk_size=m.chunk_size if m is not None else header.chunk_size,
                                  size=m.size if m is not None else 0,
                                  mtime_ns=base.mtime_ns, manifest=base.manifest, author=base.author, base=base,
                                  handles=1)
            content.reset(m)
            self._contents[ino] = content
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(ino, content, True)
            self._replaying.add(ino)
            replayed = 0
            try:
                for record in records:
                    if isinstance(record, Truncate):
                        check_file_size(record.size, content.chunk_size)
                        await self._truncate(content, record.size)
                    else:
                        await self.write(fh, record.offset, record.data)
                    replayed += 1
                self._commit(ino, content, durable=True)
            finally:
                self._replaying.discard(ino)
                self._handles.pop(fh, None)
                self._contents.pop(ino, None)
        log.info("journal %s of %s: %d records replayed and published", file.name, path, replayed)
        self.journal.remove(file)

    def dirty_bytes(self) -> int:
        """Written bytes held in memory, not yet in the chunk store (the metrics read it)."""
        return sum(content.dirty_bytes() for content in self._contents.values())

    def open_chunk_ids(self) -> set[ChunkId]:
        """Chunks open files stored but not yet committed (spilled), and the bases of written
        blocks (`Patch`): GC and the cache policy keep them."""
        ids = {cid for content in self._contents.values() for cid in content.overlay.values()}
        ids.update(p.base for content in self._contents.values() for p in content.patches.values())
        ids.discard(HOLE)
        return ids

    def open_versions(self) -> set[bytes]:
        """The versions open files were opened at (or last committed as): GC keeps them whole,
        whatever the namespace now says."""
        return {content.manifest for content in self._contents.values() if content.manifest is not None}

    async def flush_all(self, *, durable: bool = True) -> None:
        """Commit every open file (on unmount). Errors are logged, not raised, so every file gets its try."""
        for ino, content in list(self._contents.items()):
            try:
                self._publish(ino, content, durable=durable)
            except FsError as exc:
                log.error("could not commit inode %d at unmount: %s", ino, exc)

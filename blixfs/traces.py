"""Access traces: which chunks an image's first minutes of reading needed, in which order.

A VM booting from an image reads a few hundred MiB of it, scattered, in much the same
order every boot. A node records that order (`Recording`), publishes it in the
namespace as a small signed record, and a node opening the image cold fetches the
traced chunks in that order ahead of the guest (`Tracer`), at `Priority.TRACE`.

**Recording.** From the first open of a file on this node (the inode's first handle)
until the last handle closes, the first `RECORD_SECONDS` or the first `RECORD_BYTES`
read, or `MAX_TRACE_CHUNKS` distinct chunks, whichever comes first: each clean chunk
read, once, in first-read order, as (index, first 8 bytes of its id); and each chunk
written, as a place the next boot reads (the guest's own data, a grown qcow2's new
clusters: bench_vm's second boot of an image read all 17 chunks the first boot had
written, and nothing else beyond the first boot's reads), with a zero id. Chunks read
from unsaved writes and holes are not recorded (there is nothing to fetch).

**Records** (docs/protocol.md 12.2): one per (file, node), an ordinary signed entry at
``.blixfs-traces/<file key>/<node id>`` (file key: 32 hex digits of BLAKE3 of the
path), kind ``dir``, everything else empty but one xattr, `TRACE_XATTR`, whose value is
the encoded `Trace` (at most 4,096 chunks: 48 KiB). The record's author must be the node
its path names. Like member records, nothing shows them in the mount: no entry exists at
``.blixfs-traces`` itself, and the file system may not create one (EPERM). Receivers
refuse malformed records at sync (`check_record`, in `replica.check_entry`: logged,
never applied); in a closed namespace only writers' records are accepted, and when
traces are used, only records of current writers count. A read-only node keeps its
traces in memory (used for its own later opens), never published.

One record per (file, node), not per version: a VM's image gets a new version every few
seconds while it runs, and records per version would pile up in the namespace. The
record names the version it was recorded on, and each item a chunk by its index (and the
first bytes of its id then). Items are mapped onto the version opened *by index*: a
boot reads the same places of its disk whatever the guest wrote there since (fixed-size
chunking keeps every chunk at its place), so a record of an older version serves a newer
one for the chunks they share and for the places the guest rewrote (measured with
bench_vm: of the 59 chunks a boot of the image after one earlier boot read, 38 were in
the earlier boot's trace unchanged and 5 more at places it had rewritten). That is how a
new version inherits its parent's trace; and since the ids come from the version opened,
a record never makes a node fetch a chunk that is not in that version.

**Merge** (`merge`): the newest `KEEP_RECORDS` records of the file (by timestamp),
each mapped onto the version opened. A chunk held by at least half of them is *common*;
common chunks come first, ordered by the median of their positions in the traces holding
them (earliest first), then the rest by how many traces hold them, then by median
position. So the chunks most boots need come earliest, in boot order, and a chunk only
one boot out of many read does not delay them.

**Prefetch.** At the first open of a file this node does not hold whole, a task in the
tracer's nursery fetches the merged order's chunks not held, `TRACE_PARALLEL` at a time,
in order, at `Priority.TRACE`; when the last handle closes it starts no more (it is not
cancelled: a read may have joined one of its fetches, and would fail with it). It never
blocks the open or a read: a read of a chunk under way joins its fetch (single flight).
`blixfs pull --trace` runs the same plan to the end (`Tracer.pull`).

**Collection.** When a file is deleted or renamed away, on any node, each node that holds
a record of it by itself replaces that record with a tombstone (`Tracer.collect`, at most
once a second, `COLLECT_BATCH` per transaction): only the author may sign its record, so
each removes its own as the deletion reaches it (a node offline meanwhile, when it syncs).
A recording whose file is gone by its close is not published. A renamed file starts with
no trace (records are keyed by path). Not collected: records of files deleted before this
existed, and those of nodes that never come back.

Callers: the daemon builds one `Tracer` and sets it as `Vfs.tracer`; `Vfs` calls
`opened`, `read` and `closed` (sync, cheap), on the trio thread.
"""

from __future__ import annotations

import logging
import statistics
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3
import trio
from lru import LRU

from blixfs import metrics
from blixfs.content import Content
from blixfs.entry import Entry, Kind
from blixfs.errors import FsError
from blixfs.hashing import HOLE, ChunkId, short
from blixfs.manifest import Manifest, ManifestError, MissingPage, PageGet, lookup
from blixfs.members import Role
from blixfs.priority import Priority

if TYPE_CHECKING:  # the replica checks records with this module
    from blixfs.replica import Replica

log = logging.getLogger(__name__)

TRACES_DIR = ".blixfs-traces"
_PREFIX = TRACES_DIR + "/"
TRACE_XATTR = "user.blixfs.trace"
MAGIC = b"BXT1"
PREFIX_BYTES = 8  # of a chunk id, per item: enough to tell a version's chunks apart, 12 bytes an item
MAX_TRACE_CHUNKS = 4096  # items of one record: 48 KiB (1 GiB of 256 KiB chunks)
RECORD_SECONDS = 300.0  # an open is traced for its first 5 minutes ...
RECORD_BYTES = 512 << 20  # ... or its first 512 MiB read, whichever comes first
KEEP_RECORDS = 16  # the newest records of a file that are merged
MIN_PUBLISH_CHUNKS = 2  # a trace of a single chunk (a header probe) is not worth a record
KEEP_LONGER_SECONDS = 86400  # a much shorter trace replaces a node's record only once it is this old
TRACE_PARALLEL = 4  # trace prefetch fetches in flight per open file
LOCAL_TRACES = 256  # files whose unpublished trace a read-only node keeps
COLLECT_BATCH = 256  # records of deleted files removed per transaction (`Tracer.collect`)
_HEADER = struct.Struct(">4s32sIII")  # magic, manifest id, chunk size, recorded milliseconds, count
_ITEM = struct.Struct(">I8s")  # chunk index, first bytes of its id
_FILE_KEY_HEX = 32
_HEX = frozenset("0123456789abcdef")


class TraceError(ValueError):
    """A trace record that does not decode or does not fit its bounds."""


@dataclass(frozen=True)
class Trace:
    """One recorded trace: chunks of ``manifest`` (a file version) in first-read order."""

    manifest: bytes
    chunk_size: int
    items: tuple[tuple[int, bytes], ...]  # (chunk index, first PREFIX_BYTES of its id), distinct indices
    millis: int = 0  # how long the recording ran

    def encode(self) -> bytes:
        """The record's xattr value (docs/protocol.md 12.2): a header, then 12 bytes per item."""
        head = _HEADER.pack(MAGIC, self.manifest, self.chunk_size, min(self.millis, 2**32 - 1), len(self.items))
        return head + b"".join(_ITEM.pack(i, p) for i, p in self.items)

    @classmethod
    def decode(cls, raw: bytes) -> Trace:
        """Inverse of `encode`. TraceError on anything else: wrong magic or length, more than
        `MAX_TRACE_CHUNKS` items, a chunk size out of bounds, an index repeated."""
        if len(raw) < _HEADER.size:
            raise TraceError(f"trace record of {len(raw)} bytes is shorter than its header")
        magic, manifest, chunk_size, millis, count = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise TraceError("not a trace record (bad magic)")
        if count > MAX_TRACE_CHUNKS:
            raise TraceError(f"trace of {count} chunks (at most {MAX_TRACE_CHUNKS})")
        if len(raw) != _HEADER.size + count * _ITEM.size:
            raise TraceError(f"trace record of {len(raw)} bytes does not hold {count} chunks")
        if not 4096 <= chunk_size <= 1 << 30:
            raise TraceError(f"chunk size {chunk_size} out of bounds")
        items: tuple[tuple[int, bytes], ...] = tuple(_ITEM.iter_unpack(raw[_HEADER.size:]))
        if len({i for i, _ in items}) != len(items):
            raise TraceError("a chunk index is repeated")
        return cls(manifest, chunk_size, items, millis)


# ---------------------------------------------------------------------------- records

def file_key(path: str) -> str:
    """The 32 hex digits naming ``path``'s records (BLAKE3 of its UTF-8 bytes)."""
    return blake3.blake3(path.encode("utf-8", "surrogatepass")).hexdigest()[:_FILE_KEY_HEX]


def record_path(path: str, node_id: bytes) -> str:
    return f"{_PREFIX}{file_key(path)}/{node_id.hex()}"


def is_trace_path(path: str) -> bool:
    """Whether ``path`` is in the reserved trace tree (never shown, never written by the VFS)."""
    return path == TRACES_DIR or path.startswith(_PREFIX)


def check_record(e: Entry) -> str | None:
    """Why ``e`` is not a well-formed trace record, for an entry under the reserved tree;
    None for a well-formed one and for every entry outside it."""
    got = _record_trace(e)
    return got if isinstance(got, str) else None


def _record_trace(e: Entry) -> Trace | str | None:
    """`check_record`'s verdict, with the trace decoded on the way (None for a tombstone or
    an entry outside the tree): each record is decoded once, checked or used."""
    if not is_trace_path(e.path):
        return None
    parts = e.path.split("/")
    if len(parts) != 3 or len(parts[1]) != _FILE_KEY_HEX or len(parts[2]) != 64 \
            or not set(parts[1]) <= _HEX or not set(parts[2]) <= _HEX:
        return "reserved path (access traces) that is not a trace record"
    if parts[2] != e.author.hex():
        return "trace record of another node than its author"
    if e.kind is not Kind.DIR or e.mode or e.uid or e.gid or e.size or e.manifest is not None or e.meta \
            or e.target or e.atime_ns is not None:
        return "malformed trace record"
    if e.deleted:
        return None if not e.xattrs else "malformed trace record"
    if set(e.xattrs) != {TRACE_XATTR}:
        return "malformed trace record"
    try:
        return Trace.decode(e.xattrs[TRACE_XATTR])
    except TraceError as exc:
        return f"malformed trace record: {exc}"


def record_entry(replica: Replica, path: str, trace: Trace | None) -> Entry:
    """This node's (unsigned) record of ``trace`` for file ``path``, over the one it holds;
    with ``trace`` None, the tombstone that removes it (the file is gone)."""
    rpath = record_path(path, replica.author)
    seen: dict[bytes, int] = {}
    for v in replica.store.versions(rpath):
        for a, t in v.successor_context().items():
            seen[a] = max(seen.get(a, 0), t)
    ts = replica.stamp(replica.store.get_any(rpath), seen, replica.store.versions(rpath))
    return Entry(path=rpath, kind=Kind.DIR, mode=0, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
                 author=replica.author, timestamp_ns=ts, deleted=trace is None,
                 xattrs={} if trace is None else {TRACE_XATTR: trace.encode()}, seen=seen)


# ---------------------------------------------------------------------------- merge

def merge(traces: Sequence[Sequence[int]], limit: int = MAX_TRACE_CHUNKS) -> list[int]:
    """One order of chunk indices from several traces (module docstring): common chunks (in
    at least half of the traces) by median position, then the rest by how many traces hold
    them, then median position; ties by index. At most ``limit``."""
    positions: dict[int, list[int]] = {}
    n = 0
    for t in traces:
        if not t:
            continue
        n += 1
        seen: set[int] = set()
        for pos, idx in enumerate(t):
            if idx not in seen:
                seen.add(idx)
                positions.setdefault(idx, []).append(pos)
    if not positions:
        return []

    def key(idx: int) -> tuple[int, float, float, int]:
        held = positions[idx]
        median = statistics.median(held)
        if 2 * len(held) >= n:
            return (0, median, -len(held), idx)
        return (1, -len(held), median, idx)
    return sorted(positions, key=key)[:limit]


# ---------------------------------------------------------------------------- recording

@dataclass
class Recording:
    """The trace of one open file while it is recorded (bounded: `MAX_TRACE_CHUNKS` items)."""

    path: str
    manifest: bytes
    chunk_size: int
    started: float = field(default_factory=time.monotonic)
    bytes_read: int = 0
    items: list[tuple[int, bytes]] = field(default_factory=list)
    indices: set[int] = field(default_factory=set)
    done: bool = False

    def note(self, chunks: Iterable[tuple[int, ChunkId, int]], nbytes: int, now: float) -> None:
        """A read of ``nbytes`` touching ``chunks`` ((index, id, length), in file order).
        Stops (``done``) at the first bound reached; reads past it are not recorded."""
        if self.done:
            return
        if now - self.started > RECORD_SECONDS or self.bytes_read >= RECORD_BYTES:
            self.done = True
            return
        self.bytes_read += nbytes
        for idx, cid, _ in chunks:
            if cid == HOLE or idx in self.indices:
                continue
            if len(self.items) >= MAX_TRACE_CHUNKS:
                self.done = True
                return
            self.indices.add(idx)
            self.items.append((idx, bytes(cid[:PREFIX_BYTES])))

    def note_written(self, first: int, last: int, now: float) -> None:
        """Chunks ``first``..``last`` were written: places the next boot reads (the guest's
        own data, a grown image's new clusters), recorded like reads but without an id
        (they have none yet; zeros). Bounded like `note`."""
        if self.done:
            return
        if now - self.started > RECORD_SECONDS:
            self.done = True
            return
        for idx in range(first, last + 1):
            if idx in self.indices:
                continue
            if len(self.items) >= MAX_TRACE_CHUNKS:
                self.done = True
                return
            self.indices.add(idx)
            self.items.append((idx, bytes(PREFIX_BYTES)))

    def trace(self) -> Trace:
        return Trace(self.manifest, self.chunk_size, tuple(self.items),
                     int((time.monotonic() - self.started) * 1000))


# ---------------------------------------------------------------------------- the service

@dataclass
class _Open:
    """A file this node has open, as the tracer follows it."""

    recording: Recording | None
    # Set at the last close: the prefetch starts no more fetches. It is never cancelled: a
    # read of the same chunk may have joined a fetch it started (single flight), and would
    # fail with it.
    stopped: bool = False
    prefetched: dict[ChunkId, int] = field(default_factory=dict)  # fetched by its prefetch, not read yet


Progress = Callable[[int, int], Awaitable[None] | None]


@dataclass
class PullReport:
    """What `Tracer.pull` did."""

    chunks: int = 0  # in the merged trace, within the version
    fetched_bytes: int = 0
    missing_bytes: int = 0  # what was missing when it started
    failed: list[str] = field(default_factory=list)
    fetched: list[int] = field(default_factory=list)  # chunk indices, in the order they arrived


class Tracer:
    """Records this node's traces, publishes them, and prefetches by the merged trace.
    See the module docstring. `serve` runs the prefetch and publish tasks."""

    def __init__(self, replica: Replica, content: Content, *, parallel: int = TRACE_PARALLEL) -> None:
        self.replica = replica
        self.content = content
        self.parallel = parallel
        self._open: dict[int, _Open] = {}
        self._local: LRU[str, tuple[int, Trace]] = LRU(LOCAL_TRACES)  # file path -> (ns, trace): not published
        self._nursery: trio.Nursery | None = None
        self._said_read_only = False
        self.published = 0
        self.collected = 0
        # Files deleted (or renamed away) whose record by this node is to be removed, by
        # record path (`collect`): at most one per record this node holds.
        self._gone: dict[str, str] = {}
        self._gone_wakeup = trio.Event()
        replica.listeners.append(self._on_change)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await self._gone_wakeup.wait()
                    self._gone_wakeup = trio.Event()
                    self.collect()
                    # Deletions come in bursts (rm -r, a sync): one transaction per second at most.
                    await trio.sleep(1.0)
            finally:
                self._nursery = None

    # ------------------------------------------------------------ collecting

    def _on_change(self, changed: list[Entry], source: str | None) -> None:
        """Replica listener (sync, on the trio thread, for local and remote changes alike):
        note the files deleted, whose record by this node `collect` then removes. Cheap for
        everything else: only file tombstones are looked at."""
        for e in changed:
            if e.deleted and e.kind is Kind.FILE and not is_trace_path(e.path):
                self._local.pop(e.path, None)
                rpath = record_path(e.path, self.replica.author)
                # Only records held: the queue stays bounded by this node's records.
                if self.replica.writable and self.replica.store.get(rpath) is not None:
                    self._gone[rpath] = e.path
                    self._gone_wakeup.set()

    def collect(self) -> int:
        """Remove (tombstone, in one transaction) this node's records of the files noted gone
        that are still gone and whose record is live: a deleted or renamed file's trace would
        otherwise stay in every node's namespace for good (up to 48 KiB per file and node).
        Only this node's own records: each node removes its own, as only it may sign them.
        At most `COLLECT_BATCH` per call (one short transaction on the event loop); the rest
        wait for the next. Returns how many were removed; a refusal (a full disk, a revoke)
        is logged and the records stay, as before."""
        batch = list(self._gone.items())[:COLLECT_BATCH]
        for rpath, _ in batch:
            del self._gone[rpath]
        if self._gone:
            self._gone_wakeup.set()
        store = self.replica.store
        tombs = [record_entry(self.replica, path, None) for rpath, path in batch
                 if store.get(path) is None and store.get(rpath) is not None]
        if not tombs:
            return 0
        try:
            self.replica.commit_local(tombs, traces=True)
        except FsError as exc:
            log.warning("%d access trace records of deleted files could not be removed: %s", len(tombs), exc)
            return 0
        self.collected += len(tombs)
        log.info("removed this node's access trace records of %d deleted files", len(tombs))
        return len(tombs)

    # ------------------------------------------------------------ the VFS's hooks

    def opened(self, ino: int, path: str, manifest: bytes | None, root: Manifest | None, author: bytes) -> None:
        """The first handle of ``path`` (inode ``ino``) opened, reading version ``manifest``
        (None: a new or emptied file, nothing to trace or fetch)."""
        if ino in self._open or manifest is None or root is None:
            return
        state = _Open(Recording(path, manifest, root.chunk_size))
        self._open[ino] = state
        if self._nursery is not None and not self.content.holds_complete(manifest):
            self._nursery.start_soon(self._prefetch, state, path, manifest, root, author or None)

    def read(self, ino: int, chunks: Sequence[tuple[int, ChunkId, int]], nbytes: int) -> None:
        """A read of ``nbytes`` of inode ``ino`` touched clean ``chunks`` ((index, id, length))."""
        state = self._open.get(ino)
        if state is None:
            return
        if state.prefetched:
            for _, cid, length in chunks:
                if state.prefetched.pop(cid, None) is not None:
                    metrics.trace_prefetch_bytes.labels("used").inc(length)
        rec = state.recording
        if rec is not None and not rec.done:
            rec.note(chunks, nbytes, time.monotonic())
            if rec.done:
                state.recording = None
                self._finish(rec)

    def wrote(self, ino: int, first: int, last: int) -> None:
        """A write to inode ``ino`` covered chunks ``first``..``last``."""
        state = self._open.get(ino)
        rec = state.recording if state is not None else None
        if rec is not None and not rec.done:
            rec.note_written(first, last, time.monotonic())
            if rec.done and state is not None:
                state.recording = None
                self._finish(rec)

    def closed(self, ino: int) -> None:
        """The last handle of inode ``ino`` closed: publish its trace, stop its prefetch."""
        state = self._open.pop(ino, None)
        if state is None:
            return
        state.stopped = True
        if state.recording is not None:
            self._finish(state.recording)

    # ------------------------------------------------------------ publishing

    def _finish(self, rec: Recording) -> None:
        if len(rec.items) < MIN_PUBLISH_CHUNKS:
            return
        if self.replica.store.get(rec.path) is None:
            return  # deleted or renamed while open: its record would never be collected
        trace = rec.trace()
        if not self.replica.writable:
            if not self._said_read_only:
                log.info("this node may not write the namespace: its access traces are kept here, not published")
                self._said_read_only = True
            self._local[rec.path] = (time.time_ns(), trace)
            return
        try:
            self.publish(rec.path, trace)
        except FsError as exc:  # a full disk, a revoke meanwhile: the trace is kept here
            log.warning("the access trace of %s could not be published: %s", rec.path, exc)
            self._local[rec.path] = (time.time_ns(), trace)

    def publish(self, path: str, trace: Trace) -> bool:
        """Publish ``trace`` as this node's record for ``path``, unless the record held is more
        than twice as long and younger than `KEEP_LONGER_SECONDS` (a header probe, or a boot
        that failed early, does not replace a boot trace; a boot that really reads less
        replaces it after that). Of any version: a running image changes version all the
        time. FsError when the replica refuses."""
        held = self.replica.store.get(record_path(path, self.replica.author))
        if held is not None:
            old = _decoded(held)
            young = time.time_ns() - held.timestamp_ns < KEEP_LONGER_SECONDS * 10**9
            if old is not None and young and len(old.items) > 2 * len(trace.items):
                log.debug("kept the longer access trace of %s (%d chunks, not %d)", path, len(old.items),
                          len(trace.items))
                return False
        self.replica.commit_local([record_entry(self.replica, path, trace)], traces=True)
        self.published += 1
        log.info("published the access trace of %s: %d chunks of version %s", path, len(trace.items),
                 short(trace.manifest))
        return True

    # ------------------------------------------------------------ the merged trace

    def records(self, path: str) -> list[Trace]:
        """The traces of ``path`` that count, newest first: the namespace's records by current
        writers (malformed ones logged and skipped) and this node's unpublished one, at most
        `KEEP_RECORDS`."""
        members = self.replica.members
        held = sorted((e for e in self.replica.store.entries(under=f"{_PREFIX}{file_key(path)}")
                       if not e.deleted and members.allows(e.author, Role.WRITE)),
                      key=lambda e: -e.timestamp_ns)
        found: list[tuple[int, Trace]] = []
        for e in held:  # newest first: only as many decoded as can be kept
            if len(found) == KEEP_RECORDS:
                break
            trace = _decoded(e)
            if trace is not None:
                found.append((e.timestamp_ns, trace))
        local = self._local.get(path)
        if local is not None:
            found.append(local)
        found.sort(key=lambda t: -t[0])
        return [t for _, t in found[:KEEP_RECORDS]]

    async def plan(self, path: str, mid: bytes, root: Manifest, author: bytes | None, *,
                   priority: Priority = Priority.TRACE) -> list[tuple[int, ChunkId]]:
        """The merged trace of ``path`` mapped onto version ``mid`` (root ``root``): (index, id)
        of the version's chunks, in prefetch order. Loads the pages it needs (EIO if one
        cannot be had). Items map by index (module docstring); those past the version's end or
        at a hole are dropped. Pages are fetched at class ``priority``."""
        traces = self.records(path)
        if not traces:
            return []
        wanted = sorted({i for t in traces for i, _ in t.items if i < root.count and t.chunk_size == root.chunk_size})
        ids: dict[int, ChunkId] = {}

        def resolve(get: PageGet) -> None:
            for i in wanted:
                if i not in ids:
                    ids[i] = lookup(root, get, i)  # MissingPage: `walk` loads it and calls again
        await self.content.walk(resolve, mid, author, priority=priority)
        mapped = [[i for i, _ in t.items if ids.get(i, HOLE) != HOLE]
                  for t in traces if t.chunk_size == root.chunk_size]
        return [(i, ids[i]) for i in merge(mapped)]

    async def _prefetch(self, state: _Open, path: str, mid: bytes, root: Manifest, author: bytes | None) -> None:
        try:
            order = await self.plan(path, mid, root, author)
        except (FsError, ManifestError, MissingPage) as exc:
            log.info("no trace prefetch for %s: %s", path, exc)
            return
        if not order or state.stopped:
            return
        started = time.monotonic()
        report = PullReport(chunks=len(order))
        await self._fetch_in_order(order, path, mid, root, author, state=state, report=report)
        log.info("trace prefetch of %s: %d of %d traced chunks fetched (%.1f MiB) in %.1f s%s", path,
                 len(report.fetched), len(order), report.fetched_bytes / (1 << 20), time.monotonic() - started,
                 "; stopped at its close" if state.stopped else "")

    async def _fetch_in_order(self, order: Sequence[tuple[int, ChunkId]], path: str, mid: bytes, root: Manifest,
                              author: bytes | None, *, state: _Open | None = None, report: PullReport | None = None,
                              progress: Progress | None = None, priority: Priority = Priority.TRACE) -> None:
        """Fetch the chunks of ``order`` not held here, in order, `parallel` in flight."""
        store = self.content.store
        send, receive = trio.open_memory_channel[tuple[int, ChunkId]](0)

        async def worker() -> None:
            async for idx, cid in receive:
                length = _length(root, idx)
                try:
                    if not store.has(cid):
                        await self.content.fetch_chunk(cid, mid, idx, author, path, priority=priority)
                except FsError as exc:
                    log.debug("trace prefetch of chunk %s of %s failed: %s", short(cid), path, exc)
                    if report is not None:
                        report.failed.append(str(exc))
                    continue
                metrics.trace_prefetch_bytes.labels("fetched").inc(length)
                if state is not None:
                    state.prefetched[cid] = length
                if report is not None:
                    report.fetched_bytes += length
                    report.fetched.append(idx)
                    if progress is not None:
                        result = progress(report.fetched_bytes, report.missing_bytes)
                        if result is not None:
                            await result

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, self.parallel)):
                nursery.start_soon(worker)
            async with send:
                for idx, cid in order:
                    if state is not None and state.stopped:
                        break  # closed by everyone: the fetches under way finish, no more start
                    if not store.has(cid):
                        await send.send((idx, cid))

    async def pull(self, path: str, mid: bytes, author: bytes | None, *, progress: Progress | None = None,
                   holders: Sequence[str] = (), priority: Priority = Priority.TRACE) -> PullReport:
        """Fetch the traced chunks of version ``mid`` of ``path`` not held here, in trace order,
        at class ``priority`` (`blixfs pull --trace [--priority]`). FsError when the version's
        root or pages cannot be had."""
        root = await self.content.load(mid, author, holders, priority=priority)
        order = await self.plan(path, mid, root, author, priority=priority)
        store = self.content.store
        report = PullReport(chunks=len(order))
        report.missing_bytes = sum(_length(root, i) for i, cid in order if not store.has(cid))
        await self._fetch_in_order(order, path, mid, root, author, report=report, progress=progress,
                                   priority=priority)
        return report


def _length(root: Manifest, idx: int) -> int:
    return root.chunk_size if idx < root.count - 1 else root.size - idx * root.chunk_size


def _decoded(e: Entry) -> Trace | None:
    """The trace of a record held here; None for a tombstone, and (logged) when it is not one."""
    got = _record_trace(e)
    if isinstance(got, str):
        log.warning("ignored trace record %s by %s: %s", e.path, e.author.hex()[:16], got)
        return None
    return got


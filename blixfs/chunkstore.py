"""Content-addressed chunk stores: the `ChunkStore` seam, on disk and in memory.

Invariants every implementation keeps (tests/test_chunkstore_contract.py checks them):

* ``get(cid)`` returns bytes whose BLAKE3 hash is ``cid``, or ``None``. Never other bytes.
* ``put`` never stores holes (all-zero data): it returns `HOLE` and writes nothing.
* A chunk is visible under its id only once whole: a crash mid-put leaves no chunk.
* ``sync()`` makes every chunk put so far durable (survives power loss).

The on-disk store keeps one file per chunk, ``<root>/<hh>/<hex id>``, written to
``<root>/tmp`` and renamed into place. Layout BXC2 (little-endian): a 16-byte header
``b"BXC2" | length: u32 | block size: u32 | low 32 bits of xxh3_64(the 12 bytes before)``,
then for each block ``i`` of the payload (`BLOCK_SIZE` bytes, the last one shorter)
``xxh3_64(block, seed=i): u64 | block``. The xxh3s are for local integrity (bit rot,
torn writes), not trust (the BLAKE3 id is what peers are held to): a mismatch on read
is logged, counted in ``blixfs_chunks_corrupt_total``, the file is removed, and the
chunk reads as missing so it can be restored from a peer or rewritten.

Per-block checksums let `read_range` read and check only the blocks that cover a range
(a 4 KiB guest read: one 16 KiB block, not the 256 KiB chunk), never returning a byte
whose block failed; on the event loop that read is polled, not slept on (`PolledReads`).
It takes the payload length from the in-memory index (from the header for a file
without a row) and assumes `BLOCK_SIZE`; when a block does not check
it reads the whole file (`get`), which decides: corrupt (removed) or a good file in
another layout, which is rewritten in this one. Why 16 KiB: docs/design.md, "The read
path" (a 4 KiB range costs what 4 KiB blocks cost; whole reads stay near 64 KiB's).
Files of the older layout BXC1, ``b"BXC1" | length: u32 | xxh3_64(payload): u64`` then
the payload, are still read (and rewritten as BXC2 on their first range read).

The index (SQLite) can disagree with the files after a crash: a chunk file renamed into
place just before the crash has no row, and a row can outlive its file (a rename lost to a
power cut, a file removed by hand). Each open store holds a marker file
``<root>/open/<pid>-<random>`` under an exclusive flock and removes it at a clean close;
a marker nobody holds locked is a store that crashed. The next store opened while no other
process has the store open then reconciles once (`DiskChunkStore._reconcile`: one scandir
of the 256 directories): files without rows are indexed as written here (never evicted:
they may be the only copy), rows without files are forgotten. Between reconciliations a
`put` of a chunk whose file exists without a row indexes it, and a `get`/`load` that finds
an indexed file gone forgets the row, so neither kind of disagreement lasts.

Callers: `blixfs.vfs.Vfs` on the trio thread (puts of dirty chunks, gets for
reads). Methods are synchronous: local disk I/O of one chunk costs tens of
microseconds, less than a hop to a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import resource
import sqlite3
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio
import xxhash
from lru import LRU

from blixfs import metrics
from blixfs.hashing import HOLE, ChunkId, chunk_id, is_zero, short
from blixfs.manifest import MAX_MANIFEST_BYTES

log = logging.getLogger(__name__)

_HEADER_V1 = struct.Struct("<4sIQ")  # magic, payload length, xxh3_64(payload)
_MAGIC_V1 = b"BXC1"
_HEADER = struct.Struct("<4sIII")  # magic, payload length, block size, low 32 bits of xxh3_64(first 12 bytes)
_MAGIC = b"BXC2"
_DIGEST = struct.Struct("<Q")  # xxh3_64(block, seed=block index), before each block
BLOCK_SIZE = 16 << 10  # payload bytes per checked block (module docstring: why 16 KiB)
_RECORD = _DIGEST.size + BLOCK_SIZE
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
MAX_CHUNK_BYTES = MAX_MANIFEST_BYTES  # manifests can exceed a data chunk; nothing legitimate is larger
DISK_RESERVE_MIN = 1 << 20  # free bytes chunks never take (2% of the disk, within these bounds)
DISK_RESERVE_MAX = 64 << 20
RECENCY_CAPACITY = 1 << 24  # lru-dict drops entries beyond its size: far more chunks than any cache holds


@dataclass(frozen=True, slots=True)
class StoreStats:
    chunks: int
    bytes: int


@dataclass(frozen=True, slots=True)
class StoreHooks:
    """What the running daemon asks of, and hears from, the node's store (`DiskChunkStore.hook`).

    ``admit(nbytes)`` is asked before data written here is stored (the node's
    `blixfs.cache.CachePolicy`): it raises OSError(ENOSPC) when the budget is full of data
    that may be the only copy. ``removed(ids)`` is told of every chunk removed (evicted,
    collected, found corrupt), once per batch: the holdings this node announces follow.
    None: not asked, nobody told."""

    admit: Callable[[int], None] | None = None
    removed: Callable[[list[ChunkId]], None] | None = None


class ChunkStore(Protocol):
    """Where chunk bytes live. See the module docstring for the invariants."""

    def get(self, cid: ChunkId) -> bytes | None:
        """The chunk's bytes, verified, or None when absent (or found corrupt and dropped)."""
        ...

    async def load(self, cid: ChunkId) -> bytes | None:
        """`get` for callers on the event loop that must not wait on the disk (the chunk
        server): what is in memory is returned at once, the rest is read by a worker thread."""
        ...

    def read_range(self, cid: ChunkId, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset + length) of the chunk (fewer past its end, like pread), or
        None when absent or found corrupt (then dropped, as `get` does). Reads and checks
        only what covers the range; never returns bytes whose check failed."""
        ...

    async def load_range(self, cid: ChunkId, offset: int, length: int) -> bytes | None:
        """`read_range` for callers on the event loop that must not wait on the disk."""
        ...

    def has(self, cid: ChunkId) -> bool:
        """Whether the store holds the chunk (cheap: from its index, not verified). A chunk
        whose file vanished behind the store's back counts until a `get`/`load` finds it
        missing; from then on it does not."""
        ...

    def put(self, data: bytes, *, verified_id: ChunkId | None = None) -> ChunkId:
        """Store ``data`` under its BLAKE3 id and return the id; `HOLE` for zeros.

        ``verified_id``: the caller fetched ``data`` and checked that it hashes to this id:
        it is not hashed again, and the chunk is a cache copy (evictable: a peer has it).
        Without it the chunk was written here and is never evicted. Raises OSError (ENOSPC
        on a full disk) with nothing half-written left behind.
        """
        ...

    def delete(self, cid: ChunkId) -> bool:
        """Remove a chunk; True if it was there. The store's removal hook hears of it."""
        ...

    def note_written_version(self, manifest_id: bytes) -> None:
        """A version whose content this node wrote (a commit): its replication is this node's
        duty until it is durable (`blixfs.replication`), whoever later changes its metadata."""
        ...

    def written_versions(self) -> dict[bytes, bool]:
        """Versions this node wrote (manifest id -> durable yet)."""
        ...

    def set_written_versions(self, durable: Iterable[bytes] = (), forget: Iterable[bytes] = (),
                             undurable: Iterable[bytes] = ()) -> None:
        """Mark written versions durable, or forget them (no longer live), or not durable again
        (a holder that counted failed its proof: every chunk of the version is protected again
        by the cache policy, those `mark_replicated` made evictable included)."""
        ...

    def sync(self) -> None:
        """Durability barrier: every chunk put before this call survives a crash."""
        ...

    def advise(self, cids: list[ChunkId]) -> None:
        """Hint: these chunks will be read soon (start loading them; never blocks long)."""
        ...

    def stats(self) -> StoreStats:
        """Number of chunks and payload bytes stored."""
        ...

    def ids(self) -> Iterator[ChunkId]:
        """Every stored chunk id (order unspecified)."""
        ...

    def close(self) -> None: ...


class MemoryChunkStore:
    """A `ChunkStore` in a dict, for unit tests of the layers above."""

    def __init__(self, *, on_removed: Callable[[list[ChunkId]], None] | None = None) -> None:
        self._chunks: dict[ChunkId, bytes] = {}
        self._written: dict[bytes, bool] = {}
        self.fail_with: int | None = None  # set to an errno to make put() fail, e.g. ENOSPC
        self._on_removed = on_removed

    def get(self, cid: ChunkId) -> bytes | None:
        return self._chunks.get(cid)

    async def load(self, cid: ChunkId) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self._chunks.get(cid)

    def read_range(self, cid: ChunkId, offset: int, length: int) -> bytes | None:
        data = self._chunks.get(cid)
        return None if data is None else data[offset : offset + length]

    async def load_range(self, cid: ChunkId, offset: int, length: int) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.read_range(cid, offset, length)

    def has(self, cid: ChunkId) -> bool:
        return cid in self._chunks

    def put(self, data: bytes, *, verified_id: ChunkId | None = None) -> ChunkId:
        if is_zero(data):
            return HOLE
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        cid = verified_id or chunk_id(data)
        self._chunks[cid] = bytes(data)
        return cid

    def delete(self, cid: ChunkId) -> bool:
        found = self._chunks.pop(cid, None) is not None
        if found and self._on_removed is not None:
            self._on_removed([cid])
        return found

    def note_written_version(self, manifest_id: bytes) -> None:
        self._written.setdefault(manifest_id, False)

    def written_versions(self) -> dict[bytes, bool]:
        return dict(self._written)

    def set_written_versions(self, durable: Iterable[bytes] = (), forget: Iterable[bytes] = (),
                             undurable: Iterable[bytes] = ()) -> None:
        for mid in durable:
            if mid in self._written:
                self._written[mid] = True
        for mid in undurable:
            if mid in self._written:
                self._written[mid] = False
        for mid in forget:
            self._written.pop(mid, None)

    def sync(self) -> None:
        pass

    def advise(self, cids: list[ChunkId]) -> None:
        pass

    def stats(self) -> StoreStats:
        return StoreStats(len(self._chunks), sum(map(len, self._chunks.values())))

    def ids(self) -> Iterator[ChunkId]:
        return iter(list(self._chunks))

    def close(self) -> None:
        pass


def _fd_cache_size() -> int:
    """Chunk files kept open for range reads: a quarter of the fds this process may open
    (the daemon raises its limit at start: `raise_fd_limit`), at most 4096 (1 GiB of 256 KiB chunks)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, soft // 4))


def raise_fd_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit (at most 65,536), as
    services do at start: the chunk store keeps files open for range reads."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 1 << 16, 1 << 16)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _close_fd(_cid: ChunkId, fd: int) -> None:
    os.close(fd)


def _write_all(fd: int, parts: list[memoryview]) -> None:
    """Write ``parts`` in order (writev of at most IOV_MAX at a time, no joined copy); a full
    disk shows as a short write first and ENOSPC on the next. Consumes ``parts``."""
    parts.reverse()  # popped from the end: a 64 MiB manifest has 8 Ki parts
    while parts:
        batch = parts[: -_IOV_MAX - 1 : -1]
        written = os.writev(fd, batch)
        if written == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        while parts and written >= len(parts[-1]):
            written -= len(parts.pop())
        if parts and written:
            parts[-1] = parts[-1][written:]


def _encode(data: bytes | bytearray | memoryview) -> list[memoryview]:
    """A chunk file's contents (BXC2, module docstring) as parts for `_write_all`."""
    view = memoryview(data)
    head = _HEADER.pack(_MAGIC, len(view), BLOCK_SIZE, 0)[:12]
    parts = [memoryview(head + struct.pack("<I", xxhash.xxh3_64_intdigest(head) & 0xFFFFFFFF))]
    for i, pos in enumerate(range(0, len(view), BLOCK_SIZE)):
        block = view[pos : pos + BLOCK_SIZE]
        parts.append(memoryview(_DIGEST.pack(xxhash.xxh3_64_intdigest(block, i))))
        parts.append(block)
    return parts


def _parse_header(raw: bytes | bytearray | memoryview) -> tuple[int, int] | str:
    """(payload length, block size) of a BXC2 header, or what is wrong with it."""
    if len(raw) < _HEADER.size:
        return "shorter than its header"
    magic, length, block, check = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        return "bad magic"
    if xxhash.xxh3_64_intdigest(memoryview(raw)[:12]) & 0xFFFFFFFF != check:
        return "header checksum mismatch"
    if block < 512 or block & (block - 1):
        return f"block size {block}"
    return int(length), int(block)


def _decode(raw: bytes | bytearray) -> bytes | str:
    """The payload of a whole chunk file (BXC2 or BXC1), every check passed; else what is wrong."""
    view = memoryview(raw)
    if bytes(view[:4]) == _MAGIC_V1:
        if len(raw) < _HEADER_V1.size:
            return "shorter than its header"
        _, length, digest = _HEADER_V1.unpack_from(raw)
        if length != len(raw) - _HEADER_V1.size:
            return f"length {len(raw) - _HEADER_V1.size}, header says {length}"
        if xxhash.xxh3_64_intdigest(view[_HEADER_V1.size :]) != digest:
            return "xxh3 mismatch"
        return bytes(view[_HEADER_V1.size :])
    header = _parse_header(raw)
    if isinstance(header, str):
        return header
    length, block = header
    blocks = -(-length // block)
    if len(raw) != _HEADER.size + length + blocks * _DIGEST.size:
        return f"{len(raw)} bytes, header says {length} in {blocks} blocks"
    parts = []
    pos = _HEADER.size
    for i in range(blocks):
        n = min(block, length - i * block)
        part = view[pos + _DIGEST.size : pos + _DIGEST.size + n]
        if xxhash.xxh3_64_intdigest(part, i) != _DIGEST.unpack_from(raw, pos)[0]:
            return f"xxh3 mismatch in block {i}"
        parts.append(part)
        pos += _DIGEST.size + n
    return b"".join(parts)


def _span(size: int, offset: int, length: int) -> tuple[int, int, int, int] | None:
    """Where the blocks covering payload bytes [offset, offset + length) of a current-layout
    file of ``size`` payload bytes lie: (file offset, byte count, first block, end of the
    range clipped to the payload); None for an empty range."""
    end = min(offset + length, size)
    if offset >= end:
        return None
    first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
    start = _HEADER.size + first * _RECORD
    stop = _HEADER.size + last * _RECORD + _DIGEST.size + min(BLOCK_SIZE, size - last * BLOCK_SIZE)
    return start, stop - start, first, end


def _range_checked(buf: bytes | bytearray, size: int, offset: int, end: int, first: int) -> bytes | None:
    """Payload bytes [offset, end) out of ``buf``, the records of blocks ``first``... as
    `_span` placed them, if every block's xxh3 checks; None if one does not or ``buf`` is short."""
    view = memoryview(buf)
    parts = []
    pos, i = 0, first
    while pos < len(buf):
        n = min(BLOCK_SIZE, size - i * BLOCK_SIZE)
        block = view[pos + _DIGEST.size : pos + _DIGEST.size + n]
        if len(block) != n or xxhash.xxh3_64_intdigest(block, i) != _DIGEST.unpack_from(buf, pos)[0]:
            return None
        base = i * BLOCK_SIZE
        parts.append(block[max(offset - base, 0) : min(end - base, n)])
        pos += _DIGEST.size + n
        i += 1
    return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)


def _check_size(data: bytes) -> None:
    if len(data) > MAX_CHUNK_BYTES:
        raise OSError(errno.EFBIG, f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}")


def _read_into(fd: int, buf: bytearray, pos: int, base: int = 0) -> None:
    """Fill ``buf[pos:]`` from ``fd`` at offset ``base + pos``, cut at the end of the file
    (a worker thread's part of `load` and `load_range`; the wait of `PolledReads.pread`)."""
    view = memoryview(buf)
    while pos < len(buf):
        got = os.preadv(fd, [view[pos:]], base + pos)
        if got == 0:  # the file shrank under us: the length check then reports it
            del view
            del buf[pos:]
            return
        pos += got


async def _pread_nowait(fd: int, count: int, offset: int) -> bytearray:
    """``count`` bytes of ``fd`` at ``offset`` (fewer at its end) for a caller on the event
    loop: what the page cache holds is read at once (RWF_NOWAIT), the rest by a worker thread."""
    buf = bytearray(count)
    try:
        got = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        got = 0
    if got < count:
        await trio.to_thread.run_sync(_read_into, fd, buf, got, offset)  # not abandoned: fd stays open
    else:
        await trio.lowlevel.checkpoint()
    return buf


class PolledReads:
    """Small reads from the disk for the event loop, polled instead of slept on.

    Caller: `DiskChunkStore.read_range` (a guest's random read, served synchronously on the
    trio thread). A read whose pages are cached is one ``preadv(RWF_NOWAIT)``. One that needs
    the disk starts it with that same call (the kernel begins reading what it could not
    return) and then asks again, without sleeping, until the bytes are there or `limit`
    seconds have passed; after that a blocking read waits for the rest. Whichever way, the
    bytes are what a ``pread`` returns (fewer at the end of the file).

    Why: the event loop waits for this read either way; sleeping on it costs a wake-up on
    top of the disk's time, and on a VM whose idle vCPUs halt that wake-up is an exit to the
    host: measured on this machine kind, 0.01 to 0.03 ms of a cold 4 KiB guest read of
    about 0.2 ms, at the same CPU (docs/design.md, "Where a 4 KiB O_DIRECT read's time
    goes"). The limit adapts as QEMU's event-loop polling does (`poll-max-ns`): a read that
    took longer than `POLL_MAX` in all (a slow disk, a busy one) halves it, down to no
    polling; one that needed less than `POLL_MAX` but more than the limit doubles it again
    (from `POLL_GROW_START`). So a disk slower than the bound stops costing polling CPU, and
    the polling is never more than `POLL_MAX` of CPU per read.
    """

    POLL_MAX = 200e-6
    POLL_GROW_START = 25e-6

    def __init__(self) -> None:
        self.limit = self.POLL_MAX
        self.supported = True  # False once RWF_NOWAIT is refused (then plain preads)
        self._cached = metrics.range_reads.labels("cached")
        self._polled = metrics.range_reads.labels("polled")
        self._waited = metrics.range_reads.labels("waited")

    def pread(self, fd: int, count: int, offset: int) -> bytearray:
        """``count`` bytes of ``fd`` at ``offset``, fewer at the end of the file (like pread)."""
        buf = bytearray(count)
        filled, started = self._poll(fd, buf, offset) if self.supported else (0, 0.0)
        if filled < len(buf):  # past the limit, or not polled: sleep on the rest
            _read_into(fd, buf, filled, offset)
            self._waited.inc()
        else:
            (self._polled if started else self._cached).inc()
        if started:
            self._adapt(time.perf_counter() - started)
        return buf

    def _poll(self, fd: int, buf: bytearray, offset: int) -> tuple[int, float]:
        """Fill ``buf`` by RWF_NOWAIT reads until it is full, the file ends (``buf`` is cut
        there), or the limit has passed since a read first found the disk needed. Returns
        (bytes filled, when that first read was; 0.0 if none was)."""
        view = memoryview(buf)
        pos, started, end_of_file = 0, 0.0, False
        try:
            while pos < len(buf):
                try:
                    got = os.preadv(fd, [view[pos:]], offset + pos, os.RWF_NOWAIT)
                except BlockingIOError:
                    now = time.perf_counter()
                    started = started or now
                    if now - started >= self.limit:
                        break
                    continue
                if got == 0:
                    end_of_file = True
                    break
                pos += got
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.info("the chunk store's file system refuses RWF_NOWAIT reads (%s): range reads sleep on the disk", exc)
            self.supported = False
        finally:
            view.release()
        if end_of_file:
            del buf[pos:]
        return pos, started

    def _adapt(self, took: float) -> None:
        """QEMU's rule: no change when polling was enough; halve past the bound; else grow."""
        if took <= self.limit:
            return
        if took > self.POLL_MAX:
            self.limit = self.limit / 2 if self.limit > self.POLL_GROW_START else 0.0
        else:
            self.limit = min(self.POLL_MAX, max(self.POLL_GROW_START, self.limit * 2))


def _syncfs(fd: int) -> None:
    """syncfs(2) on the filesystem holding ``fd``: one call flushes every chunk written so far,
    far cheaper than an fsync per chunk file plus one per directory."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


class DiskChunkStore:
    """A `ChunkStore` of one file per chunk under ``root``, indexed in ``root/index.db``.

    The index (id, size, last access) serves `stats` without walking the tree and
    will carry LRU recency; the files are the truth: a chunk file without an index
    row is still served, and a row without a file reads as missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (root / f"{i:02x}").mkdir(exist_ok=True)
        self._marker_fds: list[int] = []
        crashed = self._claim_marker()
        if crashed is not None:
            for name in os.listdir(self._tmp):  # leftovers of puts a crash interrupted
                (self._tmp / name).unlink(missing_ok=True)
        self._dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        # Open files of chunks read by range, for the event loop's reads only (a worker thread's
        # read opens its own): a guest's 4 KiB read is then one pread, without a path lookup
        # that, with the dentry cache cold, is a disk read of its own. A chunk file is never
        # changed in place (written whole, renamed): an open one reads its bytes while it is
        # there; its fd is closed when the file is removed or rewritten (`_drop_fd`).
        self._fds: LRU[ChunkId, int] = LRU(_fd_cache_size(), callback=_close_fd)
        self._polled = PolledReads()  # the same reads: polled, not slept on
        self._db = sqlite3.connect(root / "index.db", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS chunks (id BLOB PRIMARY KEY, size INTEGER NOT NULL,"
            " atime INTEGER NOT NULL, fetched INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS written_versions (manifest BLOB PRIMARY KEY,"
                         " durable INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(chunks)")}
        if "fetched" not in columns:  # an index from before the cache budget: all chunks were written here
            self._db.execute("ALTER TABLE chunks ADD COLUMN fetched INTEGER NOT NULL DEFAULT 0")
        # Recency in memory (lru-dict), loaded oldest first so the newest end up most recent.
        # Value: size * 2 + 1 for a fetched (evictable) chunk, size * 2 for one written here.
        self._recency: LRU[ChunkId, int] = LRU(RECENCY_CAPACITY)
        self._total = 0
        for cid, size, fetched in self._db.execute("SELECT id, size, fetched FROM chunks ORDER BY atime"):
            self._recency[ChunkId(cid)] = size * 2 + fetched
            self._total += size
        self._touched: set[ChunkId] = set()
        if crashed:
            self._reconcile()
            for marker in crashed:  # only now: a crash during the scan leaves them for the next open
                marker.unlink(missing_ok=True)
        self._hooks: StoreHooks | None = None  # set once by the daemon: `hook`
        self.written_generation = 0  # bumped by each new written version (the cache policy recomputes)

    def _claim_marker(self) -> list[Path] | None:
        """Create and lock this store's open marker. Returns the markers of stores that crashed
        (nobody holds their lock) when no other process has the store open, else None: a live
        store may be mid-put (a temp file not yet renamed, a file not yet indexed)."""
        markers = self.root / "open"
        markers.mkdir(exist_ok=True)
        crashed: list[Path] = []
        live = False
        for name in os.listdir(markers):
            path = markers / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # its store closed meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live = True
            else:
                crashed.append(path)
            finally:
                os.close(fd)
        path = markers / f"{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._marker_fds.append(fd)
        self._marker = path
        # The marker must survive a power cut that chunk files written from now on survive.
        dir_fd = os.open(markers, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return None if live else crashed

    def _reconcile(self) -> None:
        """After a crash: index chunk files that have no row, forget rows whose file is gone.

        One scandir per directory, one header read per file without a row: seconds for
        millions of chunks, paid only after an unclean shutdown."""
        started = time.monotonic()
        indexed: list[tuple[ChunkId, int, int]] = []
        gone: list[ChunkId] = []
        by_dir: dict[int, list[ChunkId]] = {}
        for cid in list(self._recency.keys()):  # lru-dict: keys() is a list, and no __iter__
            by_dir.setdefault(cid[0], []).append(cid)
        for i in range(256):
            present: set[bytes] = set()
            with os.scandir(self.root / f"{i:02x}") as it:
                for item in it:
                    try:
                        cid = ChunkId(bytes.fromhex(item.name))
                    except ValueError:
                        continue
                    if len(cid) != 32:
                        continue
                    present.add(cid)
                    if cid not in self._recency:
                        size = self._header_length(Path(item.path))
                        if size is not None:
                            indexed.append((cid, size, item.stat().st_mtime_ns))
            gone.extend(cid for cid in by_dir.get(i, ()) if cid not in present)
        for cid in gone:
            self._forget(cid)
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR IGNORE INTO chunks (id, size, atime, fetched) VALUES (?, ?, ?, 0)",
                             indexed)
        self._db.execute("COMMIT")
        for cid, size, _ in indexed:  # as written here: it may be the only copy, so never evicted
            self._recency[cid] = size * 2
            self._total += size
        log.warning("chunk store %s was not closed cleanly: indexed %d chunk files that had no index row, "
                    "forgot %d rows whose file was gone (%.1f s)", self.root, len(indexed), len(gone),
                    time.monotonic() - started)

    @staticmethod
    def _header_length(path: Path) -> int | None:
        """The payload length a chunk file's header states, or None if it has no valid header
        (a torn file: removed, as a read would remove it)."""
        try:
            with open(path, "rb", buffering=0) as f:
                raw = f.read(_HEADER.size)
        except FileNotFoundError:
            return None
        if len(raw) == _HEADER_V1.size and raw[:4] == _MAGIC_V1:
            return int(_HEADER_V1.unpack(raw)[1])
        header = _parse_header(raw)
        if not isinstance(header, str):
            return header[0]
        log.error("chunk file %s has no valid header: removed", path.name[:12])
        path.unlink(missing_ok=True)
        return None

    def _missing(self, cid: ChunkId) -> None:
        """A read found no file: if the index says the chunk is held, it is not any more."""
        if cid in self._recency:
            log.warning("chunk %s is indexed but its file is gone: forgotten, it reads as missing", short(cid))
            self._forget(cid)
            self._removed([cid])

    def _path(self, cid: ChunkId) -> Path:
        h = cid.hex()
        return self.root / h[:2] / h

    def get(self, cid: ChunkId) -> bytes | None:
        path = self._path(cid)
        try:
            with open(path, "rb", buffering=0) as f:
                raw = f.readall()
        except FileNotFoundError:
            self._missing(cid)
            return None
        return self._checked(cid, path, raw)

    async def load(self, cid: ChunkId) -> bytes | None:
        path = self._path(cid)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._missing(cid)
            await trio.lowlevel.checkpoint()
            return None
        try:
            raw = await _pread_nowait(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        return self._checked(cid, path, raw)

    def _open_chunk(self, cid: ChunkId) -> int:
        """An fd of the chunk's file. Relative to the store's directory and without pathlib:
        on a 4 KiB read this path and its lookup were a third of the daemon's time."""
        h = cid.hex()
        return os.open(f"{h[:2]}/{h}", os.O_RDONLY, dir_fd=self._dir_fd)

    def read_range(self, cid: ChunkId, offset: int, length: int) -> bytes | None:
        fd = self._fds.get(cid)
        if fd is None:
            try:
                fd = self._open_chunk(cid)
            except FileNotFoundError:
                self._missing(cid)
                return None
            # Range reads are a guest's random I/O: no kernel read-ahead (it would turn a 16 KiB
            # read of a cold chunk into 128 KiB, twice the disk time). Whole-chunk reads open their own fd.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[cid] = fd
        size = self._current_size(cid, fd)
        if size is not None:
            span = _span(size, offset, length)
            if span is None:
                return b""
            start, count, first, end = span
            data = _range_checked(self._polled.pread(fd, count, start), size, offset, end, first)
            if data is not None:
                metrics.chunk_reads.inc()
                return data
        self._drop_fd(cid)  # the whole-file path may rewrite or remove it
        return self._whole_range(cid, self.get(cid), offset, length)

    def _drop_fd(self, cid: ChunkId) -> None:
        """Close the cached fd of ``cid``'s file (removed, rewritten, or not readable by block)."""
        fd = self._fds.pop(cid, None)  # pop does not call the callback
        if fd is not None:
            os.close(fd)

    async def load_range(self, cid: ChunkId, offset: int, length: int) -> bytes | None:
        try:
            fd = self._open_chunk(cid)
        except FileNotFoundError:
            self._missing(cid)
            await trio.lowlevel.checkpoint()
            return None
        try:
            size = self._current_size(cid, fd)
            if size is not None:
                span = _span(size, offset, length)
                if span is None:
                    await trio.lowlevel.checkpoint()
                    return b""
                start, count, first, end = span
                data = _range_checked(await _pread_nowait(fd, count, start), size, offset, end, first)
                if data is not None:
                    metrics.chunk_reads.inc()
                    return data
        finally:
            os.close(fd)
        return self._whole_range(cid, await self.load(cid), offset, length)

    def _current_size(self, cid: ChunkId, fd: int) -> int | None:
        """The payload length of chunk ``cid`` if its file ``fd`` can be read by block: from the
        index (no read), else from the file's header; None when the file is not in the current
        layout (BXC1, another block size, a bad header): the whole-file path then decides."""
        value = self._recency.get(cid)  # also makes it the most recent
        if value is not None:
            self._touched.add(cid)
            return value // 2
        header = _parse_header(os.pread(fd, _HEADER.size, 0))
        if isinstance(header, str) or header[1] != BLOCK_SIZE:
            return None
        return header[0]

    def _whole_range(self, cid: ChunkId, data: bytes | None, offset: int, length: int) -> bytes | None:
        """A range read that could not be served by block: ``data`` is the whole chunk as
        `get`/`load` checked it (None: missing, or corrupt and removed). A good file in an
        older layout is rewritten in the current one, so the next range read is cheap."""
        if data is None:
            return None
        path = self._path(cid)
        try:
            with open(path, "rb", buffering=0) as f:
                header = _parse_header(f.read(_HEADER.size))
            if isinstance(header, str) or header[1] != BLOCK_SIZE:
                self._write_file(cid, data, replace=True)
                log.info("chunk %s rewritten in the block-checked layout (%s)", short(cid),
                         header if isinstance(header, str) else f"block size {header[1]}")
        except OSError as exc:  # a full disk: the old file still reads, by its slow path
            log.debug("chunk %s kept in its old layout: %s", short(cid), exc)
        return data[offset : offset + length]

    def _checked(self, cid: ChunkId, path: Path, raw: bytes | bytearray) -> bytes | None:
        """The payload of a chunk file's bytes if its header and xxh3 check; else the file is removed."""
        metrics.chunk_reads.inc()
        payload = _decode(raw)
        if not isinstance(payload, str):
            if self._recency.get(cid) is not None:  # get() makes it the most recent
                self._touched.add(cid)
            return payload
        log.error("chunk %s is corrupt on disk (%s): removed, it reads as missing", short(cid), payload)
        metrics.chunks_corrupt.inc()
        path.unlink(missing_ok=True)
        self._forget(cid)
        self._removed([cid])
        return None

    def has(self, cid: ChunkId) -> bool:
        # The in-memory index, not a stat per call: read-ahead asks for every chunk it plans.
        return cid in self._recency

    def put(self, data: bytes, *, verified_id: ChunkId | None = None) -> ChunkId:
        if is_zero(data):
            return HOLE
        _check_size(data)
        cid = verified_id or chunk_id(data)
        fetched = verified_id is not None
        admit = self._hooks.admit if self._hooks is not None else None
        if not fetched and admit is not None and cid not in self._recency:
            admit(len(data))
        # Also when the file was there without a row: a crash between rename and index left it.
        if self._write_file(cid, data) or cid not in self._recency:
            self._index(cid, len(data), fetched)
        return cid

    def _write_file(self, cid: ChunkId, data: bytes, *, replace: bool = False) -> bool:
        """Write the chunk file (temp file, then rename); False if it was there already
        (``replace``: rewrite it anyway, as one atomic rename over the old file).

        ENOSPC when the write would leave less than the reserve free on the filesystem:
        chunks never take the last of the disk, so the namespace (SQLite) can still commit a
        delete, a rename or a small write that frees or needs little room."""
        path = self._path(cid)
        if not replace and os.path.exists(path):  # the file, not the index: the files are the truth
            return False
        st = os.statvfs(self._dir_fd)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        if free - len(data) < max(DISK_RESERVE_MIN, min(DISK_RESERVE_MAX, total // 50)):
            raise OSError(errno.ENOSPC, f"No space left on device (keeping the last {free} bytes of the disk "
                                        "for metadata)")
        tmp = self._tmp / uuid.uuid4().hex
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, _encode(data))
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def _index(self, cid: ChunkId, size: int, fetched: bool) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO chunks (id, size, atime, fetched) VALUES (?, ?, ?, ?)",
            (cid, size, time.time_ns(), int(fetched)),
        )
        if cid not in self._recency:
            self._total += size
        self._recency[cid] = size * 2 + int(fetched)
        metrics.chunks_stored.inc()
        metrics.chunk_bytes_stored.inc(size)

    def delete(self, cid: ChunkId) -> bool:
        found = self._delete(cid)
        if found:
            self._removed([cid])
        return found

    def delete_many(self, cids: Iterable[ChunkId]) -> list[ChunkId]:
        """Remove these chunks; the removal hook (`StoreHooks.removed`) hears of them once.
        Returns those that were there."""
        gone = [cid for cid in cids if self._delete(cid)]
        self._removed(gone)
        return gone

    def _delete(self, cid: ChunkId) -> bool:
        self._forget(cid)
        try:
            self._path(cid).unlink()
        except FileNotFoundError:
            return False
        return True

    def _removed(self, cids: list[ChunkId]) -> None:
        removed = self._hooks.removed if self._hooks is not None else None
        if cids and removed is not None:
            removed(cids)

    def hook(self, hooks: StoreHooks) -> None:
        """Ask and tell ``hooks`` (`StoreHooks`) from now on; once per store (asserted), by the
        daemon before it serves. The store is opened with the node, before the daemon's
        services exist (offline gc and status use it without them), so this is the one
        step that joins them."""
        assert self._hooks is None, "the store is hooked once"
        self._hooks = hooks

    def note_written_version(self, manifest_id: bytes) -> None:
        cur = self._db.execute("INSERT OR IGNORE INTO written_versions (manifest, durable) VALUES (?, 0)",
                               (manifest_id,))
        if cur.rowcount:
            self.written_generation += 1

    def written_versions(self) -> dict[bytes, bool]:
        return {bytes(m): bool(d) for m, d in self._db.execute("SELECT manifest, durable FROM written_versions")}

    def set_written_versions(self, durable: Iterable[bytes] = (), forget: Iterable[bytes] = (),
                             undurable: Iterable[bytes] = ()) -> None:
        self._db.executemany("UPDATE written_versions SET durable = 1 WHERE manifest = ?", [(m,) for m in durable])
        cur = self._db.executemany("UPDATE written_versions SET durable = 0 WHERE manifest = ? AND durable = 1",
                                   [(m,) for m in undurable])
        if cur.rowcount:
            self.written_generation += 1  # the cache policy protects those chunks again at once
        self._db.executemany("DELETE FROM written_versions WHERE manifest = ?", [(m,) for m in forget])

    def _forget(self, cid: ChunkId) -> None:
        self._drop_fd(cid)
        self._db.execute("DELETE FROM chunks WHERE id = ?", (cid,))
        value = self._recency.pop(cid, None)
        if value is not None:
            self._total -= value // 2
        self._touched.discard(cid)

    @property
    def total_bytes(self) -> int:
        return self._total

    def evict(self, budget: int, keep: Callable[[ChunkId], bool], *, low_water: float = 0.9,
              reserve: int = 0) -> list[ChunkId]:
        """When over ``budget`` bytes, delete least recently used fetched chunks until under
        ``low_water`` x budget. Never deletes a chunk written here (it may be the only copy)
        nor one ``keep`` protects (the cache policy decides: `blixfs.cache`). Returns what
        was deleted.

        Runs inline (an unlink per chunk): a reader streaming far more than the budget
        pays a few milliseconds every tenth of the budget, and never stalls.
        """
        if self._total + reserve <= budget:
            return []
        target = int(budget * low_water) - reserve
        evicted: list[ChunkId] = []
        # items() lists the most recent first, without touching recency: walk from the other end.
        for cid, value in reversed(self._recency.items()):
            if self._total <= target:
                break
            if not value & 1 or keep(cid):
                continue
            self._delete(cid)
            evicted.append(cid)
        if self._total + reserve > budget:
            log.warning("cache holds %d bytes, over its budget of %d: the rest is data written here (not yet "
                        "replicated) or pinned", self._total, budget)
        metrics.chunks_evicted.inc(len(evicted))
        self._removed(evicted)
        return evicted

    def mark_replicated(self, cids: Iterable[ChunkId]) -> int:
        """These chunks, written here, are now held whole by enough other nodes: the cache may
        evict them like fetched ones. Returns how many changed."""
        changed = []
        for cid in cids:
            value = self._recency.get(cid)  # also makes them recent: just written, likely read again
            if value is not None and not value & 1:
                self._recency[cid] = value | 1
                changed.append((cid,))
        if changed:
            self._db.executemany("UPDATE chunks SET fetched = 1 WHERE id = ?", changed)
        return len(changed)

    def index_rows(self, now: int) -> Iterator[tuple[ChunkId, int, int]]:
        """(id, size, last use in ns) of every indexed chunk; chunks read since the last
        `save_recency` count as used at ``now``."""
        rows = self._db.execute("SELECT id, size, atime FROM chunks").fetchall()
        for cid, size, atime in rows:
            yield ChunkId(cid), size, now if cid in self._touched else atime

    def save_recency(self) -> None:
        """Persist access times of chunks read since the last call (recency survives restarts)."""
        if not self._touched:
            return
        now = time.time_ns()
        order = {cid: i for i, cid in enumerate(reversed(self._recency.keys())) if cid in self._touched}
        self._db.executemany("UPDATE chunks SET atime = ? WHERE id = ?",
                             [(now - (len(order) - i), cid) for cid, i in order.items()])
        self._touched.clear()

    def sync(self) -> None:
        _syncfs(self._dir_fd)

    def advise(self, cids: list[ChunkId]) -> None:
        # posix_fadvise(WILLNEED) queues asynchronous reads of the whole file in the kernel:
        # a few microseconds here instead of a blocking disk read later.
        for cid in cids:
            try:
                fd = os.open(self._path(cid), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def stats(self) -> StoreStats:
        count, total = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM chunks").fetchone()
        return StoreStats(int(count), int(total))

    def ids(self) -> Iterator[ChunkId]:
        for sub in sorted(self.root.glob("[0-9a-f][0-9a-f]")):
            for name in os.listdir(sub):
                if len(name) == 64:
                    yield ChunkId(bytes.fromhex(name))

    def close(self) -> None:
        try:
            self.save_recency()
        except (sqlite3.Error, OSError) as exc:  # a full disk: recency is worth less than a clean stop
            log.warning("could not save chunk recency at close: %s", exc)
        self._db.close()
        for cid in list(self._fds.keys()):
            self._drop_fd(cid)
        os.close(self._dir_fd)
        self._marker.unlink(missing_ok=True)  # a clean close: the next open need not reconcile
        for fd in self._marker_fds:
            os.close(fd)
        self._marker_fds.clear()

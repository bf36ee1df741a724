"""ChunkReader: how the VFS gets chunk bytes: a memory LRU over the chunk store, and read-ahead.

Callers: `blixfs.content.Content` (for the VFS), on the trio thread.

* `get` returns verified bytes or None (missing). A FUSE read is at most 1 MiB and
  usually 128 KiB, so a sequential reader asks for each chunk several times in a
  row: recent chunks stay in memory and are verified once.
* `get_range` serves a read of part of a chunk held here: from memory if the chunk is
  there, else only the store's blocks that cover it (`ChunkStore.read_range`), so a
  4 KiB guest read neither reads nor checks the rest of a 256 KiB chunk.
* `prefetch` tells the store which chunks a sequential reader will want next. The
  disk store turns that into posix_fadvise(WILLNEED), so the kernel reads those
  chunk files asynchronously while this thread keeps serving; the later `get` then
  finds them in the page cache. Chunks are separate files, so the kernel's own
  read-ahead of the FUSE file does not cross chunk boundaries by itself.
  (Measured, docs/design.md: Python threads loading chunks ahead cost more in
  hops and GIL hand-offs than they saved.)

Every `get` is counted as a cache hit (memory, store) or miss (fetched), and the chunks
fetched ahead are followed to their use or waste (`blixfs.readahead`), for the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from lru import LRU

from blixfs import metrics
from blixfs.chunkstore import ChunkStore
from blixfs.hashing import ChunkId
from blixfs.readahead import ReadAheadLedger

log = logging.getLogger(__name__)

# Fetches one chunk from its holders (the content layer's, over its fetcher): verified bytes, or FsError(EIO).
Fetch = Callable[[], Awaitable[bytes]]


class ChunkReader:
    """Knows nothing of the network: the content layer (`blixfs.content.Content`) passes
    how to fetch a chunk with each `get`, and fetches ahead what `prefetch` says is not
    held here."""

    def __init__(self, store: ChunkStore, *, cache_chunks: int = 64) -> None:
        self.store = store
        self._cache: LRU[ChunkId, bytes] = LRU(cache_chunks)
        self.ahead = ReadAheadLedger()
        self._hit_memory = metrics.cache_hits.labels("memory")
        self._hit_store = metrics.cache_hits.labels("store")

    def remember(self, cid: ChunkId, data: bytes) -> None:
        """Keep a chunk just fetched in memory (the fetcher's ``on_fetched`` hook), so the
        read that wants a chunk fetched ahead does not read back from disk what was just
        written there."""
        self._cache[cid] = data
        self.ahead.arrived(cid, len(data))

    async def get(self, cid: ChunkId, fetch: Fetch | None = None) -> bytes | None:
        """The chunk's verified bytes; None if this node does not hold it and ``fetch`` is None.

        A chunk not held here is fetched with ``fetch`` (stored on disk once); its
        FsError(EIO), when no holder could serve it in time, propagates.
        """
        data = self._cache.get(cid)
        if data is not None:
            self._hit_memory.inc()
            self.ahead.read(cid)
            return data
        data = self.store.get(cid)
        if data is not None:
            self._hit_store.inc()
            self.ahead.read(cid)
        elif fetch is not None:
            self.ahead.demanded(cid)
            metrics.cache_misses.inc()
            data = await fetch()
        if data is not None:
            self._cache[cid] = data
        return data

    def get_range(self, cid: ChunkId, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset + length) of a chunk held here (fewer past its end), checked:
        from memory if the whole chunk is there, else only the store blocks covering the range
        (a 4 KiB read reads 16 KiB, not the chunk). None if not held here (or found corrupt:
        the store dropped it), for the caller to fetch it whole. Not kept in memory: a range
        is not a chunk, and the store reads it again more cheaply than memory would hold it."""
        data = self._cache.get(cid)
        if data is not None:
            self._hit_memory.inc()
            self.ahead.read(cid)
            return data[offset : offset + length]
        part = self.store.read_range(cid, offset, length)
        if part is not None:
            self._hit_store.inc()
            self.ahead.read(cid)
        return part

    def prefetch(self, cids: Iterable[ChunkId]) -> list[ChunkId]:
        """Hint that ``cids`` will be read soon: local ones are advised to the kernel; returns
        the others (neither in memory nor held), for the caller to fetch in the background."""
        wanted = [cid for cid in cids if cid not in self._cache]
        local = [cid for cid in wanted if self.store.has(cid)]
        self.store.advise(local)
        held = set(local)
        missing = [cid for cid in wanted if cid not in held]
        self.ahead.expect(missing)
        return missing

"""Cache policy: the chunk cache's byte budget and what may never be evicted.

The chunk store (`blixfs.chunkstore.DiskChunkStore`) keeps chunks and their recency and
knows how to evict least recently used ones; this class decides when and which may go.
Never evicted (docs/design.md, "Never lose the last copy"):

* chunks written here, until their version is durable (the store's own flag);
* every chunk of a live version this node wrote that is not durable yet, even one it
  first held as a cache copy: a version that reuses chunks of an older, durable one
  must not lose them here while it is the only one that needs them (the older version's
  replicas may be dropped once it is superseded);
* the chunks of pinned images (`blixfs pin`) and of replicas this node holds for others.

Callers: once the daemon runs, the store asks `admit` before storing data written here
(ENOSPC when the budget is full of what may not be evicted: the daemon passes it in the
store's `blixfs.chunkstore.StoreHooks`); the fetcher's ``on_stored`` hook calls `enforce`
after each fetched chunk; `blixfs status` reads `budget`. All on the trio thread.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

from blixfs.chunkstore import DiskChunkStore
from blixfs.hashing import ChunkId
from blixfs.statefile import StateFileError

log = logging.getLogger(__name__)

RECOMPUTE_SECONDS = 1.0


class CachePolicy:
    """See the module docstring. ``protected`` computes the set of chunks never to evict; it
    is recomputed at most once a second (an eviction asks once per candidate chunk), and at
    once after a new written version (the store's ``written_generation``)."""

    def __init__(self, store: DiskChunkStore, budget: int, protected: Callable[[], set[ChunkId]]) -> None:
        self.store = store
        self.budget = budget
        self._compute = protected
        self._at = -1.0
        self._generation = -1
        self._set: set[ChunkId] = set()
        self._open: Callable[[], set[ChunkId]] | None = None
        self._open_generation: Callable[[], int] = lambda: 0
        self._opened = -1

    def follow_open_files(self, chunks: Callable[[], set[ChunkId]], generation: Callable[[], int]) -> None:
        """Also keep ``chunks()``: what open files need from the store and is referenced by no
        version yet (spilled chunks, the bases of written blocks: `blixfs.vfs.Vfs.open_chunk_ids`),
        recomputed at once when ``generation()`` changes (a new one), not a second later."""
        self._open, self._open_generation = chunks, generation

    def keep(self, cid: ChunkId) -> bool:
        """Whether ``cid`` must stay (see the module docstring)."""
        now = time.monotonic()
        opened = self._open_generation()
        if (now - self._at > RECOMPUTE_SECONDS or self._generation != self.store.written_generation
                or opened != self._opened):
            try:
                self._set, self._at = self._compute(), now
            except StateFileError:  # pins or replicas unknown (logged): evicting anything could lose a copy
                self._at = -1.0  # asked again next time: the file may have been repaired
                return True
            if self._open is not None:
                self._set |= self._open()
            self._generation, self._opened = self.store.written_generation, opened
        return cid in self._set

    def invalidate(self) -> None:
        """Recompute the protected set at the next question (pins or replicas changed)."""
        self._at = -1.0

    def enforce(self) -> list[ChunkId]:
        """Evict fetched chunks beyond the budget, least recently used first."""
        if self.store.total_bytes <= self.budget:
            return []
        evicted = self.store.evict(self.budget, self.keep)
        if evicted:
            log.info("cache over budget: evicted %d chunks", len(evicted))
        return evicted

    def admit(self, nbytes: int) -> None:
        """Room for ``nbytes`` of data written here, or OSError(ENOSPC). Such data may be the
        only copy: it is never evicted, so when the budget is full of it the writer gets
        ENOSPC, until replication makes some of it evictable."""
        if self.store.total_bytes + nbytes <= self.budget:
            return
        self.store.evict(self.budget, self.keep, low_water=1.0, reserve=nbytes)
        if self.store.total_bytes + nbytes > self.budget:
            raise OSError(errno.ENOSPC, f"the chunk cache is full of data not yet replicated "
                                        f"({self.store.total_bytes} of {self.budget} bytes)")

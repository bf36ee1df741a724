"""ChunkReader: how the VFS gets chunk bytes: a memory LRU over the chunk store, and read-ahead.

Callers: `blixfs.vfs.Vfs` on the trio thread.

* `get` returns verified bytes or None (missing). A FUSE read is at most 1 MiB and
  usually 128 KiB, so a sequential reader asks for each chunk several times in a
  row: recent chunks stay in memory and are verified once.
* `prefetch` tells the store which chunks a sequential reader will want next. The
  disk store turns that into posix_fadvise(WILLNEED), so the kernel reads those
  chunk files asynchronously while this thread keeps serving; the later `get` then
  finds them in the page cache. Chunks are separate files, so the kernel's own
  read-ahead of the FUSE file does not cross chunk boundaries by itself.
  (Measured, docs/design.md: Python threads loading chunks ahead cost more in
  hops and GIL hand-offs than they saved.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from lru import LRU

from blixfs.chunkstore import ChunkStore
from blixfs.fetcher import Fetcher, Locate
from blixfs.hashing import ChunkId

log = logging.getLogger(__name__)


class ChunkReader:
    def __init__(self, store: ChunkStore, *, cache_chunks: int = 64) -> None:
        self.store = store
        self._cache: LRU[ChunkId, bytes] = LRU(cache_chunks)
        self.fetcher: Fetcher | None = None

    def use(self, fetcher: Fetcher) -> None:
        """Called by the daemon once the node is on the network: from then on chunks this
        node does not hold are fetched from their holders instead of reading as missing.
        Chunks fetched ahead are kept in memory too, so the read that wants one next does
        not read back from disk what was just written there."""
        self.fetcher = fetcher
        fetcher.on_fetched = self._cache.__setitem__

    async def get(self, cid: ChunkId, holders: Callable[[], Sequence[str]] | None = None,
                  label: str | None = None, locate: Locate | None = None) -> bytes | None:
        """The chunk's verified bytes; None if this node does not hold it and cannot fetch it.

        With a fetcher and ``holders``, a chunk not held here is fetched (stored on disk
        once); FsError(EIO) if no holder could serve it in time.
        """
        data = self._cache.get(cid)
        if data is None:
            data = self.store.get(cid)
            if data is None and self.fetcher is not None and holders is not None:
                data = await self.fetcher.get(cid, holders(), label, locate=locate)
            if data is not None:
                self._cache[cid] = data
        return data

    def prefetch(self, cids: Iterable[ChunkId],
                 holders: Callable[[ChunkId], tuple[Sequence[str], Locate | None]] | None = None,
                 label: str | None = None) -> None:
        """Hint that ``cids`` will be read soon: local ones are advised to the kernel, the
        others fetched in the background when ``holders`` says who has them (and how to
        find more)."""
        wanted = [cid for cid in cids if cid not in self._cache]
        local = [cid for cid in wanted if self.store.has(cid)]
        self.store.advise(local)
        if self.fetcher is not None and holders is not None:
            held = set(local)
            self.fetcher.prefetch(((cid, *holders(cid)) for cid in wanted if cid not in held), label)

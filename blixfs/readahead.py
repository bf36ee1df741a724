"""What became of the chunks fetched ahead of a sequential reader: used or wasted.

`blixfs.reader.ChunkReader` tells the ledger which chunks it hands to the fetcher as
read-ahead (`expect`), which of those arrived (`arrived`, from the fetcher's
``on_fetched`` hook), and every later read of a chunk (`read`). A chunk fetched ahead is
*used* when a read then finds it here (memory or store), and *wasted* when a read had to
fetch it again (it was evicted first) or when it leaves the ledger unread: the ledger
remembers at most `WINDOW` chunks fetched ahead (at 256 KiB chunks, 1 GiB), so memory is
bounded whatever the reader does. A chunk a read fetched itself before its read-ahead
task got to it is neither: the read waited for it (a miss).

Figures go to ``blixfs_readahead_bytes_total{outcome}`` (`blixfs.metrics`); the ledger
also keeps its own totals for tests and reports. Trio thread only.
"""

from __future__ import annotations

from lru import LRU

from blixfs import metrics
from blixfs.hashing import ChunkId

WINDOW = 4096


class ReadAheadLedger:
    """See the module docstring."""

    def __init__(self, window: int = WINDOW) -> None:
        self._expected: LRU[ChunkId, bool] = LRU(window)  # handed to the fetcher, not arrived yet
        self._ahead: LRU[ChunkId, int] = LRU(window, callback=self._unread)  # arrived: id -> bytes
        self.fetched = 0
        self.used = 0
        self.wasted = 0

    def expect(self, cids: list[ChunkId]) -> None:
        for cid in cids:
            self._expected[cid] = True

    def arrived(self, cid: ChunkId, nbytes: int) -> None:
        """A chunk was fetched: counts as read-ahead if it was expected and no read wanted it first."""
        if self._expected.pop(cid, None) is None:
            return
        self._ahead[cid] = nbytes
        self.fetched += nbytes
        metrics.readahead_bytes.labels("fetched").inc(nbytes)

    def demanded(self, cid: ChunkId) -> None:
        """A read must fetch ``cid`` itself: any read-ahead of it is late (or was evicted)."""
        self._expected.pop(cid, None)
        nbytes = self._ahead.pop(cid, None)
        if nbytes is not None:
            self._waste(nbytes)

    def read(self, cid: ChunkId) -> None:
        """A read found ``cid`` here."""
        if not self._ahead:
            return
        nbytes = self._ahead.pop(cid, None)
        if nbytes is not None:
            self.used += nbytes
            metrics.readahead_bytes.labels("used").inc(nbytes)

    def _unread(self, cid: ChunkId, nbytes: int) -> None:
        self._waste(nbytes)

    def _waste(self, nbytes: int) -> None:
        self.wasted += nbytes
        metrics.readahead_bytes.labels("wasted").inc(nbytes)

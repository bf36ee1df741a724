"""Which missing chunk a whole-version fetch takes next, so that nodes pulling one version
at once serve each other instead of all waiting on its one source.

When eight hosts pull an image from one seed at the same time, and each took the chunks
in the file's order, they would all want the same chunks at the same time, which only the
seed holds: its link carries every byte eight times. Instead each fetch picks its next
chunk by who can send it soonest (`ChunkPicker.take`):

* the candidates are a window of the version's missing chunks in an order of the fetch's
  own (shuffled), so hosts hold different chunks early and have something to trade;
* for each of the first `LOOKAHEAD` candidates: its holders (HOLDINGS bitmaps, so partial
  holders count; the version's author holds everything) and the soonest one's expected
  time (`pick_cost`: latency x (1 + requests in flight), `PeerBook.expected`);
* the candidate with the soonest holder wins; among equals, the one with the fewest
  holders (rarest first). So a loaded seed is asked for chunks nobody else has yet, and
  every idle host for what it holds.

**Not piling onto one holder.** A holder with a request of this node under way whose next
request would be expected to take more than `BUSY_SECONDS` (half the attempt deadline)
gets no more until one returns: otherwise eight hosts' workers all queue on the seed at
once, each request waits behind 63 others, and on a slow link they time out (and the seed
is penalised). The latency it answers with regulates how many requests it gets, as a
congestion window would. A holder never measured gets one request at a time until it has
answered. When every candidate's holders are busy, `take` returns None and the fetch waits
for one of its requests to return; with none of its own under way it takes the best
candidate anyway (``force``): a penalised holder may be the only one.

The fetcher then ranks the chunk's holders itself (`PeerBook.rank`, same figures, so
usually the holder the pick counted on) and verifies what it gets by the chunk id: a
holdings claim is only a hint, and a holder that lied costs a DONT_HAVE and the next one.
Nothing here changes what counts as a durable copy (`blixfs.replication`'s proofs).

Cost: one `take` sorts the nodes whose holdings name the version by expected time (listed
once per take, `Holdings.version_holders`: at most the holdings table's 1024) and weighs
`LOOKAHEAD` candidates against the `MAX_HOLDERS` soonest: a crowd of claimants costs a
pick a sort, not 64 x 1024 bit tests. Trio thread only, no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from blixfs.fetcher import ATTEMPT_TIMEOUT
from blixfs.hashing import ChunkId
from blixfs.holdings import NodeHoldings
from blixfs.peers import PeerBook

LOOKAHEAD = 64  # candidates weighed per pick (a pick costs LOOKAHEAD x holders bit tests)
MAX_HOLDERS = 32  # holders weighed per pick, the soonest ones (their count is the rarity's too)
BUSY_SECONDS = ATTEMPT_TIMEOUT / 2  # a holder expected to take longer gets no second request

Holders = Callable[[], Sequence[tuple[str, NodeHoldings]]]


def pick_cost(peers: PeerBook, node: str, busy: float = BUSY_SECONDS) -> float:
    """Expected seconds of one more request to ``node`` (`PeerBook.expected`); math.inf when
    it is busy: a request of ours is under way and the next would take more than ``busy``."""
    expected = peers.expected(node)
    return expected if expected <= busy or not peers.of(node).inflight else math.inf


class ChunkPicker:
    """The missing chunks of one version a fetch has yet to take; see the module docstring.

    ``holders()`` lists the nodes whose holdings name the version, with their records (the
    author as holding it whole), asked once per pick; ``cost(node)`` is the expected
    seconds of one more request to ``node``, math.inf for one not to ask now (`pick_cost`)."""

    def __init__(self, manifest_id: bytes, holders: Holders, cost: Callable[[str], float],
                 rng: random.Random | None = None, lookahead: int = LOOKAHEAD,
                 max_holders: int = MAX_HOLDERS) -> None:
        self.manifest_id = manifest_id
        self._max_holders = max_holders
        self._holders = holders
        self._cost = cost
        self._rng = rng or random.Random()
        self._lookahead = lookahead
        self._pool: list[tuple[int, ChunkId]] = []

    def __len__(self) -> int:
        return len(self._pool)

    def add(self, index: int, cid: ChunkId) -> None:
        """One more missing chunk (chunk ``index`` of the version), at a random place."""
        self._pool.append((index, cid))
        j = self._rng.randrange(len(self._pool))
        self._pool[j], self._pool[-1] = self._pool[-1], self._pool[j]

    def take(self, *, force: bool = False) -> tuple[int, ChunkId] | None:
        """The chunk to fetch next, removed from the pool; None when the pool is empty, or
        when no candidate has a holder to ask now, unless ``force``."""
        if not self._pool:
            return None
        # The cheapest holders only: a pick's work stays bounded however many records name
        # the version (any member can announce up to the holdings table's 1024 nodes).
        costs = sorted(((self._cost(node), i, record) for i, (node, record) in enumerate(self._holders())),
                       key=lambda c: c[:2])
        nodes = [(record, cost) for cost, _, record in costs[:self._max_holders]]
        best_at, best = 0, (math.inf, math.inf)
        for at in range(min(self._lookahead, len(self._pool))):
            index = self._pool[at][0]
            soonest, count = math.inf, 0
            for record, cost in nodes:
                if record.holds(self.manifest_id, index):
                    count += 1
                    soonest = min(soonest, cost)
            score = (soonest, count)
            if score < best:
                best_at, best = at, score
        if best[0] == math.inf and not force:
            return None
        item = self._pool[best_at]
        self._pool[best_at] = self._pool[-1]
        self._pool.pop()
        return item

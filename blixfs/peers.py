"""Peers as this node measured them: request latency and throughput (EWMA), requests in
flight, failures, a penalty box, connection state (set by `blixfs.health`), and addresses.

Callers: the fetcher (ranking holders, recording outcomes), the health monitor, the
replicator (placement), the daemon's reports. All on the trio thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from blixfs import metrics
from blixfs.net.transport import NodeAddr

log = logging.getLogger(__name__)

_EWMA = 0.2
# Peers learnt only from other nodes' relayed HOLDINGS and never reached, at most: anyone
# with read capability can announce any number of invented node ids and addresses.
MAX_EXCHANGE_PEERS = 256
MAX_PENALTY_SECONDS = 600.0  # a holder failing again and again is asked last for at most this long


@dataclass
class PeerStats:
    """What this node measured about one peer."""

    latency: float = 0.002  # seconds per chunk request (EWMA), a guess until measured
    throughput: float = 0.0  # bytes/s (EWMA)
    inflight: int = 0
    bytes_received: int = 0
    chunks_received: int = 0
    failures: int = 0
    bad_data: int = 0
    penalised_until: float = 0.0
    strikes: int = 0  # failures since its last success: each doubles the next penalty
    last_ok: float = 0.0
    # Connection management (blixfs.health): the peer's state as last probed.
    state: str = "unknown"  # connected / degraded / unreachable / unknown
    reason: str = ""  # why degraded or unreachable
    rtt_ms: float | None = None  # QUIC's RTT, else the probe's round trip
    loss: float = 0.0
    last_seen: float = 0.0  # wall clock of the last successful probe or transfer
    found_by: str = ""  # ticket / mdns / exchange (holdings) / incoming
    learnt: float = field(default_factory=time.time)  # wall clock when this node first heard of it

    def expected_seconds(self) -> float:
        return self.latency * (1 + self.inflight)


class PeerBook:
    """Peers' measured figures and addresses (see the module docstring)."""

    def __init__(self, self_id: str) -> None:
        self.self_id = self_id
        self.stats: dict[str, PeerStats] = {}
        self.addrs: dict[str, NodeAddr] = {}
        self._refused = 0
        # Holders a read keeps its deadline for: authors of the versions read (they hold the
        # namespace key) and holders that proved they hold data (`blixfs.replication`). The
        # others are holders on their own word (HOLDINGS, HAVE): see `rank`.
        self.trusted: set[str] = set()

    def reached(self, node_id: str) -> bool:
        """Whether this node ever reached ``node_id`` itself (a probe answered, a transfer)."""
        stats = self.stats.get(node_id)
        return stats is not None and stats.last_seen > 0

    def hearsay(self, node_id: str) -> bool:
        """Whether all this node knows of ``node_id`` comes from third parties (relayed
        HOLDINGS) and it was never reached: its address is whatever the relayer said."""
        stats = self.stats.get(node_id)
        return stats is None or (stats.found_by in ("", "exchange") and stats.last_seen == 0)

    def learn(self, addr: NodeAddr, found_by: str = "ticket") -> bool:
        """Remember how to reach a peer (a newer address replaces the old one). A peer new
        to this book learnt by ``"exchange"`` is refused (False, logged) while
        `MAX_EXCHANGE_PEERS` such peers, never reached, are known."""
        if addr.node_id == self.self_id:
            return False
        if found_by == "exchange" and addr.node_id not in self.stats and addr.node_id not in self.addrs:
            unproven = sum(1 for n, st in self.stats.items() if st.found_by == "exchange" and st.last_seen == 0)
            if unproven >= MAX_EXCHANGE_PEERS:
                self._refused += 1
                if self._refused % 100 == 1:
                    log.warning("not learning peer %s from holdings: %d peers learnt that way were never "
                                "reached (%d refused)", addr.node_id[:16], unproven, self._refused)
                return False
        if addr.addrs or addr.node_id not in self.addrs:
            self.addrs[addr.node_id] = addr
        stats = self.of(addr.node_id)
        if not stats.found_by or (stats.found_by == "exchange" and found_by != "exchange"):
            stats.found_by = found_by  # a ticket, mDNS or an incoming session outranks hearsay
        return True

    def forget(self, node_id: str) -> None:
        self.stats.pop(node_id, None)
        self.addrs.pop(node_id, None)
        metrics.peer_label.release(node_id)  # its metric series go, and its label slot is free again

    def addr(self, node_id: str) -> NodeAddr:
        # Without an address the transport reuses a connection the peer opened to us.
        return self.addrs.get(node_id) or NodeAddr(node_id)

    def of(self, node_id: str) -> PeerStats:
        return self.stats.setdefault(node_id, PeerStats())

    def is_trusted(self, node_id: str) -> bool:
        return node_id in self.trusted

    def expected(self, node_id: str) -> float:
        """Expected seconds of one more request to ``node_id``, as `rank` weighs holders:
        latency x (1 + requests in flight); math.inf for one penalised or unreachable, and
        for one never measured while a request to it is under way (a holder is measured one
        request at a time: a claimant may stall, and a busy source's first answer says how
        busy it is). A holder never measured with no request under way counts with the
        default guess, so that it is asked."""
        st = self.of(node_id)
        if st.penalised_until > time.monotonic() or st.state == "unreachable":
            return math.inf
        if not st.chunks_received and st.inflight:
            return math.inf
        return st.expected_seconds()

    def rank(self, holders: Iterable[str], *, explore: bool = True) -> list[str]:
        """Holders in the order a fetch tries them (protocol.md 14.2, step 3):

        0. with ``explore``, one holder never measured, neither trusted nor penalised, with
           no request in flight: every holder gets asked once and measured, so the nearest
           one is found rather than assumed (the fetcher gives it a short deadline, and
           explores one holder at a time);
        1. trusted holders and measured ones, lowest expected time first: latency x (1 +
           requests in flight); a trusted holder not measured yet counts with the best
           measured latency. Requests in flight spread a sequential reader's read-ahead
           over several holders;
        2. the other holders never measured (claims: HOLDINGS, HAVE), in the given order;
        3. penalised and unreachable ones, by expected time as in 1.

        Ties keep the given order.
        """
        now = time.monotonic()
        unique = [h for h in dict.fromkeys(holders) if h != self.self_id]
        measured = [self.of(h).latency for h in unique if self.of(h).chunks_received]
        prior = min(measured) if measured else PeerStats.latency

        def down(h: str) -> bool:
            st = self.of(h)
            return st.penalised_until > now or st.state == "unreachable"

        def claim_only(h: str) -> bool:
            return self.of(h).chunks_received == 0 and h not in self.trusted

        first = next((h for h in unique if explore and not down(h) and claim_only(h) and not self.of(h).inflight),
                     None)

        def key(h: str) -> tuple[int, float]:
            st = self.of(h)
            latency = (st.latency if st.chunks_received else prior) * (1 + st.inflight)
            if down(h):
                return (3, latency)
            if h == first:
                return (0, 0.0)
            if claim_only(h):
                return (2, 0.0)
            return (1, latency)

        return sorted(unique, key=key)

    def record_ok(self, node_id: str, nbytes: int, seconds: float) -> None:
        s = self.of(node_id)
        s.latency = seconds if s.chunks_received == 0 else (1 - _EWMA) * s.latency + _EWMA * seconds
        rate = nbytes / max(seconds, 1e-6)
        s.throughput = rate if s.chunks_received == 0 else (1 - _EWMA) * s.throughput + _EWMA * rate
        s.bytes_received += nbytes
        s.chunks_received += 1
        s.strikes = 0
        s.last_ok = time.monotonic()
        s.last_seen = time.time()

    def penalise(self, node_id: str, seconds: float, *, bad_data: bool) -> float:
        """Rank ``node_id`` last for ``seconds``, doubled for every failure since its last
        success (at most `MAX_PENALTY_SECONDS`): a holder that stalls every time stops
        costing reads anything but a rare retry. Returns the penalty given."""
        s = self.of(node_id)
        s.failures += 1
        s.bad_data += int(bad_data)
        seconds = min(MAX_PENALTY_SECONDS, seconds * 2 ** min(s.strikes, 16))
        s.strikes += 1
        s.penalised_until = time.monotonic() + seconds
        return seconds

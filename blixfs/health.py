"""Connection management: is each peer reachable, and how good is the path to it.

`HealthMonitor.run` probes every known peer every `PROBE_INTERVAL` seconds (peers from
tickets, LAN discovery, holdings announcements, and open sessions), all at once, each
with a `PROBE_TIMEOUT` deadline. A probe is one chunk request for the zero id (a peer
answers DONT_HAVE at once), which dials if needed; the round trip, and QUIC's RTT and
loss over the live connections, give the figures. States, in the `PeerBook`:

* ``connected``: the probe answered;
* ``degraded``: it answered, but loss is above `DEGRADED_LOSS` or the RTT above
  `DEGRADED_RTT_MS`;
* ``unreachable``: it did not answer in time (the reason is kept); readers rank such
  peers after every other holder.

Peers unseen (no answer, no transfer) for ``expiry`` seconds leave the list, and their
holdings are forgotten; so do peers never reached that were only heard of from other
nodes (relayed HOLDINGS) for `HEARSAY_EXPIRY` seconds. Such a peer's address is whatever
the relayer said: anyone with read capability could make every node dial any address
every 2 s. So each is probed at most once per `HEARSAY_PROBE_INTERVAL`, and at most
`HEARSAY_PROBES` of them per round. Reconnecting is the sync sessions' job (`SyncService.maintain`,
exponential backoff with jitter); this layer only tells everyone how things stand.
"""

from __future__ import annotations

import logging
import time

import trio

from blixfs.chunkproto import ChunkClient
from blixfs.hashing import HOLE
from blixfs.holdings import Holdings
from blixfs.net.transport import PathStats, Transport, TransportError
from blixfs.peers import PeerBook
from blixfs.sync import SyncService

log = logging.getLogger(__name__)

PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 3.0
DEGRADED_LOSS = 0.05
DEGRADED_RTT_MS = 500.0
DEFAULT_EXPIRY = 3600.0
HEARSAY_PROBE_INTERVAL = 60.0
HEARSAY_PROBES = 4
HEARSAY_EXPIRY = 600.0


class HealthMonitor:
    def __init__(self, transport: Transport, peers: PeerBook, holdings: Holdings, sync: SyncService,
                 *, expiry: float = DEFAULT_EXPIRY) -> None:
        self.transport = transport
        self.client = ChunkClient(transport)  # a probe is a chunk request for the hole id: DONT_HAVE
        self.peers = peers
        self.holdings = holdings
        self.sync = sync
        self.expiry = expiry
        self._counters: dict[str, tuple[int, int]] = {}  # per peer: (sent, lost) at the last probe
        self._hearsay_probed: dict[str, float] = {}  # node id -> trio time of its last probe

    def known(self) -> set[str]:
        ids = set(self.peers.addrs) | set(self.peers.stats) | {s.peer for s in self.sync.sessions()}
        ids |= set(self.holdings.nodes)
        ids.discard(self.peers.self_id)
        return ids

    def to_probe(self) -> list[str]:
        """This round's probes: every known peer, but of those only heard of from third
        parties (`PeerBook.hearsay`, no session), at most `HEARSAY_PROBES`, each at most
        once per `HEARSAY_PROBE_INTERVAL`, those waiting longest first."""
        sessions = {s.peer for s in self.sync.sessions()}
        now = trio.current_time()
        out, hearsay = [], []
        for node_id in self.known():
            if node_id in sessions or not self.peers.hearsay(node_id):
                out.append(node_id)
            elif now - self._hearsay_probed.get(node_id, -HEARSAY_PROBE_INTERVAL) >= HEARSAY_PROBE_INTERVAL:
                hearsay.append(node_id)
        hearsay.sort(key=lambda n: self._hearsay_probed.get(n, -HEARSAY_PROBE_INTERVAL))
        for node_id in hearsay[:HEARSAY_PROBES]:
            self._hearsay_probed[node_id] = now
            out.append(node_id)
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            async with trio.open_nursery() as nursery:
                for node_id in self.to_probe():
                    nursery.start_soon(self.probe, node_id)
            self._expire()
            await trio.sleep(PROBE_INTERVAL)

    async def probe(self, node_id: str) -> None:
        stats = self.peers.of(node_id)
        before = stats.state
        started = time.monotonic()
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                await self.client.fetch(self.peers.addr(node_id), HOLE)
        except (TransportError, trio.TooSlowError, Exception) as exc:  # any failure means "not reachable now"
            stats.state = "unreachable"
            stats.reason = str(exc) or f"no answer within {PROBE_TIMEOUT:.0f} s"
        else:
            path = self.transport.path_stats(node_id)
            round_trip = (time.monotonic() - started) * 1000
            stats.rtt_ms = path.rtt_ms if path is not None and path.rtt_ms is not None else round(round_trip, 2)
            stats.loss = self._recent_loss(node_id, path)
            stats.last_seen = time.time()
            if stats.loss > DEGRADED_LOSS:
                stats.state, stats.reason = "degraded", f"{stats.loss:.0%} packet loss"
            elif stats.rtt_ms > DEGRADED_RTT_MS:
                stats.state, stats.reason = "degraded", f"RTT {stats.rtt_ms:.0f} ms"
            else:
                stats.state, stats.reason = "connected", ""
        if stats.state != before:
            log.info("peer %s is %s%s", node_id[:16], stats.state, f" ({stats.reason})" if stats.reason else "")

    def _recent_loss(self, node_id: str, path: PathStats | None) -> float:
        """Loss over the last probe interval: a connection's lifetime counters would keep an
        outage that is over (its lost packets) in the figure for good."""
        if path is None:
            self._counters.pop(node_id, None)
            return 0.0
        sent0, lost0 = self._counters.get(node_id, (0, 0))
        self._counters[node_id] = (path.sent_datagrams, path.lost_packets)
        if path.sent_datagrams < sent0 or path.lost_packets < lost0:  # a new connection: counters restarted
            sent0, lost0 = 0, 0
        sent = path.sent_datagrams - sent0
        return (path.lost_packets - lost0) / sent if sent > 0 else 0.0

    def _expire(self) -> None:
        now = time.time()
        sessions = {s.peer for s in self.sync.sessions()}
        for node_id in list(self.peers.stats):
            stats = self.peers.stats[node_id]
            if stats.state == "unreachable" and stats.last_seen and now - stats.last_seen > self.expiry:
                log.info("peer %s unseen for %.0f s: forgotten", node_id[:16], now - stats.last_seen)
            elif node_id not in sessions and self.peers.hearsay(node_id) and now - stats.learnt > HEARSAY_EXPIRY:
                log.info("peer %s, only heard of, never reached in %.0f s: forgotten", node_id[:16],
                         now - stats.learnt)
            else:
                continue
            self.peers.forget(node_id)
            self.holdings.nodes.pop(node_id, None)
            self._hearsay_probed.pop(node_id, None)
        for node_id in [n for n in self.holdings.nodes if n not in self.peers.stats and n != self.peers.self_id
                        and n not in sessions]:
            self.peers.of(node_id)  # a record without a peer entry: its age counts from now

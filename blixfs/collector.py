"""State metrics, read from the running daemon's live objects when Prometheus scrapes.

Counters and histograms are updated where things happen (`blixfs.metrics`); what is a
state (how many bytes the cache holds, how many files are durable, a peer's RTT, how
long since a session last received an entry) is computed here, at scrape time, from the
`blixfs.daemon.Runtime`: nothing on the read or sync paths pays for it, and the figures
cannot drift from the objects they describe.

`watch` is a service (``nursery.start(watch, runtime)`` in `blixfs.daemon.serve_node`):
while it runs, the process's default registry (what ``--metrics-port`` serves) reports
that runtime. A process runs one daemon; when tests run several nodes in one process
(tests/cluster.py), the first one watched is reported, and `NodeCollector` can be
registered in a registry of a test's own for any other.

Peer labels are those of `blixfs.metrics.peer_label` (bounded, see there), given here
only to peers this node knows first hand (a session, or reached itself): the peers only
heard of from relayed HOLDINGS are counted in ``blixfs_peers{state}`` but get no series
of their own. The figures are computed on the trio thread (`NodeCollector`), so a
scrape never sees an object half changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from blixfs import metrics

if TYPE_CHECKING:
    from blixfs.daemon import Runtime

log = logging.getLogger(__name__)

REPLICATION_STATES = ("local-only", "replicating", "durable")
PEER_STATES = ("connected", "degraded", "unreachable", "unknown")


class NodeCollector(Collector):
    """The state gauges of one runtime (None: nothing to report). See the module docstring.

    ``token`` is the trio run the runtime lives in: a scrape from another thread (the
    HTTP server's) computes the figures on the trio thread through it, so it never reads
    an object while trio changes it. Without one, `collect` must run on that thread."""

    def __init__(self, runtime: Runtime | None = None, token: trio.lowlevel.TrioToken | None = None) -> None:
        self.runtime = runtime
        self.token = token

    def collect(self) -> Iterator[Metric]:
        runtime, token = self.runtime, self.token
        if runtime is None:
            return iter(())
        if token is None or _on_trio_thread():
            return iter(list(self._families(runtime)))
        try:
            return iter(trio.from_thread.run_sync(lambda: list(self._families(runtime)), trio_token=token))
        except trio.RunFinishedError:  # the daemon is stopping: its state is gone
            return iter(())

    def describe(self) -> Iterator[Metric]:
        """Every family `collect` may report, empty (the registry checks names with it)."""
        return iter([_family(name) for name in FAMILIES])

    def _families(self, rt: Runtime) -> Iterator[Metric]:
        yield from self._cache(rt)
        yield from self._replication(rt)
        yield from self._peers(rt)
        yield from self._sync(rt)

    @staticmethod
    def _cache(rt: Runtime) -> Iterator[Metric]:
        node = rt.node
        yield _family("blixfs_cache_bytes", node.chunks.total_bytes)
        yield _family("blixfs_cache_budget_bytes", node.cache.budget if node.cache is not None else node.cache_size())
        yield _family("blixfs_fetches_in_flight", sum(st.inflight for st in rt.peers.stats.values()))
        if rt.vfs is not None:
            yield _family("blixfs_dirty_bytes", rt.vfs.dirty_bytes())

    @staticmethod
    def _replication(rt: Runtime) -> Iterator[Metric]:
        files = _family("blixfs_replication_files")
        counts = dict.fromkeys(REPLICATION_STATES, 0)
        remaining = 0.0
        replicator = rt.replicator
        for rep in replicator.files.values() if replicator is not None else ():
            state = rep.state
            counts[state] = counts.get(state, 0) + 1
            if state == "durable" or replicator is None:
                continue
            m = rt.content.cached_manifest(rep.manifest)
            size = (m.stored_bytes() or 0) if m is not None else 0
            missing = max(0, rep.want - rep.copies)
            # Targets under way count for what they already hold, at most one copy each.
            done = sorted((replicator.progress(p, rep.manifest) for p in rep.targets), reverse=True)
            remaining += size * missing - size * sum(min(1.0, d) for d in done[:missing])
        for state in REPLICATION_STATES:
            files.add_metric([state], counts.get(state, 0))
        yield files
        yield _family("blixfs_replication_bytes_to_go", max(0.0, remaining))

    @staticmethod
    def _peers(rt: Runtime) -> Iterator[Metric]:
        by_state, state, rtt, loss, latency, seen = (_family(n) for n in (
            "blixfs_peers", "blixfs_peer_state", "blixfs_peer_rtt_seconds", "blixfs_peer_loss_ratio",
            "blixfs_peer_fetch_latency_seconds", "blixfs_peer_last_seen_seconds"))
        counts = dict.fromkeys(PEER_STATES, 0)
        sessions = {s.peer for s in rt.sync.sessions()}
        now = time.time()
        for node_id, st in rt.peers.stats.items():
            counts[st.state if st.state in counts else "unknown"] += 1
            if node_id not in sessions and not rt.peers.reached(node_id):
                continue  # heard of only: no series of its own (module docstring)
            label = metrics.peer_label(node_id)
            if label == metrics.OTHER:
                continue  # figures of different peers do not add up
            for name in PEER_STATES:
                state.add_metric([label, name], 1.0 if st.state == name else 0.0)
            if st.rtt_ms is not None:
                rtt.add_metric([label], st.rtt_ms / 1000)
            loss.add_metric([label], st.loss)
            if st.chunks_received:
                latency.add_metric([label], st.latency)
            if st.last_seen:
                seen.add_metric([label], max(0.0, now - st.last_seen))
        for name in PEER_STATES:
            by_state.add_metric([name], counts[name])
        yield from (by_state, state, rtt, loss, latency, seen)

    @staticmethod
    def _sync(rt: Runtime) -> Iterator[Metric]:
        sessions, lag = _family("blixfs_sync_sessions"), _family("blixfs_sync_last_entry_age_seconds")
        behind = _family("blixfs_sync_entries_behind")
        infos = rt.sync.sessions()
        synced = sum(1 for s in infos if s.synced.is_set())
        sessions.add_metric(["synced"], synced)
        sessions.add_metric(["syncing"], len(infos) - synced)
        now = trio.current_time()
        ages: dict[str, float] = {}
        behinds: dict[str, int] = {}
        for s in infos:
            age = max(0.0, now - (s.last_entry or s.started))
            label = metrics.peer_label(s.peer)
            if label != metrics.OTHER:
                ages[label] = min(age, ages.get(label, age))  # a peer may have two sessions (one each way)
                behinds[label] = max(s.entries_to_send, behinds.get(label, 0))
        for label, age in sorted(ages.items()):
            lag.add_metric([label], age)
            behind.add_metric([label], behinds[label])
        yield from (sessions, lag, behind, _family("blixfs_sync_queued_bytes", rt.sync.queued_bytes()))


# Every gauge the collector reports: name -> (help, labels).
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "blixfs_cache_bytes": ("Bytes of chunks in the local store (cache and data written here)", ()),
    "blixfs_cache_budget_bytes": ("Byte budget of the chunk cache", ()),
    "blixfs_fetches_in_flight": ("Chunk requests to peers under way", ()),
    "blixfs_dirty_bytes": ("Written bytes held in memory, not yet in the chunk store", ()),
    "blixfs_replication_files": ("Files whose current version this node wrote, by replication state "
                                 "(local-only, replicating, durable)", ("state",)),
    "blixfs_replication_bytes_to_go": ("Bytes still to copy before every file written here has its copies "
                                       "(estimate)", ()),
    "blixfs_peers": ("Peers in the peer book, by connection state", ("state",)),
    "blixfs_peer_state": ("1 for a peer's current connection state, 0 for the others", ("peer", "state")),
    "blixfs_peer_rtt_seconds": ("Round-trip time to a peer (QUIC's, else the probe's)", ("peer",)),
    "blixfs_peer_loss_ratio": ("Share of packets to a peer lost over the last probe interval", ("peer",)),
    "blixfs_peer_fetch_latency_seconds": ("A chunk request's latency to a peer (moving average)", ("peer",)),
    "blixfs_peer_last_seen_seconds": ("Seconds since a peer last answered a probe or served a chunk", ("peer",)),
    "blixfs_sync_sessions": ("Sync sessions, by state (syncing, synced)", ("state",)),
    "blixfs_sync_last_entry_age_seconds": ("Seconds since a peer's session last delivered entries (since the "
                                           "session started if none yet)", ("peer",)),
    "blixfs_sync_entries_behind": ("Entries a peer has yet to be sent by this node (the rest of its session's "
                                   "diff and its live queue)", ("peer",)),
    "blixfs_sync_queued_bytes": ("Bytes waiting in the live queues of all sync sessions", ()),
}


def _family(name: str, value: float | None = None) -> GaugeMetricFamily:
    """An empty gauge family from `FAMILIES`, or with one unlabelled sample ``value``."""
    doc, labels = FAMILIES[name]
    if value is not None:
        return GaugeMetricFamily(name, doc, value=value)
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _on_trio_thread() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


_process = NodeCollector()
_registered = False


async def watch(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Report ``runtime`` in the default registry while this runs (module docstring)."""
    global _registered
    if not _registered:
        REGISTRY.register(_process)
        _registered = True
    mine = _process.runtime is None
    if mine:
        _process.runtime, _process.token = runtime, trio.lowlevel.current_trio_token()
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        if mine:
            _process.runtime, _process.token = None, None

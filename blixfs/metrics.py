"""Process-wide metrics (prometheus-client), one definition per metric; docs/metrics.md lists them.

The daemon serves them with ``blixfs mount --metrics-port`` (the default registry, on
127.0.0.1); tests read them through `counter_value` or by scraping. What is *counted* as
it happens lives here (counters, histograms); what is *state* (cache bytes, replication
states, peers' RTT, sync lag) is read from the live objects at scrape time by
`blixfs.collector.NodeCollector`, so the hot paths pay nothing for it.

Labels are of bounded cardinality: never a chunk id or a path. A peer is labelled by the
first 16 hex digits of its id (as in the logs), and only the first `MAX_PEER_LABELS`
peers get a label of their own (`PeerLabels`); the others share ``"other"``. A peer the
peer book forgets (expired, `blixfs.peers.PeerBook.forget`) gives its label back and its
series disappear, so a churning or hostile set of node ids cannot grow the series count
beyond the cap. Label values of ``reason`` and ``op`` come from fixed sets.

Everything here is called on the trio thread (or, for the chunk store's counters, from
wherever the store is used); prometheus-client's own locks make that safe.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import math
from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

MAX_PEER_LABELS = 64
OTHER = "other"
PEER_LABEL_LEN = 16

# --------------------------------------------------------------------------- chunk store

chunks_corrupt = Counter(
    "blixfs_chunks_corrupt_total", "Stored chunks whose checksum failed on read (treated as missing)"
)
chunks_stored = Counter("blixfs_chunks_stored_total", "Chunks written to the local chunk store")
chunk_bytes_stored = Counter("blixfs_chunk_bytes_stored_total", "Bytes written to the local chunk store")
chunks_evicted = Counter("blixfs_chunks_evicted_total", "Fetched chunks evicted from the cache (LRU, over budget)")
chunk_reads = Counter("blixfs_chunk_reads_total", "Chunks read from the local chunk store")
range_reads = Counter("blixfs_range_reads_total",
                      "Range reads of the local chunk store (a guest's small reads), by how they got their bytes:"
                      " cached (page cache), polled (from the disk, polled), waited (from the disk, slept on)", ["how"])
gc_freed_chunks = Counter("blixfs_gc_freed_chunks_total", "Unreferenced chunks deleted by garbage collection")
gc_freed_bytes = Counter("blixfs_gc_freed_bytes_total", "Bytes of unreferenced chunks deleted by garbage collection")

# --------------------------------------------------------------------------- VFS and FUSE

commits = Counter("blixfs_commits_total", "File versions committed to the namespace")
fuse_errors = Counter("blixfs_fuse_unexpected_errors_total", "Unexpected exceptions in FUSE handlers (answered EIO)")
open_files = Gauge("blixfs_open_files", "Files with at least one open handle")

# A FUSE request answered from memory takes tens of microseconds; one that waits for a
# peer takes up to the fetch deadline (20 s by default).
FUSE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0)


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.sum = 0.0


class HotHistogram(Collector):
    """A histogram with one label for a path taken tens of thousands of times a second:
    each observation is a bisect and two additions on plain numbers (about 0.4 us, where
    prometheus-client's `Histogram.observe` takes a lock per bucket and sum, about 2 us:
    a 4 KiB FUSE read costs tens). The counts are read at scrape time. Only one thread may
    observe (the trio thread); a scrape from another thread reads a copy, which may be
    one observation behind in the sum: harmless for a rate."""

    def __init__(self, name: str, doc: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = [*buckets, math.inf]
        self._le = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        self._series: dict[str, _Series] = {}
        REGISTRY.register(self)

    def labels(self, value: str) -> HotHistogram.Child:
        """The series of one label value, to keep and observe into (bind it once)."""
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = _Series(len(self.bounds))
        return HotHistogram.Child(self.bounds, series)

    class Child:
        __slots__ = ("_bounds", "_series")

        def __init__(self, bounds: list[float], series: _Series) -> None:
            self._bounds, self._series = bounds, series

        def observe(self, value: float) -> None:
            series = self._series
            series.counts[bisect.bisect_left(self._bounds, value)] += 1
            series.sum += value

    def remove(self, value: str) -> None:
        self._series.pop(value, None)

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.doc, labels=[self.label])]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for value, series in sorted(list(self._series.items())):
            counts, total = list(series.counts), series.sum
            cumulative = list(itertools.accumulate(counts))
            family.add_metric([value], list(zip(self._le, cumulative, strict=True)), total)
        return [family]


fuse_request_seconds = HotHistogram(
    "blixfs_fuse_request_duration_seconds", "Time to answer a FUSE request, by operation (handler name)",
    "op", FUSE_BUCKETS)

# --------------------------------------------------------------------------- cache (read path)

# A chunk a read wanted, by where it came from: memory (the reader's LRU), store (this
# node's disk), or fetched (from a peer: a miss). Hit ratio = hits / (hits + misses).
cache_hits = Counter("blixfs_cache_hits_total", "Chunk reads served locally, by tier (memory, store)", ["tier"])
cache_misses = Counter("blixfs_cache_misses_total", "Chunk reads that had to fetch the chunk from a peer")
readahead_bytes = Counter(
    "blixfs_readahead_bytes_total",
    "Bytes fetched from peers ahead of a sequential reader, by outcome: fetched, used (later read), "
    "wasted (evicted or never read)", ["outcome"])

# --------------------------------------------------------------------------- network

trace_prefetch_bytes = Counter(
    "blixfs_trace_prefetch_bytes_total",
    "Bytes fetched ahead of a reader in the order of the file's access trace (fetched), and of those, read by "
    "the same open afterwards (used)", ["outcome"])
fetched_bytes = Counter("blixfs_fetched_bytes_total", "Chunk bytes fetched from a peer (verified)", ["peer"])
served_bytes = Counter("blixfs_served_bytes_total", "Chunk bytes served to a peer", ["peer"])
FETCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
fetch_seconds = Histogram(
    "blixfs_fetch_duration_seconds",
    "Time to fetch one chunk from peers, every attempt included, by outcome (ok, failed)",
    ["outcome"], buckets=FETCH_BUCKETS)
# Transfer classes and bandwidth limits (`blixfs.priority`, `blixfs.limits`): fixed label sets.
PRIORITY_NAMES = ("demand", "trace", "ahead", "background")
limit_rate = Gauge("blixfs_limit_bytes_per_second", "Bandwidth limit in force (0: none), by limit (upload, background)",
                   ["limit"])
limit_wait_seconds = Counter("blixfs_limit_wait_seconds_total",
                             "Time transfers waited for a bandwidth limit's tokens, summed over waiters, by limit",
                             ["limit"])
priority_requests = Counter("blixfs_priority_requests_total",
                            "Chunk requests by transfer class, on the requesting side (fetch) and the serving side "
                            "(serve)", ["side", "priority"])
priority_queue_seconds = Counter("blixfs_priority_queue_seconds_total",
                                 "Time chunk requests waited for a slot of the priority scheduler, by side and class",
                                 ["side", "priority"])
sync_entries_received = Counter("blixfs_sync_entries_received_total",
                                "Namespace entries received in sync sessions (valid or not)", ["peer"])

# Why something a peer sent was refused. A fixed set: anything else is counted as "other".
REFUSAL_REASONS: dict[str, frozenset[str]] = {
    "sync": frozenset({"bad_frame", "not_member", "wrong_namespace", "hello_timeout", "bad_entry",
                       "holdings_unsigned", "holdings_full"}),
    "chunks": frozenset({"not_member", "bad_request", "unknown_op", "slow_reader"}),
    "transport": frozenset({"connection_limit", "stream_limit"}),
}
refused = Counter("blixfs_refused_total", "Frames, requests and entries from peers refused, by protocol and reason",
                  ["protocol", "reason"])


def count_refused(protocol: str, reason: str, n: int = 1) -> None:
    """Count ``n`` refusals; a protocol or reason outside `REFUSAL_REASONS` counts as "other"."""
    reasons = REFUSAL_REASONS.get(protocol)
    if reasons is None:
        protocol, reason = OTHER, OTHER
    elif reason not in reasons:
        reason = OTHER
    if n > 0:
        refused.labels(protocol, reason).inc(n)


class PeerLabels:
    """The label value each peer gets: its first 16 hex digits for the first ``cap`` peers,
    ``"other"`` for the rest, until a labelled peer is `release`\\ d.

    A peer keeps its label while it has one (a series must not change meaning); `release`
    (the peer book forgot the peer) removes its series from every per-peer counter and
    frees the slot."""

    def __init__(self, cap: int = MAX_PEER_LABELS) -> None:
        self.cap = cap
        self._labels: dict[str, str] = {}  # full hex id -> label value

    def __call__(self, peer: str) -> str:
        label = self._labels.get(peer)
        if label is not None:
            return label
        if len(self._labels) >= self.cap:
            return OTHER
        label = peer[:PEER_LABEL_LEN].lower()
        if label == OTHER or label in self._labels.values():
            return OTHER  # two ids sharing 64 bits: one of them was ground on purpose
        self._labels[peer] = label
        return label

    def labelled(self, peer: str) -> str | None:
        """The label ``peer`` holds, without giving it one."""
        return self._labels.get(peer)

    def release(self, peer: str) -> None:
        label = self._labels.pop(peer, None)
        if label is None:
            return
        for counter in PER_PEER:
            with contextlib.suppress(KeyError):  # never counted under that label
                counter.remove(label)

    def clear(self) -> None:
        """Forget every label (tests)."""
        for peer in list(self._labels):
            self.release(peer)


PER_PEER: tuple[Counter, ...] = (fetched_bytes, served_bytes, sync_entries_received)
peer_label = PeerLabels()


def count_fetched(peer: str, nbytes: int) -> None:
    fetched_bytes.labels(peer_label(peer)).inc(nbytes)


def count_served(peer: str, nbytes: int) -> None:
    served_bytes.labels(peer_label(peer)).inc(nbytes)


def counter_value(counter: Counter) -> float:
    """The current value of an unlabelled counter (for tests and `status`)."""
    return float(counter._value.get())
journal_syncs = Counter("blixfs_journal_syncs_total", "fsyncs made durable through the journal (no version published)")

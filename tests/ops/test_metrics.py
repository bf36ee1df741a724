"""Metrics of in-process nodes (tests/cluster.py): the real process-wide registry, scraped
as Prometheus text and parsed with prometheus-client's own parser."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from blixfs import metrics
from blixfs.collector import NodeCollector
from blixfs.daemon import Runtime
from blixfs.metrics import PeerLabels
from blixfs.net.transport import NodeAddr
from tests.cluster import cluster, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def fresh_peer_labels() -> None:
    """Peer labels are process-wide, one node per process in a daemon: in a test process,
    the in-process nodes of earlier tests would have taken every label (the cap)."""
    metrics.peer_label.clear()


def scrape(registry: CollectorRegistry = REGISTRY) -> Samples:
    """Every sample of ``registry``'s text exposition: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def node_state(runtime: Runtime) -> Samples:
    """The state gauges of one in-process node (the default registry reports only the first)."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(runtime))
    return scrape(registry)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def test_an_image_read_on_b_is_fetched_on_b_and_served_on_a_in_equal_bytes(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 12345
    data = os.urandom(size)
    async with cluster(tmp_path, ["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        la, lb = metrics.peer_label(a.id), metrics.peer_label(b.id)
        await a.write("img", 0, data, create=True)
        # The create is a version of its own (empty): wait for the written one.
        await wait_until(lambda: (e := b.entry("img")) is not None and e.size == size, "img written, on b")
        before = scrape()
        assert await b.read("img") == data
        assert await b.read("img") == data  # the second read is served from b's store and memory

        def moved() -> tuple[float, float]:
            now = scrape()
            return (value(now, "blixfs_fetched_bytes_total", peer=la) - value(before, "blixfs_fetched_bytes_total",
                                                                             peer=la),
                    value(now, "blixfs_served_bytes_total", peer=lb) - value(before, "blixfs_served_bytes_total",
                                                                            peer=lb))

        # Read-ahead may still be under way when the read returns: wait for the two sides to agree.
        await wait_until(lambda: moved()[0] == moved()[1], "bytes fetched on b == bytes served on a")
        fetched, served = moved()
        assert fetched == served >= size

        after = scrape()

        def delta(name: str, **labels: str) -> float:
            return total(after, name, **labels) - total(before, name, **labels)

        assert delta("blixfs_cache_misses_total") >= 1
        assert delta("blixfs_cache_hits_total") >= size // (64 * 1024)  # the second read hits every chunk
        assert delta("blixfs_fetch_duration_seconds_count", outcome="ok") >= 1
        ahead = {o: delta("blixfs_readahead_bytes_total", outcome=o) for o in ("fetched", "used", "wasted")}
        assert ahead["used"] + ahead["wasted"] <= ahead["fetched"] <= fetched
        assert ahead["used"] > 0  # a sequential read of 49 chunks: read-ahead serves some of them
        assert b.vfs.content.reader.ahead.used >= ahead["used"]

        # State, read from the live objects at scrape time.
        sb = node_state(b.runtime)
        assert value(sb, "blixfs_cache_bytes") >= size
        assert value(sb, "blixfs_cache_budget_bytes") == b.node.cache_size()
        assert value(sb, "blixfs_sync_sessions", state="synced") >= 1
        assert value(sb, "blixfs_sync_last_entry_age_seconds", peer=la) >= 0
        assert ("blixfs_peer_state", (("peer", la), ("state", "connected"))) in sb
        await wait_until(lambda: value(node_state(a.runtime), "blixfs_replication_files", state="durable") == 1,
                         "img durable on a (copies=1)")
        sa = node_state(a.runtime)
        assert value(sa, "blixfs_replication_files", state="local-only") == 0
        assert value(sa, "blixfs_replication_bytes_to_go") == 0


async def test_a_file_written_on_a_lone_node_is_dirty_then_local_only_with_all_its_bytes_to_go(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a"], copies=2) as nodes:
        a = nodes["a"]
        fh = await a.open_for_write("img", create=True)
        await a.vfs.write(fh, 0, os.urandom(300_000))
        assert value(node_state(a.runtime), "blixfs_dirty_bytes") == 300_000  # in memory until the close
        await a.vfs.release(fh)
        assert value(node_state(a.runtime), "blixfs_dirty_bytes") == 0
        await wait_until(lambda: value(node_state(a.runtime), "blixfs_replication_files", state="local-only") == 1,
                         "img local-only")
        assert value(node_state(a.runtime), "blixfs_replication_bytes_to_go") == 300_000


async def test_peer_labels_stay_bounded_with_more_peers_than_the_cap(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cap = 4
    metrics.peer_label.clear()  # the series earlier tests left go: this one counts the series there are
    monkeypatch.setattr(metrics, "peer_label", PeerLabels(cap))
    async with cluster(tmp_path, ["a"]) as nodes:
        a = nodes["a"]
        strangers = [os.urandom(32).hex() for _ in range(3 * cap)]
        for peer in strangers:
            a.runtime.peers.learn(NodeAddr(peer, ("127.0.0.1:9",)), "mdns")
            st = a.runtime.peers.of(peer)
            st.state, st.rtt_ms, st.last_seen = "connected", 1.5, time.time()  # as if probed
            metrics.count_served(peer, 1000)
            metrics.count_fetched(peer, 10)
        served = {dict(ls)["peer"]: v for (n, ls), v in scrape().items() if n == "blixfs_served_bytes_total"}
        assert len(served) <= cap + 1 and served[metrics.OTHER] >= (2 * cap) * 1000
        state = node_state(a.runtime)
        rtt_peers = {dict(ls)["peer"] for (n, ls) in state if n == "blixfs_peer_rtt_seconds"}
        assert 0 < len(rtt_peers) <= cap and metrics.OTHER not in rtt_peers
        assert value(state, "blixfs_peers", state="connected") == 3 * cap  # counted, whether labelled or not

        # A peer the book forgets gives its label back: its series go, and a newcomer gets one.
        first = strangers[0]
        label = metrics.peer_label.labelled(first)
        assert label is not None
        a.runtime.peers.forget(first)
        newcomer = os.urandom(32).hex()
        metrics.count_served(newcomer, 7)
        after = scrape()
        assert ("blixfs_served_bytes_total", (("peer", label),)) not in after
        assert value(after, "blixfs_served_bytes_total", peer=newcomer[:16]) == 7
        assert len({dict(ls)["peer"] for (n, ls) in after if n == "blixfs_served_bytes_total"}) <= cap + 1
        metrics.peer_label.clear()


async def test_refusals_are_counted_by_reason_from_a_fixed_set() -> None:
    before = scrape()
    metrics.count_refused("sync", "bad_frame")
    metrics.count_refused("chunks", "made-up reason from a peer")
    metrics.count_refused("nonsense", "x", 3)
    await trio.lowlevel.checkpoint()
    after = scrape()

    def delta(**labels: str) -> float:
        return value(after, "blixfs_refused_total", **labels) - value(before, "blixfs_refused_total", **labels)

    assert delta(protocol="sync", reason="bad_frame") == 1
    assert delta(protocol="chunks", reason="other") == 1
    assert delta(protocol="other", reason="other") == 3

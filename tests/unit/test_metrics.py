"""The metric definitions, their documentation, the Grafana dashboard that uses them, and
the bounded bookkeeping behind them (peer labels, the read-ahead ledger)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import REGISTRY

from blixfs import metrics
from blixfs.collector import FAMILIES, NodeCollector
from blixfs.hashing import ChunkId
from blixfs.metrics import OTHER, PeerLabels
from blixfs.readahead import ReadAheadLedger

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docs" / "grafana" / "blixfs.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",)}


def families() -> dict[str, str]:
    """Every blixfs metric family this process can expose: name -> type."""
    out = {f.name: f.type for f in REGISTRY.collect() if f.name.startswith("blixfs_")}
    out.update({f.name: f.type for f in NodeCollector().describe()})
    return out


def sample_names() -> set[str]:
    return {name + suffix for name, kind in families().items() for suffix in SUFFIXES[kind]}


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner["title"], target


def test_every_expr_of_the_grafana_dashboard_refers_to_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = sample_names()
    used: set[str] = set()
    for title, target in targets(dashboard):
        expr = target["expr"]
        names = set(re.findall(r"\bblixfs_[a-z0-9_]+", expr))
        assert names, f"{title}: {expr} uses no blixfs metric"
        assert names <= exposed, f"{title}: {sorted(names - exposed)} do not exist"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)
        assert target["datasource"]["uid"] == "${datasource}", title
        used |= names
    # Every family shows somewhere on the dashboard.
    unused = {name for name in families() if not any(u.startswith(name) for u in used)}
    assert not unused, f"not on the dashboard: {sorted(unused)}"


def test_the_dashboard_is_grafana_10_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 38  # Grafana 10.0
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    titles = " / ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("fetched", "served", "hit ratio", "fetch latency", "fuse latency", "replication state",
                   "bytes to go", "sync lag", "rtt", "peer state", "refused", "gc"):
        assert wanted in titles, wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    doc = (REPO / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(blixfs_[a-z0-9_]+)` \|", doc, re.M))
    exposed = {name + ("_total" if kind == "counter" else "") for name, kind in families().items()}
    assert documented == exposed, (sorted(documented - exposed), sorted(exposed - documented))


def test_metric_names_follow_prometheus_conventions() -> None:
    for name, kind in families().items():
        assert re.fullmatch(r"blixfs_[a-z0-9_]+", name), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        assert not name.endswith("_total"), name  # prometheus-client adds it to counters' samples
    for name, (_, labels) in FAMILIES.items():
        assert "path" not in labels and "chunk" not in labels, name


def test_peer_labels_are_capped_and_freed_when_a_peer_is_forgotten() -> None:
    labels = PeerLabels(cap=3)
    peers = [f"{i:02x}" * 32 for i in range(10)]
    given = [labels(p) for p in peers]
    assert given[:3] == [p[:16] for p in peers[:3]] and set(given[3:]) == {OTHER}
    assert labels(peers[1]) == peers[1][:16]  # a peer keeps its label
    labels.release(peers[1])
    assert labels.labelled(peers[1]) is None
    assert labels(peers[5]) == peers[5][:16]  # the slot is free again
    assert labels(peers[1]) == OTHER


def test_peer_release_removes_its_series() -> None:
    labels = PeerLabels(cap=2)
    peer = "ab" * 32
    metrics.served_bytes.labels(labels(peer)).inc(5)
    labels.release(peer)
    assert not any(s.labels.get("peer") == peer[:16] for f in REGISTRY.collect()
                   if f.name == "blixfs_served_bytes" for s in f.samples)


def test_refusals_outside_the_fixed_set_count_as_other() -> None:
    def count(protocol: str, reason: str) -> float:
        return REGISTRY.get_sample_value("blixfs_refused_total", {"protocol": protocol, "reason": reason}) or 0.0

    before = count("chunks", OTHER), count("sync", "bad_entry")
    metrics.count_refused("chunks", "anything a peer makes up")
    metrics.count_refused("sync", "bad_entry", 0)  # nothing refused: no change
    metrics.count_refused("sync", "bad_entry", 2)
    assert (count("chunks", OTHER), count("sync", "bad_entry")) == (before[0] + 1, before[1] + 2)


def cid(i: int) -> ChunkId:
    return ChunkId(bytes([i]) * 32)


def test_read_ahead_is_used_when_read_and_wasted_when_evicted_or_never_read() -> None:
    ledger = ReadAheadLedger(window=2)
    ledger.expect([cid(1), cid(2)])
    ledger.arrived(cid(1), 100)
    ledger.arrived(cid(9), 999)  # fetched by a read, not ahead: not counted
    ledger.read(cid(1))
    assert (ledger.fetched, ledger.used, ledger.wasted) == (100, 100, 0)
    ledger.arrived(cid(2), 200)
    ledger.demanded(cid(2))  # evicted before its read: fetched again
    assert ledger.wasted == 200
    ledger.expect([cid(3)])
    ledger.demanded(cid(3))  # a read got there before the read-ahead: a miss, neither used nor wasted
    ledger.arrived(cid(3), 300)
    assert (ledger.fetched, ledger.used, ledger.wasted) == (300, 100, 200)
    ledger.expect([cid(4), cid(5)])
    ledger.arrived(cid(4), 10)
    ledger.arrived(cid(5), 10)
    ledger.expect([cid(6)])
    ledger.arrived(cid(6), 10)
    assert ledger.wasted == 210  # the window holds two: the oldest unread one is given up
    ledger.read(cid(6))
    assert ledger.used == 110

"""Metrics as a fleet's Prometheus sees them: two real daemons with ``--metrics-port``, an
image moved between them through their FUSE mounts, both scraped over HTTP and parsed
with prometheus-client's parser."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.request
from collections.abc import Callable

import pytest

from tests.conftest import MountedNode, visible, wait_for
from tests.helpers import MiB
from tests.multinode.test_replication import ticket

pytestmark = pytest.mark.mounted
Factory = Callable[..., MountedNode]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def node_id(node: MountedNode) -> str:
    nid: str = json.loads(node.cli("status", "--json").stdout)["node_id"]
    return nid


def test_an_image_read_through_the_mount_is_counted_alike_on_both_nodes(make_node: Factory) -> None:
    pa, pb = free_port(), free_port()
    a = make_node("a", "--metrics-port", str(pa), "--copies", "1")
    b = make_node("b", "--metrics-port", str(pb), start=False)
    b.cli("join", ticket(a))
    b.start()
    la, lb = node_id(a)[:16], node_id(b)[:16]
    size = 8 * MiB
    data = os.urandom(size)
    (a.mnt / "img").write_bytes(data)
    wait_for(lambda: visible(b, "img", size), 60, "img on b")
    with open(b.mnt / "img", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()

    def agree() -> bool:
        fetched = value(scrape(pb), "blixfs_fetched_bytes_total", peer=la)
        return fetched >= size and fetched == value(scrape(pa), "blixfs_served_bytes_total", peer=lb)

    wait_for(agree, 60, "bytes fetched on b from a == bytes served on a to b")
    sb = scrape(pb)
    assert total(sb, "blixfs_cache_misses_total") >= 1
    assert total(sb, "blixfs_cache_hits_total") >= 1
    assert value(sb, "blixfs_fetch_duration_seconds_count", outcome="ok") >= 1
    for op in ("lookup", "getattr", "open", "read"):
        assert value(sb, "blixfs_fuse_request_duration_seconds_count", op=op) >= 1, op
    assert value(sb, "blixfs_fuse_request_duration_seconds_bucket", op="read", le="+Inf") == \
        value(sb, "blixfs_fuse_request_duration_seconds_count", op="read")
    assert value(scrape(pa), "blixfs_fuse_request_duration_seconds_count", op="write") >= 1
    assert value(sb, "blixfs_cache_bytes") >= size
    assert value(sb, "blixfs_sync_sessions", state="synced") >= 1
    # State gauges come from the live daemon, computed on its trio thread at each scrape.
    wait_for(lambda: value(scrape(pb), "blixfs_peer_state", peer=la, state="connected") == 1, 30,
             "a connected, as b sees it")
    wait_for(lambda: value(scrape(pa), "blixfs_replication_files", state="durable") == 1, 60,
             "img durable on a (one copy wanted)")
    # No chunk id, path or full node id in any label.
    for (_, labels) in sb:
        for _, v in labels:
            assert len(v) <= 40 and "img" not in v

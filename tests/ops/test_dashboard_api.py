"""The dashboard's JSON on in-process nodes: a read on B of a file A wrote, as each page shows it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cluster import CHUNK, cluster, wait_until


async def test_pages_after_a_read(tmp_path: Path) -> None:
    data = os.urandom(16 * CHUNK)
    async with cluster(tmp_path, ["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        await a.write("disk.img", 0, data, create=True)
        # The version with the data, not the empty one the create published first (b reading that
        # one first read b'' here, once in ~12 runs).
        await wait_until(lambda: b.entry("disk.img") is not None and b.entry("disk.img") == a.entry("disk.img"),
                         "the written file on b")
        assert await b.read("disk.img") == data
        assert b.runtime.api is not None and b.runtime.analytics is not None
        api = b.runtime.api

        live = api.transfers()["live"]
        assert [(t["path"], t["bytes"], t["peers"]) for t in live] == [("disk.img", len(data), {a.id: len(data)})]
        assert live[0]["held_fraction"] == 1.0

        b.runtime.analytics.end_idle(force=True)
        t = api.transfers()
        assert t["live"] == [] and t["history"][0]["bytes"] == len(data)
        img = t["top_images"][0]
        assert img["path"] == "disk.img" and img["bytes_read"] == len(data) and img["fetched"] == len(data)
        assert 0 <= img["hit_ratio"] < 1 and img["misses"] >= 1  # the first chunk had to be fetched
        manifest = len(b.node.chunks.get(b.entry("disk.img").manifest) or b"")  # type: ignore[arg-type,union-attr]
        assert (t["top_peers"][0]["id"], t["top_peers"][0]["fetched"]) == (a.id, len(data) + manifest)
        assert a.runtime.api is not None
        assert a.runtime.api.transfers()["totals"]["served"] == len(data) + manifest  # counted on a

        mid = b.entry("disk.img").manifest  # type: ignore[union-attr]
        assert mid is not None
        await wait_until(lambda: a.id in b.runtime.holdings.holders(mid), "a's holdings on b")
        topo = api.topology()
        assert {n["id"] for n in topo["nodes"]} == {a.id, b.id}
        holders = {h["id"]: h["fraction"] for h in topo["images"][0]["holders"]}
        assert holders == {a.id: 1.0, b.id: 1.0}

        images = api.images()["images"]
        assert images[0]["path"] == "disk.img" and images[0]["copies_held"] == 2 and images[0]["size"] == len(data)

        overview = api.overview()
        assert overview["namespace"]["capability"] == "read-write"
        assert overview["cache"]["chunk_reads"] >= 16

        # No secret in any page: the namespace id appears by prefix only.
        everything = json.dumps(api.all())
        keys = b.node.replica.keys
        assert keys.id.hex() not in everything and keys.id.hex()[:16] in everything
        assert keys.secret is None or keys.secret.hex() not in everything
        assert b.node.secret.hex() not in everything

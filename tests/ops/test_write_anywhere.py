"""Writes on any node, whatever it holds; holders found by content; the last copy kept.

Whole nodes in one process over the in-memory network (tests/cluster.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from blixfs.hashing import HOLE, ChunkId
from tests.cluster import CHUNK, cluster, wait_until

SIZE = 16 * CHUNK


async def test_a_node_holding_nothing_writes_and_every_node_reads_the_new_version(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "c", "d"]) as nodes:
        a, c, d = nodes["a"], nodes["c"], nodes["d"]
        data = bytearray(os.urandom(SIZE))
        await a.write("img", 0, bytes(data), create=True)
        first = a.entry("img")
        await wait_until(lambda: c.entry("img") == first and d.entry("img") == first, "the image everywhere")
        assert c.node.chunks.stats().chunks == 0  # c holds none of it
        patch = os.urandom(4096)
        await c.write("img", 5 * CHUNK + 100, patch)  # dd conv=notrunc of 4 KiB
        data[5 * CHUNK + 100 : 5 * CHUNK + 100 + 4096] = patch
        assert await c.read("img") == bytes(data)  # unchanged chunks found on a, under the old version
        second = c.entry("img")
        assert second is not None and second.manifest != first.manifest
        await wait_until(lambda: d.entry("img") == second, "c's version on d")
        assert await d.read("img") == bytes(data)  # d never read the old version: found by content
        assert await a.read("img") == bytes(data)


async def test_writer_replicates_what_it_wrote_though_it_holds_only_part_of_it(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "b", "c"], copies=2) as nodes:
        a, c = nodes["a"], nodes["c"]
        await a.write("img", 0, os.urandom(SIZE), create=True)
        await wait_until(lambda: c.entry("img") is not None and c.entry("img") == a.entry("img"), "the image on c")
        await c.write("img", 3 * CHUNK, os.urandom(4096))
        e = c.entry("img")
        assert e is not None and e.manifest is not None

        def durable() -> bool:
            return any(r["path"] == "img" and r["state"] == "durable" for r in c.runtime.replicator.report()
                       if c.runtime.replicator is not None)

        await wait_until(durable, "c's version to be held whole on two nodes")
        holders = [n for n in nodes.values() if e.manifest in n.runtime.holdings.own.complete]
        assert len(holders) >= 2


async def test_replication_follows_the_data_writer_not_the_last_entry_author(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "b"], copies=2) as nodes:
        a, b = nodes["a"], nodes["b"]
        replicator = a.runtime.replicator
        assert replicator is not None
        replicator.default_copies = 1  # durable at once: nothing replicated yet
        await a.write("img", 0, os.urandom(SIZE), create=True)
        await wait_until(lambda: b.entry("img") == a.entry("img"), "the image on b")
        ino = (await b.vfs.lookup(1, "img")).ino
        await b.vfs.setattr(ino, mode=0o600)  # b is now the entry's author; a wrote the data
        await wait_until(lambda: a.entry("img") == b.entry("img"), "the chmod on a")
        e = a.entry("img")
        assert e is not None and e.mode == 0o600 and e.author == b.node.node_id
        replicator.default_copies = 2
        await wait_until(lambda: e.manifest in b.runtime.holdings.own.complete, "a to replicate its data to b")


async def test_a_chunk_shared_with_a_durable_version_stays_while_the_new_version_is_not_durable(
        tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a"], copies=1) as nodes:
        a = nodes["a"]
        await a.write("img", 0, os.urandom(SIZE), create=True)
        old = a.entry("img")
        assert old is not None and old.manifest is not None
        replicator = a.runtime.replicator
        assert replicator is not None
        await wait_until(lambda: any(r["state"] == "durable" for r in replicator.report()), "one copy is durable")
        replicator.default_copies = 2  # the next version needs a peer: there is none
        await a.write("img", 0, os.urandom(4096))
        new = a.entry("img")
        assert new is not None and new.manifest is not None
        m = a.vfs.content.manifest(new.manifest)
        assert m is not None
        shared = [c for c in m.ids[1:] if c != HOLE]
        cache = a.node.cache
        assert cache is not None
        cache.budget = 0  # evict all that may go
        cache.enforce()
        assert all(a.node.chunks.has(c) for c in shared), "the new version's only copy was evicted"
        assert a.node.chunks.has(ChunkId(new.manifest))


async def test_a_peers_version_arriving_during_unsaved_writes_is_kept_as_a_conflict(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        await a.write("img", 0, os.urandom(SIZE), create=True)
        await wait_until(lambda: b.entry("img") == a.entry("img"), "the image on b")
        fh = await a.open_for_write("img")
        ours = os.urandom(4096)
        await a.vfs.write(fh, 0, ours)  # not flushed yet
        await b.write("img", 2 * CHUNK, os.urandom(4096))
        theirs = await b.read("img")
        await wait_until(lambda: a.entry("img") == b.entry("img"), "b's version on a")
        await a.vfs.release(fh)  # the commit of a's writes must not drop b's version
        for node in (a, b):
            await wait_until(lambda n=node: len([e for e in n.node.namespace.versions("img") if not e.deleted]) == 2,
                             f"both versions kept on {node.name}")
            names = [name for name, _ in await node.vfs.readdir(1)]
            conflict = [n for n in names if n.startswith("img.conflict-")]
            assert len(conflict) == 1, names
            assert await node.read(conflict[0]) == theirs
            assert (await node.read("img"))[:4096] == ours


async def test_removed_chunks_leave_this_nodes_holdings_gc_and_corruption_alike(tmp_path: Path) -> None:
    from blixfs.gc import collect

    async with cluster(tmp_path, ["a"]) as nodes:
        a = nodes["a"]
        await a.write("img", 0, os.urandom(SIZE), create=True)
        old = a.entry("img")
        assert old is not None and old.manifest is not None
        holdings = a.runtime.holdings
        assert old.manifest in holdings.own.complete
        # a chunk rots on disk: reading it finds and removes it; this node stops claiming it
        m = a.vfs.content.manifest(old.manifest)
        assert m is not None
        path = a.node.chunks._path(m.ids[4])
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
        assert a.node.chunks.get(m.ids[4]) is None
        assert old.manifest not in holdings.own.complete
        assert not holdings.own.holds(old.manifest, 4) and holdings.own.holds(old.manifest, 3)
        # an overwrite leaves the old version to GC: once collected, it is not claimed at all
        await a.write("img", 0, os.urandom(SIZE))
        collect(a.node.namespace, a.node.chunks, grace_seconds=0)
        assert not a.node.chunks.has(ChunkId(old.manifest))
        assert old.manifest not in holdings.own.complete and old.manifest not in holdings.own.partial

"""Large files through manifest trees: a sparse 16 TiB image written on one node and read
on another, and commits whose cost follows what changed, not the image size.

Whole nodes in one process over the in-memory network (tests/cluster.py), and a bare Vfs.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blixfs.chunkstore import MemoryChunkStore
from blixfs.daemon import _gc
from blixfs.errors import FsError
from blixfs.gc import collect
from blixfs.hashing import ChunkId
from blixfs.manifest import MAX_FILE_SIZE, MIN_CHUNK_SIZE, PAGE_BYTES, Manifest, iter_tree
from blixfs.vfs import ROOT_INO, Vfs
from tests.cluster import CHUNK, cluster, wait_until
from tests.helpers import make_replica, make_vfs

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


async def test_a_sparse_16_tib_image_is_written_reread_and_read_on_another_node(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "c"]) as nodes:
        a, c = nodes["a"], nodes["c"]
        fh = await a.open_for_write("disk.img", create=True)
        ino = (await a.vfs.lookup(ROOT_INO, "disk.img")).ino
        await a.vfs.setattr(ino, size=MAX_FILE_SIZE)
        places = {0: os.urandom(4096), MAX_FILE_SIZE // 2 - 1000: os.urandom(5000),
                  MAX_FILE_SIZE - 3000: os.urandom(3000)}
        for offset, data in places.items():
            assert await a.vfs.write(fh, offset, data) == len(data)
        await a.vfs.fsync(fh, False)
        await a.vfs.release(fh)
        e = a.entry("disk.img")
        assert e is not None and e.size == MAX_FILE_SIZE and e.manifest is not None
        root = a.vfs.content.manifest(e.manifest)
        assert root is not None and root.depth == 3  # 2**28 chunks of 64 KiB
        pages = [cid for level, _, cid in iter_tree(root, a.node.chunks.get) if level >= 0]
        assert len(pages) <= 3 * 3 + 1  # the paths to three places (the middle one spans two chunks)
        assert a.node.chunks.stats().bytes < 6 * CHUNK + len(pages) * PAGE_BYTES + KiB

        await wait_until(lambda: c.entry("disk.img") == e, "the image's version on c")
        for node in (a, c):  # a reopens what it wrote; c holds nothing of it and fetches pages and chunks
            fh = await node.vfs.open(ino if node is a else (await c.vfs.lookup(ROOT_INO, "disk.img")).ino, os.O_RDONLY)
            try:
                for offset, data in places.items():
                    got = await node.vfs.read(fh, offset - 100 if offset else 0, len(data) + 200)
                    before = bytes(100 if offset else 0)
                    assert got == (before + data + bytes(200 - len(before)))[: MAX_FILE_SIZE - offset + len(before)]
                assert await node.vfs.read(fh, 5 * GiB, 4096) == bytes(4096)
            finally:
                await node.vfs.release(fh)
        # c holds only what it read: the paths to the places, and their chunks.
        assert c.node.chunks.stats().bytes < 6 * CHUNK + len(pages) * PAGE_BYTES + KiB
        for node in (a, c):  # GC walks the tree page by page and frees nothing live
            report = collect(node.node.namespace, node.node.chunks, grace_seconds=0)
            assert report.missing_manifests == [] and report.freed_chunks == 0


async def test_commits_of_4k_on_a_100_gib_image_store_the_touched_chunks_and_a_few_pages() -> None:
    vfs = make_vfs()  # 256 KiB chunks: depth 2 at 100 GiB
    fh, attr = await vfs.create(ROOT_INO, "disk.img", 0o644, os.O_RDWR, 0, 0)
    await vfs.setattr(attr.ino, size=100 * GiB)
    await vfs.fsync(fh, False)
    before = vfs.chunks.stats().bytes
    commits = 40
    places = [(i * 2_654_435_761 * 4096) % (100 * GiB - 4096) // 4096 * 4096 for i in range(1, commits + 1)]
    for offset in places:
        await vfs.write(fh, offset, os.urandom(4096))
        await vfs.fsync(fh, False)
    grown = vfs.chunks.stats().bytes - before
    touched = len({offset // vfs.chunk_size for offset in places}) * vfs.chunk_size
    # Each commit: its chunk, the two pages on its path, and a root of three ids. A flat
    # manifest would have added 100 GiB / 256 KiB x 36 bytes = 14 MiB per commit.
    assert grown <= touched + commits * (2 * PAGE_BYTES + 200)
    await vfs.release(fh)
    e = vfs.namespace.get("disk.img")
    assert e is not None and e.manifest is not None
    root = Manifest.decode(vfs.chunks.get(ChunkId(e.manifest)) or b"")
    assert root.depth == 2
    fh = await vfs.open(attr.ino, os.O_RDONLY)
    assert await vfs.read(fh, places[0], 4096) != bytes(4096)
    await vfs.release(fh)


async def test_gc_on_a_node_holding_some_pages_fetches_the_rest_before_it_frees_anything(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "c"]) as nodes:
        a, c = nodes["a"], nodes["c"]
        fh = await a.open_for_write("disk.img", create=True)
        ino = (await a.vfs.lookup(ROOT_INO, "disk.img")).ino
        await a.vfs.setattr(ino, size=GiB)  # 16 Ki chunks of 64 KiB: a root of 32 pages
        places = {0: os.urandom(4096), GiB // 2: os.urandom(4096), GiB - 4096: os.urandom(4096)}
        for offset, data in places.items():
            await a.vfs.write(fh, offset, data)
        await a.vfs.release(fh)
        e = a.entry("disk.img")
        assert e is not None and e.manifest is not None
        await wait_until(lambda: c.entry("disk.img") == e, "the image's version on c")
        fh = await c.vfs.open((await c.vfs.lookup(ROOT_INO, "disk.img")).ino, os.O_RDONLY)
        assert await c.vfs.read(fh, GiB // 2, 4096) == places[GiB // 2]  # one page of three fetched
        await c.vfs.release(fh)
        report = collect(c.node.namespace, c.node.chunks, grace_seconds=0, dry_run=True)
        assert report.missing_manifests and "disk.img" in report.missing_manifests[0]  # unprovable: frees nothing
        done = await _gc(c.runtime, {"grace": 0})  # the daemon's gc fetches the pages first
        assert done["missing_manifests"] == [] and done["freed_chunks"] == 0
        fh = await c.vfs.open((await c.vfs.lookup(ROOT_INO, "disk.img")).ino, os.O_RDONLY)
        for offset, data in places.items():
            assert await c.vfs.read(fh, offset, 4096) == data
        await c.vfs.release(fh)


async def test_a_page_that_does_not_fit_its_place_reads_as_eio_never_as_data() -> None:
    store = MemoryChunkStore()
    vfs = Vfs(make_replica(), store, chunk_size=MIN_CHUNK_SIZE)
    fh, _ = await vfs.create(ROOT_INO, "f", 0o644, os.O_RDWR, 0, 0)
    await vfs.write(fh, 0, os.urandom(768 * MIN_CHUNK_SIZE))  # two leaf pages: 512 ids and 256
    await vfs.release(fh)
    e = vfs.namespace.get("f")
    assert e is not None and e.manifest is not None
    root = vfs.content.manifest(e.manifest)
    assert root is not None and root.depth == 1
    first, second = root.entries
    store._chunks[first] = store._chunks[second]  # a store (or peer) giving a page that belongs elsewhere
    reader = Vfs(vfs.replica, store, chunk_size=MIN_CHUNK_SIZE)  # nothing cached
    fh = await reader.open((await reader.lookup(ROOT_INO, "f")).ino, os.O_RDONLY)
    with pytest.raises(FsError) as err:
        await reader.read(fh, 0, 4096)
    assert err.value.errno == errno.EIO
    await reader.release(fh)

"""Garbage collection over a real chunk store: what is freed, what must never be."""

from __future__ import annotations

import os
from pathlib import Path

from blixfs.chunkstore import DiskChunkStore
from blixfs.gc import collect
from blixfs.hashing import HOLE, ChunkId
from blixfs.manifest import MIN_CHUNK_SIZE
from blixfs.namespace import SqliteNamespaceStore
from blixfs.vfs import ROOT_INO, Vfs
from tests.helpers import make_replica, write_file

CS = MIN_CHUNK_SIZE


def ids_of(vfs: Vfs, name: str) -> set[ChunkId]:
    e = vfs.namespace.get(name)
    assert e is not None and e.manifest is not None
    return {c for c in vfs.content.manifest(e.manifest).ids if c != HOLE} | {ChunkId(e.manifest)}


async def test_overwritten_and_deleted_content_is_freed_shared_chunks_stay(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "chunks")
    vfs = Vfs(make_replica(SqliteNamespaceStore(tmp_path / "ns.db")), store, chunk_size=CS)
    shared = os.urandom(CS)
    await write_file(vfs, "img", shared + os.urandom(3 * CS))
    old = ids_of(vfs, "img")
    await write_file(vfs, "img", shared + os.urandom(2 * CS))  # overwritten: keeps the shared first chunk
    new = ids_of(vfs, "img")
    await write_file(vfs, "gone", os.urandom(2 * CS))
    gone = ids_of(vfs, "gone")
    await vfs.unlink(ROOT_INO, "gone")

    dry = collect(vfs.namespace, store, grace_seconds=0, dry_run=True)
    assert dry.freed_chunks == len((old - new) | gone) and all(store.has(c) for c in old | gone)
    young = collect(vfs.namespace, store, grace_seconds=3600)
    assert young.freed_chunks == 0 and young.kept_recent == len((old - new) | gone)

    report = collect(vfs.namespace, store, grace_seconds=0)
    assert report.freed_chunks == len((old - new) | gone)
    assert not any(store.has(c) for c in (old - new) | gone)
    assert all(store.has(c) for c in new)  # including the chunk shared with the old version
    fh = await vfs.open(vfs.inodes.ino("img"), os.O_RDONLY)
    assert (await vfs.read(fh, 0, CS)) == shared


async def test_conflict_versions_keep_their_content(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "chunks")
    vfs = Vfs(make_replica(SqliteNamespaceStore(tmp_path / "ns.db")), store, chunk_size=CS)
    await write_file(vfs, "f", os.urandom(CS))
    loser = vfs.namespace.get("f")
    assert loser is not None
    # a concurrent version from another author that wins: ours becomes a kept sibling
    other = make_replica(keys=vfs.replica.keys)
    await write_file(vfs, "tmp", os.urandom(CS))
    tmp = vfs.namespace.get("tmp")
    assert tmp is not None
    winner = tmp.evolve(path="f", author=other.author, timestamp_ns=loser.timestamp_ns + 10, seen={})
    other.commit_local([winner])
    (signed,) = [e for e in other.store.entries() if e.path == "f"]
    await vfs.replica.merge_remote([signed], "peer")
    await vfs.unlink(ROOT_INO, "tmp")
    assert vfs.namespace.conflicts_under("")
    report = collect(vfs.namespace, store, grace_seconds=0)
    assert loser.manifest is not None and store.has(ChunkId(loser.manifest))
    assert report.missing_manifests == []


async def test_a_live_file_without_its_manifest_stops_gc(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "chunks")
    vfs = Vfs(make_replica(SqliteNamespaceStore(tmp_path / "ns.db")), store, chunk_size=CS)
    await write_file(vfs, "a", os.urandom(2 * CS))
    await write_file(vfs, "b", os.urandom(2 * CS))
    e = vfs.namespace.get("a")
    assert e is not None and e.manifest is not None
    store.delete(ChunkId(e.manifest))  # as if its manifest lived on a peer only
    before = set(store.ids())
    report = collect(vfs.namespace, store, grace_seconds=0)
    assert report.missing_manifests == ["a"] and report.freed_chunks == 0
    assert set(store.ids()) == before


async def _own_version_loses_to_a_peer(vfs: Vfs, content: bytes) -> str:
    """Write ``f`` here, then merge a concurrent, later version from another author: ours
    becomes a conflict copy. Returns the conflict file's name."""
    await write_file(vfs, "f", content)
    mine = vfs.namespace.get("f")
    assert mine is not None
    other = make_replica(keys=vfs.replica.keys)
    winner = mine.evolve(author=other.author, timestamp_ns=mine.timestamp_ns + 10, seen={}, size=1)
    other.commit_local([winner])
    (signed,) = [e for e in other.store.entries() if e.path == "f"]
    await vfs.replica.merge_remote([signed], "peer")
    assert [c.author for c in vfs.namespace.conflicts_under("")] == [vfs.author]
    return mine.conflict_name()


async def read_all(vfs: Vfs, name: str) -> bytes:
    fh = await vfs.open((await vfs.lookup(ROOT_INO, name)).ino, os.O_RDONLY)
    try:
        return await vfs.read(fh, 0, 1 << 30)
    finally:
        await vfs.release(fh)


async def test_a_new_write_keeps_this_nodes_superseded_conflict_copy_as_a_file(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "chunks")
    vfs = Vfs(make_replica(SqliteNamespaceStore(tmp_path / "ns.db")), store, chunk_size=CS)
    ours = os.urandom(CS + 100)
    name = await _own_version_loses_to_a_peer(vfs, ours)
    await write_file(vfs, "f", b"written again here")  # supersedes our own old version (entry.write_context)
    assert vfs.namespace.conflicts_under("") == []
    kept = vfs.namespace.get(name)
    assert kept is not None and kept.author == vfs.author  # a plain file now, on every node
    assert await read_all(vfs, name) == ours
    assert await read_all(vfs, "f") == b"written again here"
    assert collect(vfs.namespace, store, grace_seconds=0).missing_manifests == []
    assert await read_all(vfs, name) == ours  # GC keeps its chunks


async def test_deleting_this_nodes_conflict_file_drops_it_without_a_copy(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "chunks")
    vfs = Vfs(make_replica(SqliteNamespaceStore(tmp_path / "ns.db")), store, chunk_size=CS)
    name = await _own_version_loses_to_a_peer(vfs, os.urandom(100))
    await vfs.unlink(ROOT_INO, name)
    assert vfs.namespace.conflicts_under("") == [] and vfs.namespace.get(name) is None

"""Large namespaces: the replicator's own-files index, statfs counts through the VFS, and a
session start that streams its diff in pages with the event loop free between them."""

from __future__ import annotations

import itertools
import os
from collections.abc import Generator, Mapping
from pathlib import Path

import pytest
import trio

import blixfs.sync
from blixfs.crypto import generate_secret
from blixfs.entry import Entry, Kind
from blixfs.holdings import Holdings
from blixfs.namespace import SqliteNamespaceStore
from blixfs.net.memory import MemoryNetwork
from blixfs.node import Node
from blixfs.peers import PeerBook
from blixfs.replica import NamespaceKeys
from blixfs.replication import Replicator
from blixfs.sync import ALPN, SyncService
from blixfs.vfs import ROOT_INO
from tests.helpers import make_replica, write_file


def _replicator(node: Node, transport: blixfs.sync.Transport) -> Replicator:
    holdings = Holdings(node.node_id.hex())
    peers = PeerBook(node.node_id.hex())
    sync = SyncService(node.replica, transport, holdings)
    return Replicator(node, transport, sync, holdings, peers, node.vfs().content)


async def test_the_replicator_index_follows_writes_renames_deletes_and_peers(tmp_path: Path) -> None:
    node = Node.open(tmp_path / "home", lock=False)
    try:
        vfs = node.vfs()
        await write_file(vfs, "before", os.urandom(5000))  # written before the replicator exists
        async with MemoryNetwork().open_transport(node.node_id.hex()) as transport:
            rep = _replicator(node, transport)

            async def own() -> dict[str, bytes | None]:
                return {e.path: e.manifest for e in await rep._own_files()}

            def manifest(path: str) -> bytes | None:
                e = node.namespace.get(path)
                return e.manifest if e is not None else None

            assert await own() == {"before": manifest("before")}  # built by one pass at the first round
            await write_file(vfs, "img", os.urandom(5000))
            await write_file(vfs, "other", os.urandom(3000))
            assert await own() == {p: manifest(p) for p in ("before", "img", "other")}
            await write_file(vfs, "img", os.urandom(4000))  # a new version replaces the old in the index
            assert (await own())["img"] == manifest("img")
            await vfs.rename(ROOT_INO, "img", ROOT_INO, "moved")
            await vfs.unlink(ROOT_INO, "other")
            assert await own() == {p: manifest(p) for p in ("before", "moved")}
            # A peer's version of a file with content not written here takes it out of the index.
            prev = node.namespace.get("before")
            assert prev is not None
            peer = make_replica(keys=node.replica.keys, node_secret=generate_secret())
            ts = prev.timestamp_ns + 1
            theirs = prev.evolve(author=peer.author, timestamp_ns=ts, mtime_ns=ts, manifest=os.urandom(32),
                                 seen=prev.successor_context())
            await node.replica.merge_remote([peer._sign(theirs)], "peer")
            assert await own() == {"moved": manifest("moved")}
            # and the index agrees with what a full pass finds
            written = set(node.chunks.written_versions())
            full = {e.path: e.manifest for e in node.namespace.entries()
                    if not e.deleted and e.kind is Kind.FILE and e.manifest in written}
            assert await own() == full
    finally:
        node.close()


async def test_statfs_counts_follow_creates_and_deletes(tmp_path: Path) -> None:
    node = Node.open(tmp_path / "home", lock=False)
    try:
        vfs = node.vfs()
        assert isinstance(node.namespace, SqliteNamespaceStore)
        ns = node.namespace

        async def check() -> int:
            full = ns.recount()
            assert ns.stats() == full
            files = (await vfs.statfs()).files
            assert files == full.files + full.dirs + full.symlinks
            return files

        before = await check()
        await write_file(vfs, "a", b"x" * 100)
        await vfs.mkdir(ROOT_INO, "d", 0o755, 0, 0)
        await vfs.symlink(ROOT_INO, "l", "a", 0, 0)
        assert await check() >= before + 3
        assert ns.stats().file_bytes == 100
        await write_file(vfs, "a", b"y" * 250)
        assert ns.stats().file_bytes == 250
        await vfs.rename(ROOT_INO, "a", ROOT_INO, "b")
        after_rename = await check()
        await vfs.unlink(ROOT_INO, "b")
        assert await check() == after_rename - 1 and ns.stats().file_bytes == 0
    finally:
        node.close()


async def test_a_session_start_streams_its_diff_in_pages_and_yields_between_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blixfs.sync, "DIFF_PAGE", 16)
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    a = make_replica(SqliteNamespaceStore(tmp_path / "a.db"), keys=keys)
    b = make_replica(SqliteNamespaceStore(tmp_path / "b.db"), keys=keys)
    entries = []
    for i in range(300):  # ~19 pages, several frames
        ts = a.stamp(None)
        entries.append(Entry(path=f"f{i:04d}", kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=i, mtime_ns=ts,
                             ctime_ns=ts, author=a.author, timestamp_ns=ts, manifest=bytes([i % 250 + 1]) * 32))
    a.commit_local(entries)
    ticks = 0
    pulled: list[tuple[int, int]] = []  # (the probe's ticks when a page was asked for, page size)
    original = a.store.serialized_pages_since

    def pages_since(vector: Mapping[bytes, int], page: int = 256) -> Generator[list[bytes], None, None]:
        pages = original(vector, page)
        try:
            for p in pages:
                pulled.append((ticks, len(p)))
                yield p
        finally:
            pages.close()

    a.store.serialized_pages_since = pages_since  # type: ignore[method-assign]

    async def probe() -> None:  # runs whenever the sender yields to the event loop
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with net.open_transport(a.author.hex()) as ta, net.open_transport(b.author.hex()) as tb, \
            trio.open_nursery() as nursery:
        sa, sb = SyncService(a, ta), SyncService(b, tb)
        ta.register(ALPN, sa.handle)
        tb.register(ALPN, sb.handle)
        nursery.start_soon(probe)
        nursery.start_soon(sb.maintain, blixfs.sync.NodeAddr(ta.node_id))
        with trio.fail_after(60):
            while b.store.stats().files < 300:  # noqa: ASYNC110 - nothing signals "converged"
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert {e.entry_hash() for e in b.store.entries()} == {e.entry_hash() for e in a.store.entries()}
    assert len(pulled) >= 300 // 16 and all(size <= 16 for _, size in pulled)
    marks = [t for t, _ in pulled]
    assert all(later > earlier for earlier, later in itertools.pairwise(marks)), marks
    a.store.close()
    b.store.close()


async def test_a_directorys_nlink_follows_this_nodes_and_peers_changes_at_once(tmp_path: Path) -> None:
    """nlink of a directory comes from the store's running count of its subdirectories: no
    recount at a getattr, and this node's mkdir/rmdir and a peer's directory show at once."""
    from blixfs.chunkstore import MemoryChunkStore
    from blixfs.namespace import SqliteNamespaceStore
    from blixfs.vfs import Vfs

    store = SqliteNamespaceStore(tmp_path / "n.db")
    replica = make_replica(store=store)
    vfs = Vfs(replica, MemoryChunkStore())
    d = (await vfs.mkdir(ROOT_INO, "images", 0o755, 0, 0)).ino
    for i in range(3):
        await vfs.mkdir(d, f"vm-{i}", 0o755, 0, 0)
    await vfs.mkdir(ROOT_INO, "elsewhere", 0o755, 0, 0)
    assert (await vfs.getattr(d)).nlink == 5
    await vfs.mkdir(d, "vm-3", 0o755, 0, 0)
    assert (await vfs.getattr(d)).nlink == 6
    await vfs.rmdir(d, "vm-0")
    assert (await vfs.getattr(d)).nlink == 5
    peer = vfs.namespace.get("images/vm-1")
    assert peer is not None
    vfs.namespace.apply([peer.evolve(path="images/vm-9", timestamp_ns=peer.timestamp_ns + 1)])
    assert (await vfs.getattr(d)).nlink == 6
    assert store.count_subdirs("images") == store.recount_subdirs("images") == 4
    store.close()

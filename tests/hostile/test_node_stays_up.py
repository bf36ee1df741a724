"""A member (even read-only) cannot stop a node: sessions absorb whatever one peer or one
full disk does (issue items 1, 4, 6, 7, 8, 10). In process, over the in-memory network."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from blixfs import chunkproto
from blixfs.chunkproto import ALPN as CHUNKS_ALPN
from blixfs.chunkproto import ChunkClient, ChunkServer, encode_request
from blixfs.chunkstore import MemoryChunkStore
from blixfs.crypto import generate_secret
from blixfs.daemon import serve_control
from blixfs.frames import FrameError, Hello, HoldingsFrame, Synced, encode, read_frame
from blixfs.health import HEARSAY_EXPIRY, HEARSAY_PROBES, HealthMonitor
from blixfs.holdings import Holdings
from blixfs.namespace import MemoryNamespaceStore, Outcome
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import CODE_BUSY, STREAMS_PER_PEER, NodeAddr, Stream, StreamReset, TransportError
from blixfs.peers import MAX_EXCHANGE_PEERS, PeerBook
from blixfs.replica import NamespaceKeys, Replica
from blixfs.sync import (
    ALPN,
    HOLDINGS_TABLE_BYTES,
    LIVE_QUEUE_BYTES,
    MAX_HOLDINGS_NODES,
    MAX_VECTOR_AUTHORS,
    LiveQueue,
    frame_bytes,
    record_bytes,
)
from blixfs.sync import ALPN as SYNC_ALPN
from blixfs.vfs import ROOT_INO, Vfs
from tests.cluster import cluster
from tests.ops.test_sync import peer, wait_until


async def test_synced_naming_invented_authors_neither_grows_the_vector_nor_stops_the_node() -> None:
    """Item 1: a read-only member's SYNCED with 40,000 invented authors once made the next
    HELLO too large for a frame: `maintain` died with ValueError, on every restart."""
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as victim, peer(net, keys) as honest, net.open_transport() as hostile, \
            trio.open_nursery() as nursery:
        honest.write("before")
        nursery.start_soon(victim.sync.maintain, honest.addr)
        await wait_until(lambda: victim.replica.store.get("before") is not None)
        stream = await hostile.open_stream(victim.addr, ALPN)
        async with stream:
            await stream.send_all(encode(Hello(keys.id, {})))
            assert isinstance(await read_frame(stream), Hello)
            for _ in range(2):
                invented = {os.urandom(32): 10**18 + i for i in range(20_000)}
                await stream.send_all(encode(Synced(invented)))
            await stream.send_all(encode(Synced({})))  # a marker: the two before are applied
            await wait_until(lambda: any(s.synced.is_set() for s in victim.sync.sessions()
                                         if s.peer == hostile.node_id))
        vector = victim.replica.store.vector()
        assert len(vector) <= 2, f"{len(vector)} authors in the vector"
        # The vector is bounded however it got there (a store poisoned before this fix):
        victim.replica.store.advance_vector({os.urandom(32): 5 for _ in range(MAX_VECTOR_AUTHORS + 30_000)})
        net.disconnect(victim.transport.node_id, honest.transport.node_id)  # next HELLO carries it
        honest.write("after")
        await wait_until(lambda: victim.replica.store.get("after") is not None)
        nursery.cancel_scope.cancel()


class _FullDisk:
    """A namespace store whose disk fills up: every apply fails like SQLite on ENOSPC."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.full = True
        self.failures = 0

    def apply(self, entries: Sequence[object], *, durable: bool = False) -> list[Outcome]:
        if self.full:
            self.failures += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.inner.apply(entries, durable=durable)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_a_full_disk_during_sync_costs_the_session_not_the_daemon() -> None:
    """Item 4: sqlite3.OperationalError inside a session used to end `maintain` (and the mount)."""
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as victim, peer(net, keys) as honest, trio.open_nursery() as nursery:
        full = _FullDisk(victim.replica.store)
        victim.replica.store = full  # type: ignore[assignment]
        honest.write("img")
        nursery.start_soon(victim.sync.maintain, honest.addr)  # the victim dials: maintain must survive
        await wait_until(lambda: full.failures >= 2)  # failed, retried
        full.full = False  # space was freed
        await wait_until(lambda: victim.replica.store.get("img") is not None)
        nursery.cancel_scope.cancel()


async def _ask(path: str, raw: bytes) -> dict[str, object]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, OSError):  # the daemon stops reading a huge line
            await stream.send_all(raw)
            await stream.send_eof()
        data = b""
        with trio.fail_after(60):
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                assert chunk, f"no reply to {raw[:60]!r}"
                data += chunk
    reply = json.loads(data.splitlines()[-1])
    assert isinstance(reply, dict)
    return reply


async def test_malformed_control_requests_get_an_error_and_the_daemon_keeps_answering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Item 8: ``{"op": [1]}`` (unhashable), wrong field types, deep nesting, huge lines once
    raised out of `_answer` into the services nursery."""

    def broken_status() -> dict[str, object]:
        raise RuntimeError("a bug in a handler")

    runtime = SimpleNamespace(transport=SimpleNamespace(addr=lambda: "node@127.0.0.1:1"), vfs=None,
                              status=broken_status, peers_report=lambda: [], replicator=None)
    with tempfile.TemporaryDirectory(dir="/tmp") as home:  # a unix socket path is at most 107 bytes
        sock = os.path.join(home, "control.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, Path(sock), runtime)
            bad = [b'{"op": [1]}\n', b'{"op": {"a": 1}}\n', b'[1, 2]\n', b'"status"\n', b'42\n', b'null\n',
                   b'\xff\xfe\n', b'{"op": "gc", "grace": "soon"}\n', b'{"op": "gc", "grace": [1]}\n',
                   b'{"op": "gc", "dry_run": "yes"}\n', b'{"op": "pull", "path": 7}\n',
                   b'{"op": "join", "ticket": {"x": 1}}\n', b'{"op": "status"}\n', b'{"op": "api", "page": 3}\n',
                   b'{"op": "api", "page": "../../etc"}\n',
                   b"[" * 60_000 + b"\n", b"{" * 200_000 + b"\n", b'{"op": "addr", "pad": "' + b"x" * 300_000]
            for raw in bad:
                reply = await _ask(sock, raw)
                assert reply["ok"] is False and isinstance(reply["error"], str), (raw[:40], reply)
                assert (await _ask(sock, b'{"op": "addr"}\n')) == {"ok": True, "addr": "node@127.0.0.1:1"}
            nursery.cancel_scope.cancel()
    assert any("control request" in r.getMessage() for r in caplog.records)


async def test_a_future_stamped_version_does_not_push_honest_overwrites_out_of_lagging_nodes_window() -> None:
    """Item 7: a version stamped 9 minutes ahead (accepted: within the 10-minute window) made
    every later overwrite carry the future stamp (prev + 1), which a node whose clock lags
    3 minutes refused. An overwrite now takes the writer's clock and wins through ``seen``."""
    keys = NamespaceKeys.generate()
    now = time.time_ns()
    minute = 60 * 10**9

    chunks = MemoryChunkStore()  # shared: the writer reads the content it overwrites

    def vfs_at(offset: int) -> Vfs:
        return Vfs(Replica(MemoryNamespaceStore(), keys, generate_secret(), clock=lambda: time.time_ns() + offset),
                   chunks)

    fast, writer, lagging = vfs_at(9 * minute), vfs_at(0), vfs_at(-3 * minute)
    fh, _ = await fast.create(ROOT_INO, "img", 0o644, os.O_RDWR, 0, 0)
    await fast.write(fh, 0, b"from the fast clock")
    await fast.release(fh)
    future = fast.namespace.get("img")
    assert future is not None and future.timestamp_ns > now + 8 * minute
    _, refused = await writer.replica.merge_remote([future], "fast")
    assert refused == 0
    ino = (await writer.lookup(ROOT_INO, "img")).ino
    fh = await writer.open(ino, os.O_RDWR)
    await writer.write(fh, 0, b"honest overwrite!!!")
    await writer.release(fh)
    honest = writer.namespace.get("img")
    assert honest is not None and honest.author == writer.replica.author
    assert honest.timestamp_ns < now + minute, "the overwrite carried the future stamp"
    _, refused = await lagging.replica.merge_remote([future], "writer")
    assert refused == 1  # 12 minutes ahead of the lagging clock: refused, as it should be
    _, refused = await lagging.replica.merge_remote([honest], "writer")
    assert refused == 0 and lagging.namespace.get("img") == honest
    # Every node that holds both keeps the overwrite, whatever the order: it has seen the future version.
    for order in ([future, honest], [honest, future]):
        store = MemoryNamespaceStore()
        store.apply(order)
        assert store.get("img") == honest and store.conflicts_under("") == []


async def test_a_flood_of_streams_from_one_peer_is_refused_and_an_honest_peer_is_still_served() -> None:
    """Item 10: incoming streams had no limit but QUIC's; each held a handler (and, for the
    chunk server, up to REQUEST_TIMEOUT). The excess is now reset with CODE_BUSY."""
    net = MemoryNetwork()
    store = MemoryChunkStore()
    cid = store.put(os.urandom(4096))
    server = ChunkServer(store)
    async with net.open_transport(handlers={CHUNKS_ALPN: server.handle}) as srv, \
            net.open_transport() as hostile, net.open_transport() as honest:
        streams = []
        for _ in range(STREAMS_PER_PEER + 50):
            s = await hostile.open_stream(srv.addr(), CHUNKS_ALPN)
            await s.send_all(b"\x01")  # a request's first byte: the handler waits for the rest
            streams.append(s)
        busy = 0
        for s in streams[STREAMS_PER_PEER:]:
            with trio.fail_after(60):
                try:
                    await s.receive_some()
                except StreamReset as exc:
                    busy += exc.code == CODE_BUSY
        assert busy == 50
        with trio.fail_after(60):
            assert await ChunkClient(honest).fetch(srv.addr(), cid) is not None
        for s in streams:
            await s.reset()


async def test_a_requester_that_stops_reading_does_not_hold_a_chunk_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 10: the chunk server had no deadline for sending a response: a requester that
    never reads held the stream and the blob (up to 16 MiB) until the connection died."""
    monkeypatch.setattr(chunkproto, "SEND_TIMEOUT", 0.5)
    net = MemoryNetwork()
    store = MemoryChunkStore()
    cid = store.put(os.urandom(4 << 20))  # more than the in-memory pipe holds
    server = ChunkServer(store)
    done = trio.Event()

    async def handle(stream: Stream, peer_id: str) -> None:
        try:
            await server.handle(stream, peer_id)
        finally:
            done.set()

    async with net.open_transport(handlers={CHUNKS_ALPN: handle}) as srv, net.open_transport() as hostile:
        s = await hostile.open_stream(srv.addr(), CHUNKS_ALPN)
        await s.send_all(encode_request(cid))
        with trio.fail_after(60):
            await done.wait()
        await s.reset()


async def test_a_holdings_flood_is_bounded_in_the_table_and_in_every_live_queue() -> None:
    """Item 6: relayed ~1 MiB HOLDINGS for invented nodes were all kept, and queued frame by
    frame (10,000 frames) for a peer that does not read: GiBs (scripts/flood_rss.py: 4.1 GiB
    after 15 s before the fix, bounded at ~210 MiB after)."""
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as victim, peer(net, keys) as honest, net.open_transport() as hostile, \
            net.open_transport() as slow, trio.open_nursery() as nursery:
        holdings = Holdings(victim.transport.node_id)
        victim.sync.holdings = holdings
        quiet = await slow.open_stream(victim.addr, ALPN)
        await quiet.send_all(encode(Hello(keys.id, {})))  # and never reads: everything is queued for it
        stream = await hostile.open_stream(victim.addr, ALPN)
        await stream.send_all(encode(Hello(keys.id, {})))

        async def drain() -> None:
            with contextlib.suppress(TransportError, FrameError):
                while await read_frame(stream) is not None:
                    pass

        nursery.start_soon(drain)
        ids = [os.urandom(32) for _ in range(31_000)]
        for _ in range(60):  # 57 MiB of announcements
            await stream.send_all(encode(HoldingsFrame(os.urandom(32), time.time_ns(), ids, [], b"", 0)))
        await stream.send_all(encode(Synced({})))
        await wait_until(lambda: any(s.synced.is_set() for s in victim.sync.sessions() if s.peer == hostile.node_id))
        assert len(holdings.nodes) <= MAX_HOLDINGS_NODES
        assert sum(record_bytes(r) for r in holdings.nodes.values()) <= HOLDINGS_TABLE_BYTES
        assert victim.sync.queued_bytes() <= LIVE_QUEUE_BYTES * len(victim.sync.sessions())
        nursery.start_soon(honest.sync.maintain, victim.addr)  # the node still syncs
        victim.write("after the flood")
        await wait_until(lambda: honest.replica.store.get("after the flood") is not None)
        nursery.cancel_scope.cancel()


def test_the_live_queue_keeps_the_newest_holdings_of_a_node_and_refuses_what_does_not_fit() -> None:
    queue = LiveQueue()
    node = os.urandom(32)
    for seq in (5, 7, 6):
        assert queue.put(HoldingsFrame(node, seq, [os.urandom(32)], [], b"", 0))
    assert queue.bytes == frame_bytes(HoldingsFrame(node, 7, [bytes(32)], [], b"", 0))
    big = [os.urandom(32) for _ in range(30_000)]
    for _ in range(40):  # 38 MiB of other nodes' holdings: the oldest are dropped, the session stays
        assert queue.put(HoldingsFrame(os.urandom(32), 1, big, [], b"", 0))
    assert queue.bytes <= LIVE_QUEUE_BYTES


async def test_peers_only_heard_of_are_bounded_probed_rarely_and_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 6: node ids learnt from relayed HOLDINGS were kept forever and probed every 2 s
    at whatever address the relayer named (a reflector)."""
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as victim:
        book = PeerBook(victim.transport.node_id)
        learnt = [book.learn(NodeAddr(os.urandom(32).hex(), ("192.0.2.1:9",)), "exchange") for _ in range(1000)]
        assert sum(learnt) == MAX_EXCHANGE_PEERS
        assert book.learn(NodeAddr(os.urandom(32).hex()), "ticket")  # tickets are not hearsay
        holdings = Holdings(victim.transport.node_id)
        monitor = HealthMonitor(victim.transport, book, holdings, victim.sync)
        rounds = [monitor.to_probe() for _ in range(5)]
        hearsay = [[n for n in r if book.hearsay(n)] for r in rounds]
        assert all(len(r) <= HEARSAY_PROBES for r in hearsay)
        assert len({n for r in hearsay for n in r}) == sum(len(r) for r in hearsay)  # none twice in an interval
        for stats in book.stats.values():
            stats.learnt -= HEARSAY_EXPIRY + 1
        monitor._expire()
        assert len(book.stats) == 1  # only the ticket's peer is left


async def test_whole_nodes_stay_up_and_keep_syncing_under_a_hostile_member(tmp_path: Path) -> None:
    """Items 1 and 6 against whole nodes (every daemon service, tests/cluster.py): a member
    with read capability lies in SYNCED and floods HOLDINGS at two nodes; the services
    nurseries would end (and the test with them) on an escaped exception."""
    async with cluster(tmp_path, ["a", "b", "c"]) as nodes:
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        keys_id = a.node.replica.keys.id
        network = a.runtime.transport._network  # type: ignore[attr-defined]
        async with network.open_transport() as hostile, trio.open_nursery() as nursery:
            ids = [os.urandom(32) for _ in range(31_000)]
            for target in (a, b):
                stream = await hostile.open_stream(NodeAddr(target.id), SYNC_ALPN)
                await stream.send_all(encode(Hello(keys_id, {})))

                async def drain(s: Stream = stream) -> None:
                    with contextlib.suppress(TransportError, FrameError):
                        while await read_frame(s) is not None:
                            pass

                nursery.start_soon(drain)
                for _ in range(2):
                    await stream.send_all(encode(Synced({os.urandom(32): 10**18 for _ in range(20_000)})))
                for _ in range(40):
                    await stream.send_all(encode(HoldingsFrame(os.urandom(32), time.time_ns(), ids, [], b"", 0)))
            await a.write("img", 0, b"written after the attack", create=True)
            await wait_until(lambda: c.entry("img") is not None and c.entry("img") == a.entry("img"))
            for n in (a, b):
                assert len(n.node.namespace.vector()) <= 3
                assert sum(record_bytes(r) for r in n.runtime.holdings.nodes.values()) <= HOLDINGS_TABLE_BYTES * 2
            network.disconnect(a.id, b.id)  # fresh sessions: new HELLOs
            network.disconnect(a.id, c.id)
            await c.write("img2", 0, b"and after the reconnect", create=True)
            await wait_until(lambda: a.entry("img2") is not None and b.entry("img2") is not None)
            nursery.cancel_scope.cancel()

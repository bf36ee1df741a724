"""The chunk protocol and the fetcher between in-process nodes: kept-open streams, stale
pools, liars, cancellation, the server's request loop. The tests that take ``kind`` run
over both transports (in memory, and real iroh endpoints on loopback); the ones that
need a mock clock or a cut link run in memory only."""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from blixfs import chunkproto
from blixfs.chunkproto import ALPN, CODE_BAD_REQUEST, ChunkClient, ChunkServer, FetchFailed, encode_request
from blixfs.chunkstore import MemoryChunkStore
from blixfs.errors import FsError
from blixfs.fetcher import PENALTY_SECONDS, Fetcher
from blixfs.hashing import ChunkId, chunk_id
from blixfs.net.iroh_transport import open_iroh_transport
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import NodeAddr, Stream, StreamHandler, StreamReset, Transport
from blixfs.peers import PeerBook


@pytest.fixture(params=["memory", "iroh"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def node(kind: str, net: MemoryNetwork, handlers: Mapping[bytes, StreamHandler] | None = None
         ) -> AbstractAsyncContextManager[Transport]:
    if kind == "memory":
        return net.open_transport(handlers=handlers)
    return open_iroh_transport(None, handlers=handlers, connect_timeout=1.5)


@dataclass
class Pair:
    net: MemoryNetwork
    store: MemoryChunkStore
    server: ChunkServer
    server_addr: NodeAddr
    client_transport: Transport
    chunks: list[ChunkId]


@asynccontextmanager
async def pair(kind: str = "memory", n_chunks: int = 8, size: int = 4096) -> AsyncIterator[Pair]:
    net = MemoryNetwork()
    store = MemoryChunkStore()
    chunks = [store.put(os.urandom(size)) for _ in range(n_chunks)]
    server = ChunkServer(store)
    async with node(kind, net, {ALPN: server.handle}) as srv, node(kind, net) as cli:
        yield Pair(net, store, server, srv.addr(), cli, chunks)


async def test_sequential_fetches_share_one_stream(kind: str) -> None:
    async with pair(kind) as p:
        client = ChunkClient(p.client_transport)
        for cid in p.chunks:
            got = await client.fetch(p.server_addr, cid)
            assert got is not None and chunk_id(got.data) == cid and got.data == p.store.get(cid)
        assert await client.fetch(p.server_addr, ChunkId(b"\xee" * 32)) is None  # DONT_HAVE keeps the stream
        assert client.streams_opened == 1
        assert p.server.requests == len(p.chunks) + 1


async def test_concurrent_fetches_open_streams_then_reuse_them(kind: str) -> None:
    async with pair(kind, n_chunks=4, size=256 * 1024) as p:
        client = ChunkClient(p.client_transport)
        results: dict[ChunkId, bytes] = {}

        async def one(cid: ChunkId) -> None:
            got = await client.fetch(p.server_addr, cid)
            assert got is not None
            results[cid] = got.data

        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for cid in p.chunks:
                    nursery.start_soon(one, cid)
        assert all(results[cid] == p.store.get(cid) for cid in p.chunks)
        assert 1 <= client.streams_opened <= len(p.chunks)  # three rounds, no stream opened after the first


async def test_stream_the_server_closed_for_idleness_is_replaced_without_error(
        autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunkproto, "POOL_IDLE_SECONDS", 10 * chunkproto.IDLE_TIMEOUT)  # keep it past the server's
    async with pair() as p:
        client = ChunkClient(p.client_transport)
        assert await client.fetch(p.server_addr, p.chunks[0]) is not None
        await trio.sleep(chunkproto.IDLE_TIMEOUT + 1)  # the server finishes the idle stream
        got = await client.fetch(p.server_addr, p.chunks[1])
        assert got is not None and got.data == p.store.get(p.chunks[1])
        assert client.streams_opened == 2


async def test_requester_drops_streams_idle_too_long(autojump_clock: trio.abc.Clock) -> None:
    async with pair() as p:
        client = ChunkClient(p.client_transport)
        assert await client.fetch(p.server_addr, p.chunks[0]) is not None
        await trio.sleep(chunkproto.POOL_IDLE_SECONDS + 1)
        assert await client.fetch(p.server_addr, p.chunks[1]) is not None
        assert client.streams_opened == 2


async def test_lost_connection_under_a_pooled_stream_is_replaced() -> None:
    async with pair() as p:
        client = ChunkClient(p.client_transport)
        assert await client.fetch(p.server_addr, p.chunks[0]) is not None
        p.net.disconnect(p.client_transport.node_id, p.server_addr.node_id)
        got = await client.fetch(p.server_addr, p.chunks[1])
        assert got is not None and got.data == p.store.get(p.chunks[1])


async def test_cancelled_fetch_never_leaves_half_an_answer_for_the_next(kind: str) -> None:
    net = MemoryNetwork()
    store = MemoryChunkStore()
    chunks = [store.put(os.urandom(256 * 1024)) for _ in range(2)]
    server = ChunkServer(store)
    stalled = trio.Event()

    async def half_then_honest(stream: Stream, peer_id: str) -> None:
        if not stalled.is_set():  # the first stream: half an answer, then nothing
            stalled.set()
            cid = ChunkId((await stream.receive_exactly(46))[2:34])
            data = store.get(cid)
            assert data is not None
            await stream.send_all(struct.pack(">BI", 0, len(data)) + data[: len(data) // 2])
            await trio.sleep_forever()
        await server.handle(stream, peer_id)

    async with node(kind, net, {ALPN: half_then_honest}) as srv, node(kind, net) as cli:
        client = ChunkClient(cli)
        # A deadline in the middle of the answer: once the server has sent half of it, not after
        # a fixed time (a dial on a slow machine can take longer than any fixed deadline).
        with trio.fail_after(60), trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                async def cancel_mid_answer() -> None:
                    await stalled.wait()
                    await trio.sleep(0.1)  # the half answer is on its way, or already read
                    scope.cancel()
                nursery.start_soon(cancel_mid_answer)
                await client.fetch(srv.addr(), chunks[0])
        assert scope.cancelled_caught
        for cid in chunks:  # each answer is the chunk asked for: the broken stream was not reused
            got = await client.fetch(srv.addr(), cid)
            assert got is not None and got.data == store.get(cid)
        assert client.streams_opened == 2


async def _liar(stream: Stream, peer_id: str) -> None:
    while await stream.receive_exactly(46):
        junk = os.urandom(4096)
        await stream.send_all(struct.pack(">BI", 0, len(junk)) + junk)


async def test_liar_is_detected_and_its_stream_not_reused(kind: str) -> None:
    net = MemoryNetwork()
    async with node(kind, net, {ALPN: _liar}) as liar, node(kind, net) as cli:
        client = ChunkClient(cli)
        for _ in range(2):
            with pytest.raises(FetchFailed) as info:
                await client.fetch(liar.addr(), chunk_id(b"x" * 4096))
            assert info.value.bad_data
        assert client.streams_opened == 2


async def test_fetcher_gets_correct_bytes_past_a_liar_and_penalises_it(kind: str) -> None:
    net = MemoryNetwork()
    store = MemoryChunkStore()
    data = os.urandom(4096)
    cid = store.put(data)
    async with node(kind, net, {ALPN: ChunkServer(store).handle}) as honest, \
            node(kind, net, {ALPN: _liar}) as liar, node(kind, net) as reader:
        peers = PeerBook(reader.node_id)
        peers.learn(honest.addr())
        peers.learn(liar.addr())
        peers.of(liar.node_id).latency = 0.0001  # the liar looks best: it is asked first
        local = MemoryChunkStore()
        fetcher = Fetcher(local, reader, peers)
        assert await fetcher.get(cid, [liar.node_id, honest.node_id]) == data
        assert local.get(cid) == data
        assert peers.of(liar.node_id).bad_data == 1
        assert peers.of(liar.node_id).penalised_until > time.monotonic() + PENALTY_SECONDS / 2
        assert peers.rank([liar.node_id, honest.node_id])[0] == honest.node_id


async def test_server_answers_requests_in_order_and_finishes_on_eof(kind: str) -> None:
    async with pair(kind, n_chunks=3) as p:
        stream = await p.client_transport.open_stream(p.server_addr, ALPN)
        async with stream:
            await stream.send_all(b"".join(encode_request(cid) for cid in p.chunks))  # pipelined
            await stream.send_eof()
            for cid in p.chunks:
                status, length = struct.unpack(">BI", await stream.receive_exactly(5))
                assert status == 0 and await stream.receive_exactly(length) == p.store.get(cid)
            assert await stream.receive_some() == b""  # FIN after the requester's EOF


async def test_server_resets_a_stream_with_a_partial_request(autojump_clock: trio.abc.Clock) -> None:
    async with pair() as p:
        stream = await p.client_transport.open_stream(p.server_addr, ALPN)
        async with stream:
            await stream.send_all(encode_request(p.chunks[0])[:20])
            with pytest.raises(StreamReset) as info:
                await stream.receive_some()
            assert info.value.code == CODE_BAD_REQUEST


async def test_server_refuses_an_unknown_version_and_finishes(kind: str) -> None:
    async with pair(kind) as p:
        stream = await p.client_transport.open_stream(p.server_addr, ALPN)
        async with stream:
            await stream.send_all(b"\x02" + encode_request(p.chunks[0])[1:])
            assert await stream.receive_exactly(5) == b"\x02\x00\x00\x00\x00"
            assert await stream.receive_some() == b""


async def test_a_chunk_the_store_refuses_is_served_but_never_taken_as_held(kind: str) -> None:
    async with pair(kind, n_chunks=2) as p:
        local = MemoryChunkStore()
        local.fail_with = errno.ENOSPC
        peers = PeerBook(p.client_transport.node_id)
        peers.learn(p.server_addr)
        fetcher = Fetcher(local, p.client_transport, peers)
        holder = [p.server_addr.node_id]
        assert await fetcher.get(p.chunks[0], holder) == p.store.get(p.chunks[0])  # a read: from memory
        with pytest.raises(FsError) as info:  # a pull or a replica: it must be on disk
            await fetcher.get(p.chunks[1], holder, must_store=True)
        assert info.value.errno == errno.ENOSPC and not local.has(p.chunks[1])
        local.fail_with = None
        assert await fetcher.get(p.chunks[1], holder, must_store=True) == p.store.get(p.chunks[1])
        assert local.has(p.chunks[1])


async def test_have_answers_which_chunks_are_held_on_a_kept_stream(kind: str) -> None:
    async with pair(kind, n_chunks=3) as p:
        client = ChunkClient(p.client_transport)
        unknown = [ChunkId(os.urandom(32)) for _ in range(9)]
        asked = [p.chunks[0], *unknown[:4], p.chunks[2], *unknown[4:], p.chunks[1]]
        assert await client.have(p.server_addr, asked) == [c in p.chunks for c in asked]
        fetched = await client.fetch(p.server_addr, p.chunks[1])  # same stream, next request
        assert fetched is not None and chunk_id(fetched.data) == p.chunks[1]
        assert client.streams_opened == 1 and p.server.have_requests == 1


@pytest.mark.parametrize("count", [0, chunkproto.MAX_HAVE + 1, 0xFFFFFFFF])
async def test_server_resets_a_have_of_a_bad_count(count: int) -> None:
    async with pair() as p:
        stream = await p.client_transport.open_stream(p.server_addr, ALPN)
        async with stream:
            await stream.send_all(struct.pack(">BB32sQI", 1, chunkproto.OP_HAVE, bytes(32), 0, count))
            with pytest.raises(StreamReset) as info:
                await stream.receive_some()
            assert info.value.code == CODE_BAD_REQUEST


async def test_fetcher_finds_holders_by_locate_when_the_given_ones_fail(kind: str) -> None:
    async with pair(kind, n_chunks=1) as p, node(kind, p.net, {ALPN: ChunkServer(MemoryChunkStore()).handle}) as empty:
        peers = PeerBook(p.client_transport.node_id)
        peers.learn(p.server_addr)
        peers.learn(empty.addr())
        fetcher = Fetcher(MemoryChunkStore(), p.client_transport, peers)
        asked: list[frozenset[str]] = []

        async def locate(tried: frozenset[str]) -> list[str]:
            asked.append(tried)
            return [p.server_addr.node_id]

        data = await fetcher.get(p.chunks[0], [empty.addr().node_id], locate=locate)
        assert chunk_id(data) == p.chunks[0]
        assert asked == [frozenset({empty.addr().node_id})]  # asked once, after the given holder lacked it

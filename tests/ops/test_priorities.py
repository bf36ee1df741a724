"""Transfer priorities and bandwidth limits between in-process nodes (in-memory network,
mock clock): the server answers demand first, the fetcher lets demand bypass its queue,
the limits hold their rates and change at run time."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from blixfs.chunkproto import ALPN, ChunkClient, ChunkServer
from blixfs.chunkstore import MemoryChunkStore
from blixfs.fetcher import BACKGROUND_WHILE_DEMAND, DEMAND_LINGER_SECONDS, FETCH_SLOTS, Fetcher
from blixfs.hashing import ChunkId
from blixfs.limits import BURST_MIN, Limits
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import NodeAddr, Transport
from blixfs.peers import PeerBook
from blixfs.priority import Priority
from blixfs.scheduling import FairQueue

LOAD_SECONDS = 0.1


class SlowStore(MemoryChunkStore):
    """A store whose every load takes LOAD_SECONDS (a busy disk: requests queue up), or
    what ``delays`` says for a chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: dict[ChunkId, float] = {}

    async def load(self, cid: ChunkId) -> bytes | None:
        await trio.sleep(self.delays.get(cid, LOAD_SECONDS))
        return await super().load(cid)


@dataclass
class Net:
    store: MemoryChunkStore
    server: ChunkServer
    addr: NodeAddr
    client: Transport
    chunks: list[ChunkId]


@asynccontextmanager
async def serving(n_chunks: int, size: int = 4096, *, slow: bool = True, slots: int | None = None,
                  limits: Limits | None = None) -> AsyncIterator[Net]:
    net = MemoryNetwork()
    store = SlowStore() if slow else MemoryChunkStore()
    chunks = [store.put(os.urandom(size)) for _ in range(n_chunks)]
    server = ChunkServer(store, limits=limits)
    if slots is not None:
        server.queue = FairQueue(slots, "serve")
        server.demand_queue = FairQueue(slots, "serve")
    async with net.open_transport(handlers={ALPN: server.handle}) as srv, net.open_transport() as cli:
        yield Net(store, server, srv.addr(), cli, chunks)


async def test_the_server_answers_a_demand_request_before_a_queue_of_background_ones(
        autojump_clock: trio.abc.Clock) -> None:
    async with serving(41, slots=1) as n:
        client = ChunkClient(n.client)
        done: dict[str, float] = {}
        start = trio.current_time()

        async def get(cid: ChunkId, priority: Priority, name: str) -> None:
            assert await client.fetch(n.addr, cid, priority) is not None
            done[name] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            for i, cid in enumerate(n.chunks[:40]):
                nursery.start_soon(get, cid, Priority.BACKGROUND, f"bg{i}")
            await trio.sleep(0.05)
            nursery.start_soon(get, n.chunks[40], Priority.DEMAND, "demand")
        # 40 background loads take 4 s one at a time; the demand one has slots of its own.
        assert done["demand"] < 0.05 + 2 * LOAD_SECONDS + 0.01
        assert max(done.values()) >= 40 * LOAD_SECONDS


async def test_background_classes_are_served_in_order(autojump_clock: trio.abc.Clock) -> None:
    async with serving(31, slots=1) as n:
        client = ChunkClient(n.client)
        order: list[Priority] = []

        async def get(cid: ChunkId, priority: Priority) -> None:
            assert await client.fetch(n.addr, cid, priority) is not None
            order.append(priority)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, n.chunks[30], Priority.BACKGROUND)  # holds the slot
            await trio.sleep(0.01)
            for i, cid in enumerate(n.chunks[:30]):
                nursery.start_soon(get, cid, [Priority.BACKGROUND, Priority.AHEAD, Priority.TRACE][i % 3])
        assert order[1:] == [Priority.TRACE] * 10 + [Priority.AHEAD] * 10 + [Priority.BACKGROUND] * 10


async def test_a_plain_get_is_served_as_read_ahead(autojump_clock: trio.abc.Clock) -> None:
    async with serving(3, slots=1) as n:
        client = ChunkClient(n.client)
        order: list[str] = []

        async def get(cid: ChunkId, priority: Priority | None, name: str) -> None:
            assert await client.fetch(n.addr, cid, priority) is not None
            order.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, n.chunks[0], Priority.BACKGROUND, "first")
            await trio.sleep(0.01)
            nursery.start_soon(get, n.chunks[1], Priority.BACKGROUND, "background")
            await trio.sleep(0.01)
            nursery.start_soon(get, n.chunks[2], None, "plain")
        assert order == ["first", "plain", "background"]


async def _fetcher(n: Net, limits: Limits | None = None) -> Fetcher:
    peers = PeerBook(n.client.node_id)
    peers.learn(n.addr)
    peers.trusted.add(n.addr.node_id)
    return Fetcher(MemoryChunkStore(), n.client, peers, limits=limits)


async def test_a_demand_read_bypasses_the_fetchers_queue_of_background_fetches(
        autojump_clock: trio.abc.Clock) -> None:
    async with serving(41) as n:
        fetcher = await _fetcher(n)
        fetcher.queue = FairQueue(2, "fetch")
        holder = [n.addr.node_id]
        done: dict[str, float] = {}
        start = trio.current_time()

        async def get(cid: ChunkId, name: str, must_store: bool) -> None:
            await fetcher.get(cid, holder, "vm.img", must_store=must_store)
            done[name] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            for i, cid in enumerate(n.chunks[:40]):
                nursery.start_soon(get, cid, f"bg{i}", True)
            await trio.sleep(0.05)
            assert fetcher.queue.waiting() + fetcher.background_gate.statistics().tasks_waiting == 38
            nursery.start_soon(get, n.chunks[40], "demand", False)
        assert done["demand"] < 0.05 + 2 * LOAD_SECONDS + 0.01
        assert len(done) == 41


async def _demand_and_ten(n: Net) -> tuple[Fetcher, list[str]]:
    """A fetcher of ``n`` and its holder list, ``n``'s last chunk loading in 1 s (the demand
    read) and the ten before it in 0.5 s each."""
    assert isinstance(n.store, SlowStore)
    n.store.delays[n.chunks[10]] = 1.0
    for cid in n.chunks[:10]:
        n.store.delays[cid] = 0.5
    return await _fetcher(n), [n.addr.node_id]


async def test_background_fetches_are_cut_back_while_demand_reads_run(autojump_clock: trio.abc.Clock) -> None:
    """While a demand fetch runs, and DEMAND_LINGER_SECONDS after, only
    BACKGROUND_WHILE_DEMAND background fetches run; then all of them again."""
    async with serving(11) as n:
        fetcher, holder = await _demand_and_ten(n)
        done: list[float] = []
        start = trio.current_time()

        async def background(cid: ChunkId) -> None:
            await fetcher.get(cid, holder, "other.img", must_store=True)
            done.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.serve)
            async with trio.open_nursery() as reads:
                reads.start_soon(fetcher.get, n.chunks[10], holder)  # a demand read for 1 s
                await trio.sleep(0.01)
                for cid in n.chunks[:10]:
                    reads.start_soon(background, cid)
            nursery.cancel_scope.cancel()
        assert fetcher.background_gate.total_tokens == FETCH_SLOTS
        # Two at a time until the demand read is done and its linger is over (1.5 s), then all.
        assert len([t for t in done if t < 1.0 + DEMAND_LINGER_SECONDS]) <= 3 * BACKGROUND_WHILE_DEMAND
        assert max(done) <= 1.0 + DEMAND_LINGER_SECONDS + 0.5 + 0.1
        assert len([t for t in done if t < 0.6]) == BACKGROUND_WHILE_DEMAND


async def test_the_upload_limit_holds_and_follows_a_change(autojump_clock: trio.abc.Clock) -> None:
    limits = Limits.create(max_upload=1_000_000)
    async with serving(40, size=256 * 1024, slow=False, limits=limits) as n:
        client = ChunkClient(n.client)
        start = trio.current_time()
        for cid in n.chunks[:20]:
            assert await client.fetch(n.addr, cid, Priority.BACKGROUND) is not None
        first = trio.current_time() - start
        size = 20 * 256 * 1024
        assert (size - 256 * 1024 - BURST_MIN) / 1e6 - 0.05 <= first <= size / 1e6 + 0.1
        limits.set({"max_upload": 4_000_000})
        start = trio.current_time()
        for cid in n.chunks[20:]:
            assert await client.fetch(n.addr, cid, Priority.BACKGROUND) is not None
        second = trio.current_time() - start
        assert second <= size / 4e6 + 0.3  # (the debt left at the old rate is repaid at the new one)
        assert second >= (size - 2 * 256 * 1024) / 4e6 - 0.3


async def test_the_background_limit_spares_demand_reads(autojump_clock: trio.abc.Clock) -> None:
    limits = Limits.create(max_background=500_000)
    async with serving(12, size=256 * 1024, slow=False) as n:
        fetcher = await _fetcher(n, limits)
        holder = [n.addr.node_id]
        start = trio.current_time()
        for cid in n.chunks[:6]:
            await fetcher.get(cid, holder, must_store=True)
        background = trio.current_time() - start
        assert background >= (5 * 256 * 1024 - BURST_MIN) / 500_000 - 0.05
        start = trio.current_time()
        for cid in n.chunks[6:]:
            await fetcher.get(cid, holder)  # demand: not limited, although the bucket is in debt
        assert trio.current_time() - start < 0.05


async def test_read_ahead_is_not_cut_back_while_demand_reads_run(autojump_clock: trio.abc.Clock) -> None:
    """A sequential reader's read-ahead (AHEAD) keeps its parallel fetches while the
    reader's own demand reads run: cut back to two, the reader would catch up with it."""
    async with serving(11) as n:
        fetcher, holder = await _demand_and_ten(n)
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.serve)
            start = trio.current_time()
            async with trio.open_nursery() as reads:
                reads.start_soon(fetcher.get, n.chunks[10], holder)  # a demand read for 1 s
                await trio.sleep(0.01)
                fetcher.prefetch(((cid, holder, None) for cid in n.chunks[:10]), "vm.img")
                await trio.sleep(0.6)
                # All ten at once: done after one load (0.5 s), while the demand read still runs.
                assert all(fetcher.store.has(cid) for cid in n.chunks[:10])
                assert trio.current_time() - start < 1.0
            nursery.cancel_scope.cancel()

"""The sync protocol between in-process replicas over the in-memory transport."""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import pytest
import trio

from blixfs.crypto import generate_secret, sign
from blixfs.entry import Entry, Kind, write_context
from blixfs.frames import Entries, FrameError, Hello, Synced, encode, read_frame
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import NodeAddr, Transport, TransportError
from blixfs.replica import MAX_FUTURE_NS, NamespaceKeys, Replica
from blixfs.sync import ALPN, SyncService
from tests.helpers import make_replica


@dataclass
class Peer:
    replica: Replica
    transport: Transport
    sync: SyncService

    @property
    def addr(self) -> NodeAddr:
        return NodeAddr(self.transport.node_id)

    def write(self, path: str, size: int = 1) -> Entry:
        prev = self.replica.store.get_any(path)
        ts = self.replica.stamp(prev)
        e = Entry(path=path, kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=size, mtime_ns=ts, ctime_ns=ts,
                  author=self.replica.author, timestamp_ns=ts, manifest=bytes([size % 251 + 1]) * 32,
                  seen=write_context(prev, self.replica.store.versions(path), self.replica.author))
        self.replica.commit_local([e])
        return e

    def state(self) -> set[bytes]:
        return {e.entry_hash() for e in self.replica.store.entries_since({})}


@asynccontextmanager
async def peer(net: MemoryNetwork, keys: NamespaceKeys) -> AsyncIterator[Peer]:
    secret = generate_secret()
    replica = make_replica(keys=keys, node_secret=secret)
    async with net.open_transport(replica.author.hex()) as transport:
        sync = SyncService(replica, transport)
        transport.register(ALPN, sync.handle)
        yield Peer(replica, transport, sync)


async def wait_until(condition: Callable[[], bool], within: float = 60.0) -> None:
    """Poll a replica state (nothing signals it) until true; fail after ``within`` seconds."""
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - no event exists for "the stores converged"
            await trio.sleep(0.005)


async def test_initial_sync_both_ways_then_live_push() -> None:
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as a, peer(net, keys) as b, trio.open_nursery() as nursery:
        for i in range(300):
            a.write(f"a{i}")
        b.write("from-b")
        nursery.start_soon(b.sync.maintain, a.addr)
        await wait_until(lambda: a.state() == b.state() and len(a.state()) == 301)
        # vectors advanced by the reconciliation, in both directions
        await wait_until(lambda: b.replica.store.vector().get(a.replica.author) is not None)
        assert a.replica.store.vector()[b.replica.author] > 0
        a.write("live")
        await wait_until(lambda: b.replica.store.get("live") is not None, within=5)  # pushed: no reconciliation runs
        nursery.cancel_scope.cancel()


async def test_changes_spread_through_a_middle_node_and_conflicts_converge() -> None:
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as a, peer(net, keys) as b, peer(net, keys) as c, trio.open_nursery() as n:
        n.start_soon(a.sync.maintain, b.addr)
        n.start_soon(c.sync.maintain, b.addr)  # a and c never talk directly
        a.write("same", 1)
        c.write("same", 2)  # concurrent with a's
        await wait_until(lambda: a.state() == b.state() == c.state() and len(a.state()) == 2)
        winners = {p.replica.store.get("same").entry_hash() for p in (a, b, c)}  # type: ignore[union-attr]
        assert len(winners) == 1
        assert all(len(p.replica.store.conflicts_under("")) == 1 for p in (a, b, c))
        n.cancel_scope.cancel()


async def test_a_dropped_connection_reconciles_what_was_missed() -> None:
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as a, peer(net, keys) as b, trio.open_nursery() as n:
        n.start_soon(b.sync.maintain, a.addr)
        a.write("before")
        await wait_until(lambda: b.replica.store.get("before") is not None)
        net.disconnect(a.transport.node_id, b.transport.node_id)
        for i in range(20):
            a.write(f"during{i}")
        await wait_until(lambda: a.state() == b.state())
        n.cancel_scope.cancel()


async def test_hostile_peer_cannot_change_the_store_and_the_node_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as node, net.open_transport() as hostile, peer(net, keys) as honest:
        node.write("precious")
        before = node.state()

        async def session(*frames: bytes) -> None:
            stream = await hostile.open_stream(node.addr, ALPN)
            async with stream:
                with trio.move_on_after(2), contextlib.suppress(TransportError, FrameError):
                    for f in frames:
                        await stream.send_all(f)
                    await stream.send_eof()
                    while await read_frame(stream) is not None:
                        pass  # until the node closes or resets the stream

        hello = encode(Hello(keys.id, {}))
        forged_key, me = NamespaceKeys.generate(), generate_secret()
        ts = time.time_ns()
        bogus = Entry(path="precious", kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=666, mtime_ns=ts, ctime_ns=ts,
                      author=bytes(32), timestamp_ns=ts + 10**9)
        msg = bogus.canonical()
        assert forged_key.secret is not None
        wrong_sig = replace(bogus, namespace_sig=sign(forged_key.secret, msg), author_sig=sign(me, msg))
        far = replace(bogus, timestamp_ns=ts + 2 * MAX_FUTURE_NS)
        for attack in (
            [b"garbage that is not a frame at all"],
            [struct.pack(">IB", 2**31, 2)],  # a length far beyond the bound
            [encode(Hello(NamespaceKeys.generate().id, {}))],  # another namespace
            [hello, encode(Entries([wrong_sig, far]))],  # forged and far-future entries
            [hello, struct.pack(">IB", 5, 77) + b"abcd"],  # unknown frame type
            [hello, encode(Entries([bogus]))[:-3]],  # cut short
        ):
            await session(*attack)
        assert node.state() == before
        for why in ("frame length", "does not hold", "writer lacks write capability", "in the future",
                    "unknown frame type", "ended inside a frame"):
            assert why in caplog.text, why
        assert "handler for" not in caplog.text  # every attack was handled, none escaped as a crash
        async with trio.open_nursery() as n:  # an honest peer still syncs
            n.start_soon(honest.sync.maintain, node.addr)
            await wait_until(lambda: honest.replica.store.get("precious") is not None)
            n.cancel_scope.cancel()


async def test_a_read_only_replica_syncs_but_cannot_write() -> None:
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as writer, peer(net, NamespaceKeys(keys.id)) as reader, trio.open_nursery() as n:
        n.start_soon(reader.sync.maintain, writer.addr)
        writer.write("img")
        await wait_until(lambda: reader.replica.store.get("img") is not None)
        assert not reader.replica.writable
        n.cancel_scope.cancel()




async def test_a_peer_cannot_inflate_vectors_past_refused_entries_or_for_our_author() -> None:
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as node, peer(net, keys) as other, net.open_transport() as hostile:
        node.write("mine")
        node.replica.store.apply([other.write("theirs")])  # an author the node holds versions of
        own_before = node.replica.store.vector()[node.replica.author]
        stream = await hostile.open_stream(node.addr, ALPN)
        stranger = other.replica.author
        invented = bytes([9]) * 32
        async with stream:
            await stream.send_all(encode(Hello(keys.id, {})))
            await stream.send_all(encode(Synced({node.replica.author: (1 << 63) - 1, stranger: 5, invented: 5})))
            await stream.send_eof()
            with contextlib.suppress(TransportError, FrameError), trio.move_on_after(2):
                while await read_frame(stream) is not None:
                    pass
        vector = node.replica.store.vector()
        assert vector[node.replica.author] == own_before  # nobody speaks for our own author
        assert vector[stranger] == 5
        assert invented not in vector  # an author the node holds nothing of is not advanced
        bogus = replace(Entry(path="x", kind=Kind.FILE, mode=0, uid=0, gid=0, size=0, mtime_ns=1, ctime_ns=1,
                              author=stranger, timestamp_ns=50), namespace_sig=bytes(64), author_sig=bytes(64))
        stream = await hostile.open_stream(node.addr, ALPN)
        async with stream:
            await stream.send_all(encode(Hello(keys.id, {})))
            await stream.send_all(encode(Entries([bogus])))
            await stream.send_all(encode(Synced({stranger: 100})))
            await stream.send_eof()
            with contextlib.suppress(TransportError, FrameError), trio.move_on_after(2):
                while await read_frame(stream) is not None:
                    pass
        assert node.replica.store.vector()[stranger] == 5  # a session that refused entries advances nothing

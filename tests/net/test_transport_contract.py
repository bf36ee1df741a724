"""The transport contract, run against every implementation.

Each test gets a `harness` that opens transports of one kind: "memory" (MemoryNetwork)
or "iroh" (real iroh endpoints on loopback in this process). A few tests at the end use
iroh across two processes, and iroh-only helpers (key file, signatures).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio

from blixfs.net.iroh_transport import (
    load_or_create_secret_key,
    node_id_from_secret_key,
    open_iroh_transport,
    sign,
    verify,
)
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import (
    CODE_ABORTED,
    CODE_BUSY,
    CODE_HANDLER_FAILED,
    CODE_NO_HANDLER,
    CODE_SHUTDOWN,
    CODE_TOO_MANY_CONNECTIONS,
    ConnectError,
    ConnectionLost,
    NodeAddr,
    Stream,
    StreamClosed,
    StreamHandler,
    StreamReset,
    Transport,
    TransportClosed,
    TransportError,
    UnexpectedEOF,
)

ECHO = b"blixfs/test-echo/1"
OTHER = b"blixfs/test-other/1"
MiB = 1 << 20


class Harness:
    kind: str

    def open(
        self,
        handlers: Mapping[bytes, StreamHandler] | None = None,
        identity: bytes | None = None,
    ) -> AbstractAsyncContextManager[Transport]:
        raise NotImplementedError


class MemoryHarness(Harness):
    kind = "memory"

    def __init__(self) -> None:
        self.network = MemoryNetwork()

    def open(
        self,
        handlers: Mapping[bytes, StreamHandler] | None = None,
        identity: bytes | None = None,
    ) -> AbstractAsyncContextManager[Transport]:
        node_id = hashlib.sha256(identity).hexdigest() if identity else None
        return self.network.open_transport(node_id, handlers=handlers)


class IrohHarness(Harness):
    kind = "iroh"

    @asynccontextmanager
    async def _open(
        self, handlers: Mapping[bytes, StreamHandler] | None, identity: bytes | None
    ) -> AsyncIterator[Transport]:
        async with open_iroh_transport(identity, handlers=handlers, connect_timeout=1.5) as t:
            yield t

    def open(
        self,
        handlers: Mapping[bytes, StreamHandler] | None = None,
        identity: bytes | None = None,
    ) -> AbstractAsyncContextManager[Transport]:
        return self._open(handlers, identity)


@pytest.fixture(params=["memory", "iroh"])
def harness(request: pytest.FixtureRequest) -> Harness:
    return MemoryHarness() if request.param == "memory" else IrohHarness()


async def echo(stream: Stream, peer_id: str) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def request(transport: Transport, peer: NodeAddr, payload: bytes) -> bytes:
    async with await transport.open_stream(peer, ECHO) as stream:
        await stream.send_all(payload)
        await stream.send_eof()
        return await stream.receive_to_eof(len(payload) + 1)


# --- basic exchange -----------------------------------------------------------------------


@asynccontextmanager
async def asked(harness: Harness, handler: Callable[[Stream, str], Awaitable[None]]) -> AsyncIterator[Stream]:
    """A client's stream to a node serving ``handler`` on ECHO, one byte already sent: a
    stream reaches the server only once written to, so the handler starts with
    ``receive_exactly(1)`` before it answers."""
    async with (
        harness.open({ECHO: handler}) as server,
        harness.open() as client,
        await client.open_stream(server.addr(), ECHO) as stream,
    ):
        await stream.send_all(b"?")
        yield stream


async def test_round_trip_and_identities(harness: Harness) -> None:
    seen: list[tuple[str, bytes]] = []

    async def handler(stream: Stream, peer_id: str) -> None:
        seen.append((peer_id, stream.alpn))
        data = await stream.receive_to_eof(1000)
        await stream.send_all(b"re:" + data)

    async with harness.open({ECHO: handler}) as server, harness.open() as client:
        async with await client.open_stream(server.addr(), ECHO) as stream:
            assert stream.peer_id == server.node_id
            assert stream.alpn == ECHO
            await stream.send_all(b"hello")
            await stream.send_eof()
            assert await stream.receive_some() == b"re:hello"
            assert await stream.receive_some() == b""
            assert await stream.receive_some() == b""  # EOF is sticky
        assert seen == [(client.node_id, ECHO)]
        assert server.addr().node_id == server.node_id != client.node_id


async def test_large_transfer_is_byte_exact(harness: Harness) -> None:
    payload = random.Random(1).randbytes(64 * MiB)
    async with harness.open({ECHO: echo}) as server, harness.open() as client:
        stream = await client.open_stream(server.addr(), ECHO)
        received = bytearray()

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await stream.receive_some():
                received += chunk
        assert len(received) == len(payload)
        assert received == payload


async def test_receive_exactly_and_unexpected_eof(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await stream.send_all(b"abcdefgh")
        await stream.send_eof()

    async with asked(harness, handler) as stream:
        assert await stream.receive_exactly(3) == b"abc"
        with pytest.raises(UnexpectedEOF) as info:
            await stream.receive_exactly(10)
        assert info.value.received == 5


class ReadWatch:
    """Watches one stream's raw reads: ``midway`` is set when it starts a read after one
    that brought data, i.e. it waits for the rest of a message it has begun (on iroh,
    `receive_exactly`'s exact read); ``calls`` names the primitives used, in order."""

    def __init__(self, stream: Stream) -> None:
        self.midway = trio.Event()
        self.calls: list[str] = []
        self._got = False
        for name in ("_raw_receive", "_raw_receive_exact"):
            setattr(stream, name, self._wrap(name, getattr(stream, name)))

    def _wrap(self, name: str, raw: Callable[[int], Awaitable[bytes]]) -> Callable[[int], Awaitable[bytes]]:
        async def watched(n: int) -> bytes:
            self.calls.append(name)
            if self._got:
                self.midway.set()
            data = await raw(n)
            self._got = self._got or bool(data)
            return data

        return watched


def rest_started(harness: Harness, watch: ReadWatch) -> None:
    """The part of the message still to come is read the transport's cheap way."""
    expected = "_raw_receive_exact" if harness.kind == "iroh" else "_raw_receive"
    assert watch.calls[0] == "_raw_receive"  # the first read is cancel-safe
    assert watch.calls[-1] == expected, watch.calls


async def test_receive_exactly_eof_midway(harness: Harness) -> None:
    """The stream ends inside the exact read of a message's rest: UnexpectedEOF with the
    count of bytes that did come, and the receive side at EOF from then on."""
    watch: list[ReadWatch] = []

    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await stream.send_all(b"head")
        await watch[0].midway.wait()
        await stream.send_all(b"-and-some")
        await stream.send_eof()

    async with (
        harness.open({ECHO: handler}) as server,
        harness.open() as client,
        await client.open_stream(server.addr(), ECHO) as stream,
    ):
        watch.append(ReadWatch(stream))
        await stream.send_all(b"?")
        with trio.fail_after(30), pytest.raises(UnexpectedEOF) as info:
            await stream.receive_exactly(64 * 1024)
        assert info.value.received == len(b"head-and-some")
        assert "13 of 65536" in str(info.value)
        rest_started(harness, watch[0])
        assert await stream.receive_some() == b""
        with pytest.raises(UnexpectedEOF) as info:
            await stream.receive_exactly(1)
        assert info.value.received == 0


async def test_receive_exactly_cancelled_midway_breaks_the_receive_side(harness: Harness) -> None:
    """A deadline inside the exact read of a message's rest: bytes may be gone, so the
    receive side is broken (StreamClosed after), closing resets the stream, and the
    connection carries on."""
    watch: list[ReadWatch] = []
    peer_saw: list[BaseException] = []
    peer_done = trio.Event()

    async def handler(stream: Stream, peer_id: str) -> None:
        if await stream.receive_exactly(1) == b"n":
            await stream.send_all(b"fine")
            return
        await stream.send_all(b"part")
        try:
            await stream.receive_some()  # the requester's reset ends the wait
        except StreamReset as exc:
            peer_saw.append(exc)
        finally:
            peer_done.set()

    async with harness.open({ECHO: handler}) as server, harness.open() as client:
        stream = await client.open_stream(server.addr(), ECHO)
        async with stream:
            watch.append(ReadWatch(stream))
            await stream.send_all(b"?")
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    async def cancel_midway() -> None:
                        await watch[0].midway.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(cancel_midway)
                    await stream.receive_exactly(100)
                    raise AssertionError("the peer never sent 100 bytes")
            rest_started(harness, watch[0])
            with pytest.raises(StreamClosed, match="cancelled midway"):
                await stream.receive_some()
            with pytest.raises(StreamClosed, match="cancelled midway"):
                await stream.receive_exactly(4)
        with trio.fail_after(30):
            await peer_done.wait()
        assert isinstance(peer_saw[0], StreamReset) and peer_saw[0].code == CODE_ABORTED
        async with await client.open_stream(server.addr(), ECHO) as stream:
            await stream.send_all(b"n")
            with trio.fail_after(30):
                assert await stream.receive_exactly(4) == b"fine"
        assert client.stats().connections_dialed == 1


async def test_receive_exactly_peer_reset_midway(harness: Harness) -> None:
    """A reset inside the exact read is the StreamReset `receive_some` gives, code and all."""
    watch: list[ReadWatch] = []

    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await stream.send_all(b"part")
        await watch[0].midway.wait()
        await stream.reset(0x1234)

    async with (
        harness.open({ECHO: handler}) as server,
        harness.open() as client,
        await client.open_stream(server.addr(), ECHO) as stream,
    ):
        watch.append(ReadWatch(stream))
        await stream.send_all(b"?")
        with trio.fail_after(30), pytest.raises(StreamReset) as info:
            await stream.receive_exactly(100)
        assert info.value.code == 0x1234
        rest_started(harness, watch[0])
        with pytest.raises(StreamReset) as info:  # sticky, as after receive_some
            await stream.receive_some()
        assert info.value.code == 0x1234


async def test_receive_exactly_connection_lost_midway(harness: Harness) -> None:
    """The peer's node closing inside the exact read: ConnectionLost with its close code."""
    watch: list[ReadWatch] = []

    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await stream.send_all(b"part")
        await trio.sleep_forever()

    async with (
        harness.open() as client,
        harness.open({ECHO: handler}) as server,
        await client.open_stream(server.addr(), ECHO) as stream,
    ):
        watch.append(ReadWatch(stream))
        await stream.send_all(b"?")

        async def close_server_midway() -> None:
            await watch[0].midway.wait()
            await server.aclose()

        with trio.fail_after(15):  # below QUIC's idle timeout
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_server_midway)
                with pytest.raises(ConnectionLost) as info:
                    await stream.receive_exactly(100)
        assert info.value.code == CODE_SHUTDOWN
        rest_started(harness, watch[0])


async def test_receive_exactly_large_message_is_byte_exact(harness: Harness) -> None:
    """A message longer than one exact read (iroh: 1 MiB each), sent in uneven writes."""
    payload = random.Random(7).randbytes(3 * MiB + 12345)

    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        pos = 0
        for size in (1000, 70_000, MiB + 3, len(payload)):
            await stream.send_all(payload[pos : pos + size])
            pos += size
        await stream.send_all(b"tail")
        await stream.send_eof()

    async with asked(harness, handler) as stream:
        with trio.fail_after(60):
            assert await stream.receive_exactly(len(payload)) == payload
            assert await stream.receive_exactly(4) == b"tail"
            assert await stream.receive_some() == b""


# --- connection reuse ---------------------------------------------------------------------


async def test_concurrent_streams_share_one_connection(harness: Harness) -> None:
    async with harness.open({ECHO: echo}) as server, harness.open() as client:
        results: dict[int, bool] = {}

        async def worker(i: int) -> None:
            for round_ in range(3):
                payload = bytes([i, round_]) * (MiB // 2)
                results[i * 10 + round_] = await request(client, server.addr(), payload) == payload

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(worker, i)
        assert len(results) == 24 and all(results.values())
        c, s = client.stats(), server.stats()
        assert (c.connections_dialed, c.connections_accepted, c.live_connections) == (1, 0, 1)
        assert (s.connections_dialed, s.connections_accepted, s.live_connections) == (0, 1, 1)
        assert c.streams_opened == s.streams_accepted == 24


async def test_peer_reuses_the_connection_we_dialed(harness: Harness) -> None:
    """The server opens streams back to the client without an address and without
    dialing: it uses the connection the client made."""
    async with harness.open({ECHO: echo}) as server, harness.open({ECHO: echo}) as client:
        assert await request(client, server.addr(), b"ping") == b"ping"
        assert await request(server, NodeAddr(client.node_id), b"pong") == b"pong"
        assert server.stats().connections_dialed == 0
        assert client.stats().connections_dialed == 1
        assert client.stats().streams_accepted == 1


async def test_every_protocol_shares_one_connection_per_peer(harness: Harness) -> None:
    async with harness.open({ECHO: echo, OTHER: echo}) as server, harness.open() as client:
        for alpn in (ECHO, OTHER, ECHO, OTHER):
            async with await client.open_stream(server.addr(), alpn) as stream:
                assert stream.alpn == alpn
                await stream.send_all(b"x")
                await stream.send_eof()
                assert await stream.receive_to_eof(10) == b"x"
        assert client.stats().connections_dialed == 1
        assert client.stats().live_connections == 1


async def test_reconnects_after_peer_restart(harness: Harness) -> None:
    identity = os.urandom(32)
    async with harness.open() as client:
        async with harness.open({ECHO: echo}, identity) as server:
            first_addr = server.addr()
            assert await request(client, first_addr, b"one") == b"one"
        # The server closed: its connection is dead. A new incarnation (same identity,
        # maybe another address) must be reachable without any action by the caller.
        async with harness.open({ECHO: echo}, identity) as server:
            assert server.node_id == first_addr.node_id
            with trio.fail_after(30):
                assert await request(client, server.addr(), b"two") == b"two"
        assert client.stats().connections_dialed == 2


# --- errors -------------------------------------------------------------------------------


async def test_peer_reset_gives_code(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(3)
        await stream.reset(0x1234)

    async with (
        harness.open({ECHO: handler}) as server,
        harness.open() as client,
        await client.open_stream(server.addr(), ECHO) as stream,
    ):
        await stream.send_all(b"abc")
        with trio.fail_after(30), pytest.raises(StreamReset) as info:
            await stream.receive_some()
        assert info.value.code == 0x1234
        with pytest.raises(StreamReset):  # the error is sticky
            await stream.receive_some()


async def test_peer_stopping_reads_fails_our_send(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await stream.reset(0x1235)

    async with (
        harness.open({ECHO: handler}) as server,
        harness.open() as client,
        await client.open_stream(server.addr(), ECHO) as stream,
    ):
        with trio.fail_after(30), pytest.raises(StreamReset) as info:
            while True:
                await stream.send_all(b"x" * MiB)
        assert info.value.code == 0x1235


async def test_handler_exception_resets_stream_and_node_survives(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        if await stream.receive_exactly(1) == b"!":
            raise RuntimeError("handler bug")
        await stream.send_all(b"ok")

    async with harness.open({ECHO: handler}) as server, harness.open() as client:
        async with await client.open_stream(server.addr(), ECHO) as stream:
            await stream.send_all(b"!")
            with trio.fail_after(30), pytest.raises(StreamReset) as info:
                await stream.receive_some()
            assert info.value.code == CODE_HANDLER_FAILED
        async with await client.open_stream(server.addr(), ECHO) as stream:
            await stream.send_all(b".")
            assert await stream.receive_exactly(2) == b"ok"


async def test_peer_closing_transport_gives_connection_lost(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await trio.sleep_forever()

    async with harness.open() as client:
        async with harness.open({ECHO: handler}) as server:
            addr = server.addr()
            stream = await client.open_stream(addr, ECHO)
            await stream.send_all(b"x")
            await trio.sleep(0.05)
            await server.aclose()
            with trio.fail_after(15), pytest.raises(ConnectionLost) as info:  # below QUIC's 30 s idle timeout
                await stream.receive_some()
            assert info.value.code == CODE_SHUTDOWN
            with pytest.raises(TransportClosed):
                await server.open_stream(client.addr(), ECHO)
        with trio.fail_after(30), pytest.raises(ConnectError):
            await client.open_stream(addr, ECHO)
        await stream.aclose()


async def test_unknown_protocol_is_a_clear_error(harness: Harness) -> None:
    echo2 = b"blixfs/test-echo/2"
    async with harness.open({ECHO: echo}) as server, harness.open() as client:
        async with await client.open_stream(server.addr(), echo2) as stream:
            await stream.send_all(b"v1?")
            with trio.fail_after(30), pytest.raises(StreamReset) as info:
                await stream.receive_some()
            assert info.value.code == CODE_NO_HANDLER  # the peer does not speak it: no hang
        assert await request(client, server.addr(), b"still fine") == b"still fine"
        server.register(echo2, echo)  # served from now on, on a running transport
        with pytest.raises(ValueError):
            server.register(echo2, echo)
        async with await client.open_stream(server.addr(), echo2) as stream:
            await stream.send_all(b"v2")
            await stream.send_eof()
            assert await stream.receive_to_eof(10) == b"v2"


async def test_unregistered_alpn_resets_new_streams(harness: Harness) -> None:
    async with harness.open({ECHO: echo}) as server, harness.open() as client:
        assert await request(client, server.addr(), b"a") == b"a"
        server.unregister(ECHO)
        async with await client.open_stream(server.addr(), ECHO) as stream:
            await stream.send_all(b"b")
            with trio.fail_after(30), pytest.raises(StreamReset) as info:
                await stream.receive_some()
            assert info.value.code == CODE_NO_HANDLER


async def test_unreachable_peer(harness: Harness) -> None:
    async with harness.open() as client:
        nobody = NodeAddr(node_id_from_secret_key(os.urandom(32)), ("127.0.0.1:9",))
        start = time.monotonic()
        with trio.fail_after(60), pytest.raises(ConnectError):
            await client.open_stream(nobody, ECHO)
        assert time.monotonic() - start < 1.5 + 6  # the connect timeout, with room for a slow machine
        # Not every 32-byte value is an ed25519 key (this one isn't a curve point); a bad
        # id coming from a peer must be an error, never a crash.
        not_a_key = "02" + "00" * 31
        with trio.fail_after(30), pytest.raises(ConnectError):
            await client.open_stream(NodeAddr(not_a_key, ("127.0.0.1:9",)), ECHO)


# --- deadlines and cancellation -----------------------------------------------------------


async def test_deadline_on_silent_peer_and_transport_stays_usable(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        if await stream.receive_exactly(1) == b"s":
            await trio.sleep_forever()  # never answers
        await stream.send_all(b"late")

    async with harness.open({ECHO: handler}) as server, harness.open() as client:
        async with await client.open_stream(server.addr(), ECHO) as stream:
            await stream.send_all(b"s")
            start = time.monotonic()
            with pytest.raises(trio.TooSlowError), trio.fail_after(0.3):
                await stream.receive_some()
            assert 0.25 < time.monotonic() - start < 3.0  # the deadline, late by a slow scheduler at most
        # the same connection carries new streams
        async with await client.open_stream(server.addr(), ECHO) as stream:
            await stream.send_all(b"n")
            with trio.fail_after(30):
                assert await stream.receive_exactly(4) == b"late"
        assert client.stats().connections_dialed == 1
        assert client.stats().live_connections == 1


async def test_cancelled_receive_loses_nothing(harness: Harness) -> None:
    gate = trio.Event()

    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await gate.wait()
        await stream.send_all(b"data")
        await stream.send_eof()

    async with asked(harness, handler) as stream:
        with trio.move_on_after(0.1) as scope:
            await stream.receive_some()
        assert scope.cancelled_caught
        gate.set()
        with trio.fail_after(30):
            assert await stream.receive_to_eof(100) == b"data"


async def test_cancelled_send_breaks_only_that_stream(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        if await stream.receive_exactly(1) == b"s":
            await trio.sleep_forever()  # never reads: the sender blocks on flow control
        await stream.send_all(b"fine")

    async with harness.open({ECHO: handler}) as server, harness.open() as client:
        async with await client.open_stream(server.addr(), ECHO) as stream:
            await stream.send_all(b"s")
            start = time.monotonic()
            with pytest.raises(trio.TooSlowError), trio.fail_after(0.5):
                await stream.send_all(b"x" * (64 * MiB))
            assert time.monotonic() - start < 3.5  # the 0.5 s deadline, late by a slow scheduler at most
            with pytest.raises(StreamClosed):
                await stream.send_all(b"more")
        async with await client.open_stream(server.addr(), ECHO) as stream:
            await stream.send_all(b"n")
            with trio.fail_after(30):
                assert await stream.receive_exactly(4) == b"fine"
        assert client.stats().connections_dialed == 1


async def test_reset_from_another_task_unblocks_waiters(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await trio.sleep_forever()

    async with harness.open({ECHO: handler}) as server, harness.open() as client:
        stream = await client.open_stream(server.addr(), ECHO)
        await stream.send_all(b"x")
        outcome: list[BaseException] = []

        async def blocked_receive() -> None:
            try:
                await stream.receive_some()
            except StreamClosed as exc:
                outcome.append(exc)

        async def blocked_send() -> None:
            try:
                await stream.send_all(b"y" * (64 * MiB))
            except StreamClosed as exc:
                outcome.append(exc)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked_receive)
                nursery.start_soon(blocked_send)
                await trio.sleep(0.2)
                await stream.reset(0x200)
        assert len(outcome) == 2
        with pytest.raises(StreamClosed):
            await stream.receive_some()
        assert client.stats().live_connections == 1


async def test_one_receiver_at_a_time(harness: Harness) -> None:
    async def handler(stream: Stream, peer_id: str) -> None:
        await stream.receive_exactly(1)
        await trio.sleep_forever()

    async with asked(harness, handler) as stream, trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some)
        await trio.sleep(0.05)
        with pytest.raises(trio.BusyResourceError):
            await stream.receive_some()
        nursery.cancel_scope.cancel()


# --- NodeAddr -----------------------------------------------------------------------------


async def test_incoming_connections_are_bounded(harness: Harness) -> None:
    """At the bound, an idle fresh connection makes room; with none idle a fresh newcomer
    is refused with CODE_TOO_MANY_CONNECTIONS, and a kept peer pushes out a busy fresh one."""
    release = trio.Event()

    async def hold(stream: Stream, peer_id: str) -> None:
        await stream.receive_some()
        await stream.send_all(b"held")
        await release.wait()

    async with harness.open({ECHO: echo, OTHER: hold}) as server, harness.open() as c1, \
            harness.open() as c2, harness.open() as c3, harness.open() as c4:
        server.max_incoming = 2
        assert await request(c1, server.addr(), b"a") == b"a"
        assert await request(c2, server.addr(), b"b") == b"b"
        assert server.incoming_connections() == 2
        # c1 is the least recently used idle connection: c3 takes its room.
        assert await request(c3, server.addr(), b"c") == b"c"
        assert server.incoming_connections() == 2
        # Now c2 and c3 are busy (a stream each being served): a fresh newcomer is refused.
        held = []
        for client in (c2, c3):
            stream = await client.open_stream(server.addr(), OTHER)
            await stream.send_all(b"x")
            assert await stream.receive_some() == b"held"
            held.append(stream)
        with pytest.raises(TransportError) as refused:
            with trio.fail_after(30):
                await request(c1, server.addr(), b"again")
        assert refused.value.code == CODE_TOO_MANY_CONNECTIONS
        assert server.incoming_connections() == 2
        # A kept peer (e.g. a member this node syncs with) pushes out a busy fresh connection.
        server.kept_peers = lambda: {c4.node_id}
        assert await request(c4, server.addr(), b"d") == b"d"
        assert server.incoming_connections() == 2
        with pytest.raises(ConnectionLost) as lost:
            with trio.fail_after(30):
                await held[0].receive_some()
        assert lost.value.code == CODE_TOO_MANY_CONNECTIONS
        release.set()
        for stream in held:
            await stream.reset()


async def test_kept_peers_are_not_locked_out_by_the_total_stream_bound(harness: Harness) -> None:
    """Fresh keys filling a protocol's total bound get CODE_BUSY; a kept peer (a member with
    a synced session) is held to the per-peer bound only."""
    release = trio.Event()

    async def hold(stream: Stream, peer_id: str) -> None:
        await stream.receive_some()
        await stream.send_all(b"held")
        await release.wait()

    async with harness.open() as server, harness.open() as c1, harness.open() as c2, \
            harness.open() as kept:
        server.register(OTHER, hold, per_peer=1, total=1)
        server.kept_peers = lambda: {kept.node_id}
        streams = []
        for client, served in ((c1, True), (c2, False), (kept, True)):
            stream = await client.open_stream(server.addr(), OTHER)
            await stream.send_all(b"x")
            with trio.fail_after(30):
                if served:
                    assert await stream.receive_some() == b"held"
                else:
                    with pytest.raises(StreamReset) as busy:
                        await stream.receive_some()
                    assert busy.value.code == CODE_BUSY
            streams.append(stream)
        release.set()
        for stream in streams:
            await stream.reset()


def test_node_addr_encodings() -> None:
    addr = NodeAddr("AB" * 32, ("127.0.0.1:4433", "[::1]:5", "[fe80::1]:65535"))
    assert addr.node_id == "ab" * 32
    assert NodeAddr.parse(str(addr)) == addr
    assert NodeAddr.from_bytes(addr.to_bytes()) == addr
    assert len(addr.to_bytes()) == 1 + 32 + 1 + 7 + 19 + 19
    assert NodeAddr.parse("cd" * 32) == NodeAddr("cd" * 32)
    encoded = addr.to_bytes()
    for bad in (encoded[:-1], encoded + b"\0", b"\x02" + encoded[1:], encoded[:33] + b"\xff"):
        with pytest.raises(ValueError):
            NodeAddr.from_bytes(bad)
    for text in ("zz" * 32, "ab" * 31, "ab" * 32 + "@1.2.3.4", "ab" * 32 + "@1.2.3.4:0"):
        with pytest.raises(ValueError):
            NodeAddr.parse(text)


# --- iroh across processes ------------------------------------------------------------------

PEER_SCRIPT = r"""
import sys, trio
from blixfs.net.iroh_transport import open_iroh_transport

async def echo(stream, peer_id):
    while data := await stream.receive_some():
        await stream.send_all(data)

async def main():
    key = bytes.fromhex(sys.argv[1])
    async with open_iroh_transport(key, bind_addr=sys.argv[2], handlers={ALPN: echo}) as t:
        print(t.addr(), flush=True)
        stdin = trio.lowlevel.FdStream(0)
        while await stdin.receive_some():
            pass

trio.run(main)
""".replace("ALPN", repr(ECHO))


@asynccontextmanager
async def peer_process(key: bytes, bind_addr: str = "127.0.0.1:0") -> AsyncIterator[
    tuple[NodeAddr, trio.Process]
]:
    """An iroh echo node in a child process; it exits when its stdin closes."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", PEER_SCRIPT, key.hex(), bind_addr],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some()
                assert chunk, "peer process died"
                line += chunk
        yield NodeAddr.parse(line.decode()), proc
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                if proc.stdin is not None:
                    await proc.stdin.aclose()  # the peer exits cleanly
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_two_processes_round_trip_large_and_graceful_exit() -> None:
    payload = random.Random(2).randbytes(32 * MiB)
    async with open_iroh_transport() as client, peer_process(os.urandom(32)) as (addr, proc):
        assert await request(client, addr, b"hello") == b"hello"
        with trio.fail_after(30):
            stream = await client.open_stream(addr, ECHO)
            got = bytearray()
            async with stream, trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(payload)
                    await stream.send_eof()

                nursery.start_soon(send)
                while chunk := await stream.receive_some():
                    got += chunk
        assert got == payload
        # A stream waiting on the peer sees ConnectionLost when the peer shuts down.
        async with await client.open_stream(addr, ECHO) as waiting:
            await waiting.send_all(b"x")
            assert await waiting.receive_exactly(1) == b"x"
            assert proc.stdin is not None
            await proc.stdin.aclose()
            with trio.fail_after(15), pytest.raises(ConnectionLost) as info:  # below QUIC's 30 s idle timeout
                await waiting.receive_some()
            assert info.value.code == CODE_SHUTDOWN
        assert client.stats().connections_dialed == 1


async def test_crashed_peer_connection_is_dropped_and_redialed() -> None:
    """A SIGKILLed peer is only noticed by QUIC after 30 s; the probe started by a
    deadline drops the stale connection in ~2 s, so a restarted peer (same key, same
    port) is reached again by the next open_stream."""
    key = os.urandom(32)
    async with open_iroh_transport(connect_timeout=3) as client:
        async with peer_process(key) as (addr, proc):
            assert await request(client, addr, b"one") == b"one"
            proc.send_signal(signal.SIGKILL)
        async with peer_process(key, addr.addrs[0]) as (addr2, _):
            assert addr2 == addr
            stream = await client.open_stream(addr, ECHO)  # on the stale connection
            await stream.send_all(b"lost")
            with pytest.raises(trio.TooSlowError), trio.fail_after(0.5):
                await stream.receive_some()
            with trio.fail_after(15), pytest.raises((ConnectionLost, StreamClosed)):  # ~2 s here
                await stream.receive_some()
            await stream.aclose()
            with trio.fail_after(30):
                assert await request(client, addr, b"two") == b"two"
        assert client.stats().connections_dialed == 2


# --- identity helpers ---------------------------------------------------------------------


def test_secret_key_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "keys", "node.key")
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        key = load_or_create_secret_key(path)
    finally:
        os.umask(old_umask)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret_key(path) == key
    assert [n for n in os.listdir(os.path.dirname(path))] == ["node.key"]
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError):
        load_or_create_secret_key(path)


async def test_node_id_matches_key_and_signatures() -> None:
    key = os.urandom(32)
    async with open_iroh_transport(key) as transport:
        assert transport.node_id == node_id_from_secret_key(key)
    signature = sign(key, b"entry")
    assert len(signature) == 64
    assert verify(node_id_from_secret_key(key), b"entry", signature)
    assert not verify(node_id_from_secret_key(key), b"entrY", signature)
    assert not verify(node_id_from_secret_key(os.urandom(32)), b"entry", signature)
    assert not verify(node_id_from_secret_key(key), b"entry", b"short")

"""An in-process `Transport` for tests of the layers above the network.

`MemoryNetwork` is a switchboard: transports opened on it reach each other by node id
(addresses are ignored). It keeps the semantics of the iroh transport that protocol code
can observe: one connection per (peer pair, ALPN), `UnsupportedProtocol` for an ALPN the
peer doesn't serve, bounded per-stream buffers (flow control), EOF, resets and stops with
codes, `ConnectionLost` when a node closes or `MemoryNetwork.disconnect` cuts a link.
As with QUIC, the peer's handler starts only once the opener has sent something.
"""

from __future__ import annotations

import logging
import secrets
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import trio

from blixfs.net.transport import (
    CODE_NO_HANDLER,
    CODE_SHUTDOWN,
    CODE_TOO_MANY_CONNECTIONS,
    MUX_ALPN,
    ConnectError,
    ConnectionLost,
    NodeAddr,
    Stream,
    StreamHandler,
    StreamReset,
    TransportClosed,
    TransportError,
    validate_alpn,
    validate_node_id,
)
from blixfs.net.transport import (
    Transport as _Transport,
)

logger = logging.getLogger(__name__)

PIPE_CAPACITY = 1 << 20
"""Bytes a stream direction buffers before the sender waits (like a QUIC stream window)."""


class _Pipe:
    """One direction of a stream: a bounded byte buffer with EOF, reset, stop and loss."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.reset_code: int | None = None  # set by the sender
        self.stop_code: int | None = None  # set by the receiver
        self.lost: ConnectionLost | None = None
        self.lot = trio.lowlevel.ParkingLot()

    def _wake(self) -> None:
        self.lot.unpark_all()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            if self.lost is not None:
                raise ConnectionLost(str(self.lost), code=self.lost.code)
            if self.stop_code is not None:
                raise StreamReset(
                    f"peer stopped reading (code {self.stop_code})", code=self.stop_code
                )
            room = PIPE_CAPACITY - len(self.buf)
            if room <= 0:
                await self.lot.park()
                continue
            take = view[pos : pos + room]
            self.buf += take
            pos += len(take)
            self._wake()

    def finish(self) -> None:
        if self.lost is not None:
            raise ConnectionLost(str(self.lost), code=self.lost.code)
        self.eof = True
        self._wake()

    async def read(self, max_bytes: int) -> bytes:
        while True:
            if self.reset_code is not None:
                raise StreamReset(
                    f"peer reset the stream (code {self.reset_code})", code=self.reset_code
                )
            if self.lost is not None:
                raise ConnectionLost(str(self.lost), code=self.lost.code)
            if self.buf:
                data = bytes(self.buf[:max_bytes])
                del self.buf[:max_bytes]
                self._wake()
                return data
            if self.eof:
                return b""
            await self.lot.park()

    def reset(self, code: int) -> None:
        # After connection loss nothing reaches the peer any more, as with QUIC.
        if self.lost is None and self.reset_code is None and self.stop_code is None:
            self.reset_code = code
            self.buf.clear()
        self._wake()

    def stop(self, code: int) -> None:
        if self.lost is None and self.stop_code is None and not (self.eof and not self.buf):
            self.stop_code = code
        self.buf.clear()
        self._wake()

    def lose(self, exc: ConnectionLost) -> None:
        self.lost = exc
        self._wake()


class MemoryStream(Stream):
    """One end of an in-memory stream. See `Stream` for the contract."""

    def __init__(
        self, peer_id: str, alpn: bytes, send: _Pipe, recv: _Pipe, conn: _MemConnection
    ) -> None:
        super().__init__(peer_id, alpn)
        self._send_pipe = send
        self._recv_pipe = recv
        self._conn = conn
        self._announce: Callable[[], None] | None = None

    def _announce_once(self) -> None:
        # Like QUIC, the peer learns of a stream only when the opener sends something.
        announce, self._announce = self._announce, None
        if announce is not None:
            announce()

    async def _raw_send(self, data: bytes | bytearray | memoryview) -> None:
        self._announce_once()
        await self._send_pipe.write(data)

    async def _raw_finish(self) -> None:
        self._announce_once()
        self._send_pipe.finish()

    async def _raw_receive(self, max_bytes: int) -> bytes:
        return await self._recv_pipe.read(max_bytes)

    async def _raw_reset(self, code: int) -> None:
        self._send_pipe.reset(code)

    async def _raw_stop(self, code: int) -> None:
        self._recv_pipe.stop(code)


class _MemConnection:
    """A connection between two transports for one ALPN; knows its pipes to break them."""

    def __init__(self, dialer: MemoryTransport, acceptor: MemoryTransport, alpn: bytes) -> None:
        self.ends = (dialer, acceptor)
        self.alpn = alpn
        self.lost: ConnectionLost | None = None
        self.pipes: weakref.WeakSet[_Pipe] = weakref.WeakSet()

    def other(self, me: MemoryTransport) -> MemoryTransport:
        return self.ends[1] if self.ends[0] is me else self.ends[0]

    def lose(self, exc: ConnectionLost) -> None:
        if self.lost is not None:
            return
        self.lost = exc
        for pipe in list(self.pipes):
            pipe.lose(exc)
        for end in self.ends:
            end._forget(self)


class MemoryNetwork:
    """Connects `MemoryTransport`s in one process. Not thread-safe; one trio run."""

    def __init__(self) -> None:
        self._nodes: dict[str, MemoryTransport] = {}

    @asynccontextmanager
    async def open_transport(
        self,
        node_id: str | None = None,
        *,
        handlers: Mapping[bytes, StreamHandler] | None = None,
    ) -> AsyncIterator[MemoryTransport]:
        """Start a transport on this network; close it (and its handler tasks) on exit.

        `node_id` defaults to a random one. Raises ValueError if the id is taken.
        """
        node_id = validate_node_id(node_id) if node_id else secrets.token_bytes(32).hex()
        if node_id in self._nodes:
            raise ValueError(f"node {node_id[:10]} already on this network")
        transport = MemoryTransport(self, node_id)
        for alpn, handler in (handlers or {}).items():
            transport.register(alpn, handler)
        self._nodes[node_id] = transport
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(transport._run_tasks)
                try:
                    yield transport
                finally:
                    await transport.aclose()
        finally:
            self._nodes.pop(node_id, None)

    def disconnect(self, a: str, b: str) -> None:
        """Kill every connection between nodes `a` and `b` (both see `ConnectionLost`).

        They may reconnect on the next `open_stream`; this simulates a network fault.
        """
        node = self._nodes.get(a)
        if node is None:
            return
        for conn in list(node._all_connections()):
            if conn.other(node).node_id == b:
                conn.lose(ConnectionLost("connection lost (network fault)"))

    def _lookup(self, node_id: str) -> MemoryTransport | None:
        return self._nodes.get(node_id)


class MemoryTransport(_Transport):
    """A `Transport` on a `MemoryNetwork`. Create with `MemoryNetwork.open_transport`."""

    def __init__(self, network: MemoryNetwork, node_id: str) -> None:
        super().__init__()
        self._network = network
        self._node_id = node_id
        self._conns: dict[tuple[str, bytes], list[_MemConnection]] = {}

    @property
    def node_id(self) -> str:
        return self._node_id

    def addr(self) -> NodeAddr:
        return NodeAddr(self._node_id)

    def _live_connections(self) -> int:
        return sum(len(v) for v in self._conns.values())

    async def open_stream(self, peer: NodeAddr, alpn: bytes) -> Stream:
        alpn = validate_alpn(alpn)
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise TransportClosed("transport is closed")
        # One connection per peer carries every protocol (transport.MUX_ALPN), as with iroh.
        conn = self._live_connection(peer.node_id, MUX_ALPN) or self._dial(peer.node_id, MUX_ALPN)
        remote = conn.other(self)
        ours, theirs = _Pipe(), _Pipe()
        conn.pipes.add(ours)
        conn.pipes.add(theirs)
        stream = MemoryStream(peer.node_id, alpn, send=ours, recv=theirs, conn=conn)
        remote_stream = MemoryStream(self._node_id, alpn, send=theirs, recv=ours, conn=conn)
        self._streams_opened += 1
        stream._announce = lambda: remote._deliver(remote_stream)
        return stream

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        for conn in list(self._all_connections()):
            conn.lose(ConnectionLost("peer closed the connection", code=CODE_SHUTDOWN))
        if self._tasks_scope is not None:
            self._tasks_scope.cancel()
        await trio.lowlevel.checkpoint()

    # -- internals --

    async def _serve(self) -> None:
        # Streams are delivered by the dialing side (`_deliver`): nothing to accept here.
        await trio.sleep_forever()

    def _all_connections(self) -> list[_MemConnection]:
        return [c for conns in self._conns.values() for c in conns]

    def _live_connection(self, peer_id: str, alpn: bytes) -> _MemConnection | None:
        for conn in self._conns.get((peer_id, alpn), ()):
            if conn.lost is None:
                return conn
        return None

    def _dial(self, peer_id: str, alpn: bytes) -> _MemConnection:
        if peer_id == self._node_id:
            raise ConnectError("cannot connect to ourselves")
        remote = self._network._lookup(peer_id)
        if remote is None or remote._closed:
            raise ConnectError(f"no route to node {peer_id[:10]}")
        conn = _MemConnection(self, remote, alpn)
        self._conns.setdefault((peer_id, alpn), []).append(conn)
        remote._conns.setdefault((self._node_id, alpn), []).append(conn)

        def close(code: int, reason: str) -> None:
            conn.lose(ConnectionLost(f"peer closed the connection (code {code}: {reason})", code=code))

        if not remote._admit(conn, self._node_id, close):
            # As with iroh, the acceptor closes the connection: the dialer sees the code.
            close(CODE_TOO_MANY_CONNECTIONS, "too many connections")
            raise ConnectionLost(f"node {peer_id[:10]} refused the connection: too many connections",
                                 code=CODE_TOO_MANY_CONNECTIONS)
        self._note_dialed(peer_id)
        self._dialed += 1
        remote._accepted += 1
        logger.debug("memory connection %s -> %s for %r", self._node_id[:10], peer_id[:10], alpn)
        return conn

    def _forget(self, conn: _MemConnection) -> None:
        key = (conn.other(self).node_id, conn.alpn)
        conns = self._conns.get(key, [])
        if conn in conns:
            conns.remove(conn)
        if not conns:
            self._conns.pop(key, None)
        self._forget_incoming(conn)

    def _deliver(self, stream: MemoryStream) -> None:
        handler = self._handlers.get(stream.alpn)
        if self._nursery is None or self._closed:
            stream._recv_pipe.stop(CODE_SHUTDOWN)
            stream._send_pipe.reset(CODE_SHUTDOWN)
            return
        if handler is None:
            # A task, as in the iroh transport: the opener's first write completes first.
            self._nursery.start_soon(stream.reset, CODE_NO_HANDLER)
            return
        self._streams_accepted += 1
        self._nursery.start_soon(self._run_handler, stream.alpn, handler, stream, stream.peer_id, stream._conn)


__all__ = ["MemoryNetwork", "MemoryStream", "MemoryTransport", "TransportError"]

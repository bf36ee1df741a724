"""The transport interface: authenticated byte streams to peers, named by ALPN.

Everything above the network (sync, chunk fetch, replication) talks to peers through the
two abstract classes here, `Transport` and `Stream`, so it can be tested against
`blixfs.net.memory` and run against `blixfs.net.iroh_transport`. This module must not
import iroh.

Model (the QUIC model, kept as is so a Rust iroh node can speak the same protocols):

- A node is named by its endpoint id: the hex form of its ed25519 public key. `NodeAddr`
  is that id plus the direct "ip:port" addresses it may be reached on.
- A protocol is named by a versioned ALPN, e.g. ``b"blixfs/sync/1"``. A node serves an
  ALPN by registering a `StreamHandler` for it. Dialing an ALPN the peer does not serve
  fails with `UnsupportedProtocol` on the dialing side.
- `Transport.open_stream` returns a bidirectional `Stream`. Streams to the same peer and
  ALPN share one connection, which is dialed on first use and redialed if it has died.
- The side that opens a stream must send first: QUIC tells the peer about a new stream
  only when its first byte (or its EOF) arrives, so a handler is not started before then.

Error codes given to `Stream.reset` (and seen by the peer in `StreamReset.code`) are QUIC
application error codes: integers in ``[0, 2**62)``. Codes below `CODE_APP_MIN` belong
to the transport; protocols pick theirs from `CODE_APP_MIN` up.
"""

from __future__ import annotations

import abc
import copy
import enum
import ipaddress
import logging
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

import trio

from blixfs import metrics

logger = logging.getLogger(__name__)

# --- error codes -----------------------------------------------------------------------

CODE_OK = 0
"""Normal end: used when a stream is closed with unread data left in its receive side."""
CODE_ABORTED = 1
"""The local side gave up on the stream mid-exchange (exception, cancellation, deadline)."""
CODE_NO_HANDLER = 2
"""A stream arrived for an ALPN this node has no handler for (any more)."""
CODE_HANDLER_FAILED = 3
"""The handler serving this stream raised."""
CODE_SHUTDOWN = 4
"""The node is shutting down (stream reset or connection close)."""
CODE_BUSY = 5
"""Too many streams of this protocol are being served (from this peer, or in all): refused."""
CODE_TOO_MANY_CONNECTIONS = 6
"""Connection close code: this node keeps too many incoming connections (in all, or of
this peer) and refused or dropped this one. The peer may redial later."""
CODE_APP_MIN = 0x100
"""The first code protocols above the transport may use for their own errors."""
CODE_MAX = 2**62 - 1
"""QUIC varints carry at most 62 bits."""

STREAMS_PER_PEER = 64
"""Default bound on the incoming streams of one protocol one peer may have served at once."""
STREAMS_TOTAL = 1024
"""Default bound on the incoming streams of one protocol served at once, all peers together."""

CONNECTIONS_IN = 1024
"""Default bound on the incoming connections a node keeps at once, all peers together."""
CONNECTIONS_IN_PER_PEER = 4
"""Default bound on the incoming connections of one peer (one is normal; more while a dead
one has not timed out yet)."""
DIALED_REMEMBERED = 4096
"""Peers this node dialed that it remembers as such (their connections are kept first)."""

MAX_ALPN_LEN = 255
"""TLS limits a protocol name to 255 bytes."""

DEFAULT_RECEIVE_SIZE = 256 * 1024
"""`Stream.receive_some` default. 256 KiB reads were the best bulk layout measured on iroh."""


# --- errors ----------------------------------------------------------------------------


# Every connection between two blixfs nodes negotiates this one ALPN, and carries every
# protocol (blixfs/sync/1, blixfs/chunks/1, ...): one connection per peer, pooled. Each
# stream names its protocol first: `encode_stream_header`. (QUIC negotiates exactly one
# ALPN per connection, so per-protocol ALPNs would mean a connection per protocol.)
MUX_ALPN = b"blixfs/1"
STREAM_HEADER_TIMEOUT = 10.0


def encode_stream_header(alpn: bytes) -> bytes:
    """What a stream opener sends first: u8 length | protocol name (a validated ALPN)."""
    return bytes([len(alpn)]) + alpn


class TransportError(Exception):
    """Base class of every error the transport raises about the network or a peer."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        """The application error code involved, when there is one."""


class ConnectError(TransportError):
    """No connection to the peer could be set up (unreachable, timed out, handshake failed)."""


class UnsupportedProtocol(ConnectError):
    """The peer answered but does not serve the requested ALPN (e.g. another version)."""


class ConnectionLost(TransportError):
    """The connection under a stream died: the peer closed it, went away, or we shut down.

    ``code`` is the peer's application close code when it closed the connection itself.
    The next `Transport.open_stream` to that peer dials a new connection.
    """


class StreamReset(TransportError):
    """The peer aborted the stream: it reset its sending side, or stopped reading ours.

    ``code`` is the application error code the peer gave.
    """


class StreamClosed(TransportError):
    """The stream can't be used for this any more because of something done locally.

    Raised when sending after `Stream.send_eof`, using a stream after `Stream.reset` or
    `Stream.aclose` (also when another task does so while this one waits), or after an
    operation that cannot be resumed was cancelled (see `Stream.send_all`).
    """


class UnexpectedEOF(TransportError):
    """`Stream.receive_exactly` met the end of the stream first.

    ``received`` is how many of the bytes asked for had arrived before the end (they are
    consumed and lost). Both transports know it exactly (iroh's ``read_exact`` reports
    it); an implementation that could not tell would give the bytes it knows of, a lower
    bound. blixfs uses it only in messages: a message cut short is refused whole.
    """

    def __init__(self, message: str, *, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class TransportClosed(TransportError):
    """The local transport has been closed."""


# --- addresses -------------------------------------------------------------------------

_NODE_ADDR_VERSION = 1
MAX_ADDRS = 16
"""A `NodeAddr` carries at most this many direct addresses (bounds the decoder)."""


def validate_node_id(node_id: str) -> str:
    """Return `node_id` normalised to lowercase hex; raise ValueError unless it is 32 bytes."""
    if not isinstance(node_id, str) or len(node_id) != 64:
        raise ValueError(f"node id must be 64 hex characters, got {node_id!r}")
    try:
        bytes.fromhex(node_id)
    except ValueError:
        raise ValueError(f"node id must be 64 hex characters, got {node_id!r}") from None
    return node_id.lower()


def _parse_socket_addr(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad socket address {text!r}")
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad socket address {text!r}: no port")
        ip = ipaddress.IPv4Address(host)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in socket address {text!r}")
    return ip, int(port_text)


def _format_socket_addr(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True)
class NodeAddr:
    """How to reach a node: its endpoint id and direct addresses.

    ``node_id`` is the lowercase hex of the node's 32-byte ed25519 public key; the
    connection is authenticated against it, so addresses are only hints. ``addrs`` are
    "ip:port" strings ("[v6]:port" for IPv6); they may be empty when a connection to the
    node already exists (e.g. the node dialed us).

    Two encodings, both strict (they never trust a length or a count):
    ``str(addr)`` / `NodeAddr.parse` give ``"<hex id>@ip:port,ip:port"``;
    `NodeAddr.to_bytes` / `NodeAddr.from_bytes` give a compact binary form for tickets:
    version byte 1, 32 id bytes, address count (u8, at most `MAX_ADDRS`), then per
    address a family byte (4 or 6), 4 or 16 address bytes and a big-endian u16 port.
    """

    node_id: str
    addrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_id", validate_node_id(self.node_id))
        addrs = tuple(self.addrs)
        if len(addrs) > MAX_ADDRS:
            raise ValueError(f"at most {MAX_ADDRS} addresses, got {len(addrs)}")
        normalised = tuple(_format_socket_addr(*_parse_socket_addr(a)) for a in addrs)
        object.__setattr__(self, "addrs", normalised)

    def __str__(self) -> str:
        return self.node_id + ("@" + ",".join(self.addrs) if self.addrs else "")

    @classmethod
    def parse(cls, text: str) -> NodeAddr:
        """Parse the `str` form; raise ValueError on anything malformed."""
        node_id, _, rest = text.strip().partition("@")
        addrs = tuple(a for a in rest.split(",") if a) if rest else ()
        return cls(node_id, addrs)

    def to_bytes(self) -> bytes:
        """Encode compactly (see the class docstring for the layout)."""
        out = bytearray([_NODE_ADDR_VERSION])
        out += bytes.fromhex(self.node_id)
        out.append(len(self.addrs))
        for text in self.addrs:
            ip, port = _parse_socket_addr(text)
            out.append(ip.version)
            out += ip.packed
            out += struct.pack(">H", port)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeAddr:
        """Decode `to_bytes` output; raise ValueError on a bad, short or overlong input."""
        view = memoryview(data)
        if len(view) < 34:
            raise ValueError("node address too short")
        if view[0] != _NODE_ADDR_VERSION:
            raise ValueError(f"unknown node address version {view[0]}")
        node_id = bytes(view[1:33]).hex()
        count = view[33]
        if count > MAX_ADDRS:
            raise ValueError(f"node address claims {count} addresses, at most {MAX_ADDRS}")
        pos = 34
        addrs = []
        for _ in range(count):
            if pos >= len(view):
                raise ValueError("node address truncated")
            family = view[pos]
            size = {4: 4, 6: 16}.get(family)
            if size is None:
                raise ValueError(f"bad address family {family}")
            end = pos + 1 + size + 2
            if end > len(view):
                raise ValueError("node address truncated")
            raw = bytes(view[pos + 1 : pos + 1 + size])
            ip = ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw)
            (port,) = struct.unpack(">H", view[end - 2 : end])
            addrs.append(_format_socket_addr(ip, port))
            pos = end
        if pos != len(view):
            raise ValueError("trailing bytes after node address")
        return cls(node_id, tuple(addrs))


def validate_alpn(alpn: bytes) -> bytes:
    """Return `alpn` as bytes; raise ValueError unless it is 1..255 bytes."""
    if not isinstance(alpn, bytes | bytearray) or not 0 < len(alpn) <= MAX_ALPN_LEN:
        raise ValueError(f"ALPN must be 1..{MAX_ALPN_LEN} bytes, got {alpn!r}")
    return bytes(alpn)


def validate_code(code: int) -> int:
    """Return `code`; raise ValueError unless it is a valid QUIC application error code."""
    if not isinstance(code, int) or not 0 <= code <= CODE_MAX:
        raise ValueError(f"error code must be in [0, 2**62), got {code!r}")
    return code


# --- streams ---------------------------------------------------------------------------


class _Side(enum.Enum):
    OPEN = "open"
    DONE = "done"  # send: EOF sent; receive: EOF seen
    ABORTED = "aborted"  # reset / stopped / closed locally
    BROKEN = "broken"  # an operation that can't be resumed was cancelled


class Stream(abc.ABC):
    """One bidirectional byte stream to a peer, with QUIC semantics.

    Concurrency: one task may send while another receives; two tasks sending (or two
    receiving) at once get `trio.BusyResourceError`. `reset` and `aclose` may be called
    from any task; operations blocked in other tasks then raise `StreamClosed`.

    Deadlines: every method that waits on the peer can be cancelled (e.g. by
    `trio.fail_after`). A cancelled `receive_some` loses no data and the stream stays
    usable. A cancelled `send_all` may have sent part of its data, and a `receive_exactly`
    cancelled once part of its message came may have consumed any part of the rest, so
    after either that side is marked broken: later calls raise `StreamClosed` and closing
    it resets it with `CODE_ABORTED` (a `receive_exactly` cancelled before any byte came
    loses nothing). Cancellation never affects the connection or other streams.

    Closing: use ``async with stream:``. A clean exit is `aclose` (sends EOF if not yet
    sent; stops the receive side with `CODE_OK` if unread data remains); an exit by
    exception resets the stream with `CODE_ABORTED`, so the peer never mistakes a
    truncated message for a complete one.

    Implementations provide the `_raw_*` primitives; this class keeps the state machine
    so that every transport behaves alike.
    """

    def __init__(self, peer_id: str, alpn: bytes) -> None:
        self._peer_id = peer_id
        self._alpn = alpn
        self._send_side = _Side.OPEN
        self._recv_side = _Side.OPEN
        self._send_error: TransportError | None = None
        self._recv_error: TransportError | None = None
        self._send_scope: trio.CancelScope | None = None
        self._recv_scope: trio.CancelScope | None = None
        self._closed = False

    @property
    def peer_id(self) -> str:
        """The authenticated endpoint id (hex) of the node at the other end."""
        return self._peer_id

    @property
    def alpn(self) -> bytes:
        """The protocol this stream's connection was opened for."""
        return self._alpn

    # -- primitives implementations provide --

    @abc.abstractmethod
    async def _raw_send(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of `data` (non-empty). Raise TransportError subclasses only."""

    @abc.abstractmethod
    async def _raw_finish(self) -> None:
        """Send EOF."""

    @abc.abstractmethod
    async def _raw_receive(self, max_bytes: int) -> bytes:
        """Return 1..max_bytes bytes, or b"" at EOF. Must lose no data if cancelled."""

    _exact_receive_max = 0
    """The largest `_raw_receive_exact` an implementation offers; 0: it has none, and
    `receive_exactly` loops over `_raw_receive` alone."""

    async def _raw_receive_exact(self, n: int) -> bytes:
        """Return exactly ``n`` bytes (1 <= n <= `_exact_receive_max`) in one call.

        Optional (see `_exact_receive_max`). Raise `UnexpectedEOF` if the stream ends first,
        its ``received`` set to how many of these ``n`` bytes came; otherwise what
        `_raw_receive` raises, for the same causes. Need not be cancel-safe: a cancellation
        may lose bytes it consumed (`receive_exactly` then breaks the receive side).
        """
        raise NotImplementedError

    @abc.abstractmethod
    async def _raw_reset(self, code: int) -> None:
        """Abort the sending side with `code`. Must not raise; must not block long."""

    @abc.abstractmethod
    async def _raw_stop(self, code: int) -> None:
        """Tell the peer to stop sending, with `code`. Must not raise; must not block long."""

    def _release(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """Drop resources once the stream is closed (called once)."""

    def _on_cancelled(self) -> None:  # noqa: B027 - optional hook, empty on purpose
        """A send or receive was cancelled (often a deadline): the peer may be gone.

        Must not block or raise. The iroh transport starts a liveness probe here.
        """

    # -- public API --

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of `data`, waiting for flow control as needed.

        Raises `StreamReset` (peer stopped reading), `ConnectionLost`, `StreamClosed`.
        Cancellation breaks the stream (see the class docstring).
        """
        self._check_send()
        if not len(data):
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._op("send"):
            try:
                await self._raw_send(data)
            except TransportError as exc:
                self._send_error = exc
                raise
            except trio.Cancelled:
                self._send_side = _Side.BROKEN
                self._on_cancelled()
                raise
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        """Tell the peer nothing more will be sent. Idempotent.

        Raises `ConnectionLost`, `StreamClosed` (after reset/close/a broken send).
        """
        if self._send_side is _Side.DONE and not self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._check_send()
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._op("send"):
            try:
                await self._raw_finish()
            except TransportError as exc:
                self._send_error = exc
                raise
        self._send_side = _Side.DONE
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes:
        """Return between 1 and `max_bytes` bytes as soon as some arrive; b"" at EOF.

        Raises `StreamReset` (peer reset its side), `ConnectionLost`, `StreamClosed`.
        Cancellation loses no data; the stream stays usable.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        data = await self._guarded_receive(self._raw_receive, max_bytes, consumes_on_cancel=False)
        if not data:
            self._recv_side = _Side.DONE
        return data

    async def _guarded_receive(self, read: Callable[[int], Awaitable[bytes]], size: int, *,
                               consumes_on_cancel: bool) -> bytes:
        """``read(size)`` under the receive side's state machine, for `receive_some` and
        `_receive_exact`: b"" at EOF already reached; a failure is remembered for later
        receives; an EOF midway (`UnexpectedEOF`) leaves the side at EOF; a cancellation
        starts the liveness hook and, when ``consumes_on_cancel`` (the read may have taken
        bytes with it), breaks the receive side."""
        if self._recv_side is _Side.DONE and not self._closed:
            await trio.lowlevel.checkpoint()
            return b""
        self._check_receive()
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._op("receive"):
            try:
                data = await read(size)
            except UnexpectedEOF:
                self._recv_side = _Side.DONE
                raise
            except TransportError as exc:
                self._recv_error = exc
                raise
            except trio.Cancelled:
                if consumes_on_cancel and self._recv_side is _Side.OPEN:
                    self._recv_side = _Side.BROKEN
                self._on_cancelled()
                raise
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def receive_exactly(self, n: int) -> bytes:
        """Return exactly `n` bytes.

        Raises `UnexpectedEOF` if the stream ends first (``received``: how many of the
        `n` bytes had come; the receive side is then at EOF), and what `receive_some`
        raises, for the same causes (a reset by the peer is `StreamReset`, a dead
        connection `ConnectionLost`, with the same codes). Cancellation before any byte
        was consumed loses nothing, as for `receive_some`; after some were, it breaks the
        receive side (how many were consumed is unknown): later receives raise
        `StreamClosed`, and closing the stream resets it with `CODE_ABORTED`.

        How: the first read is a `receive_some` (so waiting for a message that has not
        started stays cancel-safe); when it brings only part of the `n` bytes, an
        implementation with an exact read (iroh's ``read_exact``) takes the rest in one
        call per `_exact_receive_max` bytes, where `receive_some` would return each few
        packets as they arrive.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        parts: list[bytes] = []
        got = 0
        try:
            while got < n:
                if got and self._exact_receive_max:
                    chunk = await self._receive_exact(min(n - got, self._exact_receive_max), got, n)
                else:
                    chunk = await self.receive_some(min(n - got, DEFAULT_RECEIVE_SIZE * 4))
                if not chunk:
                    raise UnexpectedEOF(
                        f"stream ended after {got} of {n} bytes", received=got
                    )
                parts.append(chunk)
                got += len(chunk)
        except trio.Cancelled:
            if got and self._recv_side is _Side.OPEN:
                self._recv_side = _Side.BROKEN
            raise
        if not parts:
            await trio.lowlevel.checkpoint()
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _receive_exact(self, want: int, got: int, n: int) -> bytes:
        """`_raw_receive_exact` of ``want`` bytes with the state machine of `receive_some`,
        for `receive_exactly`, which has ``got`` of its ``n`` bytes already; b"" if the
        receive side is already at EOF."""
        at_eof = self._recv_side is _Side.DONE and not self._closed
        try:
            data = await self._guarded_receive(self._raw_receive_exact, want, consumes_on_cancel=True)
        except UnexpectedEOF as exc:
            received = got + exc.received
            raise UnexpectedEOF(f"stream ended after {received} of {n} bytes", received=received) from None
        if at_eof:
            return data
        if len(data) != want:  # an implementation bug: never hand on a short message
            self._recv_side = _Side.BROKEN
            raise TransportError(f"exact read of {want} bytes returned {len(data)}")
        return data

    async def receive_to_eof(self, limit: int) -> bytes:
        """Return everything up to EOF, at most `limit` bytes.

        Raises `TransportError` if the peer sends more than `limit` (the stream is then
        stopped with `CODE_ABORTED`), and what `receive_some` raises.
        """
        parts: list[bytes] = []
        got = 0
        while True:
            chunk = await self.receive_some(min(max(limit - got + 1, 1), DEFAULT_RECEIVE_SIZE))
            if not chunk:
                return b"".join(parts)
            got += len(chunk)
            if got > limit:
                await self.reset(CODE_ABORTED)
                raise TransportError(f"peer sent more than {limit} bytes")
            parts.append(chunk)

    async def set_priority(self, priority: int) -> None:
        """Send this stream's bytes before those of streams of a lower ``priority`` (an i32;
        0 by default) on the same connection (QUIC send priority; between connections it
        has no effect). Best effort: transports without it ignore it, and it never raises
        (a stream already closed keeps whatever it had)."""
        await self._raw_set_priority(priority)

    async def _raw_set_priority(self, priority: int) -> None:
        """Apply a send priority; optional (the default ignores it). Must not raise."""
        await trio.lowlevel.checkpoint()

    async def reset(self, code: int = CODE_ABORTED) -> None:
        """Abort both directions with application error `code`; the peer sees `StreamReset`.

        Never raises a transport error and completes even inside a cancelled scope.
        Idempotent. Operations waiting in other tasks raise `StreamClosed`.
        """
        validate_code(code)
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._cancel_ops()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if self._send_side is not _Side.ABORTED:
                await self._raw_reset(code)
            if self._recv_side in (_Side.OPEN, _Side.BROKEN):
                await self._raw_stop(code)
        self._send_side = self._recv_side = _Side.ABORTED
        self._release()

    async def aclose(self) -> None:
        """Close the stream: EOF if not sent, stop an unread receive side with `CODE_OK`.

        A stream broken by cancellation is reset with `CODE_ABORTED` instead. Never raises
        a transport error; completes even inside a cancelled scope. Idempotent.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if (
            self._send_side is _Side.BROKEN
            or self._recv_side is _Side.BROKEN
            or self._send_scope is not None
        ):
            await self.reset(CODE_ABORTED)
            return
        self._closed = True
        self._cancel_ops()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if self._send_side is _Side.OPEN and self._send_error is None:
                try:
                    await self._raw_finish()
                except TransportError as exc:
                    logger.debug("finish on close failed: %s", exc)
            if self._recv_side is _Side.OPEN and self._recv_error is None:
                await self._raw_stop(CODE_OK)
        self._send_side = self._recv_side = _Side.ABORTED
        self._release()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.aclose()
        else:
            await self.reset(CODE_ABORTED)

    # -- internals --

    def _check_send(self) -> None:
        if self._closed:
            raise StreamClosed("stream is closed")
        if self._send_error is not None:
            raise copy.copy(self._send_error)
        if self._send_side is _Side.DONE:
            raise StreamClosed("EOF already sent on this stream")
        if self._send_side is _Side.BROKEN:
            raise StreamClosed("an earlier send on this stream was cancelled midway")

    def _check_receive(self) -> None:
        if self._closed:
            raise StreamClosed("stream is closed")
        if self._recv_error is not None:
            raise copy.copy(self._recv_error)
        if self._recv_side is _Side.BROKEN:
            raise StreamClosed("an earlier receive on this stream was cancelled midway")

    @contextmanager
    def _op(self, side: str) -> Iterator[None]:
        """Run one send- or receive-side operation in a scope `reset`/`aclose` can cancel."""
        attr = "_send_scope" if side == "send" else "_recv_scope"
        if getattr(self, attr) is not None:
            raise trio.BusyResourceError(f"another task is already using this stream to {side}")
        scope = trio.CancelScope()
        setattr(self, attr, scope)
        try:
            with scope:
                yield
        finally:
            setattr(self, attr, None)
        if scope.cancelled_caught:
            raise StreamClosed(f"stream was closed by another task during {side}")

    def _cancel_ops(self) -> None:
        for scope in (self._send_scope, self._recv_scope):
            if scope is not None:
                scope.cancel()


StreamHandler = Callable[[Stream, str], Awaitable[None]]
"""``async def handler(stream, peer_id)``: serves one incoming stream.

The transport starts one handler task per incoming stream, closes the stream when the
handler returns, and resets it (`CODE_HANDLER_FAILED`) if the handler raises; an
exception is logged and never reaches the transport's caller.
"""


async def run_stream_handler(handler: StreamHandler, stream: Stream, peer_id: str) -> None:
    """Run `handler` on an incoming stream with the contract `StreamHandler` states.

    Called by transport implementations, one task per incoming stream. Lets only
    cancellation out (after resetting the stream with `CODE_SHUTDOWN`).
    """
    try:
        await handler(stream, peer_id)
    except trio.Cancelled:
        await stream.reset(CODE_SHUTDOWN)
        raise
    except TransportError as exc:
        logger.info(
            "handler for %r from %s ended by transport error: %s",
            stream.alpn,
            peer_id[:10],
            exc,
        )
        await stream.reset(CODE_HANDLER_FAILED)
    except Exception:
        logger.exception("handler for %r from %s failed", stream.alpn, peer_id[:10])
        await stream.reset(CODE_HANDLER_FAILED)
    else:
        await stream.aclose()


# --- transports ------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportStats:
    """Counters for observability and tests (e.g. that connections are reused)."""

    connections_dialed: int
    """Outgoing connections successfully set up since start."""
    connections_accepted: int
    """Incoming connections successfully set up since start."""
    live_connections: int
    """Connections currently open, both directions."""
    streams_opened: int
    streams_accepted: int


@dataclass(frozen=True)
class PathStats:
    """What the transport knows of its live connections to one peer."""

    rtt_ms: float | None  # QUIC's smoothed RTT; None when unknown
    sent_datagrams: int
    lost_packets: int

    @property
    def loss(self) -> float:
        return self.lost_packets / self.sent_datagrams if self.sent_datagrams else 0.0


@dataclass
class _Inbound:
    """What `Transport._admit` keeps of one incoming connection."""

    peer_id: str
    close: Callable[[int, str], None]  # close the connection with (code, reason); must not raise


class Transport(abc.ABC):
    """A node's endpoint: opens streams to peers, and serves registered ALPNs.

    Obtained from an implementation's async context manager (`open_iroh_transport`,
    `MemoryNetwork.open_transport`), which also runs the accept loop and the handler
    tasks, and closes everything on exit.

    Connection reuse: all streams to one peer, for every protocol, go over one connection
    (it negotiates `MUX_ALPN`; each stream names its protocol in a header, see
    `encode_stream_header`). A connection the peer dialed to us counts too: we open our
    streams to that peer on it, so a peer that can reach us but not the reverse (NAT)
    still works. A connection that died is replaced by a new dial on the next `open_stream`.

    The "ALPN" of `register` and `open_stream` is the protocol's name (``b"blixfs/sync/1"``).

    Implementations call ``super().__init__()``, which sets the state they share: the
    handlers, the closed flag, the nursery of handler tasks that `_run_tasks` runs, and
    the counters `stats` reports (they count connections and streams as they go).
    """

    def __init__(self) -> None:
        self._handlers: dict[bytes, StreamHandler] = {}
        self._limits: dict[bytes, tuple[int, int]] = {}  # per ALPN: (per peer, total) streams served at once
        self._serving: dict[tuple[bytes, str], int] = {}  # streams being served, per (ALPN, peer)
        self._serving_total: dict[bytes, int] = {}
        self._refused = 0
        # Incoming connections, least recently used first (see `_admit`): key -> _Inbound.
        self._incoming: OrderedDict[object, _Inbound] = OrderedDict()
        self._incoming_of: dict[str, int] = {}  # incoming connections per peer
        self._serving_of: dict[str, int] = {}  # streams being served per peer, all protocols
        self._dialed_peers: OrderedDict[str, None] = OrderedDict()  # most recent last
        self._conns_refused = 0
        self.max_incoming = CONNECTIONS_IN
        """Incoming connections kept at once (see `_admit`)."""
        self.max_incoming_per_peer = CONNECTIONS_IN_PER_PEER
        self.kept_peers: Callable[[], Collection[str]] = lambda: ()
        """Peers whose incoming connections are never dropped for a newcomer's sake and who
        may take the room of fresh ones (the daemon: members with a synced session). Called
        only when the incoming connections are at their bound."""
        self._closed = False
        self._nursery: trio.Nursery | None = None
        self._tasks_scope: trio.CancelScope | None = None
        self._dialed = 0
        self._accepted = 0
        self._streams_opened = 0
        self._streams_accepted = 0

    @property
    @abc.abstractmethod
    def node_id(self) -> str:
        """This node's endpoint id (lowercase hex of its ed25519 public key)."""

    @abc.abstractmethod
    def addr(self) -> NodeAddr:
        """How peers can reach this node right now."""

    def register(self, alpn: bytes, handler: StreamHandler, *, per_peer: int = STREAMS_PER_PEER,
                 total: int = STREAMS_TOTAL) -> None:
        """Serve protocol `alpn`: run `handler` for each incoming stream that names it.

        At most ``per_peer`` streams of one peer and ``total`` in all are served at once;
        a stream beyond either is reset with `CODE_BUSY` (and logged), so one peer
        opening streams as fast as it can neither exhausts this node nor crowds out the
        others beyond ``total``. Peers kept first (`kept_peers`, peers this node dialed)
        are held to ``per_peer`` only: fresh keys filling ``total`` do not lock them out.
        Raises ValueError if `alpn` is invalid or already
        registered, or a limit is below 1.
        """
        alpn = validate_alpn(alpn)
        if alpn in self._handlers:
            raise ValueError(f"ALPN {alpn!r} already registered")
        if per_peer < 1 or total < 1:
            raise ValueError("stream limits must be at least 1")
        self._handlers[alpn] = handler
        self._limits[alpn] = (per_peer, total)

    # -- incoming connections --

    def _admit(self, key: object, peer_id: str, close: Callable[[int, str], None]) -> bool:
        """Whether to keep a new incoming connection (``key`` identifies it, ``close`` closes
        it); called by the implementations once the peer is authenticated. False: the
        caller closes it with `CODE_TOO_MANY_CONNECTIONS` (and `_admit` logged it).

        Endpoint keys are free, so a hostile member can connect with any number of them.
        At most `max_incoming` incoming connections are kept, and `max_incoming_per_peer`
        of one peer. At the bound, the connection used least recently (no stream being
        served on it, the oldest last stream) of a peer that is neither kept
        (`kept_peers`) nor dialed by this node is closed to make room; a newcomer that is
        kept or dialed may close a busy one too. Without such a victim the newcomer is
        refused. So a flood of fresh keys churns among itself, and never pushes out the
        peers this node syncs with."""
        if self._incoming_of.get(peer_id, 0) >= self.max_incoming_per_peer:
            self._refuse_connection(peer_id, f"{self._incoming_of[peer_id]} connections of this peer")
            return False
        if len(self._incoming) >= self.max_incoming:
            kept = set(self.kept_peers())
            kept.update(self._dialed_peers)
            privileged = peer_id in kept
            victim = None
            busy_victim = None
            for other_key, other in self._incoming.items():  # least recently used first
                if other.peer_id in kept:
                    continue
                if not self._serving_of.get(other.peer_id):
                    victim = other_key
                    break
                if busy_victim is None:
                    busy_victim = other_key
            if victim is None and privileged:
                victim = busy_victim
            if victim is None:
                self._refuse_connection(peer_id, f"{len(self._incoming)} incoming connections, none idle")
                return False
            dropped = self._incoming[victim]
            self._forget_incoming(victim)
            self._refuse_connection(dropped.peer_id, "the least recently used, dropped to make room")
            dropped.close(CODE_TOO_MANY_CONNECTIONS, "too many connections")
        self._incoming[key] = _Inbound(peer_id, close)
        self._incoming_of[peer_id] = self._incoming_of.get(peer_id, 0) + 1
        return True

    def _refuse_connection(self, peer_id: str, why: str) -> None:
        self._conns_refused += 1
        metrics.count_refused("transport", "connection_limit")
        # One line per 100: a flood must not flood the log too.
        if self._conns_refused % 100 == 1:
            logger.warning("incoming connection of %s closed: %s (limits %d, %d per peer; %d closed so far)",
                           peer_id[:16], why, self.max_incoming, self.max_incoming_per_peer, self._conns_refused)

    def _forget_incoming(self, key: object) -> None:
        """An incoming connection ended (or was dropped): no longer counted. Idempotent."""
        inbound = self._incoming.pop(key, None)
        if inbound is None:
            return
        left = self._incoming_of[inbound.peer_id] - 1
        if left:
            self._incoming_of[inbound.peer_id] = left
        else:
            del self._incoming_of[inbound.peer_id]

    def _touch_incoming(self, key: object) -> None:
        """A stream arrived on ``key``: it is now the most recently used."""
        if key in self._incoming:
            self._incoming.move_to_end(key)

    def _note_dialed(self, peer_id: str) -> None:
        """This node dialed ``peer_id``: its incoming connections are kept first (`_admit`)."""
        self._dialed_peers[peer_id] = None
        self._dialed_peers.move_to_end(peer_id)
        while len(self._dialed_peers) > DIALED_REMEMBERED:
            self._dialed_peers.popitem(last=False)

    def _kept(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is one of the peers kept first (`kept_peers`, or dialed by us)."""
        return peer_id in self._dialed_peers or peer_id in self.kept_peers()

    def incoming_connections(self) -> int:
        """Incoming connections kept now (counted by `_admit`)."""
        return len(self._incoming)

    # -- incoming streams --

    async def _run_handler(self, alpn: bytes, handler: StreamHandler, stream: Stream, peer_id: str,
                           conn: object = None) -> None:
        """`run_stream_handler` within the limits `register` set for ``alpn``. Called by the
        implementations, one task per incoming stream (on connection ``conn``, the key given
        to `_admit`, if incoming); raises nothing but cancellation."""
        if conn is not None:
            self._touch_incoming(conn)
        per_peer, total = self._limits.get(alpn, (STREAMS_PER_PEER, STREAMS_TOTAL))
        key = (alpn, peer_id)
        mine, everyone = self._serving.get(key, 0), self._serving_total.get(alpn, 0)
        if mine >= per_peer or (everyone >= total and not self._kept(peer_id)):
            self._refused += 1
            metrics.count_refused("transport", "stream_limit")
            # One line per 100 refusals: a flood must not flood the log too.
            if self._refused % 100 == 1:
                logger.warning("refusing a %r stream from %s: %d of its streams, %d in all, are being served "
                               "(limits %d, %d; %d refused so far)", alpn, peer_id[:16], mine, everyone, per_peer,
                               total, self._refused)
            await stream.reset(CODE_BUSY)
            return
        self._serving[key] = mine + 1
        self._serving_total[alpn] = everyone + 1
        self._serving_of[peer_id] = self._serving_of.get(peer_id, 0) + 1
        try:
            await run_stream_handler(handler, stream, peer_id)
        finally:
            left = self._serving[key] - 1
            if left:
                self._serving[key] = left
            else:
                del self._serving[key]
            self._serving_total[alpn] -= 1
            left = self._serving_of[peer_id] - 1
            if left:
                self._serving_of[peer_id] = left
            else:
                del self._serving_of[peer_id]
            if conn is not None:
                self._touch_incoming(conn)

    def serving(self, alpn: bytes, peer_id: str | None = None) -> int:
        """Incoming streams of ``alpn`` being served now (of ``peer_id``, or in all)."""
        if peer_id is None:
            return self._serving_total.get(alpn, 0)
        return self._serving.get((alpn, peer_id), 0)

    def unregister(self, alpn: bytes) -> None:
        """Stop serving `alpn`: new streams naming it are reset with `CODE_NO_HANDLER`.
        No-op if not registered."""
        self._handlers.pop(bytes(alpn), None)
        self._limits.pop(bytes(alpn), None)

    @abc.abstractmethod
    async def open_stream(self, peer: NodeAddr, alpn: bytes) -> Stream:
        """Open a new stream to `peer` for protocol `alpn`, dialing if no connection is alive.

        Remember that the opener sends first. A protocol the peer does not serve shows as
        `StreamReset` with `CODE_NO_HANDLER` at the first read. Raises `UnsupportedProtocol`
        (the peer does not speak `MUX_ALPN` at all), `ConnectError` (unreachable, timed out),
        `ConnectionLost`, `TransportClosed`. Cancellable at any point without affecting other
        callers: a dial in progress is shared by all callers for the same peer.
        """

    def path_stats(self, node_id: str) -> PathStats | None:
        """RTT and loss of the live connections to ``node_id``; None when there are none
        (or the implementation has no such figures)."""
        return None

    def stats(self) -> TransportStats:
        """Current counters."""
        return TransportStats(
            connections_dialed=self._dialed,
            connections_accepted=self._accepted,
            live_connections=self._live_connections(),
            streams_opened=self._streams_opened,
            streams_accepted=self._streams_accepted,
        )

    @abc.abstractmethod
    def _live_connections(self) -> int:
        """How many connections are open now, both directions."""

    async def _run_tasks(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The nursery of handler tasks, with `_serve` in it, until `aclose` cancels it.

        Started by the implementation's context manager (``nursery.start``)."""
        with trio.CancelScope() as scope:
            self._tasks_scope = scope
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._serve)
                task_status.started()
        self._nursery = None

    @abc.abstractmethod
    async def _serve(self) -> None:
        """What runs in the tasks nursery for the transport's life (e.g. the accept loop)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection (peers see `ConnectionLost` with `CODE_SHUTDOWN`), stop
        accepting, cancel handler tasks. Idempotent; completes even when cancelled."""

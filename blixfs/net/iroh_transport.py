"""The iroh implementation of `blixfs.net.transport`: the one module that calls iroh.

It owns three things besides the `Transport` itself:

1. A fix for the uniffi 0.31 code in the iroh 1.2.0 wheel, which copies every `bytes`
   argument into Rust one byte per Python loop step (10 MB/s for any stream write).
   `_UniffiRustBufferBuilder.write` and `._pack_into` are replaced at import by one
   `ctypes.memmove`. Upstream fix: uniffi-rs #2824, released in uniffi 0.32 (iroh-ffi
   issue #229); `_pack_into` is uniffi-rs #2956. Drop `_install_lowering_fix` once the
   iroh wheel is built with uniffi >= 0.32: it detects a fixed wheel and does nothing.
2. An event-loop stand-in so iroh's async methods run under trio. uniffi's async calls
   ask a global "event loop" for `create_future()` and later call
   `call_soon_threadsafe(set_result, future, code)` from Rust's callback (on a tokio
   thread, or inline on our thread when the Rust future is ready at once). `_TrioLoop`
   plays that role with trio primitives. When uniffi's future is cancelled by trio,
   uniffi drops the Rust future, which is how cancellation reaches Rust. uniffi callback
   interfaces (Rust calling Python coroutines: `ProtocolHandler`, `watch_*`) would need a
   real asyncio loop and are not used.
3. Offline endpoint setup: `preset_minimal()`, relays disabled, an explicit bind address.
4. Deferred frees of iroh handles. Each uniffi object's ``__del__`` calls into Rust to
   free its handle, and Python runs ``__del__`` wherever the cyclic GC happens to run:
   also inside `_TrioLoop.call_soon_threadsafe` on a tokio thread, in the middle of
   Rust's callback. Freeing a stream or an error there can wait on a lock that thread
   holds: it hung forever (a process that hit a `FrameError` with an iroh error in its
   cause chain, freed by a collection in a tokio thread; the event loop then waited on
   that thread's wake-up). `_defer_frees` replaces every ``__del__`` of the binding by one
   that queues the handle; `_free_deferred` frees them on the event loop's thread before
   each call into iroh through `_call` or `_sync`, every `FREE_DEFERRED_INTERVAL`, and
   when the transport closes.

Facts about iroh 1.2.0 this module relies on (measured; see docs/transport.md):
- Dropping the last Python reference to a `Connection` closes it at once, discarding
  unsent data: connections are kept in `IrohTransport._conns` until they die.
- `RecvStream.read` is cancel-safe. `SendStream.write_all` is not (partial writes).
- `SendStream`/`RecvStream` methods hold a per-stream tokio mutex while they wait, so a
  `reset` can only proceed once a blocked `write_all` has been cancelled.
- A stream reaches the peer's `accept_bi` only with its first byte.
- An unserved ALPN fails the dialer's handshake with TLS alert 120 at once.
- A dial to an address where nothing answers fails only after iroh's 30 s idle timeout,
  and a connection to a peer that crashed (even one restarted on the same port with the
  same key: there is no stateless reset) stays "open" for those 30 s, so requests on it
  hang. (Idle connections to live peers stay open: iroh sends keep-alives.) Hence the
  liveness probe: when a stream operation is cancelled (a deadline expired), one QUIC
  datagram is sent on the connection. It is ack-eliciting, so a live peer's QUIC stack
  answers within milliseconds, without its application seeing anything (unread
  datagrams are dropped by its quinn). If nothing at all arrives from the peer within
  `DEFAULT_PROBE_TIMEOUT`, the connection is closed and the next `open_stream` dials
  afresh.
"""

from __future__ import annotations

import collections
import copy
import ctypes
import ipaddress
import logging
import os
import re
import secrets
import struct
import threading
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import outcome
import trio
from iroh import iroh_ffi as _ffi

from blixfs.net.transport import (
    CODE_ABORTED,
    CODE_NO_HANDLER,
    CODE_SHUTDOWN,
    CODE_TOO_MANY_CONNECTIONS,
    MAX_ADDRS,
    MUX_ALPN,
    STREAM_HEADER_TIMEOUT,
    ConnectError,
    ConnectionLost,
    NodeAddr,
    PathStats,
    Stream,
    StreamClosed,
    StreamHandler,
    StreamReset,
    Transport,
    TransportClosed,
    TransportError,
    UnexpectedEOF,
    UnsupportedProtocol,
    encode_stream_header,
    validate_alpn,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

WRITE_CHUNK = 256 * 1024
"""`send_all` hands iroh at most this much per call: 256 KiB writes measured best and
bound the copy uniffi makes of each argument."""
READ_MAX = 1 << 20
"""Cap on one `read` or `read_exact`: iroh allocates (and zeroes) a buffer of the requested
size before any byte arrives, so a peer announcing a large message commits at most this
much per stream it has us wait on."""
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_PROBE_TIMEOUT = 2.0
"""A connection whose peer doesn't acknowledge a probe within this time is dropped."""
DEFAULT_CLOSE_TIMEOUT = 1.0
"""How long `aclose` waits for iroh to finish closing the endpoint."""
SECRET_KEY_LEN = 32
MAX_HANDSHAKES = 128
"""Incoming handshakes in progress at once; more are ignored (the dialer times out). Each
costs a task for up to the handshake timeout, before the peer's key is even known."""


# --- 1. the bytes lowering fix ----------------------------------------------------------


def _fast_write(self: Any, value: Any) -> None:
    # Same contract as the generated method: append `value`'s bytes to the RustBuffer.
    if type(value) is not bytes:
        value = memoryview(value).tobytes()
    length = len(value)
    with self._reserve(length):
        if length:
            dst = ctypes.addressof(self.rbuf.data.contents) + self.rbuf.len
            ctypes.memmove(dst, value, length)


def _fast_pack_into(self: Any, size: int, fmt: str, value: Any) -> None:
    packed = struct.pack(fmt, value)
    if len(packed) != size:
        raise ValueError(f"struct format {fmt!r} packs {len(packed)} bytes, not {size}")
    self.write(packed)


setattr(_fast_write, "_blixfs_fast", True)  # noqa: B010 - marks our replacement
setattr(_fast_pack_into, "_blixfs_fast", True)  # noqa: B010


def _is_byte_loop(func: Any) -> bool:
    """True for the generated per-byte loop (uniffi < 0.32), which iterates with enumerate."""
    code = getattr(func, "__code__", None)
    return code is not None and "enumerate" in code.co_names


_ORIGINAL_WRITERS: dict[str, Any] = {}


def _install_lowering_fix() -> bool:
    """Replace the per-byte RustBuffer writers; return True if the fast path is in place."""
    builder = getattr(_ffi, "_UniffiRustBufferBuilder", None)
    if builder is None:
        logger.warning("iroh bindings have no _UniffiRustBufferBuilder; lowering fix skipped")
        return False
    patched = False
    for name, fast in (("write", _fast_write), ("_pack_into", _fast_pack_into)):
        current = getattr(builder, name, None)
        if getattr(current, "_blixfs_fast", False):
            patched = True
        elif _is_byte_loop(current):
            _ORIGINAL_WRITERS[name] = current
            setattr(builder, name, fast)
            patched = True
    if not patched:
        logger.info("iroh bindings already lower bytes without a Python loop; not patched")
    return patched


LOWERING_FIX_INSTALLED = _install_lowering_fix()


def lowering_fix_active() -> bool:
    """True if the RustBuffer writer in use is ours (for tests and diagnostics)."""
    write = getattr(_ffi._UniffiRustBufferBuilder, "write", None)
    return bool(getattr(write, "_blixfs_fast", False))


def set_lowering_fix(enabled: bool) -> None:
    """Switch between our writers and the wheel's originals. For benchmarks only: the
    original path moves 10 MB/s. No-op if the wheel didn't need the fix."""
    builder = _ffi._UniffiRustBufferBuilder
    for name, fast in (("write", _fast_write), ("_pack_into", _fast_pack_into)):
        original = _ORIGINAL_WRITERS.get(name)
        if original is not None:
            setattr(builder, name, fast if enabled else original)


# --- 2. the trio event-loop stand-in for uniffi futures ---------------------------------


class _TrioFuture:
    """What uniffi awaits for one poll of a Rust future; resolved via `_TrioLoop`."""

    __slots__ = ("_cancelled", "_done", "_result", "_task", "_thread", "_token")

    def __init__(self) -> None:
        try:
            self._token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            raise RuntimeError("iroh async calls must run inside trio") from None
        self._thread = threading.get_ident()
        self._task: trio.lowlevel.Task | None = None
        self._done = False
        self._cancelled = False
        self._result: Any = None

    def cancelled(self) -> bool:
        return self._cancelled

    def set_result(self, value: Any) -> None:
        # Runs on the trio thread only (see _TrioLoop.call_soon_threadsafe).
        if self._done or self._cancelled:
            return
        self._done = True
        self._result = value
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Value(value))

    def __await__(self) -> Generator[Any, None, Any]:
        if not self._done:
            self._task = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                # uniffi's `finally` then frees the Rust future, which drops it in Rust.
                self._cancelled = True
                self._task = None
                return trio.lowlevel.Abort.SUCCEEDED

            # __await__ can't use `await`; delegating to the coroutine's iterator is the same.
            waiter = trio.lowlevel.wait_task_rescheduled(abort)  # noqa: ASYNC105
            return (yield from waiter.__await__())
        return self._result


class _TrioLoop:
    """Installed with `uniffi_set_event_loop`; implements the two methods uniffi uses."""

    def create_future(self) -> _TrioFuture:
        return _TrioFuture()

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        # uniffi passes (set_result, future, poll_code). Called from a ctypes callback, so
        # it must never raise.
        future = args[0] if args else None
        if not isinstance(future, _TrioFuture) or future._cancelled:
            return
        if threading.get_ident() == future._thread:
            # The Rust future was ready during our own poll call: resolve it now, so a
            # result is never left waiting for the scheduler, where a cancellation could
            # drop it (e.g. bytes already taken from a stream).
            callback(*args)
            return
        with suppress(trio.RunFinishedError):
            future._token.run_sync_soon(callback, *args)


_ffi.uniffi_set_event_loop(_TrioLoop())  # type: ignore[arg-type]


# --- deferred frees (module docstring, item 4) -------------------------------------------

_deferred_frees: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
FREE_DEFERRED_INTERVAL = 0.5  # seconds a queued handle waits at most on a running transport


def _defer_frees() -> int:
    """Make each uniffi class's ``__del__`` queue its handle instead of freeing it there and
    then; returns how many classes were changed."""
    changed = 0
    for cls in vars(_ffi).values():
        uniffi_object = isinstance(cls, type) and "_handle" in getattr(cls, "__annotations__", {})
        if not uniffi_object or "__del__" not in cls.__dict__ or cls.__dict__["__del__"].__name__ == "queue":
            continue

        def queue(self: Any, free: Callable[[Any], None] = cls.__dict__["__del__"]) -> None:
            handle = getattr(self, "_handle", None)  # absent when the constructor failed
            if handle is not None:
                _deferred_frees.append((free, handle))  # deque.append: atomic, from any thread

        cls.__del__ = queue
        changed += 1
    return changed


def _free_deferred() -> None:
    """Free the queued handles (on the event loop's thread, outside any call into iroh)."""
    while _deferred_frees:
        free, handle = _deferred_frees.popleft()
        free(types.SimpleNamespace(_handle=handle))  # the binding's own __del__ reads only _handle


async def _free_deferred_every(interval: float) -> None:
    """`_free_deferred` at least every ``interval`` seconds: handles are freed also while
    the transport makes no call (one runs in each transport's task nursery)."""
    while True:
        await trio.sleep(interval)
        _free_deferred()


_defer_frees()


# --- errors -----------------------------------------------------------------------------

_RESET_RE = re.compile(r"Reset\((\d+)\)")
_STOPPED_RE = re.compile(r"Stopped\((\d+)\)")
_CLOSE_CODE_RE = re.compile(r"error_code: (\d+)")
_CLOSE_REASON_RE = re.compile(r'reason: b"([^"]*)"')
# quinn's ReadExactError, as iroh 1.2.0 formats it (Debug): FinishedEarly(bytes read) or
# ReadError(<the ReadError that `read` reports as is>).
_FINISHED_EARLY_RE = re.compile(r"FinishedEarly\((\d+)\)")
_READ_ERROR_PREFIX = "ReadError("


def _translate(exc: BaseException) -> TransportError:
    """Map an iroh error to the transport's exception types (by kind and message)."""
    if not isinstance(exc, _ffi.IrohError):
        return TransportError(f"iroh internal error: {exc}")
    return _translate_message(exc.kind(), exc.message())


def _translate_message(kind: Any, message: str) -> TransportError:
    if m := _FINISHED_EARLY_RE.fullmatch(message):
        # `read_exact` only: the stream ended after this many of the bytes asked for.
        received = int(m.group(1))
        return UnexpectedEOF(f"stream ended after {received} bytes of an exact read", received=received)
    if message.startswith(_READ_ERROR_PREFIX) and message.endswith(")"):
        # `read_exact` wraps what `read` would have raised: translate that, so a reset or a
        # lost connection is the same error whichever of the two met it.
        return _translate_message(kind, message[len(_READ_ERROR_PREFIX) : -1])
    if m := _RESET_RE.fullmatch(message):
        code = int(m.group(1))
        return StreamReset(f"peer reset the stream (code {code})", code=code)
    if m := _STOPPED_RE.fullmatch(message):
        code = int(m.group(1))
        return StreamReset(f"peer stopped reading the stream (code {code})", code=code)
    if "LocallyClosed" in message:
        return ConnectionLost("connection was closed locally")
    if message == "ClosedStream":
        return StreamClosed("stream is already closed")
    if "ApplicationClosed" in message:
        code_m = _CLOSE_CODE_RE.search(message)
        reason_m = _CLOSE_REASON_RE.search(message)
        close_code = int(code_m.group(1)) if code_m else None
        reason = f": {reason_m.group(1)}" if reason_m and reason_m.group(1) else ""
        return ConnectionLost(
            f"peer closed the connection (code {close_code}{reason})", code=close_code
        )
    if kind in (_ffi.IrohErrorKind.CONNECTION, _ffi.IrohErrorKind.CLOSED) or message.startswith(
        "ConnectionLost"
    ):
        return ConnectionLost(f"connection lost: {message}")
    return TransportError(f"iroh {kind.name.lower()} error: {message}")


def _connect_error(exc: BaseException, peer: NodeAddr, alpn: bytes) -> ConnectError:
    text = exc.message() if isinstance(exc, _ffi.IrohError) else str(exc)
    last = text.strip().splitlines()[-1].strip() if text.strip() else text
    if "error 120" in text or "doesn't support any known protocol" in text:
        return UnsupportedProtocol(f"peer {peer.node_id[:10]} does not serve {alpn!r}")
    return ConnectError(f"cannot connect to {peer.node_id[:10]} for {alpn!r}: {last}")


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await one iroh async method, translating its errors."""
    if _deferred_frees:
        _free_deferred()
    try:
        return await fn(*args)
    except (_ffi.IrohError, _ffi.InternalError) as exc:
        raise _translate(exc) from exc


def _sync(fn: Callable[..., T], *args: Any) -> T:
    if _deferred_frees:
        _free_deferred()
    try:
        return fn(*args)
    except (_ffi.IrohError, _ffi.InternalError) as exc:
        raise _translate(exc) from exc


# --- streams and connections ------------------------------------------------------------


class _Connection:
    """One iroh connection and what we know about it. Holding it keeps it open."""

    def __init__(
        self, raw: Any, peer_id: str, alpn: bytes, dialed: bool, transport: IrohTransport
    ) -> None:
        self.raw = raw
        self.peer_id = peer_id
        self.alpn = alpn
        self.dialed = dialed
        self.transport = transport
        self.dead = False
        self.probing = False
        self.stable_id: int = raw.stable_id()

    def alive(self) -> bool:
        if not self.dead and self.raw.close_reason() is not None:
            self.dead = True
        return not self.dead

    def __repr__(self) -> str:
        way = "to" if self.dialed else "from"
        return f"<connection {self.stable_id} {way} {self.peer_id[:10]} {self.alpn!r}>"


class IrohStream(Stream):
    """A QUIC bidirectional stream on an iroh connection. See `Stream` for the contract."""

    _exact_receive_max = READ_MAX

    def __init__(self, conn: _Connection, send: Any, recv: Any, alpn: bytes) -> None:
        super().__init__(conn.peer_id, alpn)
        self._header = b""  # the stream header, sent with the first bytes (see open_stream)
        self._conn = conn
        self._send = send
        self._recv = recv

    def _on_cancelled(self) -> None:
        self._conn.transport._suspect(self._conn)

    def _note(self, exc: TransportError) -> TransportError:
        if isinstance(exc, ConnectionLost):
            self._conn.dead = True
        return exc

    async def _raw_send(self, data: bytes | bytearray | memoryview) -> None:
        if self._header:
            data, self._header = self._header + bytes(data), b""
        try:
            if len(data) <= WRITE_CHUNK:
                await _call(self._send.write_all, data)
                return
            view = memoryview(data).cast("B")
            for pos in range(0, len(view), WRITE_CHUNK):
                await _call(self._send.write_all, view[pos : pos + WRITE_CHUNK])
        except TransportError as exc:
            raise self._note(exc) from exc.__cause__

    async def _raw_finish(self) -> None:
        if self._header:  # a stream closed before any data still names its protocol
            await self._raw_send(b"")
        try:
            await _call(self._send.finish)
        except TransportError as exc:
            raise self._note(exc) from exc.__cause__

    async def _raw_receive(self, max_bytes: int) -> bytes:
        try:
            data: bytes = await _call(self._recv.read, min(max_bytes, READ_MAX))
        except TransportError as exc:
            raise self._note(exc) from exc.__cause__
        return data

    async def _raw_receive_exact(self, n: int) -> bytes:
        # One call for what would be many `read`s on a slow link, each returning the
        # little that had arrived: ~1/3 of the CPU per 256 KiB chunk at 50 Mbit/s. quinn's
        # read_exact is not cancel-safe (bytes it took are dropped with its buffer); the
        # state machine in `Stream.receive_exactly` breaks the stream for it.
        try:
            data: bytes = await _call(self._recv.read_exact, n)
        except TransportError as exc:
            raise self._note(exc) from exc.__cause__
        return data

    async def _raw_set_priority(self, priority: int) -> None:
        # quinn's stream priority: among the streams of one connection, higher goes first.
        try:
            await _call(self._send.set_priority, priority)
        except TransportError as exc:
            logger.debug("set_priority(%d) on %r: %s", priority, self._conn, exc)

    async def _raw_reset(self, code: int) -> None:
        try:
            await _call(self._send.reset, code)
        except TransportError as exc:
            logger.debug("reset(%d) on %r: %s", code, self._conn, exc)

    async def _raw_stop(self, code: int) -> None:
        try:
            await _call(self._recv.stop, code)
        except TransportError as exc:
            logger.debug("stop(%d) on %r: %s", code, self._conn, exc)


class _PendingDial:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.conn: _Connection | None = None
        self.error: TransportError | None = None


class IrohTransport(Transport):
    """A `Transport` over an iroh endpoint. Create with `open_iroh_transport`."""

    def __init__(
        self,
        endpoint: Any,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        super().__init__()
        self._ep = endpoint
        self._close_timeout = close_timeout
        self._node_id: str = str(endpoint.id())
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._probe_timeout = probe_timeout
        self._conns: dict[tuple[str, bytes], list[_Connection]] = {}
        self._dials: dict[tuple[str, bytes], _PendingDial] = {}
        self._handshaking = 0
        self._handshakes_ignored = 0

    # -- Transport API --

    @property
    def node_id(self) -> str:
        return self._node_id

    def addr(self) -> NodeAddr:
        """Our id and the concrete addresses we listen on (wildcard sockets expanded by
        iroh into interface addresses)."""
        found: list[str] = []
        for text in [*self._ep.addr().direct_addresses(), *self._ep.bound_sockets()]:
            try:
                parsed = NodeAddr(self._node_id, (text,)).addrs[0]
            except ValueError:
                continue
            host = parsed.rpartition(":")[0].strip("[]")
            if ipaddress.ip_address(host).is_unspecified or parsed in found:
                continue
            found.append(parsed)
        return NodeAddr(self._node_id, tuple(found[:MAX_ADDRS]))

    def _live_connections(self) -> int:
        return sum(1 for c in self._all_connections() if c.alive())

    async def open_stream(self, peer: NodeAddr, alpn: bytes) -> Stream:
        alpn = validate_alpn(alpn)
        for attempt in range(2):
            if self._closed:
                raise TransportClosed("transport is closed")
            conn = await self._connection(peer, MUX_ALPN)  # one connection per peer, every protocol
            try:
                bi = await _call(conn.raw.open_bi)
            except ConnectionLost:
                # A cached connection can die between the liveness check and open_bi.
                conn.dead = True
                self._forget(conn)
                if attempt:
                    raise
                continue
            self._streams_opened += 1
            stream = IrohStream(conn, bi.send(), bi.recv(), alpn)
            # The protocol name goes first (the peer dispatches on it), in the same write as
            # the caller's first bytes: a Rust round trip less per request. iroh shows a
            # stream to the peer on its first byte anyway, so the caller sends first.
            stream._header = encode_stream_header(alpn)
            await trio.lowlevel.checkpoint()
            return stream
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        for conn in self._all_connections():
            try:
                conn.raw.close(CODE_SHUTDOWN, b"shutdown")
            except (_ffi.IrohError, _ffi.InternalError) as exc:
                logger.debug("closing %r: %s", conn, _translate(exc))
        if self._tasks_scope is not None:
            self._tasks_scope.cancel()
        # Connections were closed above, so peers already have their CONNECTION_CLOSE;
        # iroh's close also waits out the QUIC draining period (~3 s for a handshake that
        # never completed), which need not hold up our shutdown.
        with trio.CancelScope(shield=True), trio.move_on_after(self._close_timeout) as scope:
            try:
                await _call(self._ep.close)
            except TransportError as exc:
                logger.warning("closing iroh endpoint: %s", exc)
        if scope.cancelled_caught:
            logger.info("iroh endpoint still draining after %g s; not waiting", self._close_timeout)
        logger.debug("iroh transport %s closed", self._node_id[:10])

    # -- connections --

    def path_stats(self, node_id: str) -> PathStats | None:
        conns = [c for c in self._all_connections() if c.peer_id == node_id and c.alive()]
        if not conns:
            return None
        rtts: list[float] = []
        sent = lost = 0
        for conn in conns:
            try:
                rtt = conn.raw.rtt()
                stats = conn.raw.stats()
            except (_ffi.IrohError, _ffi.InternalError):
                continue
            if rtt is not None:
                rtts.append(float(rtt))
            sent += int(stats.udp_tx_datagrams)
            lost += int(stats.lost_packets)
        return PathStats(min(rtts) if rtts else None, sent, lost)

    def _all_connections(self) -> list[_Connection]:
        return [c for conns in self._conns.values() for c in conns]

    def _live(self, key: tuple[str, bytes]) -> _Connection | None:
        for conn in self._conns.get(key, ()):
            if conn.alive():
                return conn
        return None

    def _add(self, conn: _Connection) -> None:
        self._conns.setdefault((conn.peer_id, conn.alpn), []).append(conn)

    def _forget(self, conn: _Connection) -> None:
        key = (conn.peer_id, conn.alpn)
        conns = self._conns.get(key, [])
        if conn in conns:
            conns.remove(conn)
        if not conns:
            self._conns.pop(key, None)
        self._forget_incoming(conn)

    async def _connection(self, peer: NodeAddr, alpn: bytes) -> _Connection:
        """A live connection to `peer` for `alpn`, joining or starting a shared dial."""
        key = (peer.node_id, alpn)
        conn = self._live(key)
        if conn is not None:
            await trio.lowlevel.checkpoint()
            return conn
        pending = self._dials.get(key)
        if pending is None:
            if self._nursery is None:
                raise TransportClosed("transport is not running")
            pending = _PendingDial()
            self._dials[key] = pending
            # The dial runs in the transport's nursery so one caller's deadline doesn't
            # abort it for the others waiting on it.
            self._nursery.start_soon(self._dial, key, peer, alpn, pending)
        await pending.done.wait()
        if pending.error is not None:
            raise copy.copy(pending.error) from pending.error
        assert pending.conn is not None
        return pending.conn

    async def _dial(
        self, key: tuple[str, bytes], peer: NodeAddr, alpn: bytes, pending: _PendingDial
    ) -> None:
        conn: _Connection | None = None
        try:
            try:
                target = _ffi.EndpointAddr(
                    _ffi.EndpointId.from_string(peer.node_id), None, list(peer.addrs)
                )
            except (_ffi.IrohError, _ffi.InternalError) as exc:
                # Not every 32-byte string is an ed25519 point; ids come from peers.
                pending.error = ConnectError(f"invalid node id {peer.node_id[:10]}: {exc}")
                return
            with trio.move_on_after(self._connect_timeout) as scope:
                try:
                    raw = await self._ep.connect(target, alpn)
                except (_ffi.IrohError, _ffi.InternalError) as exc:
                    pending.error = _connect_error(exc, peer, alpn)
                    logger.info("%s", pending.error)
                    return
            if scope.cancelled_caught:
                pending.error = ConnectError(
                    f"cannot connect to {peer.node_id[:10]} for {alpn!r}: "
                    f"no answer within {self._connect_timeout:g} s"
                )
                logger.info("%s", pending.error)
                return
            remote = str(raw.remote_id())
            if remote != peer.node_id:  # iroh authenticates the id; belt and braces
                raw.close(CODE_SHUTDOWN, b"wrong peer")
                pending.error = ConnectError(
                    f"dialed {peer.node_id[:10]} but reached {remote[:10]}"
                )
                return
            conn = _Connection(raw, remote, alpn, dialed=True, transport=self)
            self._add(conn)
            self._note_dialed(remote)
            self._dialed += 1
            pending.conn = conn
            logger.debug("dialed %r", conn)
        finally:
            if pending.conn is None and pending.error is None:
                pending.error = TransportClosed("transport closed while dialing")
            if self._dials.get(key) is pending:
                del self._dials[key]
            pending.done.set()
        # This task stays on as the connection's stream acceptor: peers may open streams
        # on connections we dialed, too.
        await self._serve_connection(conn)

    def _suspect(self, conn: _Connection) -> None:
        """A stream operation on `conn` was cancelled: check the peer is still there."""
        if conn.probing or conn.dead or self._closed or self._nursery is None:
            return
        conn.probing = True
        self._nursery.start_soon(self._probe, conn)

    async def _probe(self, conn: _Connection) -> None:
        try:
            if not conn.alive():
                return
            try:
                received = conn.raw.stats().udp_rx_datagrams
                conn.raw.send_datagram(b"\0")
            except (_ffi.IrohError, _ffi.InternalError) as exc:
                logger.debug("cannot probe %r: %s", conn, _translate(exc))
                return
            deadline = trio.current_time() + self._probe_timeout
            while trio.current_time() < deadline:
                await trio.sleep(0.05)
                if not conn.alive() or conn.raw.stats().udp_rx_datagrams != received:
                    return
            logger.warning(
                "%r: nothing heard from the peer %g s after a probe; dropping the connection",
                conn,
                self._probe_timeout,
            )
            conn.dead = True
            self._forget(conn)
            with suppress(_ffi.IrohError, _ffi.InternalError):
                conn.raw.close(CODE_ABORTED, b"peer unresponsive")
        finally:
            conn.probing = False

    # -- background tasks --

    async def _serve(self) -> None:
        """The accept loop (and the periodic free of queued iroh handles)."""
        assert self._nursery is not None
        self._nursery.start_soon(_free_deferred_every, FREE_DEFERRED_INTERVAL)
        while True:
            try:
                incoming = await _call(self._ep.accept_next)
            except TransportError as exc:
                logger.warning("accept loop stopped: %s", exc)
                return
            if incoming is None:  # endpoint closed
                return
            if self._handshaking >= MAX_HANDSHAKES:
                self._handshakes_ignored += 1
                if self._handshakes_ignored % 100 == 1:
                    logger.warning("%d incoming handshakes in progress: ignoring a new one (%d so far)",
                                   self._handshaking, self._handshakes_ignored)
                with suppress(TransportError), trio.move_on_after(1):
                    await _call(incoming.ignore)
                continue
            self._handshaking += 1
            self._nursery.start_soon(self._accept_one, incoming)

    async def _accept_one(self, incoming: Any) -> None:
        raw = None
        try:
            with trio.move_on_after(self._handshake_timeout) as scope:
                try:
                    accepting = await _call(incoming.accept)
                    raw = await _call(accepting.connect)
                except TransportError as exc:
                    # e.g. the dialer asked for an ALPN we don't serve: it got TLS alert 120.
                    logger.info("incoming connection failed its handshake: %s", exc)
                    return
        finally:
            self._handshaking -= 1
        if scope.cancelled_caught or raw is None:
            logger.info("incoming connection: no handshake within %g s", self._handshake_timeout)
            return
        conn = _Connection(
            raw, str(raw.remote_id()), bytes(raw.alpn()), dialed=False, transport=self
        )

        def close(code: int, reason: str) -> None:
            conn.dead = True
            with suppress(_ffi.IrohError, _ffi.InternalError):
                raw.close(code, reason.encode())

        if not self._admit(conn, conn.peer_id, close):
            close(CODE_TOO_MANY_CONNECTIONS, "too many connections")
            return
        self._add(conn)
        self._accepted += 1
        logger.debug("accepted %r", conn)
        await self._serve_connection(conn)

    async def _dispatch(self, conn: _Connection, bi: Any) -> None:
        """One incoming stream: read the protocol name it starts with, run that handler
        (a reset with CODE_NO_HANDLER when none is registered, or no valid name comes)."""
        stream = IrohStream(conn, bi.send(), bi.recv(), b"")
        try:
            with trio.fail_after(STREAM_HEADER_TIMEOUT):
                size = (await stream.receive_exactly(1))[0]
                alpn = _header_alpn(await stream.receive_exactly(size))
        except (TransportError, trio.TooSlowError, ValueError) as exc:
            logger.debug("stream from %s without a valid protocol name: %s", conn.peer_id[:10], exc)
            await stream.reset(CODE_NO_HANDLER)
            return
        stream._alpn = alpn
        handler = self._handlers.get(alpn)
        if handler is None:
            await stream.reset(CODE_NO_HANDLER)
            return
        self._streams_accepted += 1
        await self._run_handler(alpn, handler, stream, conn.peer_id, conn)

    async def _serve_connection(self, conn: _Connection) -> None:
        """Accept the peer's streams on `conn` until it dies, one handler task each."""
        assert self._nursery is not None
        try:
            while True:
                try:
                    bi = await _call(conn.raw.accept_bi)
                except TransportError as exc:
                    logger.debug("%r ended: %s", conn, exc)
                    return
                self._nursery.start_soon(self._dispatch, conn, bi)
        finally:
            conn.dead = True
            self._forget(conn)


def _header_alpn(raw: bytes) -> bytes:
    return validate_alpn(raw)


def endpoint_options(*, internet: bool, bind_addr: str, secret_key: bytes | None, alpns: list[bytes]) -> Any:
    """The iroh endpoint options for offline (default) or internet mode.

    Offline: the minimal preset, relays disabled; peers are dialed at the addresses in
    their tickets or learnt on the LAN. Internet (``blixfs mount --internet``): iroh's n0
    preset, with n0's public relays (so nodes behind NAT reach each other, relayed when
    no direct path can be punched) and its DNS discovery (a node id alone is enough to
    dial). This workplace has no internet, so only the options are tested.
    """
    return _ffi.EndpointOptions(
        preset=_ffi.preset_n0() if internet else _ffi.preset_minimal(),
        relay_mode=_ffi.RelayMode.default_mode() if internet else _ffi.RelayMode.disabled(),
        bind_addr=bind_addr,
        secret_key=bytes(secret_key) if secret_key is not None else None,
        alpns=alpns,
    )


@asynccontextmanager
async def open_iroh_transport(
    secret_key: bytes | None = None,
    *,
    bind_addr: str = "127.0.0.1:0",
    handlers: Mapping[bytes, StreamHandler] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    internet: bool = False,
) -> AsyncIterator[IrohTransport]:
    """Bind an offline iroh endpoint and run a `Transport` on it for the block's duration.

    `secret_key` is the node's 32-byte ed25519 secret (see `load_or_create_secret_key`);
    a fresh one is used if None. No relays, no discovery: peers are reached at the
    addresses in their `NodeAddr`. `handlers` are registered before the endpoint starts
    accepting. Dials that get no answer fail after `connect_timeout` seconds; a
    connection whose peer stays silent `probe_timeout` seconds after a cancelled stream
    operation is dropped (see the module docstring). Closing waits at most
    `close_timeout` seconds for iroh.

    Raises ValueError for a bad key or ALPN, `TransportError` if the endpoint can't bind.
    On exit, closes the transport (see `Transport.aclose`) and cancels handler tasks.
    """
    if secret_key is not None and len(secret_key) != SECRET_KEY_LEN:
        raise ValueError(f"secret key must be {SECRET_KEY_LEN} bytes")
    handlers = dict(handlers or {})
    for alpn in handlers:
        validate_alpn(alpn)
    options = endpoint_options(internet=internet, bind_addr=bind_addr, secret_key=secret_key, alpns=[MUX_ALPN])
    try:
        endpoint = await _call(_ffi.Endpoint.bind, options)
    except TransportError as exc:
        raise TransportError(f"cannot bind iroh endpoint on {bind_addr}: {exc}") from exc
    transport = IrohTransport(
        endpoint,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
        probe_timeout=probe_timeout,
        close_timeout=close_timeout,
    )
    transport._handlers.update({bytes(a): h for a, h in handlers.items()})
    logger.info("iroh transport %s listening on %s", transport.node_id[:10], transport.addr())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(transport._run_tasks)
            try:
                yield transport
            finally:
                await transport.aclose()
    finally:
        await transport.aclose()
        _free_deferred()


# --- identity ---------------------------------------------------------------------------


def load_or_create_secret_key(path: str | os.PathLike[str]) -> bytes:
    """Return the node's 32-byte secret key stored at `path`, creating it if missing.

    A new key is written with mode 0600 from the start (os.open with the mode, so no
    window where umask or a chmod race exposes it) and published atomically with a hard
    link, so concurrent callers all end up with the same key. Raises ValueError if the
    file exists but doesn't hold exactly 32 bytes (never overwrites it), OSError on I/O
    errors. Logs a warning if an existing file is readable by group or others.
    """
    existing = _read_key(os.fspath(path))
    if existing is not None:
        return existing
    return write_secret_key(path, generate_secret_key())


def generate_secret_key() -> bytes:
    """A new random 32-byte ed25519 secret key (every 32-byte value is a valid seed)."""
    return secrets.token_bytes(SECRET_KEY_LEN)


def write_secret_key(path: str | os.PathLike[str], key: bytes) -> bytes:
    """Store ``key`` at ``path`` (mode 0600, atomically) unless a key is already there.

    Returns the key the file holds afterwards: ``key``, or the one a concurrent caller
    stored first. Never overwrites an existing key file.
    """
    if len(key) != SECRET_KEY_LEN:
        raise ValueError(f"secret key must be {SECRET_KEY_LEN} bytes")
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        key_read = _read_key(path)
        if key_read is None:
            raise
        key = key_read
    finally:
        os.unlink(tmp)
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key


def _read_key(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        mode = os.fstat(fd).st_mode
        data = os.read(fd, SECRET_KEY_LEN + 1)
    finally:
        os.close(fd)
    if len(data) != SECRET_KEY_LEN:
        raise ValueError(f"{path}: expected a {SECRET_KEY_LEN}-byte secret key, found {len(data)}")
    if mode & 0o077:
        logger.warning("%s: secret key file is accessible by others (mode %o)", path, mode & 0o777)
    return data


def node_id_from_secret_key(secret_key: bytes) -> str:
    """The endpoint id (lowercase hex public key) a transport with this key will have."""
    return str(_sync(_ffi.SecretKey.from_bytes, bytes(secret_key)).public())


def sign(secret_key: bytes, message: bytes) -> bytes:
    """Ed25519-sign `message` with the node key; returns the 64-byte signature."""
    signature = _sync(_ffi.SecretKey.from_bytes, bytes(secret_key)).sign(bytes(message))
    return bytes(signature.to_bytes())


def verify(node_id: str, message: bytes, signature: bytes) -> bool:
    """True if `signature` is `node_id`'s ed25519 signature of `message`. Never raises
    for a bad signature or malformed input, only returns False."""
    try:
        public = _ffi.EndpointId.from_string(node_id)
        public.verify(bytes(message), _ffi.Signature.from_bytes(bytes(signature)))
    except (_ffi.IrohError, _ffi.InternalError, TypeError, ValueError):
        return False
    return True

"""The chunk protocol (``blixfs/chunks/1``): ask a peer for a chunk by id.

A bidirectional stream carries a sequence of requests, one at a time: the requester
sends the next request only once it has read the whole previous response (streams are
cheap, and concurrency is several streams on the one connection per peer)::

    request  = version: u8 (1) | op: u8 (1 = GET) | chunk id: 32 bytes | offset: u64 | length: u32
    response = status: u8 (0 OK, 1 DONT_HAVE, 2 BAD_REQUEST) | length: u32 | bytes

    HAVE     = version | op 3 | 32 zero bytes | offset 0 | count: u32 (1..MAX_HAVE) | count x chunk id
    response = status OK | length ceil(count / 8) | bitmap (bit i, LSB first: holds id i)

HAVE asks which of a batch of chunk ids the peer holds now: holders found by content,
whatever version the requester read (`blixfs.content`). Like GET it keeps the stream.

    PROVE    = version | op 4 | manifest id | offset 0 | count: u32 (1..MAX_PROVE_RANGES)
               | nonce: 32 bytes | count x (chunk index: u32 | offset: u32 | length: u32)
    response = status OK | length 32 | BLAKE3(nonce || the bytes of each range, in order)
               (DONT_HAVE: the manifest or a chunk named is not held; BAD_REQUEST: an index
               beyond the manifest or a range longer than MAX_PROVE_LENGTH)

PROVE is how a writer checks that a node claiming to hold a version holds its bytes now
(`blixfs.replication`): the nonce is fresh, so the answer cannot be computed in advance,
and the ranges are random, so only a node holding the version (or fetching it on demand)
can answer. Like GET it keeps the stream.

    GETP     = version | op 0x10 + class (0x10 DEMAND, 0x11 TRACE, 0x12 AHEAD, 0x13 BACKGROUND)
               | chunk id | offset | length; answered as GET

GETP is GET with the requester's transfer class (`blixfs.priority`): the same 46 bytes,
the class in the op byte (no extra read per request). A plain GET is served as AHEAD
(`DEFAULT_CLASS`): requesters from before classes existed neither jump the demand queue
nor starve behind background transfers. Ops 0x14 to 0x1F are unknown (BAD_REQUEST).

Serving order (docs/design.md "Transfer priorities"): GET requests are served through
two fair queues (`blixfs.scheduling.FairQueue`), one of `DEMAND_SLOTS` for DEMAND and one of
`SERVE_SLOTS` for the other classes (better class first), each fair between peers in
round robin within a class: a peer that marks everything DEMAND gets its share of the
demand slots, not all of them, and never delays another peer's demand request behind its
queue. Waiting requests are bounded by the transport's stream limits (one per stream). The
answer's bytes then take from the ``max_upload`` limit (`blixfs.limits`) in class order,
and go on the QUIC stream with the class's send priority (`send_priority`): on one
connection, a demand answer overtakes background answers already being sent.

``length`` 0 asks for the chunk from ``offset`` to its end. A requester that asks for a
whole chunk verifies its BLAKE3 id before using it (`ChunkClient.fetch` does); a range
cannot be verified against a flat BLAKE3 id, so blixfs itself always fetches whole
chunks (256 KiB: half a millisecond here) and ranges are for a future verified-streaming
reader.

Why streams are kept open: opening a stream, naming its protocol, accepting it and
finishing it cost both sides several calls into iroh per chunk, as much CPU as moving
the chunk's bytes (docs/design.md, "Lazy fetch"). `ChunkClient` keeps a few idle
streams per peer; the server reads the next request on a stream until the requester
finishes it or it stays idle for `IDLE_TIMEOUT`.

The server answers from its local store, which checks its own xxh3 on read, so it
never serves bytes it knows are damaged; it only serves chunks it holds (no relay).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import blake3
import trio
from lru import LRU

from blixfs import crypto, metrics
from blixfs.chunkstore import MAX_CHUNK_BYTES, ChunkStore
from blixfs.hashing import HOLE, ChunkId, chunk_id, short
from blixfs.limits import Limits
from blixfs.manifest import Manifest, ManifestError, MissingPage, lookup
from blixfs.net.transport import (
    CODE_APP_MIN,
    NodeAddr,
    Stream,
    Transport,
    TransportError,
    UnexpectedEOF,
)
from blixfs.priority import Priority
from blixfs.scheduling import FairQueue

log = logging.getLogger(__name__)
T = TypeVar("T")

ALPN = b"blixfs/chunks/1"
VERSION = 1
OP_GET = 1
OP_HOLD = 2  # "please hold this version whole for durability": chunk id = its manifest id, then u16 | path | sig
HOLD_CONTEXT = b"blixfs/hold/1\x00"  # signature domain of a HOLD's namespace signature
OP_HAVE = 3  # "which of these chunk ids do you hold?": count in the length field, then the ids
OP_PROVE = 4  # "hash these ranges of this version with my nonce": count in the length field, nonce, ranges
OP_GETP = 0x10  # GET with the transfer class: op = OP_GETP + class
DEFAULT_CLASS = Priority.AHEAD  # the class of a plain GET
SERVE_SLOTS = 32  # non-demand GETs answered at once, all peers together
DEMAND_SLOTS = 32  # demand GETs answered at once, beside those
MAX_PROVE_RANGES = 16
MAX_PROVE_LENGTH = 64 * 1024  # bytes of one range: a proof reads little
NONCE_LEN = 32
PROVE_MANIFESTS = 16  # decoded manifests a chunk server keeps for PROVE
_RANGE = struct.Struct(">III")
MAX_HOLD_PATH = 4096
MAX_HAVE = 1024  # ids in one HAVE: 32 KiB of request, a 128-byte answer
OK, DONT_HAVE, BAD_REQUEST = 0, 1, 2
CODE_BAD_REQUEST = CODE_APP_MIN + 0x10
CODE_NOT_MEMBER = CODE_APP_MIN + 4  # as in blixfs/sync/1: the requester is not allowed this op
_REQUEST = struct.Struct(">BB32sQI")
_RESPONSE = struct.Struct(">BI")
REQUEST_TIMEOUT = 10.0  # a server waits this long for a new stream's first request, and for a started one to be whole
SEND_TIMEOUT = 60.0  # a server gives up (reset) on a response the requester has not taken in this long
IDLE_TIMEOUT = 60.0  # a server waits this long for the next request on a stream, then finishes it
POOL_IDLE_SECONDS = 20.0  # a requester reuses a stream idle for less than this (well under IDLE_TIMEOUT)
POOL_STREAMS = 8  # idle streams a requester keeps per peer (the read-ahead runs 8 requests at once)
# What the first read of a response asks for: the header and a default-size chunk. iroh
# allocates (and zeroes) a buffer of the size asked for, so asking for far more costs.
_FIRST_READ = _RESPONSE.size + 256 * 1024


class FetchFailed(Exception):
    """A peer could not serve a chunk; ``bad_data`` when it sent bytes that do not hash to the id."""

    def __init__(self, message: str, *, bad_data: bool = False) -> None:
        super().__init__(message)
        self.bad_data = bad_data


class _StaleStream(Exception):
    """A kept-open stream ended or failed before any byte of the answer: the server closed
    it meanwhile (idle timeout, restart) or its connection is gone. Not the peer's fault."""


@dataclass(frozen=True)
class Fetched:
    data: bytes
    seconds: float


def encode_request(cid: ChunkId, offset: int = 0, length: int = 0, priority: Priority | None = None) -> bytes:
    """A GET of ``cid`` (protocol.md 14.1); with ``priority``, a GETP carrying that class."""
    op = OP_GET if priority is None else OP_GETP + int(priority)
    return _REQUEST.pack(VERSION, op, cid, offset, length)


def request_class(op: int) -> Priority | None:
    """The transfer class of a GET or GETP op; None for any other op."""
    if op == OP_GET:
        return DEFAULT_CLASS
    if OP_GETP <= op < OP_GETP + len(Priority):
        return Priority(op - OP_GETP)
    return None


def send_priority(priority: Priority) -> int:
    """The QUIC send priority of an answer of class ``priority`` (higher goes first)."""
    return int(Priority.BACKGROUND) - int(priority)


def encode_have(cids: list[ChunkId]) -> bytes:
    """A HAVE request for ``cids`` (1 to MAX_HAVE ids; protocol.md 14.1)."""
    if not 1 <= len(cids) <= MAX_HAVE:
        raise ValueError(f"a HAVE asks about 1 to {MAX_HAVE} chunk ids, not {len(cids)}")
    return _REQUEST.pack(VERSION, OP_HAVE, bytes(32), 0, len(cids)) + b"".join(cids)


def encode_have_answer(held: list[bool]) -> bytes:
    """The answer to a HAVE: a bitmap, bit i (LSB first within each byte) set when id i is held."""
    bits = bytearray((len(held) + 7) // 8)
    for i, h in enumerate(held):
        if h:
            bits[i // 8] |= 1 << (i % 8)
    return _RESPONSE.pack(OK, len(bits)) + bytes(bits)


def hold_signed_bytes(target: bytes, manifest_id: bytes, path: str) -> bytes:
    """What a HOLD's namespace signature covers: the context, the target node's id (a HOLD
    cannot be replayed to another node), the manifest id and the path's UTF-8 bytes."""
    return HOLD_CONTEXT + target + manifest_id + path.encode("utf-8")


def encode_hold(manifest_id: ChunkId, path: str, signature: bytes = b"") -> bytes:
    """A HOLD request: hold the version ``manifest_id`` of ``path`` whole (protocol.md 14.1),
    with the namespace key's ``signature`` of `hold_signed_bytes` (b"": 64 zero bytes, which
    every target refuses)."""
    encoded = path.encode("utf-8")
    if len(encoded) > MAX_HOLD_PATH:
        raise ValueError(f"a HOLD path has at most {MAX_HOLD_PATH} bytes")
    signature = signature or bytes(64)
    if len(signature) != 64:
        raise ValueError("a HOLD signature has 64 bytes")
    return _REQUEST.pack(VERSION, OP_HOLD, manifest_id, 0, 0) + struct.pack(">H", len(encoded)) + encoded + signature


def encode_prove(manifest_id: ChunkId, nonce: bytes, ranges: list[tuple[int, int, int]]) -> bytes:
    """A PROVE request (protocol.md 14.1): ``ranges`` are (chunk index, offset, length)."""
    if not 1 <= len(ranges) <= MAX_PROVE_RANGES or len(nonce) != NONCE_LEN:
        raise ValueError(f"a PROVE has 1 to {MAX_PROVE_RANGES} ranges and a {NONCE_LEN}-byte nonce")
    return (_REQUEST.pack(VERSION, OP_PROVE, manifest_id, 0, len(ranges)) + nonce
            + b"".join(_RANGE.pack(*r) for r in ranges))


def prove_digest(nonce: bytes, parts: list[bytes]) -> bytes:
    """The answer to a PROVE: BLAKE3 of the nonce then the bytes of each range, in request order."""
    h = blake3.blake3(nonce)
    for part in parts:
        h.update(part)
    return h.digest()


def prove_range(data: bytes, offset: int, length: int) -> bytes:
    """The bytes of one PROVE range of a chunk: clamped to the chunk like a GET's range (a hole
    or a range past the end contributes the bytes that exist, possibly none)."""
    start = min(offset, len(data))
    return data[start : min(len(data), offset + length)]


# A HOLD request: (manifest id, path, requesting peer, writer's signature) -> accepted.
OnHold = Callable[[ChunkId, str, str, bytes], Awaitable[bool]]


class ChunkServer:
    """Serves this node's chunks. Register `handle` for `ALPN` on the transport.

    HOLD requests go to ``await on_hold(manifest id, path, peer, signature) -> accepted``
    (the replicator, which checks the signature, the room and the peer's rate); without one
    they are refused. ``allowed(peer, op)`` is access control (`blixfs.members`): whether
    a peer (hex id) may make a request of that op here, checked on every request (None:
    anyone). ``on_served(peer, nbytes)`` hears of each chunk sent (`blixfs.analytics`). All
    are given at construction and fixed for the server's life. ``limits``: the node's
    bandwidth limits (the ``upload`` bucket is used; the daemon may change its rate).
    GETs are answered in class order, fair between peers (module docstring).
    """

    def __init__(self, store: ChunkStore, *, on_hold: OnHold | None = None,
                 allowed: Callable[[str, int], bool] | None = None,
                 on_served: Callable[[str, int], object] | None = None,
                 limits: Limits | None = None) -> None:
        self.store = store
        self.limits = limits or Limits.create()
        self.demand_queue = FairQueue(DEMAND_SLOTS, "serve")
        self.queue = FairQueue(SERVE_SLOTS, "serve")
        self.bytes_served = 0
        self.requests = 0
        self.have_requests = 0
        self.prove_requests = 0
        # Decoded manifests PROVE asked about: a writer challenges each holder of a version
        # every few minutes, and a large image's manifest is megabytes to decode.
        self._manifests: LRU[ChunkId, Manifest] = LRU(PROVE_MANIFESTS)
        self._on_hold = on_hold
        self._allowed = allowed
        self._on_served = on_served

    async def _hold(self, stream: Stream, peer_id: str, manifest_id: ChunkId) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                (size,) = struct.unpack(">H", await stream.receive_exactly(2))
                path = (await stream.receive_exactly(size)).decode("utf-8") if size <= MAX_HOLD_PATH else None
                signature = await stream.receive_exactly(64) if path is not None else b""
        except (trio.TooSlowError, UnexpectedEOF, UnicodeDecodeError):
            path = None
        accepted = path is not None and self._on_hold is not None and await self._on_hold(manifest_id, path, peer_id,
                                                                                            signature)
        await self._send(stream, _RESPONSE.pack(OK if accepted else BAD_REQUEST, 0))

    @staticmethod
    async def _request_body(stream: Stream, peer_id: str, op: str, count: int, limit: int,
                            size: int) -> bytes | None:
        """The ``size`` bytes that follow a request of ``count`` items (1 to ``limit``); None
        when the count is out of bounds or the bytes do not come whole within REQUEST_TIMEOUT:
        the stream is then reset with CODE_BAD_REQUEST (its next request cannot be found)."""
        if not 1 <= count <= limit:
            log.info("peer %s sent a %s of %d items: refused", peer_id[:16], op, count)
            metrics.count_refused("chunks", "bad_request")
            await stream.reset(CODE_BAD_REQUEST)
            return None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                return await stream.receive_exactly(size)
        except (trio.TooSlowError, UnexpectedEOF):
            log.info("peer %s sent an incomplete %s: closing", peer_id[:16], op)
            metrics.count_refused("chunks", "bad_request")
            await stream.reset(CODE_BAD_REQUEST)
            return None

    async def _have(self, stream: Stream, peer_id: str, count: int) -> bool:
        """Answer a HAVE of ``count`` ids from the store's index (no disk read). False when the
        request was malformed and the stream was reset."""
        raw = await self._request_body(stream, peer_id, "HAVE", count, MAX_HAVE, 32 * count)
        if raw is None:
            return False
        self.have_requests += 1
        held = [self.store.has(ChunkId(raw[i : i + 32])) for i in range(0, len(raw), 32)]
        await self._send(stream, encode_have_answer(held))
        return True

    async def _prove(self, stream: Stream, peer_id: str, manifest_id: ChunkId, count: int) -> bool:
        """Answer a PROVE (module docstring). False when the request was malformed and the
        stream was reset; a proof about data not held is DONT_HAVE, never a failure here."""
        raw = await self._request_body(stream, peer_id, "PROVE", count, MAX_PROVE_RANGES,
                                       NONCE_LEN + _RANGE.size * count)
        if raw is None:
            return False
        nonce = raw[:NONCE_LEN]
        ranges = [_RANGE.unpack_from(raw, NONCE_LEN + i * _RANGE.size) for i in range(count)]
        self.prove_requests += 1
        status, answer = await self._proof(manifest_id, nonce, ranges)
        await stream.send_all(_RESPONSE.pack(status, len(answer)) + answer)
        return True

    async def _proof(self, manifest_id: ChunkId, nonce: bytes, ranges: list[tuple[int, int, int]]) -> tuple[int, bytes]:
        manifest = self._manifests.get(manifest_id) if self.store.has(manifest_id) else None
        if manifest is None:
            raw = await self.store.load(manifest_id)
            if raw is None:
                return DONT_HAVE, b""
            try:
                manifest = Manifest.decode(raw)
            except ManifestError:
                return DONT_HAVE, b""  # a manifest that does not decode is not held
            self._manifests[manifest_id] = manifest
        parts: list[bytes] = []
        pages: dict[ChunkId, bytes] = {}
        for index, offset, length in ranges:
            if index >= manifest.count or length > MAX_PROVE_LENGTH:
                return BAD_REQUEST, b""
            cid = await self._chunk_at(manifest, index, pages)
            if cid is None:
                return DONT_HAVE, b""  # a version held here has its pages here
            data = bytes(manifest.length(index)) if cid == HOLE else await self.store.load(cid)
            if data is None:
                return DONT_HAVE, b""
            parts.append(prove_range(data, offset, length))
        return OK, prove_digest(nonce, parts)

    async def _chunk_at(self, manifest: Manifest, index: int, pages: dict[ChunkId, bytes]) -> ChunkId | None:
        """Chunk ``index`` of ``manifest``, its pages read from the store (into ``pages``);
        None if one is not held here or does not fit its place."""
        while True:
            try:
                return lookup(manifest, pages.get, index)
            except MissingPage as missing:
                raw = await self.store.load(missing.pid)
                if raw is None:
                    return None
                pages[missing.pid] = raw
            except ManifestError:
                return None

    @staticmethod
    async def _send(stream: Stream, data: bytes) -> None:
        """Send a response within `SEND_TIMEOUT` (trio.TooSlowError otherwise, and the stream
        is broken): a requester that stops reading must not hold the stream, and the blob
        in memory, for as long as the connection lives."""
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)

    @staticmethod
    async def _next_request(stream: Stream, first: bool) -> bytes | None:
        """The next request's 46 bytes; None when the requester is done with the stream (EOF,
        or idle for IDLE_TIMEOUT, after an earlier request). Raises ValueError for a stream
        without a first request in REQUEST_TIMEOUT, or a request not whole REQUEST_TIMEOUT
        after its first byte."""
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT if first else IDLE_TIMEOUT):
            head = await stream.receive_some(_REQUEST.size)
        if not head:  # EOF or no byte in time
            if first:
                raise ValueError("no chunk request")
            return None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                return head + await stream.receive_exactly(_REQUEST.size - len(head))
        except (trio.TooSlowError, UnexpectedEOF):
            raise ValueError("incomplete chunk request") from None

    async def handle(self, stream: Stream, peer_id: str) -> None:
        """Answer requests on ``stream`` in order until the requester finishes it or leaves it
        idle (then FIN). A malformed or late request resets it with CODE_BAD_REQUEST; an
        unknown version or op gets BAD_REQUEST and FIN (its layout is unknown, so nothing
        after it can be read); a HOLD ends the stream after its answer."""
        try:
            await self._serve(stream, peer_id)
        except trio.TooSlowError:
            # The stream is broken by the cancelled send: closing it resets it (CODE_ABORTED).
            log.info("peer %s did not take a response within %.0f s: stream dropped", peer_id[:16], SEND_TIMEOUT)
            metrics.count_refused("chunks", "slow_reader")

    async def _serve(self, stream: Stream, peer_id: str) -> None:
        first = True
        sending = send_priority(Priority.DEMAND) - send_priority(Priority.BACKGROUND) + 1  # none set yet
        while True:
            try:
                raw = await self._next_request(stream, first)
            except ValueError:
                log.info("peer %s sent no complete chunk request: closing", peer_id[:16])
                metrics.count_refused("chunks", "bad_request")
                await stream.reset(CODE_BAD_REQUEST)
                return
            except TransportError as exc:
                if first:
                    raise
                # A requester resets a kept-open stream when a fetch on it was cancelled.
                log.debug("peer %s ended a chunk stream: %s", peer_id[:16], exc)
                return
            if raw is None:
                break
            first = False
            version, op, cid, offset, length = _REQUEST.unpack(raw)
            if self._allowed is not None and not self._allowed(peer_id, op):
                # Checked on every request: a kept-open stream outlives a revoke.
                log.warning("peer %s may not make chunk requests of op %d here: refused", peer_id[:16], op)
                metrics.count_refused("chunks", "not_member")
                await stream.reset(CODE_NOT_MEMBER)
                return
            if version == VERSION and op == OP_HOLD:
                await self._hold(stream, peer_id, ChunkId(cid))
                break
            if version == VERSION and op == OP_HAVE:
                if not await self._have(stream, peer_id, length):
                    return
                continue
            if version == VERSION and op == OP_PROVE:
                if not await self._prove(stream, peer_id, ChunkId(cid), length):
                    return
                continue
            priority = request_class(op)
            if version != VERSION or priority is None:
                log.warning("peer %s sent a chunk request of version %d op %d: refused", peer_id[:16], version, op)
                metrics.count_refused("chunks", "unknown_op")
                await self._send(stream, _RESPONSE.pack(BAD_REQUEST, 0))
                break
            queue = self.demand_queue if priority is Priority.DEMAND else self.queue
            async with queue.slot(priority, peer_id):
                data = await self.store.load(ChunkId(cid))
                self.requests += 1
                if data is None:
                    await self._send(stream, _RESPONSE.pack(DONT_HAVE, 0))
                    continue
                if offset or length:
                    end = len(data) if length == 0 else min(len(data), offset + length)
                    data = data[min(offset, len(data)) : end]
                if sending != send_priority(priority):  # a kept-open stream carries any class
                    sending = send_priority(priority)
                    await stream.set_priority(sending)
                await self.limits.upload.take(len(data), priority)
                await self._send(stream, _RESPONSE.pack(OK, len(data)) + data)
            self.bytes_served += len(data)
            metrics.count_served(peer_id, len(data))
            if self._on_served is not None:
                self._on_served(peer_id, len(data))
        await stream.send_eof()


async def _exchange(stream: Stream, peer_id: str, cid: ChunkId, priority: Priority | None = None) -> bytes | None:
    """One GET of the whole blob ``cid`` on ``stream``: its bytes, unverified; None for
    DONT_HAVE. Raises _StaleStream when nothing of an answer came, FetchFailed otherwise."""
    try:
        await stream.send_all(encode_request(cid, priority=priority))
        first = await stream.receive_some(_FIRST_READ)
    except TransportError as exc:
        raise _StaleStream(str(exc)) from exc
    if not first:
        raise _StaleStream("the server finished the stream")
    try:
        if len(first) < _RESPONSE.size:
            first += await stream.receive_exactly(_RESPONSE.size - len(first))
        status, length = _RESPONSE.unpack_from(first)
        if status == DONT_HAVE and len(first) == _RESPONSE.size:
            return None
        if status != OK:
            raise FetchFailed(f"peer {peer_id[:16]} answered status {status}")
        if length > MAX_CHUNK_BYTES:
            raise FetchFailed(f"peer {peer_id[:16]} announced {length} bytes for one chunk", bad_data=True)
        body = memoryview(first)[_RESPONSE.size :]
        if len(body) > length:
            raise FetchFailed(f"peer {peer_id[:16]} sent more bytes than it announced", bad_data=True)
        if len(body) == length:
            return bytes(body)
        # One copy joins the two parts; a call into iroh costs more than copying a chunk.
        return b"".join((body, await stream.receive_exactly(length - len(body))))
    except UnexpectedEOF as exc:
        raise FetchFailed(f"peer {peer_id[:16]} ended the stream midway through an answer ({exc})") from None


class ChunkClient:
    """Asks peers for blobs over ``blixfs/chunks/1``, keeping streams open between requests.

    Callers: the fetcher (reads, read-ahead, pulls) and the health monitor, on the trio
    thread; they set the deadline (a trio cancel scope) around each `fetch`.

    Invariants: a stream carries one request at a time and returns to its peer's pool of
    idle streams only after its whole answer was read, so an answer always belongs to the
    request before it. A stream that failed, was cancelled midway or carried bytes that are
    not the chunk is reset, never reused. A pooled stream that the server has meanwhile
    closed fails before any byte of the answer: the peer's pool is then dropped and the
    request sent once more on a new stream, so a stale pool never costs the peer an attempt.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._idle: dict[str, list[tuple[float, Stream]]] = {}
        self.streams_opened = 0

    async def _take(self, peer_id: str) -> Stream | None:
        pool = self._idle.get(peer_id)
        now = trio.current_time()
        while pool:
            since, stream = pool.pop()
            if now - since < POOL_IDLE_SECONDS:
                return stream
            await stream.aclose()  # the server sees EOF and finishes its side
        return None

    async def _give_back(self, peer_id: str, stream: Stream) -> None:
        pool = self._idle.setdefault(peer_id, [])
        if len(pool) < POOL_STREAMS:
            pool.append((trio.current_time(), stream))
        else:
            await stream.aclose()

    async def _drop(self, peer_id: str) -> None:
        """Close the peer's idle streams."""
        for _, stream in self._idle.pop(peer_id, []):
            await stream.aclose()

    async def _on_pooled_stream(self, peer: NodeAddr, exchange: Callable[[Stream], Awaitable[T]]) -> T:
        """Run one request/answer ``exchange`` on a kept-open stream to ``peer`` (a new one when
        none is idle) and pool the stream again after a whole answer. A reused stream that
        fails before any byte of the answer (`_StaleStream`) costs a retry on a new one; any
        other failure, or cancellation, resets the stream: it never carries half an answer."""
        while True:
            stream = await self._take(peer.node_id)
            reused = stream is not None
            if stream is None:
                stream = await self.transport.open_stream(peer, ALPN)
                self.streams_opened += 1
            try:
                result = await exchange(stream)
            except _StaleStream as exc:
                await stream.reset()
                if reused:
                    log.debug("kept-open stream to %s was closed (%s): asking on a new one", peer.node_id[:16], exc)
                    await self._drop(peer.node_id)
                    continue
                raise FetchFailed(f"peer {peer.node_id[:16]} closed the stream without answering: {exc}") from None
            except BaseException:
                await stream.reset()  # completes even when cancelled; the peer never takes half an answer
                raise
            await self._give_back(peer.node_id, stream)
            return result

    async def have(self, peer: NodeAddr, cids: list[ChunkId]) -> list[bool]:
        """Which of ``cids`` (at most MAX_HAVE) ``peer`` holds now. Raises FetchFailed for a
        malformed answer, or a transport error; the caller sets the deadline."""
        request = encode_have(cids)
        want = (len(cids) + 7) // 8

        async def exchange(stream: Stream) -> list[bool]:
            try:
                await stream.send_all(request)
                head = await stream.receive_some(_RESPONSE.size + want)
            except TransportError as exc:
                raise _StaleStream(str(exc)) from exc
            if not head:
                raise _StaleStream("the server finished the stream")
            try:
                if len(head) < _RESPONSE.size + want:
                    head += await stream.receive_exactly(_RESPONSE.size + want - len(head))
            except UnexpectedEOF as exc:
                raise FetchFailed(f"peer {peer.node_id[:16]} ended the stream midway through an answer ({exc})") \
                    from None
            status, length = _RESPONSE.unpack_from(head)
            if status != OK or length != want:
                raise FetchFailed(f"peer {peer.node_id[:16]} answered a HAVE with status {status}, {length} bytes")
            bits = head[_RESPONSE.size :]
            return [bool(bits[i // 8] >> (i % 8) & 1) for i in range(len(cids))]

        return await self._on_pooled_stream(peer, exchange)

    async def fetch(self, peer: NodeAddr, cid: ChunkId, priority: Priority | None = None) -> Fetched | None:
        """The whole blob ``cid`` from ``peer``, verified; None if the peer does not hold it.
        ``priority``: the class the server is told (GETP); None: a plain GET.

        Raises FetchFailed (``bad_data`` set for bytes that do not hash to ``cid``) or a
        transport error (no connection, no stream).
        """
        started = time.perf_counter()

        async def exchange(stream: Stream) -> bytes | None:
            data = await _exchange(stream, peer.node_id, cid, priority)
            if data is not None and chunk_id(data) != cid:
                raise FetchFailed(f"peer {peer.node_id[:16]} sent bytes that are not chunk {short(cid)}",
                                  bad_data=True)
            return data

        data = await self._on_pooled_stream(peer, exchange)
        return None if data is None else Fetched(data, time.perf_counter() - started)


async def request_hold(transport: Transport, peer: NodeAddr, manifest_id: ChunkId, path: str,
                       namespace_secret: bytes | None) -> bool:
    """Ask ``peer`` to hold the version ``manifest_id`` of ``path`` whole; True if it accepted.
    The request is signed with ``namespace_secret`` (write capability; None: unsigned, which
    targets refuse).

    Raises transport errors; the caller sets the deadline."""
    signature = b"" if namespace_secret is None else crypto.sign(
        namespace_secret, hold_signed_bytes(bytes.fromhex(peer.node_id), manifest_id, path))
    stream = await transport.open_stream(peer, ALPN)
    async with stream:
        await stream.send_all(encode_hold(manifest_id, path, signature))
        await stream.send_eof()
        try:
            status, _ = _RESPONSE.unpack(await stream.receive_exactly(_RESPONSE.size))
        except UnexpectedEOF:
            return False
    return bool(status == OK)


async def request_prove(transport: Transport, peer: NodeAddr, manifest_id: ChunkId, nonce: bytes,
                        ranges: list[tuple[int, int, int]]) -> bytes | None:
    """Ask ``peer`` to prove it holds these ranges of version ``manifest_id``: its 32-byte
    answer, None when it says it does not hold them (DONT_HAVE). Raises FetchFailed for a
    refused or malformed answer, transport errors; the caller sets the deadline."""
    stream = await transport.open_stream(peer, ALPN)
    async with stream:
        await stream.send_all(encode_prove(manifest_id, nonce, ranges))
        await stream.send_eof()
        try:
            status, length = _RESPONSE.unpack(await stream.receive_exactly(_RESPONSE.size))
            if status == DONT_HAVE:
                return None
            if status != OK or length != 32:
                raise FetchFailed(f"peer {peer.node_id[:16]} answered a PROVE with status {status}, {length} bytes")
            return await stream.receive_exactly(32)
        except UnexpectedEOF as exc:
            raise FetchFailed(f"peer {peer.node_id[:16]} ended the stream midway through a proof ({exc})") from None


__all__ = [
    "ALPN",
    "ChunkClient",
    "ChunkServer",
    "FetchFailed",
    "Fetched",
    "TransportError",
    "encode_have",
    "encode_have_answer",
    "encode_hold",
    "encode_prove",
    "encode_request",
    "hold_signed_bytes",
    "prove_digest",
    "prove_range",
    "request_class",
    "request_hold",
    "request_prove",
    "send_priority",
]

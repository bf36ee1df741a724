"""The chunk protocol (``blixfs/chunks/1``): ask a peer for a chunk by id.

One request per bidirectional stream (QUIC streams are cheap; concurrency is several
streams on the one connection per peer)::

    request  = version: u8 (1) | op: u8 (1 = GET) | chunk id: 32 bytes | offset: u64 | length: u32
    response = status: u8 (0 OK, 1 DONT_HAVE, 2 BAD_REQUEST) | length: u32 | bytes

``length`` 0 asks for the chunk from ``offset`` to its end. A requester that asks for a
whole chunk verifies its BLAKE3 id before using it (`fetch_chunk` does); a range cannot
be verified against a flat BLAKE3 id, so blixfs itself always fetches whole chunks
(256 KiB: half a millisecond here) and ranges are for a future verified-streaming reader.

The server answers from its local store, which checks its own xxh3 on read, so it
never serves bytes it knows are damaged; it only serves chunks it holds (no relay).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from blixfs.chunkstore import MAX_CHUNK_BYTES, ChunkStore
from blixfs.hashing import ChunkId, chunk_id, short
from blixfs.net.transport import CODE_APP_MIN, NodeAddr, Stream, Transport, TransportError, UnexpectedEOF

log = logging.getLogger(__name__)

ALPN = b"blixfs/chunks/1"
VERSION = 1
OP_GET = 1
OP_HOLD = 2  # "please hold this version whole for durability": chunk id = its manifest id, then u16 | path
MAX_HOLD_PATH = 4096
OK, DONT_HAVE, BAD_REQUEST = 0, 1, 2
CODE_BAD_REQUEST = CODE_APP_MIN + 0x10
_REQUEST = struct.Struct(">BB32sQI")
_RESPONSE = struct.Struct(">BI")
REQUEST_TIMEOUT = 10.0  # a server gives a client this long to send its request


class FetchFailed(Exception):
    """A peer could not serve a chunk; ``bad_data`` when it sent bytes that do not hash to the id."""

    def __init__(self, message: str, *, bad_data: bool = False) -> None:
        super().__init__(message)
        self.bad_data = bad_data


@dataclass(frozen=True)
class Fetched:
    data: bytes
    seconds: float


def encode_request(cid: ChunkId, offset: int = 0, length: int = 0) -> bytes:
    return _REQUEST.pack(VERSION, OP_GET, cid, offset, length)


class ChunkServer:
    """Serves this node's chunks. Register `handle` for `ALPN` on the transport.

    HOLD requests go to ``on_hold(manifest id, path, peer) -> accepted`` (the replicator);
    without one they are refused.
    """

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.bytes_served = 0
        self.requests = 0
        self.on_hold: Callable[[ChunkId, str, str], bool] | None = None

    async def _hold(self, stream: Stream, peer_id: str, manifest_id: ChunkId) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                (size,) = struct.unpack(">H", await stream.receive_exactly(2))
                path = (await stream.receive_exactly(size)).decode("utf-8") if size <= MAX_HOLD_PATH else None
        except (trio.TooSlowError, UnexpectedEOF, UnicodeDecodeError):
            path = None
        accepted = path is not None and self.on_hold is not None and self.on_hold(manifest_id, path, peer_id)
        await stream.send_all(_RESPONSE.pack(OK if accepted else BAD_REQUEST, 0))
        await stream.send_eof()

    async def handle(self, stream: Stream, peer_id: str) -> None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                raw = await stream.receive_exactly(_REQUEST.size)
        except (trio.TooSlowError, UnexpectedEOF):
            log.info("peer %s sent no complete chunk request: closing", peer_id[:16])
            await stream.reset(CODE_BAD_REQUEST)
            return
        version, op, cid, offset, length = _REQUEST.unpack(raw)
        if version == VERSION and op == OP_HOLD:
            await self._hold(stream, peer_id, ChunkId(cid))
            return
        if version != VERSION or op != OP_GET:
            log.warning("peer %s sent a chunk request of version %d op %d: refused", peer_id[:16], version, op)
            await stream.send_all(_RESPONSE.pack(BAD_REQUEST, 0))
            await stream.send_eof()
            return
        data = self.store.get(ChunkId(cid))
        self.requests += 1
        if data is None:
            await stream.send_all(_RESPONSE.pack(DONT_HAVE, 0))
        else:
            end = len(data) if length == 0 else min(len(data), offset + length)
            piece = memoryview(data)[min(offset, len(data)) : end]
            await stream.send_all(_RESPONSE.pack(OK, len(piece)) + bytes(piece))
            self.bytes_served += len(piece)
        await stream.send_eof()


async def fetch_chunk(transport: Transport, peer: NodeAddr, cid: ChunkId) -> Fetched | None:
    """The whole chunk ``cid`` from ``peer``, verified; None if the peer does not hold it.

    Raises FetchFailed (``bad_data`` set for bytes that do not hash to ``cid``) or a
    transport error. The caller sets the deadline (trio cancel scope).
    """
    started = time.perf_counter()
    stream = await transport.open_stream(peer, ALPN)
    async with stream:
        # No send_eof: the request has a fixed size, and a Rust round trip less per chunk counts.
        await stream.send_all(encode_request(cid))
        try:
            status, length = _RESPONSE.unpack(await stream.receive_exactly(_RESPONSE.size))
        except UnexpectedEOF:
            raise FetchFailed(f"peer {peer.node_id[:16]} closed the stream without answering") from None
        if status == DONT_HAVE:
            return None
        if status != OK:
            raise FetchFailed(f"peer {peer.node_id[:16]} answered status {status}")
        if length > MAX_CHUNK_BYTES:
            raise FetchFailed(f"peer {peer.node_id[:16]} announced {length} bytes for one chunk", bad_data=True)
        try:
            data = await stream.receive_exactly(length)
        except UnexpectedEOF as exc:
            raise FetchFailed(f"peer {peer.node_id[:16]} sent {exc.received} of {length} bytes") from None
    if chunk_id(data) != cid:
        raise FetchFailed(f"peer {peer.node_id[:16]} sent bytes that are not chunk {short(cid)}", bad_data=True)
    return Fetched(data, time.perf_counter() - started)


async def request_hold(transport: Transport, peer: NodeAddr, manifest_id: ChunkId, path: str) -> bool:
    """Ask ``peer`` to hold the version ``manifest_id`` of ``path`` whole; True if it accepted.

    Raises transport errors; the caller sets the deadline."""
    encoded = path.encode("utf-8")
    stream = await transport.open_stream(peer, ALPN)
    async with stream:
        await stream.send_all(_REQUEST.pack(VERSION, OP_HOLD, manifest_id, 0, 0) + struct.pack(">H", len(encoded))
                              + encoded)
        await stream.send_eof()
        try:
            status, _ = _RESPONSE.unpack(await stream.receive_exactly(_RESPONSE.size))
        except UnexpectedEOF:
            return False
    return bool(status == OK)


__all__ = ["ALPN", "ChunkServer", "FetchFailed", "Fetched", "TransportError", "fetch_chunk", "request_hold"]

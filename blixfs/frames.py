"""Frames of the sync protocol (``blixfs/sync/1``); the byte layout is in docs/protocol.md.

Every frame is ``length: u32 | type: u8 | payload`` (big-endian), ``length`` counting
type and payload, at most `MAX_FRAME`. Decoding never trusts a length or a count: it
checks each against the bytes present and the bounds below before using it, and
raises `FrameError` (never anything else) on a frame that does not decode.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import trio

from blixfs.entry import Entry
from blixfs.net.transport import Stream, UnexpectedEOF

MAX_FRAME = 1 << 20
MAX_ENTRY_BYTES = 512 * 1024
MAX_VECTOR = 65536
MAX_ERROR_TEXT = 1024
PROTOCOL_VERSION = 1
_HEAD = struct.Struct(">IB")
_U32 = struct.Struct(">I")
_VEC_ITEM = struct.Struct(">32sQ")


class FrameError(ValueError):
    """A frame that does not decode or breaks a bound."""


class FrameType(enum.IntEnum):
    HELLO = 1
    ENTRIES = 2
    SYNCED = 3
    ERROR = 4
    HOLDINGS = 5


@dataclass(frozen=True)
class Hello:
    namespace_id: bytes
    vector: dict[bytes, int]
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Entries:
    entries: list[Entry]


@dataclass(frozen=True)
class EncodedEntries:
    """An ENTRIES frame whose entries are not decoded yet (`decode` with ``defer_entries``):
    each entry's bytes, within the frame's bounds. The sync decodes and checks them in
    worker processes (`blixfs.replica.check_received`), off the event loop; `decode_entry`
    decodes one."""

    raw: list[bytes]


@dataclass(frozen=True)
class Synced:
    vector: dict[bytes, int]


@dataclass(frozen=True)
class ErrorFrame:
    code: int
    message: str


@dataclass(frozen=True)
class HoldingsFrame:
    """What ``node_id`` holds: whole manifests, and bitmaps of chunk indices of others.
    ``seq`` grows with every change; a receiver keeps only the newest per node."""

    node_id: bytes
    seq: int
    complete: list[bytes]
    partial: list[tuple[bytes, bytes]]
    addr: bytes = b""  # NodeAddr.to_bytes() of the node, so holders can be dialed (b"": unknown)
    free: int = 0  # bytes the node will still take as replicas for others (replica placement prefers room)
    # ed25519 signature by ``node_id`` (its endpoint key) over `holdings_signed_bytes`; b"" is sent
    # as 64 zero bytes, which verifies for no key: receivers refuse unsigned records.
    signature: bytes = b""


Frame = Hello | Entries | EncodedEntries | Synced | ErrorFrame | HoldingsFrame

HOLDINGS_CONTEXT = b"blixfs/holdings/1\x00"  # signature domain: no other message signed by a node key starts so
HOLDINGS_SIGNATURE_LEN = 64


def _holdings_body(frame: HoldingsFrame) -> bytes:
    parts = [frame.node_id, struct.pack(">QQH", frame.seq, frame.free, len(frame.addr)), frame.addr,
             _U32.pack(len(frame.complete)), *frame.complete, _U32.pack(len(frame.partial))]
    for mid, bits in frame.partial:
        parts += [mid, _U32.pack(len(bits)), bits]
    return b"".join(parts)


def holdings_signed_bytes(frame: HoldingsFrame) -> bytes:
    """What the holder signs: `HOLDINGS_CONTEXT` then the HOLDINGS payload without its signature
    (protocol.md section 9). Relays forward the frame as received, so the bytes are the holder's."""
    return HOLDINGS_CONTEXT + _holdings_body(frame)


def _vector(v: dict[bytes, int]) -> bytes:
    return _U32.pack(len(v)) + b"".join(_VEC_ITEM.pack(a, t) for a, t in sorted(v.items()))


def encode(frame: Frame) -> bytes:
    """The frame's bytes; ValueError if it would break a bound (a bug on our side)."""
    if isinstance(frame, Hello):
        kind, payload = FrameType.HELLO, bytes([frame.version]) + frame.namespace_id + _vector(frame.vector)
    elif isinstance(frame, Entries):
        return encode_entries([e.serialize() for e in frame.entries])
    elif isinstance(frame, EncodedEntries):
        return encode_entries(frame.raw)
    elif isinstance(frame, Synced):
        kind, payload = FrameType.SYNCED, _vector(frame.vector)
    elif isinstance(frame, HoldingsFrame):
        signature = frame.signature or bytes(HOLDINGS_SIGNATURE_LEN)
        if len(signature) != HOLDINGS_SIGNATURE_LEN:
            raise ValueError(f"a HOLDINGS signature has {HOLDINGS_SIGNATURE_LEN} bytes")
        kind, payload = FrameType.HOLDINGS, _holdings_body(frame) + signature
    else:
        text = frame.message.encode()[:MAX_ERROR_TEXT]
        kind, payload = FrameType.ERROR, struct.pack(">H", frame.code) + text
    if len(payload) + 1 > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEAD.pack(len(payload) + 1, kind) + payload


def encode_entries(serialized: list[bytes]) -> bytes:
    """An ENTRIES frame of entries already serialized (`Entry.serialize`), as `encode` makes
    it: a sender that measured its entries to fill frames does not serialize them twice."""
    parts = [_U32.pack(len(serialized))]
    for data in serialized:
        parts += [_U32.pack(len(data)), data]
    payload = b"".join(parts)
    if len(payload) + 1 > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEAD.pack(len(payload) + 1, FrameType.ENTRIES) + payload


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.view):
            raise FrameError(f"{what}: needs {n} bytes, {len(self.view) - self.pos} left")
        out = bytes(self.view[self.pos : self.pos + n])
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        (value,) = _U32.unpack(self.take(4, what))
        return int(value)

    def vector(self) -> dict[bytes, int]:
        count = self.u32("vector count")
        if count > MAX_VECTOR or count * _VEC_ITEM.size > len(self.view) - self.pos:
            raise FrameError(f"vector claims {count} authors")
        out: dict[bytes, int] = {}
        for _ in range(count):
            author, ts = _VEC_ITEM.unpack(self.take(_VEC_ITEM.size, "vector item"))
            if ts >= 1 << 63:  # timestamps are signed 64-bit nanoseconds everywhere they are stored
                raise FrameError(f"vector timestamp {ts} out of range")
            out[author] = ts
        return out

    def done(self) -> None:
        if self.pos != len(self.view):
            raise FrameError(f"{len(self.view) - self.pos} trailing bytes")


def decode_entry(data: bytes) -> Entry:
    """One entry of an ENTRIES frame; FrameError if it does not decode."""
    try:
        return Entry.deserialize(data)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise FrameError(f"undecodable entry: {type(exc).__name__}: {exc}") from None


def decode(kind: int, payload: bytes, *, defer_entries: bool = False) -> Frame:
    """Decode one frame's payload; raises FrameError on anything malformed. With
    ``defer_entries`` an ENTRIES frame comes as `EncodedEntries`: its entries' bytes, each
    still to be decoded (`decode_entry`), the rest of the frame checked."""
    r = _Reader(payload)
    frame: Frame
    if kind == FrameType.HELLO:
        version = r.take(1, "version")[0]
        if version != PROTOCOL_VERSION:
            raise FrameError(f"protocol version {version}, this node speaks {PROTOCOL_VERSION}")
        frame = Hello(r.take(32, "namespace id"), r.vector(), version)
    elif kind == FrameType.ENTRIES:
        count = r.u32("entry count")
        if count * 4 > len(payload):
            raise FrameError(f"frame claims {count} entries")
        raw = []
        for _ in range(count):
            size = r.u32("entry length")
            if size > MAX_ENTRY_BYTES:
                raise FrameError(f"entry of {size} bytes exceeds {MAX_ENTRY_BYTES}")
            raw.append(r.take(size, "entry"))
        frame = EncodedEntries(raw) if defer_entries else Entries([decode_entry(data) for data in raw])
    elif kind == FrameType.SYNCED:
        frame = Synced(r.vector())
    elif kind == FrameType.HOLDINGS:
        node_id = r.take(32, "node id")
        seq, free, addr_len = struct.unpack(">QQH", r.take(18, "seq, free space, address length"))
        addr = r.take(addr_len, "address")
        count = r.u32("complete count")
        if count * 32 > len(payload):
            raise FrameError(f"holdings claim {count} manifests")
        complete = [r.take(32, "manifest id") for _ in range(count)]
        count = r.u32("partial count")
        if count * 36 > len(payload):
            raise FrameError(f"holdings claim {count} partial manifests")
        partial = []
        for _ in range(count):
            mid = r.take(32, "manifest id")
            partial.append((mid, r.take(r.u32("bitmap length"), "bitmap")))
        frame = HoldingsFrame(node_id, seq, complete, partial, addr, free, r.take(HOLDINGS_SIGNATURE_LEN,
                                                                                  "signature"))
    elif kind == FrameType.ERROR:
        (code,) = struct.unpack(">H", r.take(2, "error code"))
        frame = ErrorFrame(code, r.take(len(payload) - 2, "error text").decode("utf-8", "replace"))
    else:
        raise FrameError(f"unknown frame type {kind}")
    r.done()
    return frame


async def read_frame(stream: Stream, *, rest_within: float | None = None,
                     defer_entries: bool = False) -> Frame | None:
    """The next frame from ``stream``, or None at a clean end of stream.

    Waits for the frame's first byte without a deadline of its own (a live session may be
    quiet for hours); with ``rest_within``, the rest of the frame must arrive within that
    many seconds of it, or FrameError: a peer that stops mid-frame does not hold the
    session for good. Raises FrameError for an oversized or malformed frame (before
    reading its body when the length is out of bounds) and the transport's errors for a
    broken stream. ``defer_entries``: as for `decode`.
    """
    try:
        first = await stream.receive_exactly(1)
    except UnexpectedEOF:
        return None
    with trio.move_on_after(rest_within if rest_within is not None else math.inf) as scope:
        try:
            head = first + await stream.receive_exactly(_HEAD.size - 1)
        except UnexpectedEOF:
            raise FrameError("stream ended inside a frame header") from None
        length, kind = _HEAD.unpack(head)
        if not 1 <= length <= MAX_FRAME:
            raise FrameError(f"frame length {length} out of bounds (1..{MAX_FRAME})")
        try:
            payload = await stream.receive_exactly(length - 1)
        except UnexpectedEOF:
            raise FrameError("stream ended inside a frame") from None
        return decode(kind, payload, defer_entries=defer_entries)
    assert scope.cancelled_caught
    raise FrameError(f"the rest of a frame did not arrive within {rest_within:g} s of its first byte")


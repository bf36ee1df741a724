"""Sync frames: round trips, bounds, and hostile bytes (fuzzed) that must only raise FrameError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixfs.entry import Entry, Kind
from blixfs.frames import (
    MAX_FRAME,
    EncodedEntries,
    Entries,
    ErrorFrame,
    FrameError,
    FrameType,
    Hello,
    Synced,
    decode,
    decode_entry,
    encode,
    encode_entries,
)

A = bytes([1]) * 32


def entry(path: str = "a/b") -> Entry:
    return Entry(path=path, kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=3, mtime_ns=1, ctime_ns=1,
                 author=A, timestamp_ns=5, manifest=bytes(range(32)), seen={A: 4},
                 namespace_sig=bytes(64), author_sig=bytes([7]) * 64)


def split(raw: bytes) -> tuple[int, bytes]:
    length, kind = struct.unpack_from(">IB", raw)
    assert length == len(raw) - 4
    return kind, raw[5:]


@pytest.mark.parametrize("frame", [
    Hello(bytes(range(32)), {A: 9, bytes(32): 1}),
    Entries([entry(), entry("c")]),
    Entries([]),
    Synced({}),
    ErrorFrame(258, "unknown namespace"),
])
def test_round_trip(frame: object) -> None:
    assert decode(*split(encode(frame))) == frame  # type: ignore[arg-type]


def test_test_vector_hello() -> None:
    """The HELLO of docs/protocol.md, byte for byte."""
    raw = encode(Hello(bytes(32), {A: 7}))
    assert raw.hex() == (
        "0000004e" "01" "01" + "00" * 32 + "00000001" + "01" * 32 + "0000000000000007"
    )


@pytest.mark.parametrize(("kind", "payload", "why"), [
    (FrameType.HELLO, b"\x02" + bytes(36), "protocol version"),
    (FrameType.HELLO, b"\x01" + bytes(10), "namespace id"),
    (FrameType.HELLO, b"\x01" + bytes(32) + struct.pack(">I", 0xFFFFFFFF), "vector claims"),
    (FrameType.ENTRIES, struct.pack(">I", 10**9), "claims"),
    (FrameType.ENTRIES, struct.pack(">II", 1, 600_000), "exceeds"),
    (FrameType.ENTRIES, struct.pack(">II", 1, 4) + b"nope", "undecodable entry"),
    (FrameType.ENTRIES, struct.pack(">II", 1, 2) + b"[]", "undecodable entry"),
    (FrameType.ENTRIES, struct.pack(">II", 1, 2) + b"{}", "undecodable entry"),
    (FrameType.SYNCED, struct.pack(">I", 0) + b"x", "trailing"),
    (99, b"", "unknown frame type"),
])
def test_hostile_frames(kind: int, payload: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        decode(kind, payload)


@given(st.integers(0, 255), st.binary(max_size=2000), st.booleans())
def test_decoder_only_raises_frame_error(kind: int, payload: bytes, defer_entries: bool) -> None:
    with contextlib.suppress(FrameError):
        decode(kind, payload, defer_entries=defer_entries)


@given(st.binary(max_size=64), st.integers(0, 2000))
def test_fuzzed_entries_frame(noise: bytes, at: int) -> None:
    raw = bytearray(encode(Entries([entry()]))[5:])
    at %= len(raw)
    raw[at : at + len(noise)] = noise
    with contextlib.suppress(FrameError):
        decode(FrameType.ENTRIES, bytes(raw))
    with contextlib.suppress(FrameError):  # as the sync decodes: the frame now, its entries in workers
        frame = decode(FrameType.ENTRIES, bytes(raw), defer_entries=True)
        assert isinstance(frame, EncodedEntries)
        for data in frame.raw:
            decode_entry(data)


def test_an_entry_too_large_for_a_frame_is_refused_when_encoding() -> None:
    big = entry().evolve(xattrs={"user.x": bytes(MAX_FRAME)})
    with pytest.raises(ValueError):
        encode(Entries([big]))


def test_vector_timestamps_beyond_int64_are_refused() -> None:
    payload = struct.pack(">I", 1) + bytes(32) + struct.pack(">Q", 1 << 63)
    with pytest.raises(FrameError, match="out of range"):
        decode(FrameType.SYNCED, payload)


def test_entries_serialized_beforehand_encode_as_the_entries_do() -> None:
    """The sync sender serializes each entry once (to fill frames) and encodes those bytes."""
    entries = [entry(), entry("c"), entry("d/e")]
    raw = encode_entries([e.serialize() for e in entries])
    assert raw == encode(Entries(entries))
    assert encode_entries([]) == encode(Entries([]))


def test_an_entries_frame_decoded_later_gives_the_bytes_sent_and_the_same_entries() -> None:
    """`decode(..., defer_entries=True)`: what the sync hands its worker processes."""
    entries = [entry(), entry("c"), entry("d/e")]
    wire = encode(Entries(entries))
    frame = decode(*split(wire), defer_entries=True)
    assert frame == EncodedEntries([e.serialize() for e in entries])
    assert [decode_entry(data) for data in frame.raw] == entries
    assert encode(frame) == wire
    assert decode(*split(wire), defer_entries=False) == Entries(entries)


def test_a_deferred_entries_frame_still_checks_its_bounds() -> None:
    with pytest.raises(FrameError, match="claims"):
        decode(FrameType.ENTRIES, struct.pack(">I", 1 << 30), defer_entries=True)
    with pytest.raises(FrameError, match="trailing"):
        decode(FrameType.ENTRIES, encode(Entries([entry()]))[5:] + b"x", defer_entries=True)

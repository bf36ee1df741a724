"""Manifests and fixed-size chunking: layout, holes, encoding, and hostile input (roots;
trees of pages are in test_manifest_tree.py)."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixfs.hashing import HOLE, chunk_id, content_id, is_zero
from blixfs.manifest import LEGACY_MAGIC, Manifest, ManifestError, chunk_count, chunk_length

CS = 64 * 1024


def test_layout_of_a_file_that_ends_mid_chunk() -> None:
    size = 3 * CS + 100
    assert chunk_count(size, CS) == 4
    assert [chunk_length(i, size, CS) for i in range(5)] == [CS, CS, CS, 100, 0]


def test_zero_chunks_are_holes_and_take_no_storage() -> None:
    data = os.urandom(CS) + bytes(2 * CS) + os.urandom(10)
    m, chunks = Manifest.of_bytes(data, CS)
    assert m.ids[1] == m.ids[2] == HOLE
    assert set(chunks) == {m.ids[0], m.ids[3]}
    assert m.stored_bytes() == CS + 10


def test_overwriting_4k_changes_exactly_one_chunk() -> None:
    data = bytearray(os.urandom(16 * CS))
    before, _ = Manifest.of_bytes(bytes(data), CS)
    for offset in (0, CS - 2048, 5 * CS + 123, 16 * CS - 4096):
        data[offset : offset + 4096] = os.urandom(4096)
        after, _ = Manifest.of_bytes(bytes(data), CS)
        changed = [i for i, (a, b) in enumerate(zip(before.ids, after.ids, strict=True)) if a != b]
        touched = {offset // CS, (offset + 4095) // CS}
        assert set(changed) == touched
        before = after


def test_repeated_content_dedups_to_one_chunk() -> None:
    block = os.urandom(CS)
    m, chunks = Manifest.of_bytes(block * 10, CS)
    assert len(set(m.ids)) == 1 and len(chunks) == 1


@given(st.integers(0, 5 * CS), st.integers(0, 2**32))
def test_encode_decode_round_trip(size: int, seed: int) -> None:
    ids = [chunk_id(seed.to_bytes(8, "little") + i.to_bytes(4, "little")) if i % 3 else HOLE
           for i in range(chunk_count(size, CS))]
    m = Manifest(size, CS, tuple(ids))  # type: ignore[arg-type]
    assert Manifest.decode(m.encode()) == m
    legacy = Manifest(size, CS, tuple(ids), legacy=True)  # type: ignore[arg-type]
    assert Manifest.decode(legacy.encode()) == legacy and legacy.encode()[:4] == LEGACY_MAGIC


def test_manifest_id_is_content_addressed() -> None:
    m, _ = Manifest.of_bytes(os.urandom(3 * CS), CS)
    assert content_id(m.encode()) == chunk_id(m.encode())
    assert Manifest.decode(m.encode()).encode() == m.encode()


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"", "shorter than its header"),
        (b"XXXX" + bytes(40), "magic"),
        (struct.pack("<4sQII", LEGACY_MAGIC, 10, CS, 1), "cannot hold"),
        (struct.pack("<4sQII", LEGACY_MAGIC, 10, CS, 0xFFFFFFFF), "cannot hold"),
        (struct.pack("<4sQII", LEGACY_MAGIC, 10, CS, 1) + struct.pack("<I32s", 11, bytes(32)), "length"),
        (struct.pack("<4sQII", LEGACY_MAGIC, 2 * CS, CS, 1) + struct.pack("<I32s", CS, bytes(32)),
         "chunks cannot make"),
        (struct.pack("<4sQII", LEGACY_MAGIC, 10, 7, 1) + struct.pack("<I32s", 10, bytes(32)), "chunk size"),
        (struct.pack("<4sQII", LEGACY_MAGIC, 1 << 60, CS, 0), "file size"),
    ],
)
def test_hostile_legacy_manifests_are_rejected(blob: bytes, why: str) -> None:
    with pytest.raises(ManifestError, match=why):
        Manifest.decode(blob)


@given(st.binary(max_size=400))
def test_decoder_never_crashes_on_garbage(blob: bytes) -> None:
    with contextlib.suppress(ManifestError):
        Manifest.decode(blob)


@given(st.binary(max_size=300), st.binary(min_size=1, max_size=3))
def test_decoder_fuzzed_from_valid_prefix(tail: bytes, flip: bytes) -> None:
    m, _ = Manifest.of_bytes(os.urandom(2 * CS + 5), CS)
    raw = bytearray(m.encode() + tail)
    raw[len(flip) % len(raw)] ^= flip[0] or 1
    with contextlib.suppress(ManifestError):
        Manifest.decode(bytes(raw))


def test_is_zero() -> None:
    assert is_zero(b"") and is_zero(bytes(5 << 20)) and is_zero(bytearray(100))
    assert not is_zero(bytes(CS - 1) + b"\x01")
    assert not is_zero(bytes(5 << 20) + b"\x01")

"""Chunk identity: BLAKE3-256 ids, the hole id, and zero detection.

A chunk id is the 32-byte BLAKE3 hash of the chunk's bytes: the same hash an
iroh-blobs node gives the chunk as a raw blob. The all-zero id `HOLE` stands for
a chunk of zeros of any length; such chunks are never stored or sent.
"""

from __future__ import annotations

from typing import NewType

import blake3

ChunkId = NewType("ChunkId", bytes)

ID_LEN = 32
HOLE = ChunkId(bytes(ID_LEN))

# One shared buffer to compare against: `data == _ZEROS[:n]` is a memcmp, far
# faster than scanning in Python, and slicing a memoryview copies nothing.
_ZEROS = memoryview(bytes(4 << 20))


def chunk_id(data: bytes | bytearray | memoryview) -> ChunkId:
    """BLAKE3-256 of ``data``. Single-threaded: chunks are small and callers run many at once."""
    return ChunkId(blake3.blake3(data).digest())


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte of ``data`` is zero (an empty buffer counts as zero)."""
    n = len(data)
    if n <= len(_ZEROS):
        return _ZEROS[:n] == data
    return data.count(0) == n if isinstance(data, bytes | bytearray) else bytes(data).count(0) == n


def content_id(data: bytes | bytearray | memoryview) -> ChunkId:
    """The id a chunk of ``data`` is stored under: `HOLE` for zeros, else its BLAKE3 hash."""
    return HOLE if is_zero(data) else chunk_id(data)


def short(cid: bytes) -> str:
    """A chunk id for log lines: the first 12 hex digits."""
    return cid.hex()[:12]

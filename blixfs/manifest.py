"""Manifests: a file's content as an ordered list of fixed-size chunks.

A manifest is itself content-addressed (stored in the chunk store like any blob)
and encodes, little-endian::

    b"BXM1" | size: u64 | chunk_size: u32 | count: u32 | count x (length: u32, id: 32 bytes)

Chunking is fixed-size (see docs/chunking.md): every chunk but the last is
exactly ``chunk_size`` long, so the chunk holding byte ``off`` is
``off // chunk_size`` and an in-place overwrite changes only the chunks it
touches. Lengths are on the wire anyway so the format stays open to
content-defined chunking; the decoder checks they agree with the layout.
A zero id (`HOLE`) is a run of zeros that is not stored.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from blixfs.errors import FsError
from blixfs.hashing import HOLE, ID_LEN, ChunkId, content_id

MAGIC = b"BXM1"
_HEADER = struct.Struct("<4sQII")
_ITEM = struct.Struct(f"<I{ID_LEN}s")
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
# 16 TiB at the smallest chunk size is far beyond any VM image; a bound keeps a
# hostile manifest from making us allocate without limit.
MAX_FILE_SIZE = 1 << 44
# A manifest is stored as one chunk, and a chunk store holds none larger (chunkstore.MAX_CHUNK_BYTES).
MAX_MANIFEST_BYTES = 16 << 20


class ManifestError(ValueError):
    """A manifest that does not decode or whose fields are inconsistent."""


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a file of ``size`` bytes has."""
    return -(-size // chunk_size)


def max_file_size(chunk_size: int) -> int:
    """The largest file a node can commit at ``chunk_size``: at most MAX_FILE_SIZE, and no more
    chunks than a manifest of MAX_MANIFEST_BYTES lists (466,033: about 114 GiB at 256 KiB
    chunks, 1.8 TiB at 4 MiB). Writes and truncates beyond it fail with EFBIG at once."""
    return min(MAX_FILE_SIZE, (MAX_MANIFEST_BYTES - _HEADER.size) // _ITEM.size * chunk_size)


def check_file_size(size: int, chunk_size: int = MAX_CHUNK_SIZE) -> None:
    """FsError(EFBIG) if a file of ``size`` bytes could never be committed at ``chunk_size``
    (by default: at any chunk size). For writes and truncates, before they change anything:
    else memory grows and the commit fails later, with the data dropped at close."""
    if size > max_file_size(chunk_size):
        raise FsError(errno.EFBIG, f"{size} bytes exceeds the largest file ({max_file_size(chunk_size)} bytes "
                                   f"at {chunk_size // 1024} KiB chunks)")


def chunk_length(index: int, size: int, chunk_size: int) -> int:
    """The length of chunk ``index`` in a file of ``size`` bytes (0 past the end)."""
    start = index * chunk_size
    return max(0, min(chunk_size, size - start))


def _check_layout(size: int, chunk_size: int, count: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(f"chunk size {chunk_size} out of bounds")
    if not 0 <= size <= MAX_FILE_SIZE:
        raise ManifestError(f"file size {size} out of bounds")
    if count != chunk_count(size, chunk_size):
        raise ManifestError(f"{count} chunks cannot make {size} bytes")


@dataclass(frozen=True, slots=True)
class Manifest:
    """The content of one file version. Immutable; `ids[i]` covers bytes [i*chunk_size, ...)."""

    size: int
    chunk_size: int
    ids: tuple[ChunkId, ...]

    def __post_init__(self) -> None:
        _check_layout(self.size, self.chunk_size, len(self.ids))

    def length(self, index: int) -> int:
        return chunk_length(index, self.size, self.chunk_size)

    def stored_bytes(self) -> int:
        """Bytes this version occupies in a chunk store (holes take none)."""
        return sum(self.length(i) for i, cid in enumerate(self.ids) if cid != HOLE)

    def encode(self) -> bytes:
        parts = [_HEADER.pack(MAGIC, self.size, self.chunk_size, len(self.ids))]
        parts.extend(_ITEM.pack(self.length(i), cid) for i, cid in enumerate(self.ids))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Decode and validate; raises `ManifestError` on anything inconsistent."""
        if len(data) < _HEADER.size:
            raise ManifestError("manifest shorter than its header")
        magic, size, chunk_size, count = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ManifestError(f"bad manifest magic {magic!r}")
        if len(data) != _HEADER.size + count * _ITEM.size:
            raise ManifestError(f"manifest of {len(data)} bytes cannot hold {count} chunks")
        _check_layout(size, chunk_size, count)
        ids: list[ChunkId] = []
        for i, (length, cid) in enumerate(_ITEM.iter_unpack(data[_HEADER.size :])):
            if length != chunk_length(i, size, chunk_size):
                raise ManifestError(f"chunk {i} has length {length}, layout says otherwise")
            ids.append(ChunkId(cid))
        return cls(size=size, chunk_size=chunk_size, ids=tuple(ids))

    @classmethod
    def of_bytes(cls, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Manifest, dict[ChunkId, bytes]]:
        """Chunk ``data``; returns the manifest and the non-hole chunks by id (for tests, import)."""
        ids: list[ChunkId] = []
        chunks: dict[ChunkId, bytes] = {}
        for start in range(0, len(data), chunk_size):
            piece = data[start : start + chunk_size]
            cid = content_id(piece)
            ids.append(cid)
            if cid != HOLE:
                chunks[cid] = piece
        return cls(size=len(data), chunk_size=chunk_size, ids=tuple(ids)), chunks


def replace_ids(manifest: Manifest, size: int, ids: Sequence[ChunkId]) -> Manifest:
    """A new version of ``manifest`` with another size and chunk list, same chunk size."""
    return Manifest(size=size, chunk_size=manifest.chunk_size, ids=tuple(ids))

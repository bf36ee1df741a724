"""Manifests: a file's content as a tree of content-addressed pages over fixed-size chunks.

A version's manifest id is the BLAKE3 of its *root*, which encodes, little-endian::

    b"BXM2" | size: u64 | chunk_size: u32 | depth: u8 | count: u32 | count x id(32)

Chunking is fixed-size (see docs/chunking.md): every chunk but the last is exactly
``chunk_size`` long, so the chunk holding byte ``off`` is ``off // chunk_size``, an
in-place overwrite changes only the chunks it touches, and chunk lengths are implied by
the layout (not on the wire). With ``n`` chunks:

* depth 0: the root's entries are the ``n`` chunk ids (files of up to `FANOUT` chunks);
* depth d >= 1: entry k is the id of a *page* of level d-1 covering chunks
  ``[k * _span(d), (k+1) * _span(d))``.

A page encodes ``b"BXP1" | level: u8 | count: u16 | count x id(32)``: level 0 lists
chunk ids, level L lists pages of level L-1, each covering ``FANOUT**L`` chunks. The
zero id (`HOLE`) is a run of zeros (a chunk) or a subtree of zeros (a page) and is
never stored, so a sparse 16 TiB file costs a few pages. ``depth`` is the least that
puts at most FANOUT entries in the root, and every count is exactly what the size and
the position imply: a tree has one encoding, and a page that does not fit its place
(wrong level, wrong count) is `ManifestError`, never wrong data.

Pages live in the chunk store and travel like chunks (GET by id; their holders are the
version's holders). A commit rewrites only the pages on the paths to its changed chunks
(`update`); untouched subtrees stay shared by id between versions.

Roots written by earlier builds (``b"BXM1" | size | chunk_size | count | count x (length
u32, id)``) still decode, as a depth-0 root with any count. Only BXM2 is written.

Pure and synchronous: page bytes come from a ``get(page_id) -> bytes | None`` the caller
provides; a page it does not have raises `MissingPage` (the caller loads it and retries:
see `blixfs.content` and the VFS).
"""

from __future__ import annotations

import bisect
import errno
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from blixfs.errors import FsError
from blixfs.hashing import HOLE, ID_LEN, ChunkId, content_id

MAGIC = b"BXM2"
LEGACY_MAGIC = b"BXM1"
PAGE_MAGIC = b"BXP1"
_ROOT = struct.Struct("<4sQIBI")
_PAGE = struct.Struct("<4sBH")
_LEGACY_HEADER = struct.Struct("<4sQII")
_LEGACY_ITEM = struct.Struct(f"<I{ID_LEN}s")
FANOUT = 512  # ids per page: 16 KiB pages
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
# 16 TiB, at every chunk size: a bound keeps a hostile root from making us walk without limit.
MAX_FILE_SIZE = 1 << 44
MAX_DEPTH = 4  # 2**32 chunks of 4 KiB need depth 3
# A legacy (BXM1) manifest was stored as one chunk, and a store holds none larger (chunkstore.MAX_CHUNK_BYTES).
MAX_MANIFEST_BYTES = 16 << 20
PAGE_BYTES = _PAGE.size + FANOUT * ID_LEN

PageGet = Callable[[ChunkId], "bytes | None"]


class ManifestError(ValueError):
    """A root or page that does not decode, or whose fields do not fit their place."""


class MissingPage(Exception):
    """A page the walk needs is not in the caller's page source: load ``pid`` and retry."""

    def __init__(self, pid: ChunkId, level: int, start: int) -> None:
        super().__init__(f"page {pid.hex()[:12]} (level {level}, chunk {start}) is not loaded")
        self.pid, self.level, self.start = pid, level, start


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a file of ``size`` bytes has."""
    return -(-size // chunk_size)


def max_file_size(chunk_size: int) -> int:
    """The largest file a node can commit: MAX_FILE_SIZE (16 TiB) at every chunk size."""
    del chunk_size  # a tree of pages has room for MAX_FILE_SIZE at any chunk size
    return MAX_FILE_SIZE


def check_file_size(size: int, chunk_size: int = MAX_CHUNK_SIZE) -> None:
    """FsError(EFBIG) if a file of ``size`` bytes could never be committed at ``chunk_size``.
    For writes and truncates, before they change anything."""
    if size > max_file_size(chunk_size):
        raise FsError(errno.EFBIG, f"{size} bytes exceeds the largest file ({max_file_size(chunk_size)} bytes)")


def chunk_length(index: int, size: int, chunk_size: int) -> int:
    """The length of chunk ``index`` in a file of ``size`` bytes (0 past the end)."""
    start = index * chunk_size
    return max(0, min(chunk_size, size - start))


def _span(level: int) -> int:
    """Chunks one entry covers in a page of ``level`` (FANOUT**level)."""
    return int(FANOUT**level)


def tree_depth(count: int) -> int:
    """The least depth whose root lists at most FANOUT entries for ``count`` chunks."""
    depth, cover = 0, FANOUT
    while count > cover:
        depth, cover = depth + 1, cover * FANOUT
    return depth


def page_count(level: int, start: int, n: int) -> int:
    """Entries of the page of ``level`` starting at chunk ``start`` in a tree of ``n`` chunks."""
    return -(-min(_span(level + 1), n - start) // _span(level))


def encode_page(level: int, ids: list[ChunkId]) -> bytes:
    assert 0 < len(ids) <= FANOUT and 0 <= level < MAX_DEPTH
    return _PAGE.pack(PAGE_MAGIC, level, len(ids)) + b"".join(ids)


def check_page(raw: bytes, level: int, count: int) -> bytes:
    """The ids area of page ``raw``, checked to be a page of ``level`` with ``count`` entries
    (what its place in the tree implies); `ManifestError` otherwise."""
    _check_page(raw, level, count)
    return raw[_PAGE.size :]


def _check_page(raw: bytes, level: int, count: int) -> None:
    """`check_page` without the copy of its ids (16 KiB): for `lookup`, which takes one."""
    if len(raw) < _PAGE.size:
        raise ManifestError("page shorter than its header")
    magic, lvl, cnt = _PAGE.unpack_from(raw)
    if magic != PAGE_MAGIC:
        raise ManifestError(f"bad page magic {magic!r}")
    if lvl != level or cnt != count:
        raise ManifestError(f"page of level {lvl} with {cnt} entries where level {level} with {count} belongs")
    if len(raw) != _PAGE.size + cnt * ID_LEN:
        raise ManifestError(f"page of {len(raw)} bytes cannot hold {cnt} ids")


def _at(ids: bytes, k: int) -> ChunkId:
    return ChunkId(ids[k * ID_LEN : (k + 1) * ID_LEN])


def _check_layout(size: int, chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(f"chunk size {chunk_size} out of bounds")
    if not 0 <= size <= MAX_FILE_SIZE:
        raise ManifestError(f"file size {size} out of bounds")


@dataclass(frozen=True, slots=True)
class Manifest:
    """The root of one file version. Immutable. ``entries`` are chunk ids (depth 0) or page
    ids of level depth-1; ``legacy``: decoded from BXM1 (depth 0, any count)."""

    size: int
    chunk_size: int
    entries: tuple[ChunkId, ...]
    depth: int = 0
    legacy: bool = False

    def __post_init__(self) -> None:
        _check_layout(self.size, self.chunk_size)
        n = self.count
        if self.legacy:
            if self.depth != 0 or len(self.entries) != n:
                raise ManifestError(f"{len(self.entries)} chunks cannot make {self.size} bytes")
            return
        if self.depth != tree_depth(n):
            raise ManifestError(f"depth {self.depth} for {n} chunks (must be {tree_depth(n)})")
        if len(self.entries) != -(-n // _span(self.depth)):
            raise ManifestError(f"{len(self.entries)} root entries cannot make {self.size} bytes at depth {self.depth}")

    @property
    def count(self) -> int:
        """How many chunks the file has."""
        return chunk_count(self.size, self.chunk_size)

    @property
    def ids(self) -> tuple[ChunkId, ...]:
        """The chunk ids of a depth-0 manifest (tests and small files); ValueError for a tree."""
        if self.depth:
            raise ValueError("a manifest tree has no flat id list: walk it (iter_chunks, lookup)")
        return self.entries

    def length(self, index: int) -> int:
        return chunk_length(index, self.size, self.chunk_size)

    def stored_bytes(self) -> int | None:
        """Bytes this version's chunks occupy (holes take none); None for a tree (its pages
        would have to be read): the caller estimates."""
        if self.depth:
            return None
        return sum(self.length(i) for i, cid in enumerate(self.entries) if cid != HOLE)

    def encode(self) -> bytes:
        if self.legacy:
            parts = [_LEGACY_HEADER.pack(LEGACY_MAGIC, self.size, self.chunk_size, len(self.entries))]
            parts.extend(_LEGACY_ITEM.pack(self.length(i), cid) for i, cid in enumerate(self.entries))
            return b"".join(parts)
        return _ROOT.pack(MAGIC, self.size, self.chunk_size, self.depth, len(self.entries)) + b"".join(self.entries)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Decode and validate a root (BXM2, or a legacy BXM1); `ManifestError` on anything inconsistent."""
        if data[:4] == LEGACY_MAGIC:
            return cls._decode_legacy(data)
        if len(data) < _ROOT.size:
            raise ManifestError("manifest shorter than its header")
        magic, size, chunk_size, depth, count = _ROOT.unpack_from(data)
        if magic != MAGIC:
            raise ManifestError(f"bad manifest magic {magic!r}")
        if count > FANOUT or len(data) != _ROOT.size + count * ID_LEN:
            raise ManifestError(f"manifest of {len(data)} bytes cannot hold {count} entries")
        body = data[_ROOT.size :]
        return cls(size=size, chunk_size=chunk_size, depth=depth,
                   entries=tuple(_at(body, k) for k in range(count)))

    @classmethod
    def _decode_legacy(cls, data: bytes) -> Manifest:
        if len(data) < _LEGACY_HEADER.size:
            raise ManifestError("manifest shorter than its header")
        _, size, chunk_size, count = _LEGACY_HEADER.unpack_from(data)
        if len(data) != _LEGACY_HEADER.size + count * _LEGACY_ITEM.size:
            raise ManifestError(f"manifest of {len(data)} bytes cannot hold {count} chunks")
        _check_layout(size, chunk_size)
        if count != chunk_count(size, chunk_size):
            raise ManifestError(f"{count} chunks cannot make {size} bytes")
        ids: list[ChunkId] = []
        for i, (length, cid) in enumerate(_LEGACY_ITEM.iter_unpack(data[_LEGACY_HEADER.size :])):
            if length != chunk_length(i, size, chunk_size):
                raise ManifestError(f"chunk {i} has length {length}, layout says otherwise")
            ids.append(ChunkId(cid))
        return cls(size=size, chunk_size=chunk_size, entries=tuple(ids), legacy=True)

    @classmethod
    def empty(cls, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Manifest:
        return cls(size=0, chunk_size=chunk_size, entries=())

    @classmethod
    def of_bytes(cls, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Manifest, dict[ChunkId, bytes]]:
        """Chunk ``data``; returns the root and the blobs to store by id: the non-hole chunks
        and the pages (for tests, import)."""
        changes: dict[int, ChunkId] = {}
        blobs: dict[ChunkId, bytes] = {}
        for i, start in enumerate(range(0, len(data), chunk_size)):
            piece = data[start : start + chunk_size]
            cid = content_id(piece)
            changes[i] = cid
            if cid != HOLE:
                blobs[cid] = piece
        root, pages = update(cls.empty(chunk_size), _no_pages, changes, len(data))
        blobs.update(pages)
        return root, blobs


def _no_pages(pid: ChunkId) -> bytes | None:
    return None


def _load(get: PageGet, pid: ChunkId, level: int, start: int, n: int) -> bytes:
    raw = get(pid)
    if raw is None:
        raise MissingPage(pid, level, start)
    return check_page(raw, level, page_count(level, start, n))


def lookup(root: Manifest, get: PageGet, index: int) -> ChunkId:
    """The chunk id at ``index`` (< root.count). `MissingPage` if a page on its path is not
    given by ``get``; `ManifestError` if one does not fit its place."""
    if root.depth == 0:
        return root.entries[index]
    n, span = root.count, _span(root.depth)
    k = index // span
    pid, level, start = root.entries[k], root.depth - 1, k * span
    while pid != HOLE:
        # Every read of a file of more than FANOUT chunks comes here: check the page, then
        # take the one id from it in place (not a copy of its 16 KiB of ids first).
        raw = get(pid)
        if raw is None:
            raise MissingPage(pid, level, start)
        _check_page(raw, level, page_count(level, start, n))
        step = _span(level)
        j = (index - start) // step
        at = _PAGE.size + j * ID_LEN
        pid, start = ChunkId(raw[at : at + ID_LEN]), start + j * step
        if level == 0:
            return pid
        level -= 1
    return HOLE


def path_pages(root: Manifest, get: PageGet, index: int) -> list[tuple[ChunkId, bytes]]:
    """The pages (id, bytes) on the path from the root to chunk ``index`` (< root.count),
    stopping at a hole subtree: what `update` reads to change that chunk. `MissingPage`."""
    if root.depth == 0:
        return []
    out: list[tuple[ChunkId, bytes]] = []
    n, span = root.count, _span(root.depth)
    k = index // span
    pid, level, start = root.entries[k], root.depth - 1, k * span
    while pid != HOLE:
        raw = get(pid)
        if raw is None:
            raise MissingPage(pid, level, start)
        ids = check_page(raw, level, page_count(level, start, n))
        out.append((pid, raw))
        if level == 0:
            break
        step = _span(level)
        j = (index - start) // step
        pid, start, level = _at(ids, j), start + j * step, level - 1
    return out


def page_at(root: Manifest, get: PageGet, level: int, start: int) -> ChunkId | None:
    """The id of the page of ``level`` starting at chunk ``start`` (a multiple of
    FANOUT**(level+1)); HOLE inside a hole subtree; None if the tree has no such page."""
    if level >= root.depth or start >= root.count:
        return None
    n, span = root.count, _span(root.depth)
    k = start // span
    pid, lvl, s = root.entries[k], root.depth - 1, k * span
    while lvl > level and pid != HOLE:
        ids = _load(get, pid, lvl, s, n)
        step = _span(lvl)
        j = (start - s) // step
        pid, s, lvl = _at(ids, j), s + j * step, lvl - 1
    return pid


def iter_tree(root: Manifest, get: PageGet, on_missing: Callable[[MissingPage], None] | None = None,
              *, chunks: bool = True) -> Iterator[tuple[int, int, ChunkId]]:
    """Every non-hole node, page by page, in order: (level, first chunk, id), level -1 for a
    chunk. HOLE subtrees are skipped. A page ``get`` does not give raises `MissingPage`, or
    with ``on_missing`` is reported there and its subtree skipped (yielded as a page still).
    ``chunks=False``: pages only (level-0 pages are yielded, not read)."""
    n = root.count
    if root.depth == 0:
        for i, cid in enumerate(root.entries):
            if cid != HOLE:
                yield -1, i, cid
        return
    span = _span(root.depth)
    stack = [(root.depth - 1, k * span, pid) for k, pid in reversed(list(enumerate(root.entries))) if pid != HOLE]
    while stack:
        level, start, pid = stack.pop()
        yield level, start, pid
        if level == 0 and not chunks:
            continue
        try:
            ids = _load(get, pid, level, start, n)
        except MissingPage as exc:
            if on_missing is None:
                raise
            on_missing(exc)
            continue
        step = _span(level)
        count = len(ids) // ID_LEN
        if level == 0:
            for j in range(count):
                cid = _at(ids, j)
                if cid != HOLE:
                    yield -1, start + j, cid
        else:
            stack.extend((level - 1, start + j * step, _at(ids, j)) for j in reversed(range(count))
                         if ids[j * ID_LEN : (j + 1) * ID_LEN] != HOLE)


def iter_chunks(root: Manifest, get: PageGet) -> Iterator[tuple[int, ChunkId]]:
    """(index, id) of every non-hole chunk, in order, reading pages as it goes (`MissingPage`)."""
    for level, start, cid in iter_tree(root, get):
        if level < 0:
            yield start, cid


def update(root: Manifest, get: PageGet, changes: Mapping[int, ChunkId], size: int,
           limit: int | None = None) -> tuple[Manifest, dict[ChunkId, bytes]]:
    """The root of a new version of ``root`` and the pages it adds (id -> bytes).

    The new version has ``size`` bytes; chunk i is ``changes[i]`` if given, else the old
    chunk i if ``i < limit`` (default: every old chunk; a truncate below the old end and
    back sets it), else a hole. Only pages on the paths to changed chunks, and those a
    resize cuts or grows, are built; every other subtree is the old one, shared by id.
    Needs the old pages on those paths: `MissingPage` names the next one (load, retry)."""
    _check_layout(size, root.chunk_size)
    cs, n_old = root.chunk_size, root.count
    eff = n_old if limit is None else max(0, min(limit, n_old))
    n = chunk_count(size, cs)
    keys = sorted(i for i in changes if 0 <= i < n)
    pages: dict[ChunkId, bytes] = {}

    def changed(lo: int, hi: int) -> bool:
        at = bisect.bisect_left(keys, lo)
        return at < len(keys) and keys[at] < hi

    def old_id(i: int) -> ChunkId:
        return lookup(root, get, i) if i < eff else HOLE

    def build(level: int, start: int, old: ChunkId | None) -> ChunkId:
        """The new subtree of ``level`` at ``start``; ``old`` is the old tree's page there
        (None: the old tree has none), so each old page is read once, from its parent."""
        cover = min(_span(level + 1), n - start)
        hi = start + cover
        if start >= eff:
            old = HOLE  # cut by a truncate (or past the old end): holes, whatever the old page said
        if not changed(start, hi):
            if start >= eff or old == HOLE:
                return HOLE  # old chunks there were holes; any past the old end are holes too
            if old is not None and min(_span(level + 1), n_old - start) == cover and hi <= eff:
                return old
        old_ids = _load(get, old, level, start, n_old) if old is not None and old != HOLE else None
        olds = len(old_ids) // ID_LEN if old_ids is not None else 0
        ids: list[ChunkId] = []
        if level == 0:
            for i in range(start, hi):
                if i in changes:
                    ids.append(changes[i])
                elif i >= eff or old == HOLE:
                    ids.append(HOLE)
                elif old_ids is not None:
                    ids.append(_at(old_ids, i - start) if i - start < olds else HOLE)
                else:
                    ids.append(old_id(i))
        else:
            step = _span(level)
            for j, s in enumerate(range(start, hi, step)):
                if old_ids is not None:
                    child = _at(old_ids, j) if j < olds else None
                elif old == HOLE:
                    child = HOLE
                else:
                    child = page_at(root, get, level - 1, s)
                ids.append(build(level - 1, s, child))
        if all(c == HOLE for c in ids):
            return HOLE
        raw = encode_page(level, ids)
        pid = content_id(raw)
        pages[pid] = raw
        return pid

    depth = tree_depth(n)
    if depth == 0:
        entries = [changes[i] if i in changes else old_id(i) for i in range(n)]
    else:
        entries = [build(depth - 1, s, page_at(root, get, depth - 1, s)) for s in range(0, n, _span(depth))]
    return Manifest(size=size, chunk_size=cs, entries=tuple(entries), depth=depth), pages


def stored_bytes(root: Manifest, get: PageGet) -> tuple[int, bool]:
    """Bytes the version's chunks occupy (holes none), and whether that is exact: a subtree
    whose page ``get`` does not give counts whole (an upper bound). Streams page by page."""
    n, total, exact = root.count, 0, True
    missing: list[MissingPage] = []
    for level, start, _ in iter_tree(root, get, on_missing=missing.append):
        if level < 0:
            total += chunk_length(start, root.size, root.chunk_size)
    for page in missing:
        exact = False
        end = min(n, page.start + _span(page.level + 1))
        total += min(root.size, end * root.chunk_size) - page.start * root.chunk_size
    return total, exact


def flat(root: Manifest, get: PageGet) -> list[ChunkId]:
    """Every chunk id, holes included (tests and small files only: O(chunks) memory)."""
    out = [HOLE] * root.count
    for i, cid in iter_chunks(root, get):
        out[i] = cid
    return out


def replace_ids(manifest: Manifest, size: int, ids: list[ChunkId] | tuple[ChunkId, ...]) -> Manifest:
    """A new depth-0 version of ``manifest`` with another size and chunk list (tests)."""
    return Manifest(size=size, chunk_size=manifest.chunk_size, entries=tuple(ids))

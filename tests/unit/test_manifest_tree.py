"""Manifest trees (BXM2 roots and BXP1 pages): update against a flat model, sharing of
untouched pages, sparse 16 TiB roots, and hostile roots and pages.

Most properties run with a small FANOUT (monkeypatched) so that deep trees, depth
changes and partial pages appear with a few hundred chunks; one test keeps the real one."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blixfs import manifest as mf
from blixfs.hashing import HOLE, ChunkId, chunk_id, content_id
from blixfs.manifest import (
    MAGIC,
    MAX_FILE_SIZE,
    MIN_CHUNK_SIZE,
    PAGE_MAGIC,
    Manifest,
    ManifestError,
    MissingPage,
    chunk_count,
    flat,
    iter_chunks,
    iter_tree,
    lookup,
    update,
)

CS = MIN_CHUNK_SIZE


@pytest.fixture
def small_fanout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(mf, "FANOUT", 4)
    yield


def cid(n: int) -> ChunkId:
    return chunk_id(n.to_bytes(8, "little"))


class Store:
    def __init__(self) -> None:
        self.pages: dict[ChunkId, bytes] = {}

    def get(self, pid: ChunkId) -> bytes | None:
        return self.pages.get(pid)


def apply(store: Store, root: Manifest, model: list[ChunkId], changes: dict[int, ChunkId], size: int,
          limit: int | None = None) -> tuple[Manifest, list[ChunkId], dict[ChunkId, bytes]]:
    new, pages = update(root, store.get, changes, size, limit)
    store.pages.update(pages)
    n = chunk_count(size, CS)
    keep = len(model) if limit is None else min(limit, len(model))
    expect = [changes.get(i, model[i] if i < keep else HOLE) for i in range(n)]
    assert flat(new, store.get) == expect
    assert Manifest.decode(new.encode()) == new
    return new, expect, pages


ops = st.lists(st.tuples(st.integers(0, 300),  # new chunk count
                         st.lists(st.tuples(st.integers(0, 299), st.integers(0, 6)), max_size=12),
                         st.none() | st.integers(0, 300)), min_size=1, max_size=6)


@given(ops)
@settings(max_examples=150, deadline=None)
def test_update_matches_a_flat_model(monkeypatch_ops: list[tuple[int, list[tuple[int, int]], int | None]]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mf, "FANOUT", 4)
        store = Store()
        root, model = Manifest.empty(CS), []
        for count, writes, limit in monkeypatch_ops:
            changes = {i: (HOLE if v == 0 else cid(v)) for i, v in writes if i < count}
            root, model, _ = apply(store, root, model, changes, count * CS - (CS // 2 if count else 0), limit)
            assert [i for i, _ in iter_chunks(root, store.get)] == [i for i, c in enumerate(model) if c != HOLE]
            for i in range(0, len(model), 7):
                assert lookup(root, store.get, i) == model[i]


def test_a_change_rewrites_only_the_pages_on_its_path(small_fanout: None) -> None:
    store = Store()
    root, model, _ = apply(store, Manifest.empty(CS), [], {i: cid(i + 1) for i in range(200)}, 200 * CS)
    assert root.depth == 3  # 4**3 = 64 < 200 chunks <= 4**4
    new, model, pages = apply(store, root, model, {77: cid(999)}, 200 * CS)
    assert len(pages) == root.depth  # one page per level
    old_nodes = {pid for level, _, pid in iter_tree(root, store.get) if level >= 0}
    new_nodes = {pid for level, _, pid in iter_tree(new, store.get) if level >= 0}
    assert len(new_nodes - old_nodes) == root.depth
    # Growing reuses the whole old tree below the new root's first entry.
    grown, _, pages = apply(store, new, model, {}, 1000 * CS)
    # The new level-3 page above the old root's, and the two partial pages at the old end
    # (chunks 192..199 at levels 1 and 2) that now cover more: nothing else.
    assert grown.depth == 4 and len(pages) == 3
    # A truncate and back within one update: the chunks between are holes.
    cut, _, _ = apply(store, new, model, {150: cid(5)}, 200 * CS, limit=100)
    assert lookup(cut, store.get, 120) == HOLE and lookup(cut, store.get, 99) == model[99]


def test_real_fanout_sparse_16_tib_costs_a_few_pages() -> None:
    store = Store()
    n = MAX_FILE_SIZE // CS
    writes = {0: cid(1), n // 2: cid(2), n - 1: cid(3)}
    root, pages = update(Manifest.empty(CS), store.get, writes, MAX_FILE_SIZE)
    store.pages.update(pages)
    assert root.depth == 3 and len(root.entries) == 32
    assert len(pages) == 3 * 3 and len(root.encode()) < 2048
    assert list(iter_chunks(root, store.get)) == sorted(writes.items())
    again, pages = update(root, store.get, {n // 2 + 1: cid(4)}, MAX_FILE_SIZE)
    assert lookup(again, {**store.pages, **pages}.get, n // 2 + 1) == cid(4)
    assert len(pages) == 3
    with pytest.raises(ManifestError):
        Manifest(MAX_FILE_SIZE + 1, CS, ())


def test_missing_pages_are_named_and_bad_pages_refused(small_fanout: None) -> None:
    store = Store()
    root, _, _ = apply(store, Manifest.empty(CS), [], {i: cid(i + 1) for i in range(20)}, 20 * CS)
    first = root.entries[0]
    with pytest.raises(MissingPage) as missing:
        lookup(root, Store().get, 0)
    assert missing.value.pid == first and missing.value.level == root.depth - 1
    # A page put where another level or count belongs is refused, never read as ids.
    other = next(pid for level, _, pid in iter_tree(root, store.get) if level == 0)
    swapped = Store()
    swapped.pages = dict(store.pages)
    swapped.pages[first] = store.pages[other]
    with pytest.raises(ManifestError, match="belongs"):
        lookup(root, swapped.get, 0)


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (struct.pack("<4sQIBI", MAGIC, 10, CS, 0, 1), "cannot hold"),
        (struct.pack("<4sQIBI", MAGIC, 10, CS, 0, 0xFFFFFFFF), "cannot hold"),
        (struct.pack("<4sQIBI", MAGIC, 10, CS, 1, 1) + bytes(32), "depth"),
        (struct.pack("<4sQIBI", MAGIC, 2 * CS, CS, 0, 1) + bytes(32), "root entries"),
        (struct.pack("<4sQIBI", MAGIC, 1 << 60, CS, 3, 0), "file size"),
        (struct.pack("<4sQIBI", MAGIC, 10, 7, 0, 1) + bytes(32), "chunk size"),
    ],
)
def test_hostile_roots_are_rejected(blob: bytes, why: str) -> None:
    with pytest.raises(ManifestError, match=why):
        Manifest.decode(blob)


@given(st.binary(max_size=200), st.integers(0, 3), st.integers(0, 600))
def test_page_decoder_never_crashes_on_garbage(blob: bytes, level: int, count: int) -> None:
    for raw in (blob, PAGE_MAGIC + blob):
        with contextlib.suppress(ManifestError):
            ids = mf.check_page(raw, level, count)
            assert len(ids) == 32 * count


@given(st.binary(max_size=64), st.integers(1, 40))
@settings(deadline=None)
def test_lookup_over_hostile_pages_is_an_error_or_an_id(blob: bytes, at: int) -> None:
    """Whatever a peer serves as a page, a walk gives an id or ManifestError."""
    root = Manifest(600 * CS, CS, (content_id(blob), HOLE), depth=1)
    for raw in (blob, struct.pack("<4sBH", PAGE_MAGIC, 0, 512) + blob * (16384 // max(1, len(blob)))):
        with contextlib.suppress(ManifestError):
            got = lookup(root, lambda pid, raw=raw: raw, at)  # type: ignore[misc]
            assert len(got) == 32


@given(st.binary(max_size=300), st.binary(min_size=1, max_size=3))
def test_root_decoder_fuzzed_from_a_valid_tree_root(tail: bytes, flip: bytes) -> None:
    root, _ = update(Manifest.empty(CS), lambda pid: None, {0: cid(1), 5000: cid(2)}, 6000 * CS)
    raw = bytearray(root.encode() + tail)
    raw[len(flip) % len(raw)] ^= flip[0] or 1
    with contextlib.suppress(ManifestError):
        Manifest.decode(bytes(raw))

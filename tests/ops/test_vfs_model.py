"""The VFS against a bytearray model: random writes, truncates, reads, flushes and reopens."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blixfs import manifest
from blixfs import vfs as vfs_module
from blixfs.chunkstore import ChunkStore, DiskChunkStore, MemoryChunkStore
from blixfs.hashing import HOLE
from blixfs.manifest import MIN_CHUNK_SIZE
from blixfs.vfs import ROOT_INO, Vfs
from tests.helpers import make_replica

CS = MIN_CHUNK_SIZE
MAX = 12 * CS

offsets = st.integers(0, MAX)
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 3 * CS), st.sampled_from(["rand", "zero"])),
        st.tuples(st.just("truncate"), offsets),
        st.tuples(st.just("read"), offsets, st.integers(0, 3 * CS)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_strategy, st.randoms(use_true_random=False))
def test_vfs_matches_a_bytearray(ops: list[tuple[object, ...]], rnd: object) -> None:
    import trio

    trio.run(_run, ops)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops_strategy)
def test_vfs_over_manifest_trees_matches_a_bytearray(ops: list[tuple[object, ...]]) -> None:
    """The same with pages of 2 ids: 12 chunks make a tree of depth 3, so writes, truncates
    and reopens cross pages, grow and shrink the tree, and commit only touched pages."""
    import trio

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest, "FANOUT", 2)
        mp.setattr(vfs_module, "FANOUT", 2)
        trio.run(_run, ops)


BLOCK = 1024  # PATCH_BLOCK in the patch test: 4 blocks per chunk
blocks = st.integers(0, MAX // BLOCK).map(lambda b: b * BLOCK)
patch_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.one_of(blocks, offsets),
                  st.one_of(st.integers(1, 6).map(lambda b: b * BLOCK), st.integers(1, 2 * CS)),
                  st.sampled_from(["rand", "zero"])),
        st.tuples(st.just("truncate"), st.one_of(blocks, offsets)),
        st.tuples(st.just("read"), offsets, st.integers(0, 3 * CS)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patch_ops)
def test_vfs_with_written_blocks_kept_as_patches_matches_a_bytearray(ops: list[tuple[object, ...]]) -> None:
    """Writes of whole blocks into clean chunks are kept as patches (the base not loaded):
    mixed with unaligned writes into the same chunks, truncates that cut or grow them,
    reads that overlay them, spills and commits that make them whole, over trees of depth 3."""
    import trio

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vfs_module, "PATCH_BLOCK", BLOCK)
        mp.setattr(manifest, "FANOUT", 2)
        mp.setattr(vfs_module, "FANOUT", 2)
        # Stored content first (written, flushed): later writes within it can be patches.
        trio.run(_run, [("write", 0, MAX, "rand"), ("flush",), *ops])


def test_block_writes_into_stored_chunks_are_patches_and_read_back() -> None:
    """Deterministic: most writes of whole blocks into stored chunks are kept as patches (the
    property above cannot say how many were), and the file reads back exactly, before and
    after the commit that makes them whole."""
    import random

    import trio

    rnd = random.Random(1)
    ops: list[tuple[object, ...]] = [("write", 0, MAX, "rand"), ("flush",)]
    for i in range(300):
        off = rnd.randrange(MAX // BLOCK) * BLOCK if rnd.random() < 0.7 else rnd.randrange(MAX)
        n = min(rnd.choice([BLOCK, 2 * BLOCK, 3 * BLOCK, 100, 5000]), MAX - off)
        if n > 0:
            ops.append(("write", off, n, "rand"))
        ops.append(("read", rnd.randrange(MAX), rnd.randrange(3 * CS)))
        if i % 37 == 0:
            ops.append(("flush",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vfs_module, "PATCH_BLOCK", BLOCK)
        assert trio.run(_run, ops) >= 100


def test_range_reads_of_the_disk_store_match_a_bytearray(tmp_path: Path) -> None:
    """Small reads of stored chunks go to `DiskChunkStore.read_range` (block-checked ranges
    through kept-open fds): between patches, unaligned writes, truncates and commits that
    change which chunks the file is made of, and reads again of the same blocks, every
    read is the model's bytes. (The reader's memory of whole chunks is emptied before each
    read, so each one reaches the store.)"""
    import trio

    cs = 64 * 1024  # 4 blocks of the store's 16 KiB
    block_ops = st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(0, 8 * cs // 4096).map(lambda b: b * 4096),
                      st.sampled_from([4096, 8192, 3000]), st.sampled_from(["rand", "zero"])),
            st.tuples(st.just("truncate"), st.integers(0, 8 * cs)),
            st.tuples(st.just("read"), st.integers(0, 8 * cs), st.integers(0, 9000)),
            st.tuples(st.just("read"), st.integers(0, 8 * cs // 4096).map(lambda b: b * 4096), st.just(4096)),
            st.tuples(st.just("flush")),
            st.tuples(st.just("reopen")),
        ),
        max_size=40,
    )

    store = DiskChunkStore(tmp_path / "chunks")
    try:
        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(block_ops)
        def check(ops: list[tuple[object, ...]]) -> None:
            trio.run(functools.partial(_run, [("write", 0, 8 * cs, "rand"), ("flush",), *ops], store=store, cs=cs,
                                       cold_reads=True))

        check()
    finally:
        store.close()


async def _run(ops: list[tuple[object, ...]], *, store: ChunkStore | None = None, cs: int = CS,
               cold_reads: bool = False) -> int:
    """Runs ``ops`` against the model; returns how many patches the VFS made. ``cold_reads``:
    the reader's memory of whole chunks is emptied before each read."""
    store = store if store is not None else MemoryChunkStore()
    CS = cs  # the module's chunk size unless told
    vfs = Vfs(make_replica(), store, chunk_size=CS, max_dirty_bytes=3 * CS)
    fh, attr = await vfs.create(ROOT_INO, "f", 0o644, os.O_RDWR, 0, 0)
    ino = attr.ino
    model = bytearray()
    for op in ops:
        kind = op[0]
        if kind == "write":
            _, off, n, how = op
            assert isinstance(off, int) and isinstance(n, int)
            data = os.urandom(n) if how == "rand" else bytes(n)
            await vfs.write(fh, off, data)
            if len(model) < off:
                model.extend(bytes(off - len(model)))
            model[off : off + n] = data
        elif kind == "truncate":
            size = op[1]
            assert isinstance(size, int)
            await vfs.setattr(ino, size=size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        elif kind == "read":
            _, off, n = op
            assert isinstance(off, int) and isinstance(n, int)
            if cold_reads:
                vfs.content.reader._cache.clear()
            assert await vfs.read(fh, off, n) == bytes(model[off : off + n])
        elif kind == "flush":
            await vfs.flush(fh)
        else:
            await vfs.release(fh)
            fh = await vfs.open(ino, os.O_RDWR)
        assert (await vfs.getattr(ino)).size == len(model)
        for content in vfs._contents.values():  # a chunk is dirty or patched, and the count is right
            assert not content.dirty.keys() & content.patches.keys()
            assert content.patch_bytes == sum(p.nbytes() for p in content.patches.values())
    await vfs.release(fh)
    entry = vfs.namespace.get("f")
    assert entry is not None and entry.size == len(model)
    fh = await vfs.open(ino, os.O_RDONLY)
    assert await vfs.read(fh, 0, len(model) + MAX) == bytes(model)
    if entry.manifest is not None:  # zero chunks are holes: never stored
        m = vfs.content.manifest(entry.manifest)
        assert m is not None
        for i, cid in enumerate(manifest.flat(m, store.get)):
            chunk = bytes(model[i * CS : (i + 1) * CS])
            assert (cid == HOLE) == (chunk == bytes(len(chunk)))
    return vfs.patch_generation

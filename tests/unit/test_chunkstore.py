"""One contract suite for every ChunkStore, plus what only the disk store can get wrong."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from blixfs import metrics
from blixfs.chunkstore import ChunkStore, DiskChunkStore, MemoryChunkStore
from blixfs.hashing import HOLE, chunk_id


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    s: ChunkStore = MemoryChunkStore() if request.param == "memory" else DiskChunkStore(tmp_path / "chunks")
    yield s
    s.close()


def test_put_get_round_trip(store: ChunkStore) -> None:
    data = os.urandom(100_000)
    cid = store.put(data)
    assert cid == chunk_id(data)
    assert store.get(cid) == data
    assert store.has(cid)


async def test_load_returns_what_get_returns(store: ChunkStore) -> None:
    data = os.urandom(300_000)
    cid = store.put(data)
    assert await store.load(cid) == data
    assert await store.load(chunk_id(b"nope")) is None


def test_holes_are_never_stored(store: ChunkStore) -> None:
    assert store.put(bytes(65536)) == HOLE
    assert store.stats().chunks == 0
    assert list(store.ids()) == []


def test_duplicate_put_stores_once(store: ChunkStore) -> None:
    data = os.urandom(5000)
    assert store.put(data) == store.put(data)
    assert store.stats().chunks == 1 and store.stats().bytes == 5000


def test_missing_and_delete(store: ChunkStore) -> None:
    assert store.get(chunk_id(b"nope")) is None
    cid = store.put(b"x" * 10)
    assert store.delete(cid) and not store.delete(cid)
    assert store.get(cid) is None and not store.has(cid)


def test_ids_lists_what_is_stored(store: ChunkStore) -> None:
    put = {store.put(os.urandom(100)) for _ in range(20)}
    assert set(store.ids()) == put
    store.sync()


def _only_file(store: DiskChunkStore) -> Path:
    (cid,) = list(store.ids())
    return store.root / cid.hex()[:2] / cid.hex()


@pytest.mark.parametrize("cached", [0, 1000, "none"])
async def test_load_reads_in_a_worker_what_the_page_cache_does_not_hold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: int | str) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(256 * 1024)
    cid = store.put(data)
    real_preadv = os.preadv
    worker_reads = []

    def preadv(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:  # as the kernel does for pages not in memory
            if cached == "none":
                raise BlockingIOError(errno.EAGAIN, "would block")
            return int(real_preadv(fd, [memoryview(buffers[0])[:cached]], offset, flags))
        worker_reads.append(offset)
        return int(real_preadv(fd, buffers, offset, flags))

    monkeypatch.setattr(os, "preadv", preadv)
    assert await store.load(cid) == data
    assert worker_reads == [0 if cached == "none" else cached]


@pytest.mark.parametrize("via", ["get", "load"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "extend"])
async def test_corrupt_chunk_reads_as_missing_logged_and_counted(
    tmp_path: Path, damage: str, via: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(64 * 1024)
    cid = store.put(data)
    path = _only_file(store)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[5000] ^= 0x40
    elif damage == "truncate":
        raw = raw[:-100]
    elif damage == "empty":
        raw = bytearray()
    else:
        raw += b"\0"
    path.write_bytes(raw)
    before = metrics.counter_value(metrics.chunks_corrupt)
    assert (store.get(cid) if via == "get" else await store.load(cid)) is None
    assert metrics.counter_value(metrics.chunks_corrupt) == before + 1
    assert "corrupt" in caplog.text and cid.hex()[:12] in caplog.text
    assert not path.exists()
    assert store.put(data) == cid and store.get(cid) == data  # can be restored


def test_interrupted_put_leaves_no_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(4096)

    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        store.put(data)
    monkeypatch.undo()
    assert store.get(chunk_id(data)) is None
    assert os.listdir(tmp_path / "c" / "tmp") == []


def test_leftover_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    DiskChunkStore(tmp_path / "c").close()
    (tmp_path / "c" / "tmp" / "half-written").write_bytes(b"partial")
    DiskChunkStore(tmp_path / "c").close()
    assert os.listdir(tmp_path / "c" / "tmp") == []


def test_full_disk_raises_enospc_and_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskChunkStore(tmp_path / "c")

    real_write = os.write

    def full(fd: int, buffers: list[memoryview]) -> int:
        data = b"".join(buffers)
        if len(data) > 100:
            return real_write(fd, data[:100])  # a full disk: first a short write...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the error

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(OSError) as info:
        store.put(os.urandom(1000))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert list(store.ids()) == [] and os.listdir(tmp_path / "c" / "tmp") == []


def test_stats_survive_reopen(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "c")
    for _ in range(3):
        store.put(os.urandom(1000))
    store.close()
    again = DiskChunkStore(tmp_path / "c")
    assert again.stats().chunks == 3 and again.stats().bytes == 3000

"""One contract suite for every ChunkStore, plus what only the disk store can get wrong."""

from __future__ import annotations

import errno
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blixfs import chunkstore, metrics
from blixfs.chunkstore import ChunkStore, DiskChunkStore, MemoryChunkStore, StoreStats
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


def _crash(store: DiskChunkStore) -> None:
    """Drop ``store`` the way a killed daemon does: no clean close (no recency saved, no marker removed)."""
    store._db.close()
    os.close(store._dir_fd)
    for fd in store._marker_fds:  # a dead process's file locks go with it
        os.close(fd)
    store._marker_fds.clear()


def _crash_before_index(store: DiskChunkStore, monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    """A put that dies between the rename of the chunk file and its index row."""
    def die(*args: object) -> None:
        raise SystemExit("simulated crash after rename")

    monkeypatch.setattr(store, "_index", die)
    with pytest.raises(SystemExit):
        store.put(data)
    monkeypatch.undo()


def test_put_indexes_a_chunk_file_a_crash_left_without_its_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(5000)
    _crash_before_index(store, monkeypatch, data)
    assert not store.has(chunk_id(data))
    assert store.put(data) == chunk_id(data)
    assert store.has(chunk_id(data)) and store.stats() == StoreStats(1, 5000)
    store.close()


def test_reopen_after_a_crash_finds_chunk_files_without_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskChunkStore(tmp_path / "c")
    kept = os.urandom(3000)
    store.put(kept)
    data = os.urandom(5000)
    _crash_before_index(store, monkeypatch, data)
    _crash(store)
    again = DiskChunkStore(tmp_path / "c")
    assert again.has(chunk_id(data)) and again.has(chunk_id(kept))
    assert again.stats() == StoreStats(2, 8000) and again.total_bytes == 8000
    assert {cid for cid, _, _ in again.index_rows(0)} == {chunk_id(data), chunk_id(kept)}
    # Found again as data written here: it may be the only copy, so never evicted.
    assert again.evict(0, lambda cid: False) == []
    assert again.get(chunk_id(data)) == data
    again.close()


def test_reopen_after_a_crash_forgets_rows_whose_file_is_gone(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "c")
    cid = store.put(os.urandom(5000))
    _only_file(store).unlink()
    _crash(store)
    again = DiskChunkStore(tmp_path / "c")
    assert not again.has(cid) and again.stats() == StoreStats(0, 0) and again.total_bytes == 0
    again.close()


def test_a_clean_reopen_does_not_scan_the_chunk_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    DiskChunkStore(tmp_path / "c").close()

    def no_scan(*args: object) -> None:
        raise AssertionError("a clean reopen scanned the chunk directories")

    monkeypatch.setattr(DiskChunkStore, "_reconcile", no_scan)
    DiskChunkStore(tmp_path / "c").close()


def test_a_reader_opening_beside_a_live_store_does_not_scan_nor_hide_its_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = DiskChunkStore(tmp_path / "c")
    data = os.urandom(5000)
    _crash_before_index(daemon, monkeypatch, data)
    with monkeypatch.context() as m:
        m.setattr(DiskChunkStore, "_reconcile", lambda self: pytest.fail("scanned beside a live store"))
        DiskChunkStore(tmp_path / "c").close()  # e.g. `blixfs status` while the daemon runs
    _crash(daemon)
    again = DiskChunkStore(tmp_path / "c")
    assert again.has(chunk_id(data))
    again.close()


@pytest.mark.parametrize("via", ["get", "load"])
async def test_a_row_whose_file_is_gone_stops_counting_as_held(
        tmp_path: Path, via: str, caplog: pytest.LogCaptureFixture) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(5000)
    cid = store.put(data)
    _only_file(store).unlink()  # e.g. removed by hand, or a rename lost to a power cut
    assert (store.get(cid) if via == "get" else await store.load(cid)) is None
    assert not store.has(cid) and store.stats() == StoreStats(0, 0) and store.total_bytes == 0
    assert cid.hex()[:12] in caplog.text
    assert store.put(data) == cid and store.has(cid)  # can be restored
    store.close()


def test_a_store_opened_beside_a_live_one_leaves_its_temp_files(tmp_path: Path) -> None:
    daemon = DiskChunkStore(tmp_path / "c")
    (tmp_path / "c" / "tmp" / "being-written").write_bytes(b"partial")  # the daemon mid-put
    DiskChunkStore(tmp_path / "c").close()
    assert os.listdir(tmp_path / "c" / "tmp") == ["being-written"]
    daemon.close()


# ------------------------------------------------------------------ range reads by block

BS = chunkstore.BLOCK_SIZE


def _edges(size: int) -> list[int]:
    """Offsets at and around every block edge of a ``size``-byte chunk, and its ends."""
    out = {0, 1, size - 1, size, size + 1}
    for edge in range(BS, size + BS, BS):
        out |= {edge - 1, edge, edge + 1}
    return sorted(o for o in out if 0 <= o <= size + 1)


def _payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize("size", [1, BS - 1, BS, BS + 1, 3 * BS + 100, 16 * BS])
async def test_range_reads_at_every_block_edge(store: ChunkStore, size: int) -> None:
    data = _payload(size)
    cid = store.put(data)
    edges = _edges(size)
    for offset in edges:
        for end in edges:
            if end < offset:
                continue
            want = data[offset:end]
            assert store.read_range(cid, offset, end - offset) == want, (offset, end)
            assert await store.load_range(cid, offset, end - offset) == want, (offset, end)
    assert store.read_range(cid, 0, size + 100) == data  # past the end: like pread
    assert store.read_range(chunk_id(b"nope"), 0, 10) is None
    assert await store.load_range(chunk_id(b"nope"), 0, 10) is None


def test_range_reads_match_slices(tmp_path: Path) -> None:
    """Any range of any chunk reads as the slice of its bytes, biased to block edges."""
    store = DiskChunkStore(tmp_path / "c")
    try:
        @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.integers(1, 5 * BS + 7), st.data())
        def check(size: int, draw: st.DataObject) -> None:
            data = _payload(size)
            cid = store.put(data)
            point = st.one_of(st.sampled_from(_edges(size)), st.integers(0, size + 2))
            offset = draw.draw(point)
            length = draw.draw(st.one_of(st.integers(0, 2 * BS + 3), st.sampled_from([4096, BS, size])))
            assert store.read_range(cid, offset, length) == data[offset : offset + length]

        check()
    finally:
        store.close()


def test_a_range_read_reads_only_the_blocks_it_covers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(256 * 1024)
    cid = store.put(data)
    spans: list[tuple[int, int]] = []
    real_preadv = os.preadv

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        spans.append((offset, offset + sum(len(b) for b in buffers)))
        return int(real_preadv(fd, buffers, offset, flags))

    monkeypatch.setattr(os, "preadv", preadv)
    assert store.read_range(cid, 5 * 4096, 4096) == data[5 * 4096 : 6 * 4096]
    # One block and its digest, not the chunk (the polled read may ask more than once).
    assert max(end for _, end in spans) - min(start for start, _ in spans) <= BS + 8


@pytest.mark.parametrize("via", ["read_range", "load_range"])
async def test_a_corrupt_block_is_found_by_a_range_read(
        tmp_path: Path, via: str, caplog: pytest.LogCaptureFixture) -> None:
    removed: list[list[bytes]] = []
    store = DiskChunkStore(tmp_path / "c")
    store.hook(chunkstore.StoreHooks(removed=removed.append))
    data = os.urandom(4 * BS)
    cid = store.put(data)
    path = _only_file(store)
    raw = bytearray(path.read_bytes())
    raw[16 + 2 * (BS + 8) + 8 + 100] ^= 0x01  # one bit of block 2's payload
    path.write_bytes(raw)
    before = metrics.counter_value(metrics.chunks_corrupt)

    async def read(offset: int, length: int) -> bytes | None:
        if via == "read_range":
            return store.read_range(cid, offset, length)
        return await store.load_range(cid, offset, length)

    assert await read(0, 4096) == data[:4096]  # block 0 is intact and checked: served
    assert await read(2 * BS + 4096, 4096) is None  # block 2 is not: the chunk reads as missing
    assert metrics.counter_value(metrics.chunks_corrupt) == before + 1
    assert "corrupt" in caplog.text and cid.hex()[:12] in caplog.text
    assert not path.exists() and not store.has(cid) and removed == [[cid]]
    assert await read(0, 4096) is None
    assert store.put(data) == cid and store.read_range(cid, 2 * BS, 10) == data[2 * BS : 2 * BS + 10]


@pytest.mark.parametrize("damage", ["truncate", "digest", "header"])
def test_range_reads_of_damaged_files_never_return_unchecked_bytes(tmp_path: Path, damage: str) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(3 * BS)
    cid = store.put(data)
    path = _only_file(store)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: 16 + 2 * (BS + 8) + 8 + 10]  # block 2 torn
    elif damage == "digest":
        raw[16 + (BS + 8)] ^= 0x80  # block 1's digest
    else:
        raw[6] ^= 0x01  # the length in the header: whole reads see it, range reads do not need it
    path.write_bytes(raw)
    got = [store.read_range(cid, off, 100) for off in (0, BS, 2 * BS)]
    for off, part in zip((0, BS, 2 * BS), got, strict=True):
        assert part is None or part == data[off : off + 100]
    assert None in got or damage == "header"
    assert store.get(cid) is None and not path.exists()  # the whole read always finds it


def _write_v1(path: Path, data: bytes) -> None:
    header = struct.pack("<4sIQ", b"BXC1", len(data), xxhash.xxh3_64_intdigest(data))
    path.write_bytes(header + data)


async def test_bxc1_files_still_read_and_are_rewritten_by_block(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(100_000)
    cid = store.put(data)
    path = _only_file(store)
    _write_v1(path, data)  # as a store from before blocks wrote it
    assert store.get(cid) == data and await store.load(cid) == data
    assert path.read_bytes()[:4] == b"BXC1"  # whole reads leave it as it is
    assert store.read_range(cid, 70_000, 5000) == data[70_000:75_000]
    assert path.read_bytes()[:4] == b"BXC2"  # the first range read rewrote it
    assert store.read_range(cid, 1, 99_999) == data[1:] and store.get(cid) == data
    _write_v1(path, data)
    assert await store.load_range(cid, 99_990, 100) == data[99_990:]
    assert path.read_bytes()[:4] == b"BXC2"


def test_a_corrupt_bxc1_file_reads_as_missing(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(50_000)
    cid = store.put(data)
    path = _only_file(store)
    _write_v1(path, data)
    raw = bytearray(path.read_bytes())
    raw[30_000] ^= 0x10
    path.write_bytes(raw)
    assert store.read_range(cid, 0, 10) is None and not path.exists()


def test_bxc1_files_are_indexed_after_a_crash(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(20_000)
    cid = store.put(data)
    _write_v1(_only_file(store), data)
    store._db.execute("DELETE FROM chunks")  # as if the crash came between rename and index
    _crash(store)
    again = DiskChunkStore(tmp_path / "c")
    assert again.has(cid) and again.stats().bytes == 20_000
    assert again.read_range(cid, 19_000, 2000) == data[19_000:]


def test_a_range_read_of_a_chunk_another_store_wrote_reads_its_header(tmp_path: Path) -> None:
    reader = DiskChunkStore(tmp_path / "c")  # its index was loaded before the chunk existed
    writer = DiskChunkStore(tmp_path / "c")
    data = os.urandom(2 * BS + 5)
    cid = writer.put(data)
    assert reader.read_range(cid, BS - 3, 10) == data[BS - 3 : BS + 7]
    writer.close()
    reader.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3 * BS), st.integers(0, 255))
def test_decoding_any_file_gives_its_payload_or_a_problem(junk: bytes, size: int, flip: int) -> None:
    """A chunk file's decoder never crashes and never returns other bytes than were written."""
    data = _payload(size)
    raw = bytearray(b"".join(bytes(p) for p in chunkstore._encode(data)))
    assert chunkstore._decode(raw) == data
    for damaged in (junk, raw[: len(junk)], raw + junk, bytes(raw[:flip]) + bytes([raw[flip] ^ 1]) + raw[flip + 1 :]
                    if flip < len(raw) else junk):
        got = chunkstore._decode(damaged)
        assert isinstance(got, str) or got == data


def test_a_chunk_of_more_blocks_than_one_writev_takes_round_trips(tmp_path: Path) -> None:
    store = DiskChunkStore(tmp_path / "c")
    data = os.urandom(chunkstore.MAX_CHUNK_BYTES)  # a largest manifest
    assert 2 * len(data) // BS + 1 > chunkstore._IOV_MAX  # more parts (digest + block each) than one writev
    cid = store.put(data)
    assert store.get(cid) == data
    assert store.read_range(cid, len(data) - BS - 5, BS + 5) == data[-BS - 5 :]



# Polled range reads (`PolledReads`): the same bytes as pread, however the kernel answers.

class _Kernel:
    """Stands in for os.preadv's RWF_NOWAIT answers: ``script`` says, call by call, "busy"
    (EAGAIN: the disk is reading) or a count of bytes now cached (fewer than asked: a short
    read); once it runs out, the bytes are there. Blocking reads are recorded and served."""

    def __init__(self, script: list[str | int], clock_step: float = 0.0) -> None:
        self.script = list(script)
        self.blocking: list[int] = []
        self.now = 0.0
        self.clock_step = clock_step
        self.real = os.preadv

    def preadv(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT and self.script:
            step = self.script.pop(0)
            if step == "busy":
                raise BlockingIOError(errno.EAGAIN, "would block")
            if step == "refused":
                raise OSError(errno.EOPNOTSUPP, "not supported")
            assert isinstance(step, int)
            return int(self.real(fd, [buffers[0][:step]], offset, 0))
        if not flags & os.RWF_NOWAIT:
            self.blocking.append(offset)
        return int(self.real(fd, buffers, offset, flags & ~os.RWF_NOWAIT))

    def perf_counter(self) -> float:
        self.now += self.clock_step
        return self.now


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.mark.parametrize("script", [[], ["busy"], ["busy"] * 5, [3000, "busy", "busy", 1000]],
                         ids=["cached", "one-poll", "polls", "short-reads"])
def test_a_polled_read_returns_what_pread_returns(
        data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch, script: list[str | int]) -> None:
    fd, _ = data_file
    kernel = _Kernel(script)
    monkeypatch.setattr(os, "preadv", kernel.preadv)
    reads = chunkstore.PolledReads()
    for offset, count in ((1000, 16_392), (99_000, 16_392), (100_000, 10), (0, 100_000)):
        kernel.script = list(script)
        assert bytes(reads.pread(fd, count, offset)) == os.pread(fd, count, offset), (offset, count)
    assert kernel.blocking == []  # every read was answered without sleeping on the disk


def test_a_read_the_disk_is_slow_to_answer_waits_once_the_limit_has_passed(
        data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    fd, data = data_file
    kernel = _Kernel(["busy"] * 1000, clock_step=20e-6)  # each look at the clock: 20 µs later
    monkeypatch.setattr(os, "preadv", kernel.preadv)
    monkeypatch.setattr(chunkstore.time, "perf_counter", kernel.perf_counter)
    reads = chunkstore.PolledReads()
    waited = metrics.counter_value(metrics.range_reads.labels("waited"))
    assert bytes(reads.pread(fd, 5000, 7)) == data[7:5007]
    assert kernel.blocking == [7]
    assert 1000 - len(kernel.script) <= reads.POLL_MAX / 20e-6 + 2  # polled up to the limit, no longer
    assert metrics.counter_value(metrics.range_reads.labels("waited")) == waited + 1


def test_the_polling_limit_adapts_to_the_disk(data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow disk (every read past POLL_MAX) turns polling off; fast ones turn it back on."""
    fd, data = data_file
    kernel = _Kernel([], clock_step=0.0)
    monkeypatch.setattr(os, "preadv", kernel.preadv)
    monkeypatch.setattr(chunkstore.time, "perf_counter", kernel.perf_counter)
    reads = chunkstore.PolledReads()
    limits = []
    for _ in range(6):  # the disk answers after 1 ms: more than POLL_MAX
        kernel.script, kernel.clock_step = ["busy"] * 10_000, 1e-3
        assert bytes(reads.pread(fd, 100, 0)) == data[:100]
        limits.append(reads.limit)
    assert limits[0] < reads.POLL_MAX and limits[-1] == 0.0 and limits == sorted(limits, reverse=True)
    for _ in range(6):  # now it answers after 60 µs (two looks at the clock)
        kernel.script, kernel.clock_step = ["busy"] * 3, 30e-6
        assert bytes(reads.pread(fd, 100, 0)) == data[:100]
    assert reads.limit >= 60e-6  # grown back: such a read is polled again
    kernel.blocking.clear()
    kernel.script, kernel.clock_step = ["busy"] * 2, 30e-6
    reads.pread(fd, 100, 0)
    assert kernel.blocking == []


def test_a_file_system_without_rwf_nowait_reads_by_plain_pread(
        data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fd, data = data_file
    kernel = _Kernel(["refused"])
    monkeypatch.setattr(os, "preadv", kernel.preadv)
    reads = chunkstore.PolledReads()
    caplog.set_level("INFO", logger="blixfs.chunkstore")
    assert bytes(reads.pread(fd, 500, 10)) == data[10:510]
    assert not reads.supported and "RWF_NOWAIT" in caplog.text
    assert bytes(reads.pread(fd, 500, 99_800)) == data[99_800:]


def test_range_reads_of_chunks_out_of_the_page_cache_check_out(tmp_path: Path) -> None:
    """The real kernel: chunk files dropped from the page cache (FADV_DONTNEED) still read
    by range, checked, the same bytes."""
    store = DiskChunkStore(tmp_path / "c")
    chunks = {store.put(d): d for d in (os.urandom(256 * 1024) for _ in range(8))}
    store.sync()
    for cid in chunks:
        fd = os.open(store._path(cid), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    rng = random.Random(3)
    for cid, data in chunks.items():
        for _ in range(4):
            offset = rng.randrange(len(data) - 4096) // 4096 * 4096
            assert store.read_range(cid, offset, 4096) == data[offset : offset + 4096]
    store.close()

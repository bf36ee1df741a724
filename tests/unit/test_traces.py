"""Access traces (blixfs.traces): the record codec, recording bounds, the merge order,
record checks, publishing and inheritance by a later version."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixfs.entry import Entry, Kind
from blixfs.errors import FsError
from blixfs.hashing import HOLE, ChunkId, chunk_id
from blixfs.manifest import lookup
from blixfs.members import Role
from blixfs.replica import NamespaceKeys, check_entry
from blixfs.traces import (
    KEEP_RECORDS,
    MAX_TRACE_CHUNKS,
    RECORD_BYTES,
    RECORD_SECONDS,
    TRACE_XATTR,
    TRACES_DIR,
    Recording,
    Trace,
    TraceError,
    Tracer,
    check_record,
    file_key,
    merge,
    record_entry,
    record_path,
)
from blixfs.vfs import ROOT_INO, Vfs
from tests.helpers import make_replica, make_vfs, write_file

CS = 4096


def _trace(indices: list[int]) -> Trace:
    return Trace(bytes(range(32)), 262144, tuple((i, i.to_bytes(8, "big")) for i in indices), 1234)


# ------------------------------------------------------------------ codec

def test_codec_round_trip_and_size() -> None:
    t = _trace([7, 3, 0, 4095])
    raw = t.encode()
    assert len(raw) == 48 + 4 * 12
    assert Trace.decode(raw) == t
    assert len(_trace(list(range(MAX_TRACE_CHUNKS))).encode()) == 48 + 48 * 1024


@pytest.mark.parametrize("raw, why", [
    (b"", "shorter than its header"),
    (b"XXXX" + bytes(44), "bad magic"),
    (_trace([1, 2]).encode()[:-1], "does not hold"),
    (_trace([1, 2]).encode() + b"\0", "does not hold"),
    (_trace([1, 1]).encode(), "repeated"),
    (replace(_trace([1]), chunk_size=100).encode(), "chunk size"),
    (b"BXT1" + bytes(32) + (262144).to_bytes(4, "big") + bytes(4) + (MAX_TRACE_CHUNKS + 1).to_bytes(4, "big"),
     "at most"),
])
def test_decode_refuses(raw: bytes, why: str) -> None:
    with pytest.raises(TraceError, match=why):
        Trace.decode(raw)


@given(st.binary(max_size=400))
def test_decode_fuzz_raises_only_trace_error(raw: bytes) -> None:
    try:
        t = Trace.decode(raw)
    except TraceError:
        return
    assert t.encode() == raw


@given(st.lists(st.integers(0, 2**32 - 1), max_size=64, unique=True), st.binary(min_size=32, max_size=32),
       st.integers(4096, 1 << 30), st.data())
def test_codec_fuzz_round_trip(indices: list[int], mid: bytes, cs: int, data: st.DataObject) -> None:
    items = tuple((i, data.draw(st.binary(min_size=8, max_size=8))) for i in indices)
    t = Trace(mid, cs, items, data.draw(st.integers(0, 2**32 - 1)))
    raw = t.encode()
    assert Trace.decode(raw) == t
    # Any single-byte change decodes to another valid trace or fails cleanly: never anything else.
    pos = data.draw(st.integers(0, len(raw) - 1))
    mutated = raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1:]
    with contextlib.suppress(TraceError):
        Trace.decode(mutated)


# ------------------------------------------------------------------ recording

def _cid(i: int) -> ChunkId:
    return chunk_id(i.to_bytes(8, "big"))


def test_recording_first_read_order_once_no_holes() -> None:
    rec = Recording("img", bytes(32), CS, started=0.0)
    rec.note([(5, _cid(5), CS), (6, HOLE, CS)], 2 * CS, 1.0)
    rec.note([(2, _cid(2), CS), (5, _cid(5), CS)], 2 * CS, 2.0)
    assert [i for i, _ in rec.items] == [5, 2]
    assert rec.items[0][1] == bytes(_cid(5)[:8])
    assert not rec.done


def test_recording_stops_at_its_bounds() -> None:
    rec = Recording("img", bytes(32), CS, started=0.0)
    rec.note([(1, _cid(1), CS)], CS, RECORD_SECONDS + 1)
    assert rec.done and rec.items == []  # past its minutes: nothing more

    rec = Recording("img", bytes(32), CS, started=0.0)
    rec.note([(1, _cid(1), CS)], RECORD_BYTES, 1.0)
    rec.note([(2, _cid(2), CS)], CS, 1.0)
    assert rec.done and [i for i, _ in rec.items] == [1]  # past its bytes

    rec = Recording("img", bytes(32), CS, started=0.0)
    for i in range(MAX_TRACE_CHUNKS + 10):
        rec.note([(i, _cid(i), CS)], 1, 1.0)
    assert rec.done and len(rec.items) == MAX_TRACE_CHUNKS  # bounded in memory


# ------------------------------------------------------------------ merge

def test_merge_single_trace_keeps_its_order() -> None:
    assert merge([[9, 3, 7, 1]]) == [9, 3, 7, 1]


def test_merge_common_chunks_by_median_position_then_the_rest() -> None:
    a = [1, 2, 3, 4]
    b = [2, 1, 3, 5]
    c = [1, 3, 2, 6, 7]
    # 1: positions 0,1,0 (median 0); 2: 1,0,2 (1); 3: 2,2,1 (2): all three traces.
    # 4, 5, 6, 7 are in one trace each (less than half): after, by median position.
    assert merge([a, b, c]) == [1, 2, 3, 4, 5, 6, 7]
    # a chunk in two traces of three is common; one in one of three is not, even if read first
    assert merge([[8, 1, 2], [1, 2, 9], [2, 1, 9]]) == [1, 2, 9, 8]


def test_merge_bounds_and_empty() -> None:
    assert merge([]) == [] and merge([[], []]) == []
    assert merge([list(range(100))], limit=10) == list(range(10))
    assert merge([[3, 3, 1]]) == [3, 1]


@given(st.lists(st.lists(st.integers(0, 50), max_size=30), max_size=6))
def test_merge_is_a_permutation_of_the_union(traces: list[list[int]]) -> None:
    out = merge(traces)
    assert sorted(out) == sorted({i for t in traces for i in t})


# ------------------------------------------------------------------ records

def test_record_checks() -> None:
    r = make_replica()
    e = r._sign(record_entry(r, "images/a.qcow2", _trace([1, 2])))
    assert e.path == f"{TRACES_DIR}/{file_key('images/a.qcow2')}/{r.author.hex()}" == record_path("images/a.qcow2",
                                                                                                  r.author)
    assert check_record(e) is None and check_entry(e, r.keys.id, time.time_ns()) is None
    other = make_replica(keys=r.keys)
    bad = [
        replace(e, path=f"{TRACES_DIR}/{file_key('x')}/{other.author.hex()}"),  # another node's record
        replace(e, path=TRACES_DIR), replace(e, path=f"{TRACES_DIR}/{file_key('x')}"),
        replace(e, path=f"{TRACES_DIR}/{file_key('x')}/{r.author.hex()}/y"),
        replace(e, kind=Kind.FILE), replace(e, target="x"), replace(e, size=1),
        replace(e, xattrs={TRACE_XATTR: b"garbage"}),
        replace(e, xattrs={TRACE_XATTR: _trace([1]).encode(), "user.other": b""}),
        replace(e, xattrs={TRACE_XATTR: b"BXT1" + bytes(44) + bytes(12 * 10)}),  # count says 0, 10 items follow
    ]
    for b in bad:
        assert check_record(b) is not None, b.path
        assert check_entry(r._sign(b), r.keys.id, time.time_ns()) is not None
    assert check_record(replace(e, deleted=True, xattrs={})) is None  # a withdrawn record


def test_vfs_may_not_write_the_trace_tree() -> None:
    r = make_replica()
    ts = r.stamp(None)
    d = Entry(path=TRACES_DIR, kind=Kind.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
              author=r.author, timestamp_ns=ts)
    with pytest.raises(FsError) as err:
        r.commit_local([d])
    assert err.value.errno == errno.EPERM
    with pytest.raises(FsError):
        r.commit_local([record_entry(r, "a", _trace([1, 2]))])  # only through Tracer.publish


async def test_mkdir_of_the_trace_tree_is_refused() -> None:
    vfs = make_vfs()
    with pytest.raises(FsError) as err:
        await vfs.mkdir(ROOT_INO, TRACES_DIR, 0o755, 0, 0)
    assert err.value.errno == errno.EPERM


# ------------------------------------------------------------------ through the VFS: record, publish, inherit

async def _read_in_order(vfs: Vfs, name: str, chunks: list[int]) -> None:
    ino = (await vfs.lookup(ROOT_INO, name)).ino
    fh = await vfs.open(ino, os.O_RDONLY)
    for i in chunks:
        await vfs.read(fh, i * CS + 100, 64)
    await vfs.release(fh)


def _data(n: int, salt: bytes = b"") -> bytes:
    return b"".join(bytes([i % 251 + 1]) * (CS - 8) + salt.ljust(8, b"-") for i in range(n))


async def test_a_read_trace_is_published_and_a_new_version_inherits_it_by_place() -> None:
    vfs = make_vfs(chunk_size=CS)
    tracer = Tracer(vfs.replica, vfs.content)
    vfs.tracer = tracer
    await write_file(vfs, "img", _data(16))
    e1 = vfs.namespace.get("img")
    assert e1 is not None and e1.manifest is not None
    await _read_in_order(vfs, "img", [5, 2, 9, 0, 2, 5])

    record = vfs.namespace.get(record_path("img", vfs.author))
    assert record is not None and tracer.published == 1
    t = Trace.decode(record.xattrs[TRACE_XATTR])
    assert t.manifest == e1.manifest and [i for i, _ in t.items] == [5, 2, 9, 0]
    root1 = vfs.content.manifest(e1.manifest)
    assert root1 is not None
    assert [i for i, _ in await tracer.plan("img", e1.manifest, root1, e1.author)] == [5, 2, 9, 0]

    # A new version changes chunk 2: it inherits the trace by place, chunk 2 being its own.
    ino = (await vfs.lookup(ROOT_INO, "img")).ino
    vfs.tracer = None  # this write is not a boot: keep the record of the first version as it is
    fh = await vfs.open(ino, os.O_WRONLY)
    await vfs.write(fh, 2 * CS, b"x" * CS)
    await vfs.release(fh)
    e2 = vfs.namespace.get("img")
    assert e2 is not None and e2.manifest is not None and e2.manifest != e1.manifest
    root2 = vfs.content.manifest(e2.manifest)
    assert root2 is not None
    plan = await tracer.plan("img", e2.manifest, root2, e2.author)
    assert [i for i, _ in plan] == [5, 2, 9, 0]
    assert plan[1][1] != lookup(root1, vfs.content.page, 2)  # the new version's chunk 2, not the old one
    assert all(cid == lookup(root2, vfs.content.page, i) for i, cid in plan)  # ids of version 2
    # Items past the version's end are dropped (a trace of a longer version, or a hostile one).
    tracer._local["img"] = (time.time_ns(), Trace(e2.manifest, CS, ((100, bytes(8)), (7, bytes(8)))))
    assert [i for i, _ in await tracer.plan("img", e2.manifest, root2, e2.author)] == [5, 7, 2, 9, 0]
    del tracer._local["img"]
    # A short later read (of any version) does not replace the longer trace.
    vfs.tracer = tracer
    await _read_in_order(vfs, "img", [1])
    assert tracer.published == 1


async def test_places_written_are_traced_after_the_reads_before_them() -> None:
    vfs = make_vfs(chunk_size=CS)
    tracer = Tracer(vfs.replica, vfs.content)
    await write_file(vfs, "img", _data(8))
    vfs.tracer = tracer
    ino = (await vfs.lookup(ROOT_INO, "img")).ino
    fh = await vfs.open(ino, os.O_RDWR)
    await vfs.read(fh, 5 * CS, 10)
    await vfs.write(fh, 9 * CS + 10, b"y" * (CS + 100))  # grows the image into chunks 9 and 10
    await vfs.read(fh, 1 * CS, 10)
    await vfs.write(fh, 5 * CS, b"z" * 10)  # read already: recorded once
    await vfs.release(fh)
    record = vfs.namespace.get(record_path("img", vfs.author))
    assert record is not None
    items = Trace.decode(record.xattrs[TRACE_XATTR]).items
    assert [i for i, _ in items] == [5, 9, 10, 1]
    assert items[1][1] == items[2][1] == bytes(8) and items[0][1] != bytes(8)
    e = vfs.namespace.get("img")
    assert e is not None and e.manifest is not None
    root = vfs.content.manifest(e.manifest)
    assert root is not None  # the version after the writes: the written places map onto it
    assert [i for i, _ in await tracer.plan("img", e.manifest, root, e.author)] == [5, 9, 10, 1]


async def test_a_node_that_may_not_write_keeps_its_trace_local() -> None:
    writer = make_vfs(chunk_size=CS)
    await write_file(writer, "img", _data(8))
    reader_replica = make_replica(keys=NamespaceKeys(writer.replica.keys.id))  # read capability only
    await reader_replica.merge_remote(list(writer.namespace.entries_since({})), "writer")
    reader = Vfs(reader_replica, writer.chunks, chunk_size=CS)
    tracer = Tracer(reader_replica, reader.content)
    reader.tracer = tracer
    await _read_in_order(reader, "img", [3, 1, 4])
    assert tracer.published == 0
    assert reader_replica.store.get(record_path("img", reader_replica.author)) is None
    assert [[i for i, _ in t.items] for t in tracer.records("img")] == [[3, 1, 4]]


async def test_records_of_non_writers_do_not_count() -> None:
    vfs = make_vfs(chunk_size=CS)
    vfs.replica.set_member(vfs.author, Role.ADMIN)
    tracer = Tracer(vfs.replica, vfs.content)
    vfs.tracer = tracer
    await write_file(vfs, "img", _data(8))
    await _read_in_order(vfs, "img", [3, 1])
    assert len(tracer.records("img")) == 1
    other = make_replica(keys=vfs.replica.keys)
    vfs.replica.set_member(other.author, Role.WRITE)
    await other.merge_remote(list(vfs.namespace.entries_since({})), "a")
    other.commit_local([record_entry(other, "img", _trace([1, 2]))], traces=True)
    await vfs.replica.merge_remote(list(other.store.entries_since({})), "b")
    assert len(tracer.records("img")) == 2
    vfs.replica.set_member(other.author, Role.READ)  # demoted: its record no longer counts
    assert len(tracer.records("img")) == 1


async def test_records_are_the_newest_that_decode_and_only_those_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Tracer.records` keeps the `KEEP_RECORDS` newest well-formed records of a file and
    decodes no older one (a popular image has a record per node that ever booted it)."""
    vfs = make_vfs(chunk_size=CS)
    tracer = Tracer(vfs.replica, vfs.content)
    await write_file(vfs, "img", _data(8))
    others = [make_replica(keys=vfs.replica.keys) for _ in range(KEEP_RECORDS + 4)]
    for n, other in enumerate(others):
        other.commit_local([record_entry(other, "img", _trace([n, n + 100]))], traces=True)
        await vfs.replica.merge_remote(list(other.store.entries_since({})), "peer")
    # The newest one held is malformed (it reached the store before a check existed): skipped.
    newest = vfs.namespace.get(record_path("img", others[-1].author))
    assert newest is not None
    broken = replace(newest, xattrs={TRACE_XATTR: b"BXT1 nonsense"}, timestamp_ns=newest.timestamp_ns + 1)
    vfs.namespace.apply([broken])
    assert vfs.namespace.get(broken.path) == broken
    decoded: list[bytes] = []
    real = Trace.decode

    def counted(raw: bytes) -> Trace:
        decoded.append(raw)
        return real(raw)
    monkeypatch.setattr(Trace, "decode", counted)

    got = tracer.records("img")
    assert len(got) == KEEP_RECORDS
    assert sorted(t.items[0][0] for t in got) == list(range(len(others) - 1 - KEEP_RECORDS, len(others) - 1))
    assert len(decoded) == KEEP_RECORDS + 1  # the malformed one, then the 16 kept: no older one

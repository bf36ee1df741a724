"""The write-ahead journal's format: framing, torn tails, bounds, appends that fail."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blixfs import journal as jmod
from blixfs.entry import Entry, Kind
from blixfs.journal import (
    KIND_TRUNCATE,
    MAX_WRITE_DATA,
    Header,
    Journal,
    JournalError,
    Truncate,
    Write,
    decode,
    encode_header,
    encode_truncate,
    encode_write,
    frame,
)

BASE = Entry(path="vm/disk.img", kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=1 << 30, mtime_ns=1, ctime_ns=1,
             author=bytes(32), timestamp_ns=5, manifest=bytes(range(32)), seen={bytes(32): 4})
HEADER = Header("vm/disk.img", 256 * 1024, BASE)


def journal_bytes(records: list[Write | Truncate]) -> bytes:
    out = [encode_header(HEADER)]
    for r in records:
        out += encode_write(r.offset, r.data) if isinstance(r, Write) else [encode_truncate(r.size)]
    return b"".join(out)


RECORDS: list[Write | Truncate] = [Write(0, b"a" * 4096), Truncate(10), Write(1 << 40, b"xyz"), Write(7, b"\0")]


def test_round_trip_keeps_the_header_and_every_record_in_order() -> None:
    header, records = decode(journal_bytes(RECORDS))
    assert header == HEADER and header.base.entry_hash() == BASE.entry_hash()
    assert records == RECORDS


def test_a_long_write_is_split_into_bounded_records_that_replay_to_the_same_bytes() -> None:
    data = os.urandom(2 * MAX_WRITE_DATA + 5)
    _, records = decode(encode_header(HEADER) + b"".join(encode_write(100, data)))
    assert [len(r.data) for r in records if isinstance(r, Write)] == [MAX_WRITE_DATA, MAX_WRITE_DATA, 5]
    image = bytearray(100 + len(data))
    for r in records:
        assert isinstance(r, Write)
        image[r.offset : r.offset + len(r.data)] = r.data
    assert bytes(image[100:]) == data


def test_every_torn_tail_yields_exactly_the_whole_records_before_it() -> None:
    raw = journal_bytes(RECORDS)
    ends = [len(journal_bytes(RECORDS[:n])) for n in range(len(RECORDS) + 1)]
    for cut in range(ends[0], len(raw) + 1):
        _, records = decode(raw[:cut])
        assert records == RECORDS[: sum(1 for e in ends[1:] if e <= cut)]


def test_a_header_that_is_torn_or_damaged_means_nothing_was_acknowledged() -> None:
    raw = journal_bytes(RECORDS)
    with pytest.raises(JournalError):
        decode(raw[:20])
    with pytest.raises(JournalError):
        decode(b"")
    damaged = bytearray(raw)
    damaged[8] ^= 1
    with pytest.raises(JournalError):
        decode(bytes(damaged))
    with pytest.raises(JournalError):  # records without a header
        decode(encode_truncate(3))


def test_a_flipped_bit_stops_the_replay_at_that_record() -> None:
    raw = journal_bytes(RECORDS)
    second = len(journal_bytes(RECORDS[:1]))
    damaged = bytearray(raw)
    damaged[second + 6] ^= 0x40
    assert decode(bytes(damaged))[1] == RECORDS[:1]


def test_well_framed_records_out_of_bounds_end_the_replay() -> None:
    too_far = frame(jmod.KIND_WRITE, (1 << 44).to_bytes(8, "little") + b"x")
    huge_truncate = frame(KIND_TRUNCATE, ((1 << 44) + 1).to_bytes(8, "little"))
    for bad in (too_far, huge_truncate, frame(KIND_TRUNCATE, b"\1"), frame(jmod.KIND_WRITE, b"1234")):
        assert decode(journal_bytes(RECORDS[:1]) + bad + encode_truncate(0))[1] == RECORDS[:1]


def test_a_frame_length_past_the_bound_is_refused_before_reading_it() -> None:
    head = jmod._FRAME.pack(jmod.KIND_WRITE, jmod.MAX_PAYLOAD + 1)
    assert decode(journal_bytes(RECORDS[:2]) + head + b"\0" * 64)[1] == RECORDS[:2]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_fail_with_journal_error(raw: bytes) -> None:
    with contextlib.suppress(JournalError):
        decode(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=4096), st.binary(min_size=1, max_size=8))
def test_garbage_after_or_inside_a_journal_never_yields_a_record_that_was_not_written(
        tail: bytes, at: int, noise: bytes) -> None:
    raw = bytearray(journal_bytes(RECORDS))
    header_len = len(journal_bytes([]))
    at = header_len + at % (len(raw) - header_len)
    raw[at : at + len(noise)] = noise
    _, records = decode(bytes(raw) + tail)
    # Whatever survives is a prefix of what was written (a 64-bit checksum collision aside).
    assert records == RECORDS[: len(records)]


def test_file_journal_syncs_appends_and_reads_back(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    fj = journal.start(HEADER.path, HEADER.chunk_size, BASE)
    fj.record_write(0, b"hello")
    fj.sync()
    assert fj.file is not None and fj.file.parent == tmp_path / "j"
    fj.record_truncate(3)
    fj.record_write(10, b"!")
    fj.sync()
    header, records = decode(fj.file.read_bytes())
    assert header == HEADER and records == [Write(0, b"hello"), Truncate(3), Write(10, b"!")]
    assert Journal(tmp_path / "j").found == [fj.file]  # the next start finds it
    fj.discard()
    assert Journal(tmp_path / "j").found == []


def test_a_failed_append_keeps_the_records_and_the_retry_leaves_a_clean_file(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path / "j")
    fj = journal.start(HEADER.path, HEADER.chunk_size, BASE)
    fj.record_write(0, b"first")
    fj.sync()
    fj.record_write(5, b"second" * 100)
    real_pwrite = os.pwrite

    def torn(fd: int, data: bytes | memoryview, offset: int) -> int:
        real_pwrite(fd, bytes(data)[:7], offset)  # part of a frame reached the file, then the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jmod.os, "pwrite", torn)
    with pytest.raises(OSError) as failed:
        fj.sync()
    assert failed.value.errno == errno.ENOSPC
    assert fj.file is not None
    assert decode(fj.file.read_bytes())[1] == [Write(0, b"first")]  # the acknowledged record only
    monkeypatch.setattr(jmod.os, "pwrite", real_pwrite)
    fj.record_truncate(1)
    fj.sync()
    assert decode(fj.file.read_bytes())[1] == [Write(0, b"first"), Write(5, b"second" * 100), Truncate(1)]


def test_a_journal_past_its_bound_or_unsynced_past_the_buffer_overflows(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", max_bytes=64 * 1024, buffer_bytes=16 * 1024)
    copy = journal.start(HEADER.path, HEADER.chunk_size, BASE)
    for i in range(5):
        copy.record_write(i * 4096, b"c" * 4096)
    assert copy.overflowed and copy.file is None  # a copy never fsynced: not written twice
    guest = journal.start(HEADER.path, HEADER.chunk_size, BASE)
    guest.record_write(0, b"g")
    guest.sync()
    for i in range(5):
        guest.record_write(i * 4096, b"g" * 4096)
    assert not guest.overflowed and guest.written > 16 * 1024  # spilled to the file, not synced
    for i in range(20):
        guest.record_write(i * 4096, b"g" * 4096)
    assert guest.overflowed  # the next fsync publishes instead


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600),
                 st.builds(lambda head, tail: head + tail,
                           st.just(jmod._HEADER.pack(jmod.MAGIC, 4096, 3) + b"a/b"), st.binary(max_size=300))))
def test_a_checksummed_header_with_any_payload_decodes_or_fails_with_journal_error(payload: bytes) -> None:
    with contextlib.suppress(JournalError):
        decode(frame(jmod.KIND_HEADER, payload))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=8))
def test_checksummed_records_of_any_kind_and_payload_never_break_the_reader(frames: list[tuple[int, bytes]]) -> None:
    raw = encode_header(HEADER) + b"".join(frame(kind, payload) for kind, payload in frames)
    _, records = decode(raw)
    for r in records:  # whatever is yielded is within bounds
        assert (r.offset + len(r.data) if isinstance(r, Write) else r.size) <= 1 << 44

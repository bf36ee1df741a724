"""The node's write-ahead journal: fsync durable without publishing a namespace version.

A guest keeps its image open for its whole life and flushes often. Publishing a version
per fsync (store the dirty chunks, a new manifest, sync, commit an entry) costs in
proportion to the image, and leaves a version behind each time. Instead, `Vfs.fsync`
appends what the file's writers changed since its last durable point to a journal and
``fdatasync``s it: the cost is what changed. Versions are published (`Vfs._publish`) on
close, on a timer, past a size bound, and on ``blixfs commit``; each publish is durable
and then drops the file's journal. See docs/design.md, "fsync and the journal".

Layout: ``<home>/journal/<n>.jnl``, one file per open file that has unpublished writes,
created at its first fsync (or when its buffer spills). A file is a sequence of frames::

    kind: u8 | length: u32 | payload (length bytes) | xxh3_64(kind, length, payload): u64

little-endian. The first frame is a HEADER; then WRITE and TRUNCATE records in the order
the writes happened (replaying them over the base gives the content exactly):

    HEADER    magic "BXJ1" | chunk_size: u32 | path_len: u16 | path (UTF-8) | base entry
              (`Entry.serialize`, the version the records apply to)
    WRITE     offset: u64 | data (at most `MAX_WRITE_DATA` bytes; longer writes are split)
    TRUNCATE  size: u64

Frames are only appended, and an fsync returns after ``fdatasync``: a crash can tear
the tail only, never an acknowledged record. The reader (`read_journal`) stops at the
first frame that is short, too long, of an unknown kind or fails its checksum, logs what
it dropped, and never yields it: garbage is never replayed. Lengths are bounded before
anything is allocated (`MAX_PAYLOAD`), so a damaged file cannot make the reader allocate
more than a frame.

Callers: `blixfs.vfs.Vfs` only (the daemon's trio thread; no locking needed: every call
runs to completion without awaiting). Errors: OSError from the disk (the Vfs turns it into
the errno fsync reports, ENOSPC on a full disk); `JournalError` for a file whose header
cannot be read (nothing in it was acknowledged: a header is synced with the first records).
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import xxhash

from blixfs.entry import MAX_PATH_BYTES, Entry
from blixfs.manifest import MAX_CHUNK_SIZE, MAX_FILE_SIZE

log = logging.getLogger(__name__)

MAGIC = b"BXJ1"
KIND_HEADER = 1
KIND_WRITE = 2
KIND_TRUNCATE = 3
MAX_WRITE_DATA = 1 << 20
MAX_HEADER = 1 << 20  # a path and an entry (entries are far below this: sync.MAX_ENTRY_BYTES)
MAX_PAYLOAD = max(MAX_WRITE_DATA + 8, MAX_HEADER)
DEFAULT_MAX_JOURNAL_BYTES = 256 << 20  # past this an fsync publishes instead (replay time, disk)
DEFAULT_BUFFER_BYTES = 16 << 20  # records kept in memory between fsyncs before they go to the file
SUFFIX = ".jnl"

_FRAME = struct.Struct("<BI")
_SUM = struct.Struct("<Q")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIH")


class JournalError(Exception):
    """A journal file whose header cannot be read: it holds nothing acknowledged."""


@dataclass(frozen=True, slots=True)
class Header:
    path: str
    chunk_size: int
    base: Entry


@dataclass(frozen=True, slots=True)
class Write:
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Truncate:
    size: int


Record = Write | Truncate


def frame(kind: int, payload: bytes) -> bytes:
    head = _FRAME.pack(kind, len(payload))
    digest = xxhash.xxh3_64()
    digest.update(head)
    digest.update(payload)
    return head + payload + _SUM.pack(digest.intdigest())


def encode_header(header: Header) -> bytes:
    path = header.path.encode("utf-8")
    return frame(KIND_HEADER, _HEADER.pack(MAGIC, header.chunk_size, len(path)) + path + header.base.serialize())


def encode_write(offset: int, data: bytes | memoryview) -> list[bytes]:
    """WRITE frames for ``data`` at ``offset``, split at `MAX_WRITE_DATA`."""
    view = memoryview(data)
    return [frame(KIND_WRITE, _U64.pack(offset + i) + bytes(view[i : i + MAX_WRITE_DATA]))
            for i in range(0, len(view), MAX_WRITE_DATA)]


def encode_truncate(size: int) -> bytes:
    return frame(KIND_TRUNCATE, _U64.pack(size))


def _frames(f: BinaryIO, name: str) -> Iterator[tuple[int, bytes]]:
    """(kind, payload) of each whole, checksummed frame; stops (logged) at the first bad one."""
    offset = 0
    while True:
        head = f.read(_FRAME.size)
        if not head:
            return
        problem = ""
        if len(head) < _FRAME.size:
            problem = "a torn frame header"
        else:
            kind, length = _FRAME.unpack(head)
            if kind not in (KIND_HEADER, KIND_WRITE, KIND_TRUNCATE):
                problem = f"unknown frame kind {kind}"
            elif length > MAX_PAYLOAD:
                problem = f"a frame of {length} bytes (at most {MAX_PAYLOAD})"
            else:
                payload = f.read(length)
                tail = f.read(_SUM.size)
                digest = xxhash.xxh3_64()
                digest.update(head)
                digest.update(payload)
                if len(payload) < length or len(tail) < _SUM.size:
                    problem = "a torn frame"
                elif _SUM.unpack(tail)[0] != digest.intdigest():
                    problem = "an xxh3 mismatch"
        if problem:
            log.warning("journal %s: %s at byte %d: the tail from there was not acknowledged and is dropped",
                        name, problem, offset)
            return
        yield kind, payload
        offset += _FRAME.size + length + _SUM.size


def _decode_header(payload: bytes) -> Header:
    if len(payload) < _HEADER.size:
        raise JournalError("header too short")
    magic, chunk_size, path_len = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise JournalError(f"bad magic {magic!r}")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE or path_len > MAX_PATH_BYTES or _HEADER.size + path_len > len(payload):
        raise JournalError("header fields out of bounds")
    try:
        path = payload[_HEADER.size : _HEADER.size + path_len].decode("utf-8")
        base = Entry.deserialize(payload[_HEADER.size + path_len :])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise JournalError(f"unreadable header: {exc}") from exc
    if base.path != path:
        raise JournalError(f"header names {path!r} but its base entry is of {base.path!r}")
    return Header(path, chunk_size, base)


def _decode_record(kind: int, payload: bytes) -> Record | None:
    """The record of a checksummed frame; None (logged by the caller) if its fields are out of bounds."""
    if kind == KIND_WRITE:
        if len(payload) < _U64.size:
            return None
        offset = _U64.unpack_from(payload)[0]
        data = payload[_U64.size :]
        if not data or offset + len(data) > MAX_FILE_SIZE:
            return None
        return Write(offset, data)
    if kind == KIND_TRUNCATE and len(payload) == _U64.size:
        size = _U64.unpack(payload)[0]
        return Truncate(size) if size <= MAX_FILE_SIZE else None
    return None


def read_journal(f: BinaryIO, name: str = "<journal>") -> tuple[Header, Iterator[Record]]:
    """The header and a lazy iterator of the records of the journal in ``f``.

    Raises JournalError if the header frame is missing or bad. The records stop at a torn
    or corrupt frame, or at a well-framed record whose fields are out of bounds (both
    logged): what follows is never yielded. Memory: one frame at a time."""
    frames = _frames(f, name)
    first = next(frames, None)
    if first is None or first[0] != KIND_HEADER:
        raise JournalError("no header frame")
    header = _decode_header(first[1])

    def records() -> Iterator[Record]:
        for kind, payload in frames:
            record = _decode_record(kind, payload)
            if record is None:
                log.warning("journal %s: a %s record out of bounds: it and what follows are dropped", name,
                            "header" if kind == KIND_HEADER else "write" if kind == KIND_WRITE else "truncate")
                return
            yield record
    return header, records()


def decode(raw: bytes) -> tuple[Header, list[Record]]:
    """`read_journal` of bytes in memory (tests, fuzzing)."""
    header, records = read_journal(io.BytesIO(raw))
    return header, list(records)


@dataclass(eq=False)
class FileJournal:
    """The journal of one open file since its last publish: records buffered in memory,
    appended to its file at each `sync` (and when the buffer passes its bound).

    ``base`` is the version the records apply to (the file's content when the first
    record was made). Once the buffer overflows while the file is not created, or the
    file passes the journal's bound, ``overflowed`` is set: the caller publishes instead."""

    journal: Journal
    path: str
    chunk_size: int
    base: Entry
    file: Path | None = None
    _fd: int | None = None
    written: int = 0  # bytes of whole frames in the file
    buffered: list[bytes] = field(default_factory=list)
    buffered_bytes: int = 0
    overflowed: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return self.written + self.buffered_bytes

    def record_write(self, offset: int, data: bytes | memoryview) -> None:
        self._add(encode_write(offset, data))

    def record_truncate(self, size: int) -> None:
        self._add([encode_truncate(size)])

    def _add(self, frames: list[bytes]) -> None:
        if self.overflowed:
            return
        self.buffered.extend(frames)
        self.buffered_bytes += sum(map(len, frames))
        if self.size > self.journal.max_bytes:
            self.overflowed = True  # the next fsync publishes; records are no use any more
            self.buffered, self.buffered_bytes = [], 0
        elif self.buffered_bytes > self.journal.buffer_bytes:
            if self.file is None:
                # Not fsynced yet (a copy, not a guest): do not write everything twice.
                self.overflowed = True
                self.buffered, self.buffered_bytes = [], 0
            else:
                try:
                    self._append()
                except OSError as exc:  # the records stay buffered; the next fsync reports it
                    log.warning("journal of %s: cannot append: %s", self.path, exc)

    def sync(self) -> None:
        """Make every record so far durable (append, ``fdatasync``). Raises OSError (ENOSPC);
        then nothing acknowledged is lost and the records stay buffered for the next try."""
        if self.overflowed:
            raise AssertionError("an overflowed journal cannot be synced: publish")
        if not self.buffered and self.file is not None:
            return
        if self.file is None:
            self.file, self._fd = self.journal.create()
            self.buffered.insert(0, encode_header(Header(self.path, self.chunk_size, self.base)))
            self.buffered_bytes += len(self.buffered[0])
        self._append()
        assert self._fd is not None
        os.fdatasync(self._fd)

    def _append(self) -> None:
        assert self._fd is not None
        data = b"".join(self.buffered)
        try:
            # At the known end: a torn earlier attempt is overwritten by the same frames.
            done = 0
            while done < len(data):
                done += os.pwrite(self._fd, memoryview(data)[done:], self.written + done)
        except OSError:
            try:
                os.ftruncate(self._fd, self.written)
            except OSError as exc:  # anything past `written` is an unacknowledged torn tail anyway
                log.debug("journal of %s: could not cut a failed append: %s", self.path, exc)
            raise
        self.written += len(data)
        self.buffered, self.buffered_bytes = [], 0

    def discard(self) -> None:
        """Drop the journal (its file too): the caller published what it holds, or it is moot."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.file is not None:
            self.journal.remove(self.file)
            self.file = None
        self.buffered, self.buffered_bytes, self.written = [], 0, 0


class Journal:
    """The journal directory of a node (``<home>/journal``); see the module docstring.

    ``found`` lists the journal files left by the previous run (to replay before their
    files are read: `Vfs.recover_journals`)."""

    def __init__(self, root: Path, *, max_bytes: int = DEFAULT_MAX_JOURNAL_BYTES,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.buffer_bytes = buffer_bytes
        root.mkdir(parents=True, exist_ok=True)
        self.found = sorted(root.glob("*" + SUFFIX), key=lambda p: (len(p.name), p.name))
        # Names only grow: a replay in creation order applies a path's older journal first.
        last = max((int(p.stem) for p in self.found if p.stem.isdigit()), default=0)
        self._names = itertools.count(last + 1)

    def start(self, path: str, chunk_size: int, base: Entry) -> FileJournal:
        """A new (in-memory) journal of ``path``'s writes over ``base``."""
        return FileJournal(self, path, chunk_size, base)

    def create(self) -> tuple[Path, int]:
        """A new empty journal file, its directory entry durable."""
        file = self.root / f"{next(self._names)}{SUFFIX}"
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            self._sync_dir()
        except OSError:
            os.close(fd)
            os.unlink(file)
            raise
        return file, fd

    def reader(self, file: Path) -> BinaryIO:
        """``file`` opened for `read_journal` (the caller closes it)."""
        return open(file, "rb")

    def remove(self, file: Path) -> None:
        """Remove a journal file. Not synced: a journal that comes back after a crash is
        recognised as published or superseded (`Vfs._recover`) and dropped then."""
        try:
            os.unlink(file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove journal %s: %s (it is replayed or dropped at the next start)", file, exc)

    def _sync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*" + SUFFIX))

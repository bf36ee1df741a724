"""Large-namespace support of the SQLite store: running counts and paged snapshot diffs."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blixfs.entry import Entry, Kind
from blixfs.members import MEMBERS_DIR
from blixfs.namespace import HIDDEN_TREES, MemoryNamespaceStore, NamespaceStats, SqliteNamespaceStore
from blixfs.traces import TRACES_DIR

A = bytes([1]) * 32
B = bytes([2]) * 32
KINDS = [Kind.FILE, Kind.DIR, Kind.SYMLINK]
PARENTS = ["", "p1", "p2"]


def entry(path: str, ts: int, author: bytes = A, kind: Kind = Kind.FILE, size: int = 0, deleted: bool = False,
          seen: dict[bytes, int] | None = None) -> Entry:
    return Entry(path=path, kind=kind, mode=0o644, uid=0, gid=0, size=size if kind is Kind.FILE else 0,
                 mtime_ns=ts, ctime_ns=ts, author=author, timestamp_ns=ts, deleted=deleted, seen=seen or {},
                 target="t" if kind is Kind.SYMLINK else "")


def random_history(rng: random.Random, n: int) -> list[Entry]:
    """Creates, overwrites (seen: replace), concurrent versions of two authors (conflicts),
    deletes, kind changes and renames (a delete at one path, a create at another)."""
    out: list[Entry] = []
    paths = [f"p{i}" for i in range(12)] + ["p1/a", "p1/b", "p2/c"]  # nested: directories' subdirectory counts
    for ts in range(1, n + 1):
        author = rng.choice([A, B])
        path = rng.choice(paths)
        prior = [e for e in out if e.path == path]
        seen = {e.author: e.timestamp_ns for e in prior if rng.random() < 0.6}  # else concurrent: a conflict
        op = rng.random()
        if op < 0.2 and prior:
            out.append(entry(path, ts, author, deleted=True, seen=seen))
        elif op < 0.3 and prior:  # rename: the old path deleted, the content at a new one
            out.append(entry(path, ts, author, deleted=True, seen=seen))
            out.append(entry(rng.choice(paths), ts, author, size=prior[-1].size))
        else:
            out.append(entry(path, ts, author, rng.choice(KINDS), rng.randrange(0, 1 << 40), seen=seen))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 7))
def test_running_counts_equal_a_recount_through_any_history(tmp_path_factory: object, seed: int,
                                                            batch: int) -> None:
    rng = random.Random(seed)
    history = random_history(rng, 60)
    rng.shuffle(history)  # any arrival order: merges, stale versions, conflicts promoted
    path = Path(tmp_path_factory.mktemp("ns")) / "n.db"  # type: ignore[attr-defined]
    store, memory = SqliteNamespaceStore(path), MemoryNamespaceStore()
    try:
        for i in range(0, len(history), batch):
            store.apply(history[i:i + batch])
            memory.apply(history[i:i + batch])
            assert store.stats() == store.recount() == memory.stats()
            for parent in PARENTS:
                assert store.count_subdirs(parent) == store.recount_subdirs(parent) == memory.count_subdirs(parent)
        store.close()
        again = SqliteNamespaceStore(path)  # persisted with the entries
        assert again.stats() == again.recount()
        assert all(again.count_subdirs(p) == again.recount_subdirs(p) for p in PARENTS)
        again.close()
    finally:
        store.close()


def test_counts_roll_back_with_a_failed_batch(tmp_path: Path) -> None:
    store = SqliteNamespaceStore(tmp_path / "n.db")
    store.apply([entry("a", 1, size=7)])
    bad = entry("b", 2)
    object.__setattr__(bad, "kind", "not a kind")  # canonical() fails mid-batch
    with pytest.raises(AttributeError):
        store.apply([entry("c", 3, size=5), bad])
    assert store.stats() == store.recount() and store.stats().file_bytes == 7
    store.close()


def test_a_database_without_counts_is_counted_once_when_opened(tmp_path: Path) -> None:
    store = SqliteNamespaceStore(tmp_path / "n.db")
    store.apply([entry("", 0, kind=Kind.DIR), entry("d", 1, kind=Kind.DIR), entry("d/f", 2, size=3),
                 entry("g", 3, size=4), entry("g", 4, deleted=True, seen={A: 3}),
                 entry(f"{MEMBERS_DIR}/{'ab' * 32}", 5, kind=Kind.DIR),
                 entry(f"{TRACES_DIR}/{'c' * 32}/{'ab' * 32}", 6, kind=Kind.DIR)])
    assert store.stats() == store.recount() == NamespaceStats(1, 1, 0, 3)
    store.close()
    db = sqlite3.connect(tmp_path / "n.db")
    db.execute("DROP TABLE shown_counts")  # a database made before the counts (or written by an older blixfs)
    # Earlier versions' table, which counted the root and the hidden records too: dropped.
    db.execute("CREATE TABLE counts (id INTEGER PRIMARY KEY, files INTEGER, dirs INTEGER, symlinks INTEGER,"
               " file_bytes INTEGER)")
    db.execute("INSERT INTO counts VALUES (0, 1, 4, 0, 3)")
    db.commit()
    db.close()
    again = SqliteNamespaceStore(tmp_path / "n.db")
    assert again.stats() == NamespaceStats(1, 1, 0, 3)  # the root and the records not counted
    db = sqlite3.connect(tmp_path / "n.db")
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'counts'").fetchone() == (0,)
    db.close()
    again.close()


def test_hidden_trees_are_the_member_and_trace_trees() -> None:
    assert set(HIDDEN_TREES) == {MEMBERS_DIR + "/", TRACES_DIR + "/"}


def test_a_database_without_subdirectory_counts_is_counted_once_when_opened(tmp_path: Path) -> None:
    store = SqliteNamespaceStore(tmp_path / "n.db")
    store.apply([entry("", 1, kind=Kind.DIR), entry("d", 2, kind=Kind.DIR), entry("d/s", 3, kind=Kind.DIR),
                 entry("d/t", 4, kind=Kind.DIR), entry("d/t", 5, deleted=True, seen={A: 4}), entry("d/f", 6),
                 entry("e", 7, kind=Kind.DIR)])
    store.close()
    db = sqlite3.connect(tmp_path / "n.db")
    db.execute("DROP TABLE subdirs")  # a database made before the running counts
    db.commit()
    db.close()
    again = SqliteNamespaceStore(tmp_path / "n.db")
    assert (again.count_subdirs(""), again.count_subdirs("d"), again.count_subdirs("e")) == (2, 1, 0)
    again.apply([entry("e/x", 8, kind=Kind.DIR)])  # and kept from there
    assert again.count_subdirs("e") == 1
    again.close()


def test_pages_are_bounded_and_read_from_one_snapshot(tmp_path: Path) -> None:
    store = SqliteNamespaceStore(tmp_path / "n.db")
    store.apply([entry(f"f{i}", i + 1) for i in range(50)] + [entry(f"g{i}", i + 1, author=B) for i in range(30)])
    pages = store.pages_since({B: 10}, page=8)
    first = next(pages)
    # applied between pages: a new path, and a version that moves "f0" into the conflicts table
    store.apply([entry("late", 100), entry("f0", 101, author=B)])
    rest = list(pages)
    assert all(1 <= len(p) <= 8 for p in [first, *rest])
    got = [e for page in [first, *rest] for e in page]
    # exactly the snapshot's diff: A's "f0" once (it was current then), nothing applied later
    assert sorted((e.path, e.author) for e in got) == sorted(
        [(f"f{i}", A) for i in range(50)] + [(f"g{i}", B) for i in range(10, 30)])
    later = sorted((e.path, e.timestamp_ns) for e in store.entries_since({A: 50, B: 30}))
    assert later == [("f0", 101), ("late", 100)]  # the store itself moved on
    store.close()


def test_closing_pages_early_ends_the_read_transaction(tmp_path: Path) -> None:
    store = SqliteNamespaceStore(tmp_path / "n.db")
    store.apply([entry(f"f{i}", i + 1) for i in range(40)])
    pages = store.pages_since({}, page=4)
    next(pages)
    pages.close()
    store.apply([entry(f"h{i}", 100 + i) for i in range(40)])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a reader left behind would hold the WAL
    busy = store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    assert busy == 0
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_serialized_pages_are_the_entries_as_they_serialize(tmp_path: Path, kind: str) -> None:
    """The sync sender sends entries as stored: the bytes `Entry.serialize` gives, paged alike."""
    store = SqliteNamespaceStore(tmp_path / "n.db") if kind == "sqlite" else MemoryNamespaceStore()
    store.apply([entry(f"f{i}", i + 1) for i in range(20)] + [entry("f3", 50, author=B)])
    raw = list(store.serialized_pages_since({A: 5}, page=6))
    decoded = list(store.pages_since({A: 5}, page=6))
    assert [len(p) for p in raw] == [len(p) for p in decoded] and all(len(p) <= 6 for p in raw)
    assert [data for page in raw for data in page] == [e.serialize() for page in decoded for e in page]
    assert len(raw[0]) and all(isinstance(data, bytes) for page in raw for data in page)
    store.close()

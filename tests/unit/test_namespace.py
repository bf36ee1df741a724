"""One contract suite for every NamespaceStore; entries and last-writer-wins."""

from __future__ import annotations

import itertools
import random
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blixfs.entry import Entry, Kind
from blixfs.namespace import CHECKPOINT_COMMITS, MemoryNamespaceStore, NamespaceStore, Outcome, SqliteNamespaceStore

A = bytes([1]) * 32
B = bytes([2]) * 32


def entry(path: str, ts: int = 1, author: bytes = A, kind: Kind = Kind.FILE, **kw: object) -> Entry:
    return Entry(path=path, kind=kind, mode=0o644, uid=0, gid=0, size=kw.pop("size", 0),  # type: ignore[arg-type]
                 mtime_ns=ts, ctime_ns=ts, author=author, timestamp_ns=ts, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite"])
def ns(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NamespaceStore]:
    s: NamespaceStore = MemoryNamespaceStore() if request.param == "memory" else SqliteNamespaceStore(tmp_path / "n.db")
    yield s
    s.close()


def test_get_and_children(ns: NamespaceStore) -> None:
    ns.apply([entry("d", kind=Kind.DIR), entry("d/b"), entry("d/a"), entry("d/a2/x"), entry("e")])
    assert ns.get("d/a") is not None and ns.get("nope") is None
    assert [e.path for e in ns.children("d")] == ["d/a", "d/b"]
    assert [e.path for e in ns.children("")] == ["d", "e"]
    assert ns.has_children("d") and not ns.has_children("e")


def test_descendants_do_not_include_siblings_with_a_common_prefix(ns: NamespaceStore) -> None:
    ns.apply([entry(p) for p in ["a", "a/b", "a/b/c", "a-b", "a0", "ab", "a/c"]])
    assert [e.path for e in ns.descendants("a")] == ["a/b", "a/b/c", "a/c"]


def test_entries_under_a_path_are_it_and_below_tombstones_included(ns: NamespaceStore) -> None:
    ns.apply([entry(p) for p in ["a", "a/b", "a/b/c", "a-b", "a0", "ab", "a/c", "z"]])
    ns.apply([entry("a/c", ts=2, deleted=True)])
    assert sorted(e.path for e in ns.entries(under="a")) == ["a", "a/b", "a/b/c", "a/c"]
    assert next(e for e in ns.entries(under="a") if e.path == "a/c").deleted
    assert sorted(e.path for e in ns.entries(under="a/b/c")) == ["a/b/c"]
    assert len(list(ns.entries())) == 8


def test_count_since_counts_what_entries_since_gives(ns: NamespaceStore) -> None:
    ns.apply([entry("a", ts=1), entry("b", ts=2), entry("c", ts=3, author=B), entry("a", ts=4, author=B)])
    ns.apply([entry("b", ts=5, deleted=True)])
    for vector in ({}, {A: 1}, {A: 9}, {A: 2, B: 3}, {B: 9}):
        assert ns.count_since(vector) == len(list(ns.entries_since(vector))), vector


def test_last_writer_wins_whatever_the_order(ns: NamespaceStore) -> None:
    versions = [entry("f", ts=5, author=A, size=1), entry("f", ts=5, author=B, size=2), entry("f", ts=4, size=3),
                entry("f", ts=5, author=B, size=9)]
    winner = max(versions, key=Entry.lww_key)
    ns.apply(versions)
    assert ns.get("f") == winner
    for perm in itertools.permutations(versions):
        other = MemoryNamespaceStore()
        for v in perm:
            other.apply([v])
        assert other.get("f") == winner


def test_apply_reports_outcomes(ns: NamespaceStore) -> None:
    first = entry("f", ts=2)
    assert ns.apply([first]) == [Outcome.NEW]
    assert ns.apply([first]) == [Outcome.DUPLICATE]
    # a later version written on top of `first` replaces it; a version it had seen is stale
    later = entry("f", ts=3, seen=first.successor_context(), size=5)
    assert ns.apply([later, entry("f", ts=1, author=A)]) == [Outcome.NEW, Outcome.STALE]


def test_tombstones_hide_but_stay(ns: NamespaceStore) -> None:
    ns.apply([entry("f", ts=1)])
    ns.apply([entry("f", ts=2, deleted=True)])
    assert ns.get("f") is None
    tomb = ns.get_any("f")
    assert tomb is not None and tomb.deleted
    assert ns.children("") == [] and ns.stats().files == 0
    assert ns.apply([entry("f", ts=1)]) == [Outcome.DUPLICATE]
    assert ns.get("f") is None


def test_stats(ns: NamespaceStore) -> None:
    ns.apply([entry("d", kind=Kind.DIR), entry("d/f", size=10), entry("g", size=5),
              entry("l", kind=Kind.SYMLINK, target="g")])
    st = ns.stats()
    assert (st.files, st.dirs, st.symlinks, st.file_bytes) == (2, 1, 1, 15)


def test_count_subdirs_counts_live_directories_only(ns: NamespaceStore) -> None:
    ns.apply([entry("", kind=Kind.DIR), entry("d", kind=Kind.DIR), entry("d/s", kind=Kind.DIR),
              entry("d/t", kind=Kind.DIR), entry("d/t/u", kind=Kind.DIR), entry("d/f"),
              entry("d/l", kind=Kind.SYMLINK, target="f"), entry("e", kind=Kind.DIR)])
    assert ns.count_subdirs("") == 2  # the root's own entry is not its child
    assert ns.count_subdirs("d") == 2 and ns.count_subdirs("d/t") == 1 and ns.count_subdirs("e") == 0
    ns.apply([entry("d/s", ts=2, kind=Kind.DIR, deleted=True)])
    assert ns.count_subdirs("d") == 1


def test_sqlite_counts_subdirs_in_a_database_made_before_the_kind_column(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "n.db")
    db.execute("CREATE TABLE entries (path TEXT PRIMARY KEY, parent TEXT NOT NULL, deleted INTEGER NOT NULL,"
               " timestamp INTEGER NOT NULL, author BLOB NOT NULL, hash BLOB NOT NULL, data BLOB NOT NULL)"
               " WITHOUT ROWID")
    for e in (entry("d", kind=Kind.DIR), entry("d/s", kind=Kind.DIR), entry("d/f")):
        db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (e.path, e.path.rpartition("/")[0], 0, e.timestamp_ns, e.author, e.entry_hash(), e.serialize()))
    db.commit()
    db.close()
    s = SqliteNamespaceStore(tmp_path / "n.db")
    assert s.count_subdirs("d") == 1 and s.count_subdirs("") == 1
    s.apply([entry("d/t", kind=Kind.DIR)])
    assert s.count_subdirs("d") == 2
    s.close()


def test_a_checkpoint_in_another_thread_leaves_the_store_as_it_was(ns: NamespaceStore) -> None:
    """`checkpoint` may run in a worker thread while the store is used (the sync runs it
    between frames once `checkpoint_due`): what was applied reads the same after it."""
    for i in range(CHECKPOINT_COMMITS):
        ns.apply([entry(f"d{i}", ts=i + 1, kind=Kind.DIR), entry(f"d{i}/f", ts=i + 1)])
    if isinstance(ns, SqliteNamespaceStore):
        assert ns.checkpoint_due()
    worker = threading.Thread(target=ns.checkpoint)
    worker.start()
    ns.apply([entry("during", ts=100)])  # a commit while it runs
    worker.join(30)
    assert not worker.is_alive() and not ns.checkpoint_due()
    assert [e.path for e in ns.children("")] == sorted([*(f"d{i}" for i in range(CHECKPOINT_COMMITS)), "during"])
    assert ns.stats().files == CHECKPOINT_COMMITS + 1


def test_sqlite_checkpoints_move_commits_into_the_database_file(tmp_path: Path) -> None:
    s = SqliteNamespaceStore(tmp_path / "n.db")
    for i in range(CHECKPOINT_COMMITS):
        s.apply([entry(f"f{i}", ts=i + 1)])
    assert s.checkpoint_due()
    s.checkpoint()
    assert not s.checkpoint_due()
    # Everything committed is in the main file: a copy of it alone, without the WAL, has it.
    (tmp_path / "copy.db").write_bytes((tmp_path / "n.db").read_bytes())
    copy = SqliteNamespaceStore(tmp_path / "copy.db")
    assert sorted(e.path for e in copy.entries()) == sorted(f"f{i}" for i in range(CHECKPOINT_COMMITS))
    copy.close()
    s.close()


def test_sqlite_persists_and_rolls_back(tmp_path: Path) -> None:
    s = SqliteNamespaceStore(tmp_path / "n.db")
    s.apply([entry("a", meta={"os": "linux"}, xattrs={"user.x": b"\x00\xff"})])
    bad = entry("b")
    object.__setattr__(bad, "kind", "not a kind")  # canonical() fails mid-batch
    with pytest.raises(AttributeError):
        s.apply([entry("c"), bad])
    s.close()
    again = SqliteNamespaceStore(tmp_path / "n.db")
    got = again.get("a")
    assert got is not None and got.meta == {"os": "linux"} and got.xattrs == {"user.x": b"\x00\xff"}
    assert again.get("c") is None  # the failed batch left nothing


def test_entry_canonical_round_trip_and_determinism() -> None:
    e = entry("dir/ünïcode file", ts=123, meta={"tags": "a,b", "os": "linux"}, xattrs={"user.k": b"v"},
              manifest=bytes(range(32)))
    assert Entry.deserialize(e.serialize()) == e
    shuffled = dict(e.meta)
    keys = list(shuffled)
    random.shuffle(keys)
    same = e.evolve(meta={k: shuffled[k] for k in keys})
    assert same.canonical() == e.canonical() and same.entry_hash() == e.entry_hash()

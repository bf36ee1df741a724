"""Namespace stores: path -> `Entry`, persistent, with last-writer-wins merge.

The `NamespaceStore` seam has two implementations, `SqliteNamespaceStore` (the
node's) and `MemoryNamespaceStore` (for unit tests); tests/test_namespace_contract.py
runs one suite against both.

Contract:

* ``apply(entries)`` merges a batch atomically. For each path the store keeps the
  *siblings*: the versions no other received version has seen (`entry.dominates`).
  A new version drops the siblings it has seen; a version some sibling has seen is
  stale. The current entry is the siblings' last-writer-wins maximum; the others are
  kept as conflict versions. The result depends only on the set of versions
  received, never on their order or duplicates, so every node that received the same
  versions holds the same state. Local writes and peers' entries take the same path.
* Tombstones (``deleted=True``) are kept: ``get`` hides them, ``get_any`` shows them.
* ``vector()`` is this store's reconciled knowledge: for each author, the timestamp up
  to which it holds everything that author wrote (or something that beats it).
  ``entries_since(v)`` is what a peer whose vector is ``v`` is missing.
* ``apply(..., durable=True)`` returns only once the batch survives power loss;
  otherwise it survives a crash of this process (SQLite WAL, synchronous=NORMAL).

Callers: `blixfs.vfs.Vfs` on the trio thread, the CLI for read-only queries.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sqlite3
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lru import LRU

from blixfs.entry import Entry, Kind, dominates, parent_of
from blixfs.members import MEMBERS_DIR

log = logging.getLogger(__name__)

PAGE_ENTRIES = 256  # entries per `pages_since` page: decoding one costs ~10 us, a page a few ms
# Pages of a background pass over the whole namespace on the event loop (the replicator's
# first round, holdings at start): decoding 256 entries held FUSE requests ~15 ms (p99).
LOOP_PAGE_ENTRIES = 32
# Commits between the WAL checkpoints the sync runs in a worker thread (`checkpoint`): ~25
# pages each for 16 entries, so ~400 pages, under SQLite's own 1,000-page autocheckpoint,
# which runs inside a COMMIT on the event loop: 5-10 ms (two fsyncs) every ~40 slices of a
# session start, a FUSE request's p99 (bench_namespace).
CHECKPOINT_COMMITS = 16


@dataclass(frozen=True, slots=True)
class NamespaceStats:
    files: int
    dirs: int
    symlinks: int
    file_bytes: int


class Outcome(enum.Enum):
    """What `NamespaceStore.apply` did with one entry."""

    NEW = "new"  # it is now the path's current version
    CONFLICT = "conflict"  # concurrent with the current version, and older: kept as a sibling
    STALE = "stale"  # a version already held had seen it: nothing to keep
    DUPLICATE = "duplicate"  # already held

    @property
    def changed(self) -> bool:
        """Whether the store learned something (worth telling peers and the mount)."""
        return self in (Outcome.NEW, Outcome.CONFLICT)


class NamespaceStore(Protocol):
    def get(self, path: str) -> Entry | None:
        """The live entry at ``path``, or None (absent or deleted)."""
        ...

    def get_any(self, path: str) -> Entry | None:
        """The current entry at ``path`` including tombstones."""
        ...

    def children(self, parent: str) -> list[Entry]:
        """Live entries directly under ``parent`` ('' is the root), sorted by name."""
        ...

    def has_children(self, parent: str) -> bool: ...

    def count_subdirs(self, parent: str) -> int:
        """How many live directories are directly under ``parent`` (a directory's nlink is
        2 + this). Cheap: asked on every getattr of a directory."""
        ...

    def descendants(self, path: str) -> list[Entry]:
        """Live entries strictly below ``path``, parents before children."""
        ...

    def apply(self, entries: Sequence[Entry], *, durable: bool = False) -> list[Outcome]:
        """Merge ``entries`` in one transaction; element i says what became of entries[i]."""
        ...

    def conflicts_under(self, parent: str) -> list[Entry]:
        """Kept sibling versions of paths directly under ``parent`` (all of them; the VFS
        shows those `entry.shown_as_conflict` picks)."""
        ...

    def versions(self, path: str) -> list[Entry]:
        """Every version of ``path`` held: the current one (tombstones too) and kept siblings."""
        ...

    def entries(self, under: str | None = None) -> Iterator[Entry]:
        """Every current entry, tombstones included (for sync and GC); with ``under``, only
        that path and those below it (a range of the index, not a pass over everything)."""
        ...

    def entries_since(self, vector: Mapping[bytes, int]) -> Iterator[Entry]:
        """Current entries and conflict versions newer than ``vector`` for their author."""
        ...

    def count_since(self, vector: Mapping[bytes, int]) -> int:
        """How many entries `entries_since` would give (index ranges, not a decode of each)."""
        ...

    def pages_since(self, vector: Mapping[bytes, int], page: int = PAGE_ENTRIES) -> Generator[list[Entry], None, None]:
        """`entries_since` in lists of at most ``page`` entries, read from one snapshot of the
        store taken at the first page: writes applied while the caller is between pages
        neither show up nor hide anything (the sync sender yields to the event loop there,
        `blixfs.sync`). Close the iterator when stopping early (it holds a read transaction)."""
        ...

    def serialized_pages_since(self, vector: Mapping[bytes, int],
                               page: int = PAGE_ENTRIES) -> Generator[list[bytes], None, None]:
        """`pages_since` with each entry as `Entry.serialize` gives it (as stored): what the
        sync sender sends, without decoding each entry only to encode it again."""
        ...

    def vector(self) -> dict[bytes, int]: ...

    def authors(self) -> set[bytes]:
        """Every author of a version this store holds (current or conflict): the authors a
        SYNCED may advance the vector for (blixfs.sync `_advance`)."""
        ...

    def advance_vector(self, known: Mapping[bytes, int]) -> None:
        """Raise this store's vector pointwise to ``known`` (after a complete reconciliation)."""
        ...

    def stats(self) -> NamespaceStats:
        """Counts of the live current entries the mount shows below its root (`counted`:
        tombstones, conflict versions, the root and hidden records left out) and the files'
        bytes. O(1): statfs and ``blixfs status`` ask it."""
        ...

    def checkpoint_due(self) -> bool:
        """Whether enough was applied since the last `checkpoint` that the caller, if it can
        wait off the event loop, should run one now (the sync does, between frames)."""
        ...

    def checkpoint(self) -> None:
        """Move what was committed into the main database file (SQLite: a WAL checkpoint) on
        a connection of its own: safe in a worker thread while the event loop reads and
        applies through the store (never two `checkpoint` calls at once). Without it the
        store does the same, less often, inside an `apply`'s commit, on the caller's thread."""
        ...

    def close(self) -> None: ...


def _descendant_range(path: str) -> tuple[str, str]:
    # Keys strictly below "a/b" are exactly those in ["a/b/", "a/b0"): '0' follows '/' in ASCII.
    return (path + "/", path + "0") if path else ("", "\U0010ffff")


_COUNT_INDEX = {Kind.FILE: 0, Kind.DIR: 1}  # in `counts` and `_delta`; anything else counts as a symlink
# Trees of records the mount never shows (protocol.md 12.1, 12.2: `blixfs.members`,
# `blixfs.traces`; tests/unit check these against their constants). `stats` counts what
# the mount shows below its root: neither these nor the root itself.
HIDDEN_TREES = (MEMBERS_DIR + "/", ".blixfs-traces/")


def counted(e: Entry) -> bool:
    """Whether ``e`` is in `NamespaceStore.stats`: live, not the root, not a hidden record."""
    return not e.deleted and e.path != "" and not e.path.startswith(HIDDEN_TREES)


def _stats_of(entries: Iterator[Entry]) -> NamespaceStats:
    files = dirs = links = size = 0
    for e in entries:
        if not counted(e):
            continue
        if e.kind is Kind.FILE:
            files += 1
            size += e.size
        elif e.kind is Kind.DIR:
            dirs += 1
        else:
            links += 1
    return NamespaceStats(files, dirs, links, size)


class _Merging:
    """The merge rule, written once over four storage primitives."""

    def _current(self, path: str) -> Entry | None:
        raise NotImplementedError

    def _put_current(self, entry: Entry) -> None:
        raise NotImplementedError

    def _conflicts_at(self, path: str) -> list[Entry]:
        raise NotImplementedError

    def _put_conflict(self, entry: Entry) -> None:
        raise NotImplementedError

    def _drop_conflict(self, entry: Entry) -> None:
        raise NotImplementedError

    def versions(self, path: str) -> list[Entry]:
        cur = self._current(path)
        return [cur, *self._conflicts_at(path)] if cur is not None else self._conflicts_at(path)

    def _merge(self, e: Entry) -> Outcome:
        cur = self._current(e.path)
        kept = self._conflicts_at(e.path)
        siblings = [cur, *kept] if cur is not None else kept
        h = e.entry_hash()
        if any(s.entry_hash() == h for s in siblings):
            return Outcome.DUPLICATE
        if any(dominates(s, e) for s in siblings):
            return Outcome.STALE
        survivors = [s for s in siblings if not dominates(e, s)]
        winner = max([*survivors, e], key=Entry.lww_key)
        for s in kept:
            if s is winner or s not in survivors:
                self._drop_conflict(s)
        if winner is not cur:
            self._put_current(winner)
            if cur is not None and cur in survivors:
                self._put_conflict(cur)
        if e is not winner:
            self._put_conflict(e)
        return Outcome.NEW if e is winner else Outcome.CONFLICT


class MemoryNamespaceStore(_Merging):
    """A `NamespaceStore` in a dict."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._conflicts: dict[tuple[str, bytes], Entry] = {}
        self._vector: dict[bytes, int] = {}

    def _current(self, path: str) -> Entry | None:
        return self._entries.get(path)

    def _put_current(self, entry: Entry) -> None:
        self._entries[entry.path] = entry

    def _conflicts_at(self, path: str) -> list[Entry]:
        return [e for (p, _), e in self._conflicts.items() if p == path]

    def _put_conflict(self, entry: Entry) -> None:
        self._conflicts[(entry.path, entry.entry_hash())] = entry

    def _drop_conflict(self, entry: Entry) -> None:
        self._conflicts.pop((entry.path, entry.entry_hash()), None)

    def get(self, path: str) -> Entry | None:
        e = self._entries.get(path)
        return None if e is None or e.deleted else e

    def get_any(self, path: str) -> Entry | None:
        return self._entries.get(path)

    def children(self, parent: str) -> list[Entry]:
        return sorted(
            (e for e in self._entries.values() if not e.deleted and e.path and parent_of(e.path) == parent),
            key=lambda e: e.path,
        )

    def has_children(self, parent: str) -> bool:
        return bool(self.children(parent))

    def count_subdirs(self, parent: str) -> int:
        return sum(1 for e in self.children(parent) if e.kind is Kind.DIR)

    def descendants(self, path: str) -> list[Entry]:
        lo, hi = _descendant_range(path)
        return sorted(
            (e for e in self._entries.values() if not e.deleted and lo <= e.path < hi and e.path),
            key=lambda e: e.path,
        )

    def apply(self, entries: Sequence[Entry], *, durable: bool = False) -> list[Outcome]:
        return [self._merge(e) for e in entries]

    def conflicts_under(self, parent: str) -> list[Entry]:
        return sorted((e for (p, _), e in self._conflicts.items() if parent_of(p) == parent),
                      key=lambda e: e.lww_key())

    def entries(self, under: str | None = None) -> Iterator[Entry]:
        if under is None:
            return iter(list(self._entries.values()))
        lo, hi = _descendant_range(under)
        return iter([e for e in self._entries.values() if e.path == under or lo <= e.path < hi])

    def entries_since(self, vector: Mapping[bytes, int]) -> Iterator[Entry]:
        everything = [*self._entries.values(), *self._conflicts.values()]
        return iter([e for e in everything if e.timestamp_ns > vector.get(e.author, -1)])

    def count_since(self, vector: Mapping[bytes, int]) -> int:
        return len(list(self.entries_since(vector)))

    def pages_since(self, vector: Mapping[bytes, int], page: int = PAGE_ENTRIES) -> Generator[list[Entry], None, None]:
        everything = list(self.entries_since(vector))  # the snapshot: later applies do not show
        for i in range(0, len(everything), page):
            yield everything[i:i + page]

    def serialized_pages_since(self, vector: Mapping[bytes, int],
                               page: int = PAGE_ENTRIES) -> Generator[list[bytes], None, None]:
        for entries in self.pages_since(vector, page):
            yield [e.serialize() for e in entries]

    def vector(self) -> dict[bytes, int]:
        return dict(self._vector)

    def authors(self) -> set[bytes]:
        return {e.author for e in (*self._entries.values(), *self._conflicts.values())}

    def advance_vector(self, known: Mapping[bytes, int]) -> None:
        for author, ts in known.items():
            self._vector[author] = max(self._vector.get(author, -1), ts)

    def stats(self) -> NamespaceStats:
        return _stats_of(self.entries())

    def checkpoint_due(self) -> bool:
        return False

    def checkpoint(self) -> None:
        pass

    def close(self) -> None:
        pass


class SqliteNamespaceStore(_Merging):
    """A `NamespaceStore` in one SQLite database (WAL mode).

    Each row keeps the entry's canonical encoding plus the columns queries need
    (parent for readdir, deleted, the LWW key). Decoded entries are cached in an
    LRU: every write goes through this object, so the cache cannot go stale.
    """

    def __init__(self, path: Path, cache_entries: int = 65536) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._checkpointer: sqlite3.Connection | None = None  # `checkpoint`'s own connection
        self._checkpoint_lock = threading.Lock()  # sessions of several peers may each ask for one
        self._commits_unchecked = 0  # commits since the last `checkpoint`
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS entries (
                path TEXT PRIMARY KEY,
                parent TEXT NOT NULL,
                deleted INTEGER NOT NULL,
                timestamp INTEGER NOT NULL,
                author BLOB NOT NULL,
                hash BLOB NOT NULL,
                data BLOB NOT NULL
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS entries_by_parent ON entries (parent, deleted, path);
            CREATE INDEX IF NOT EXISTS entries_by_author ON entries (author, timestamp);
            CREATE TABLE IF NOT EXISTS conflicts (
                path TEXT NOT NULL,
                hash BLOB NOT NULL,
                parent TEXT NOT NULL,
                timestamp INTEGER NOT NULL,
                author BLOB NOT NULL,
                data BLOB NOT NULL,
                PRIMARY KEY (path, hash)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS conflicts_by_parent ON conflicts (parent);
            CREATE INDEX IF NOT EXISTS conflicts_by_author ON conflicts (author, timestamp);
            CREATE TABLE IF NOT EXISTS vector (author BLOB PRIMARY KEY, timestamp INTEGER NOT NULL) WITHOUT ROWID;
            """
        )
        # The entry's kind, for counting subdirectories (nlink) through an index. A virtual
        # generated column: added to databases made before it without rewriting a row, and
        # an INSERT without a column list (older blixfs on the same home) still fits.
        # (A SEARCH over it is not a covering index scan: each counted directory's row is
        # read, ~0.6 us; files are never read. A stored column would need a migration.)
        self._add_virtual_column("entries", "kind", "json_extract(CAST(data AS TEXT), '$.kind')")
        self._db.execute("CREATE INDEX IF NOT EXISTS entries_by_kind ON entries (parent, kind, deleted)")
        self._init_counts()
        self._init_subdir_counts()
        self._path = path
        self._cache: LRU[str, Entry | None] = LRU(cache_entries)
        self._pending: dict[str, Entry] = {}  # written by the apply in progress, not yet committed
        self._delta = [0, 0, 0, 0]  # the apply in progress's change to the counts (files, dirs, symlinks, bytes)
        self._subdir_delta: dict[str, int] = {}  # and to `subdirs`: parent -> live directories added

    def _add_virtual_column(self, table: str, column: str, expression: str) -> None:
        if column in {r[1] for r in self._db.execute(f"PRAGMA table_xinfo({table})")}:
            return
        try:
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT GENERATED ALWAYS AS ({expression}) VIRTUAL")
        except sqlite3.OperationalError as exc:  # another process opening it just added it
            if "duplicate column" not in str(exc):
                raise

    def _init_counts(self) -> None:
        """The running counts `stats` answers from: one row, changed by each `apply` in its
        own transaction (they commit or roll back with the entries). Counted once over the
        whole table by the first open of a database that lacks them.

        Only this class writes the entries table (the daemon holds the home's lock; the CLI
        reads). An older blixfs writing the same home leaves the counts behind (statfs and
        ``blixfs status`` figures only: nothing else reads them); deleting the
        ``shown_counts`` row makes the next open count again. `recount` is the check (tests).
        The table ``counts`` of earlier versions counted the root and hidden records too: it
        is dropped."""
        self._db.execute("CREATE TABLE IF NOT EXISTS shown_counts (id INTEGER PRIMARY KEY CHECK (id = 0),"
                         " files INTEGER NOT NULL, dirs INTEGER NOT NULL, symlinks INTEGER NOT NULL,"
                         " file_bytes INTEGER NOT NULL)")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._db.execute("SELECT 1 FROM shown_counts").fetchone() is None:
                hidden = " AND ".join("NOT (path >= ? AND path < ?)" for _ in HIDDEN_TREES)
                ranges = [bound for tree in HIDDEN_TREES for bound in (tree, tree[:-1] + "0")]  # '0' follows '/'
                self._db.execute(
                    "INSERT INTO shown_counts SELECT 0, count(*) FILTER (WHERE kind = 'file'),"
                    " count(*) FILTER (WHERE kind = 'dir'), count(*) FILTER (WHERE kind NOT IN ('file', 'dir')),"
                    " coalesce(sum(json_extract(CAST(data AS TEXT), '$.size')) FILTER (WHERE kind = 'file'), 0)"
                    f" FROM entries WHERE deleted = 0 AND path != '' AND {hidden}", ranges)
            self._db.execute("DROP TABLE IF EXISTS counts")
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _init_subdir_counts(self) -> None:
        """The running count of live directories under each parent that `count_subdirs`
        answers from (a directory's nlink), kept like `_init_counts`' (same transaction as
        the entries, same caveat about an older blixfs writing the home), and counted once,
        through the (parent, kind, deleted) index, by the first open of a database without
        it. Counting at each getattr instead took 15-47 ms of the event loop for a
        directory of 33,000 subdirectories while a sync added to it."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'subdirs'").fetchone() \
                    is None:
                self._db.execute("CREATE TABLE subdirs (parent TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID")
                # The root is its own parent: its own entry is not its child.
                self._db.execute("INSERT INTO subdirs SELECT parent, count(*) FROM entries"
                                 " WHERE kind = 'dir' AND deleted = 0 AND path != '' GROUP BY parent")
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _load(self, path: str) -> Entry | None:
        if path in self._cache:
            cached: Entry | None = self._cache[path]
            return cached
        row = self._db.execute("SELECT data FROM entries WHERE path = ?", (path,)).fetchone()
        entry = Entry.deserialize(row[0]) if row else None
        self._cache[path] = entry
        return entry

    def get(self, path: str) -> Entry | None:
        e = self._load(path)
        return None if e is None or e.deleted else e

    def get_any(self, path: str) -> Entry | None:
        return self._load(path)

    def children(self, parent: str) -> list[Entry]:
        rows = self._db.execute(
            "SELECT data FROM entries WHERE parent = ? AND deleted = 0 AND path != '' ORDER BY path",
            (parent,),
        )
        return [Entry.deserialize(r[0]) for r in rows]

    def has_children(self, parent: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM entries WHERE parent = ? AND deleted = 0 AND path != '' LIMIT 1", (parent,)
        ).fetchone()
        return row is not None

    def count_subdirs(self, parent: str) -> int:
        # From the running counts (`_init_subdir_counts`): one row, whatever the directory's size.
        row = self._db.execute("SELECT n FROM subdirs WHERE parent = ?", (parent,)).fetchone()
        return int(row[0]) if row is not None else 0

    def recount_subdirs(self, parent: str) -> int:
        """`count_subdirs` counted over the entries (what the running count must equal; tests)."""
        row = self._db.execute("SELECT count(*) FROM entries WHERE parent = ? AND kind = 'dir' AND deleted = 0"
                               " AND path != ''", (parent,)).fetchone()
        return int(row[0])

    def descendants(self, path: str) -> list[Entry]:
        lo, hi = _descendant_range(path)
        rows = self._db.execute(
            "SELECT data FROM entries WHERE path >= ? AND path < ? AND deleted = 0 AND path != ''"
            " ORDER BY path",
            (lo, hi),
        )
        return [Entry.deserialize(r[0]) for r in rows]

    # Storage primitives of the merge rule; called inside apply's transaction.

    def _current(self, path: str) -> Entry | None:
        return self._pending[path] if path in self._pending else self._load(path)

    def _put_current(self, entry: Entry) -> None:
        old = self._current(entry.path)  # loaded by the merge already: no query
        for e, sign in ((old, -1), (entry, 1)):
            if e is not None and not e.deleted:
                if counted(e):
                    i = _COUNT_INDEX.get(e.kind, 2)
                    self._delta[i] += sign
                    if e.kind is Kind.FILE:
                        self._delta[3] += sign * e.size
                if e.kind is Kind.DIR and e.path:
                    parent = parent_of(e.path)
                    self._subdir_delta[parent] = self._subdir_delta.get(parent, 0) + sign
        self._db.execute(
            "INSERT OR REPLACE INTO entries (path, parent, deleted, timestamp, author, hash, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (entry.path, parent_of(entry.path), int(entry.deleted), entry.timestamp_ns, entry.author,
             entry.entry_hash(), entry.serialize()),
        )
        self._pending[entry.path] = entry

    def _conflicts_at(self, path: str) -> list[Entry]:
        rows = self._db.execute("SELECT data FROM conflicts WHERE path = ?", (path,))
        return [Entry.deserialize(r[0]) for r in rows]

    def _put_conflict(self, entry: Entry) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO conflicts VALUES (?, ?, ?, ?, ?, ?)",
            (entry.path, entry.entry_hash(), parent_of(entry.path), entry.timestamp_ns, entry.author,
             entry.serialize()),
        )

    def _drop_conflict(self, entry: Entry) -> None:
        self._db.execute("DELETE FROM conflicts WHERE path = ? AND hash = ?", (entry.path, entry.entry_hash()))

    def apply(self, entries: Sequence[Entry], *, durable: bool = False) -> list[Outcome]:
        outcomes: list[Outcome] = []
        self._pending = {}
        self._delta = [0, 0, 0, 0]
        self._subdir_delta = {}
        if durable:
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                outcomes = [self._merge(e) for e in entries]
                if any(self._delta):
                    self._db.execute("UPDATE shown_counts SET files = files + ?, dirs = dirs + ?,"
                                     " symlinks = symlinks + ?, file_bytes = file_bytes + ?", self._delta)
                changed = [(p, d) for p, d in self._subdir_delta.items() if d]
                if changed:
                    self._db.executemany("INSERT INTO subdirs VALUES (?, ?) ON CONFLICT (parent) DO UPDATE SET"
                                         " n = n + excluded.n", changed)
                    self._db.executemany("DELETE FROM subdirs WHERE parent = ? AND n = 0", [(p,) for p, _ in changed])
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._commits_unchecked += 1
            # only after COMMIT: a rolled-back batch must not reach the cache
            for path, e in self._pending.items():
                self._cache[path] = e
        finally:
            self._pending = {}
            if durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
        return outcomes

    def conflicts_under(self, parent: str) -> list[Entry]:
        rows = self._db.execute("SELECT data FROM conflicts WHERE parent = ? ORDER BY timestamp", (parent,))
        return [Entry.deserialize(r[0]) for r in rows]

    def entries_since(self, vector: Mapping[bytes, int]) -> Iterator[Entry]:
        for page in self.pages_since(vector):
            yield from page

    def pages_since(self, vector: Mapping[bytes, int], page: int = PAGE_ENTRIES) -> Generator[list[Entry], None, None]:
        with contextlib.closing(self.serialized_pages_since(vector, page)) as pages:
            for rows in pages:
                yield [Entry.deserialize(data) for data in rows]

    def serialized_pages_since(self, vector: Mapping[bytes, int],
                               page: int = PAGE_ENTRIES) -> Generator[list[bytes], None, None]:
        # A connection of its own in a read transaction: WAL gives it a snapshot that the
        # writes of this store's connection, committed between pages, do not change. (On the
        # shared connection a cursor would see rows move between the tables mid-scan: a
        # conflict version promoted to current after the entries were read would be missed.)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("BEGIN")
            for table in ("entries", "conflicts"):
                authors = [r[0] for r in db.execute(f"SELECT DISTINCT author FROM {table}")]
                for author in authors:
                    cursor = db.execute(f"SELECT data FROM {table} WHERE author = ? AND timestamp > ?",
                                        (author, vector.get(bytes(author), -1)))
                    while rows := cursor.fetchmany(page):
                        yield [bytes(data) for (data,) in rows]
        finally:
            db.close()  # ends the read transaction

    def count_since(self, vector: Mapping[bytes, int]) -> int:
        total = 0
        for table in ("entries", "conflicts"):  # per author: a range of the (author, timestamp) index
            for (author,) in self._db.execute(f"SELECT DISTINCT author FROM {table}").fetchall():
                (n,) = self._db.execute(f"SELECT count(*) FROM {table} WHERE author = ? AND timestamp > ?",
                                        (author, vector.get(bytes(author), -1))).fetchone()
                total += int(n)
        return total

    def vector(self) -> dict[bytes, int]:
        return {bytes(a): int(t) for a, t in self._db.execute("SELECT author, timestamp FROM vector")}

    def authors(self) -> set[bytes]:
        # DISTINCT over the (author, timestamp) indexes: one step per author, not per entry.
        return {bytes(r[0]) for table in ("entries", "conflicts")
                for r in self._db.execute(f"SELECT DISTINCT author FROM {table}")}

    def advance_vector(self, known: Mapping[bytes, int]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO vector VALUES (?, ?) ON CONFLICT (author) DO UPDATE SET"
                " timestamp = max(timestamp, excluded.timestamp)",
                list(known.items()),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        # SQLite rolls back by itself on some errors ("database or disk is full"): a second
        # ROLLBACK would raise "no transaction is active" and hide the real error.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def entries(self, under: str | None = None) -> Iterator[Entry]:
        if under is None:
            rows = self._db.execute("SELECT data FROM entries ORDER BY path")
        else:
            lo, hi = _descendant_range(under)
            rows = self._db.execute("SELECT data FROM entries WHERE path = ? OR (path >= ? AND path < ?) ORDER BY path",
                                    (under, lo, hi))
        for (data,) in rows:
            yield Entry.deserialize(data)

    def checkpoint_due(self) -> bool:
        return self._commits_unchecked >= CHECKPOINT_COMMITS

    def checkpoint(self) -> None:
        # PASSIVE: copies what no reader still needs, never waits for the writer, which may
        # commit meanwhile (then the WAL restarts at a later checkpoint, not this one).
        with self._checkpoint_lock:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
                self._checkpointer.execute("PRAGMA synchronous=NORMAL")
            self._commits_unchecked = 0  # commits made while it runs count towards the next
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def stats(self) -> NamespaceStats:
        files, dirs, links, size = self._db.execute("SELECT files, dirs, symlinks, file_bytes FROM shown_counts"
                                                   ).fetchone()
        return NamespaceStats(int(files), int(dirs), int(links), int(size))

    def recount(self) -> NamespaceStats:
        """`stats` counted over every entry (what the running counts must equal; tests)."""
        return _stats_of(self.entries())

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()

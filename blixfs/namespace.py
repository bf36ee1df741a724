"""Namespace stores: path -> `Entry`, persistent, with last-writer-wins merge.

The `NamespaceStore` seam has two implementations, `SqliteNamespaceStore` (the
node's) and `MemoryNamespaceStore` (for unit tests); tests/test_namespace_contract.py
runs one suite against both.

Contract:

* ``apply(entries)`` merges a batch atomically: each entry replaces the stored one
  for its path only if its `Entry.lww_key` is larger; it reports which ones won.
  Local writes and (later) entries from peers take the same path, so every node
  converges on the same winner.
* Tombstones (``deleted=True``) are kept: ``get`` hides them, ``get_any`` shows them.
* ``apply(..., durable=True)`` returns only once the batch survives power loss;
  otherwise it survives a crash of this process (SQLite WAL, synchronous=NORMAL).

Callers: `blixfs.vfs.Vfs` on the trio thread, the CLI for read-only queries.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lru import LRU

from blixfs.entry import Entry, Kind, parent_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NamespaceStats:
    files: int
    dirs: int
    symlinks: int
    file_bytes: int


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

    def descendants(self, path: str) -> list[Entry]:
        """Live entries strictly below ``path``, parents before children."""
        ...

    def apply(self, entries: Sequence[Entry], *, durable: bool = False) -> list[bool]:
        """Merge ``entries`` in one transaction; element i says whether entries[i] won."""
        ...

    def entries(self) -> Iterator[Entry]:
        """Every current entry, tombstones included (for sync and GC)."""
        ...

    def stats(self) -> NamespaceStats: ...

    def close(self) -> None: ...


def _descendant_range(path: str) -> tuple[str, str]:
    # Keys strictly below "a/b" are exactly those in ["a/b/", "a/b0"): '0' follows '/' in ASCII.
    return (path + "/", path + "0") if path else ("", "\U0010ffff")


def _stats_of(entries: Iterator[Entry]) -> NamespaceStats:
    files = dirs = links = size = 0
    for e in entries:
        if e.deleted:
            continue
        if e.kind is Kind.FILE:
            files += 1
            size += e.size
        elif e.kind is Kind.DIR:
            dirs += 1
        else:
            links += 1
    return NamespaceStats(files, dirs, links, size)


class MemoryNamespaceStore:
    """A `NamespaceStore` in a dict."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

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

    def descendants(self, path: str) -> list[Entry]:
        lo, hi = _descendant_range(path)
        return sorted(
            (e for e in self._entries.values() if not e.deleted and lo <= e.path < hi and e.path),
            key=lambda e: e.path,
        )

    def apply(self, entries: Sequence[Entry], *, durable: bool = False) -> list[bool]:
        won = []
        for e in entries:
            cur = self._entries.get(e.path)
            ok = cur is None or e.lww_key() > cur.lww_key()
            if ok:
                self._entries[e.path] = e
            won.append(ok)
        return won

    def entries(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def stats(self) -> NamespaceStats:
        return _stats_of(self.entries())

    def close(self) -> None:
        pass


class SqliteNamespaceStore:
    """A `NamespaceStore` in one SQLite database (WAL mode).

    Each row keeps the entry's canonical encoding plus the columns queries need
    (parent for readdir, deleted, the LWW key). Decoded entries are cached in an
    LRU: every write goes through this object, so the cache cannot go stale.
    """

    def __init__(self, path: Path, cache_entries: int = 65536) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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
            """
        )
        self._cache: LRU[str, Entry | None] = LRU(cache_entries)

    def _load(self, path: str) -> Entry | None:
        if path in self._cache:
            cached: Entry | None = self._cache[path]
            return cached
        row = self._db.execute("SELECT data FROM entries WHERE path = ?", (path,)).fetchone()
        entry = Entry.from_canonical(row[0]) if row else None
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
        return [Entry.from_canonical(r[0]) for r in rows]

    def has_children(self, parent: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM entries WHERE parent = ? AND deleted = 0 AND path != '' LIMIT 1", (parent,)
        ).fetchone()
        return row is not None

    def descendants(self, path: str) -> list[Entry]:
        lo, hi = _descendant_range(path)
        rows = self._db.execute(
            "SELECT data FROM entries WHERE path >= ? AND path < ? AND deleted = 0 AND path != ''"
            " ORDER BY path",
            (lo, hi),
        )
        return [Entry.from_canonical(r[0]) for r in rows]

    def apply(self, entries: Sequence[Entry], *, durable: bool = False) -> list[bool]:
        won: list[bool] = []
        written: list[Entry] = []
        if durable:
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for e in entries:
                    row = self._db.execute(
                        "SELECT timestamp, author, hash FROM entries WHERE path = ?", (e.path,)
                    ).fetchone()
                    h = e.entry_hash()
                    ok = row is None or (e.timestamp_ns, e.author, h) > (row[0], row[1], row[2])
                    if ok:
                        self._db.execute(
                            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (e.path, parent_of(e.path), int(e.deleted), e.timestamp_ns, e.author, h,
                             e.canonical()),
                        )
                        written.append(e)
                    won.append(ok)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        finally:
            if durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
        for e in written:  # only after COMMIT: a rolled-back batch must not reach the cache
            self._cache[e.path] = e
        return won

    def entries(self) -> Iterator[Entry]:
        for (data,) in self._db.execute("SELECT data FROM entries ORDER BY path"):
            yield Entry.from_canonical(data)

    def stats(self) -> NamespaceStats:
        return _stats_of(self.entries())

    def close(self) -> None:
        self._db.close()

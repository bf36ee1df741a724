"""Transfer analytics: what moved where, how well the cache served, kept across restarts.

The daemon's `Analytics` hears of every chunk fetched (the fetcher's ``on_chunk`` hook:
image, peer, bytes, why: a read that missed, read-ahead, a pull or replica), every chunk
served to a peer (the chunk server's ``on_served``) and every read the VFS answers (its
``on_read``: image, bytes, the chunks it touched). Each hook is O(1) dictionary work on
the trio thread: no I/O, no lock, nothing that can block a read. A task in the daemon's
nursery (`Analytics.run`) does the rest every `SAMPLE_SECONDS`: it samples node-wide
rates for the dashboard's charts, ends transfers idle for `IDLE_END` seconds (they join
the history), and writes what changed to ``<home>/analytics.db`` in one transaction on a
worker thread, every `FLUSH_SECONDS` and once more when the daemon stops.

What is kept, all bounded (a peer may invent node ids; a namespace may hold many files):

* ``transfers``: the last `MAX_TRANSFERS` finished transfers (image, start, end, bytes,
  chunks, read-ahead bytes, bytes per peer);
* ``image_access``: per image, the `MAX_IMAGES` most recently active (in memory too: one
  pushed out that comes back starts again from zero): application reads
  and bytes, chunk reads and misses (a chunk read that had to wait for a fetch it
  started), bytes fetched, read-ahead bytes fetched, used (read later) and wasted
  (forgotten unread, see below);
* ``peer_bytes``: per peer, the `MAX_PEERS` most recently active: bytes fetched from it
  and served to it;
* ``totals``: lifetime bytes fetched, served and read.

Read-ahead is judged by chunk: a chunk fetched ahead joins a bounded LRU (`AHEAD_TRACKED`
chunks); a read of it counts its bytes as used; one pushed out unread counts as wasted.
The cache hit ratio of an image is 1 - misses / chunk reads: the share of chunk reads
served from memory or local disk without waiting on the network (a read that found a
read-ahead fetch under way waited, but counts as read-ahead used, not as a miss).

Paths are the namespace's (the VFS's label for a file); a read of a file not known by
path (an inode opened before a rename) is not counted by image.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from lru import LRU

from blixfs.hashing import ChunkId

log = logging.getLogger(__name__)

MAX_TRANSFERS = 10_000
MAX_IMAGES = 10_000
MAX_PEERS = 1_000
AHEAD_TRACKED = 8_192  # chunks fetched ahead and not yet read (2 GiB of 256 KiB chunks)
HISTORY_IN_MEMORY = 200  # finished transfers the API shows without reading the database
SAMPLE_SECONDS = 2.0
SAMPLES = 300  # 10 minutes of rates at SAMPLE_SECONDS
FLUSH_SECONDS = 10.0
IDLE_END = 5.0  # a transfer that moved nothing this long is finished

# Why a chunk was fetched (the fetcher's ``on_chunk``).
READ, AHEAD, PULL = "read", "ahead", "pull"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, started REAL NOT NULL, ended REAL NOT NULL,
    bytes INTEGER NOT NULL, chunks INTEGER NOT NULL, ahead_bytes INTEGER NOT NULL, peers TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS image_access (
    path TEXT PRIMARY KEY, reads INTEGER NOT NULL, bytes_read INTEGER NOT NULL, chunk_reads INTEGER NOT NULL,
    misses INTEGER NOT NULL, fetched INTEGER NOT NULL, ahead INTEGER NOT NULL, ahead_used INTEGER NOT NULL,
    ahead_wasted INTEGER NOT NULL, last REAL NOT NULL);
CREATE INDEX IF NOT EXISTS image_access_last ON image_access(last);
CREATE TABLE IF NOT EXISTS peer_bytes (
    peer TEXT PRIMARY KEY, fetched INTEGER NOT NULL, served INTEGER NOT NULL, last REAL NOT NULL);
CREATE INDEX IF NOT EXISTS peer_bytes_last ON peer_bytes(last);
CREATE TABLE IF NOT EXISTS totals (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

IMAGE_FIELDS = ("reads", "bytes_read", "chunk_reads", "misses", "fetched", "ahead", "ahead_used", "ahead_wasted")


@dataclass
class ImageCounts:
    reads: int = 0
    bytes_read: int = 0
    chunk_reads: int = 0
    misses: int = 0
    fetched: int = 0
    ahead: int = 0
    ahead_used: int = 0
    ahead_wasted: int = 0
    last: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in IMAGE_FIELDS}
        out["hit_ratio"] = round(1 - self.misses / self.chunk_reads, 4) if self.chunk_reads else None
        out["ahead_efficiency"] = round(self.ahead_used / self.ahead, 4) if self.ahead else None
        out["last"] = self.last
        return out


@dataclass
class PeerCounts:
    fetched: int = 0
    served: int = 0
    last: float = 0.0


@dataclass
class LiveTransfer:
    """One image's content arriving, from its first chunk until `IDLE_END` seconds idle."""

    path: str
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    bytes: int = 0
    chunks: int = 0
    ahead_bytes: int = 0
    peers: dict[str, int] = field(default_factory=dict)
    window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=8))  # (time, bytes) samples

    def rate(self, now: float) -> float:
        """Bytes per second over the last samples (the whole transfer while it is young)."""
        if self.window and now - self.window[0][0] > 0.5:
            t0, b0 = self.window[0]
            return max(0.0, (self.bytes - b0) / (now - t0))
        return self.bytes / max(now - self.started, 1.0)  # one chunk in a millisecond is no rate yet

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "started": round(self.started, 3), "ended": round(self.updated, 3),
                "bytes": self.bytes, "chunks": self.chunks, "ahead_bytes": self.ahead_bytes,
                "peers": dict(self.peers)}


class Analytics:
    """See the module docstring. ``db_path`` None keeps everything in memory (tests, tools)."""

    def __init__(self, db_path: Path | None) -> None:
        self.db_path = db_path
        # Least recently active first: at the bound, the least recently active one goes.
        self.images: OrderedDict[str, ImageCounts] = OrderedDict()
        self.peers: OrderedDict[str, PeerCounts] = OrderedDict()
        self.totals: dict[str, int] = {"fetched": 0, "served": 0, "read": 0}
        self.live: dict[str, LiveTransfer] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_IN_MEMORY)
        self.samples: deque[dict[str, float]] = deque(maxlen=SAMPLES)
        self._ahead: LRU[ChunkId, tuple[str, int]] = LRU(AHEAD_TRACKED, callback=self._ahead_forgotten)
        self._dirty_images: set[str] = set()
        self._dirty_peers: set[str] = set()
        self._finished: list[dict[str, Any]] = []
        self._db: sqlite3.Connection | None = None
        if db_path is not None:
            self._open(db_path)

    # ------------------------------------------------------------------ hooks (trio thread, O(1))

    def on_chunk(self, label: str | None, peer: str, nbytes: int, why: str, cid: ChunkId) -> None:
        """The fetcher stored chunk ``cid`` (``nbytes``) from ``peer`` for image ``label``."""
        now = time.time()
        self.totals["fetched"] += nbytes
        self._peer(peer, now).fetched += nbytes
        if label is None:
            return
        img = self._image(label, now)
        img.fetched += nbytes
        if why == READ:
            img.misses += 1
        elif why == AHEAD:
            img.ahead += nbytes
            self._ahead[cid] = (label, nbytes)
        t = self.live.get(label)
        if t is None:
            if len(self.live) >= MAX_IMAGES:
                return
            t = self.live[label] = LiveTransfer(label, started=now)
        t.bytes += nbytes
        t.chunks += 1
        t.updated = now
        if why == AHEAD:
            t.ahead_bytes += nbytes
        if peer in t.peers or len(t.peers) < MAX_PEERS:
            t.peers[peer] = t.peers.get(peer, 0) + nbytes

    def on_served(self, peer: str, nbytes: int) -> None:
        """The chunk server sent ``nbytes`` of chunk data to ``peer``."""
        self.totals["served"] += nbytes
        self._peer(peer, time.time()).served += nbytes

    def on_read(self, label: str | None, nbytes: int, plan: Iterable[object]) -> None:
        """The VFS answered a read of ``nbytes`` of image ``label``; ``plan`` is the read's
        plan: ``bytes`` for dirty data, tuples whose second item is a chunk id read."""
        self.totals["read"] += nbytes
        if label is None:
            return
        img = self._image(label, time.time())
        img.reads += 1
        img.bytes_read += nbytes
        ahead = self._ahead
        for item in plan:
            if isinstance(item, tuple):
                img.chunk_reads += 1
                if ahead:
                    used = ahead.pop(item[1], None)
                    if used is not None:
                        img.ahead_used += used[1]

    def _ahead_forgotten(self, cid: ChunkId, entry: tuple[str, int]) -> None:
        img = self.images.get(entry[0])
        if img is not None:
            img.ahead_wasted += entry[1]
            self._dirty_images.add(entry[0])

    def _image(self, label: str, now: float) -> ImageCounts:
        img = self.images.get(label)
        if img is None:
            if len(self.images) >= MAX_IMAGES:
                self.images.popitem(last=False)
            img = self.images[label] = ImageCounts()
        else:
            self.images.move_to_end(label)
        img.last = now
        self._dirty_images.add(label)
        return img

    def _peer(self, peer: str, now: float) -> PeerCounts:
        p = self.peers.get(peer)
        if p is None:
            if len(self.peers) >= MAX_PEERS:
                self.peers.popitem(last=False)
            p = self.peers[peer] = PeerCounts()
        else:
            self.peers.move_to_end(peer)
        p.last = now
        self._dirty_peers.add(peer)
        return p

    # ------------------------------------------------------------------ sampling and the database

    async def run(self, counters: Callable[[], dict[str, float]], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample rates, end idle transfers and save, until cancelled; then save once more.
        ``counters()`` gives the node's cumulative counters to sample (bytes fetched,
        served, read; cache bytes)."""
        task_status.started()
        last_flush = time.monotonic()
        try:
            while True:
                self.sample(counters())
                self.end_idle()
                if time.monotonic() - last_flush >= FLUSH_SECONDS:
                    last_flush = time.monotonic()
                    await self.flush()
                await trio.sleep(SAMPLE_SECONDS)
        finally:
            with trio.CancelScope(shield=True):
                self.end_idle(force=True)
                await self.flush()
                self.close()

    def sample(self, counters: dict[str, float]) -> None:
        now = time.time()
        self.samples.append({"t": now, **counters})
        for t in self.live.values():
            t.window.append((now, t.bytes))

    def rates(self) -> list[dict[str, float]]:
        """Per-second rates between consecutive samples: fetched, served, read (bytes/s)."""
        out = []
        prev: dict[str, float] | None = None
        for s in self.samples:
            if prev is not None:
                dt = max(s["t"] - prev["t"], 1e-3)
                out.append({"t": round(s["t"], 1), **{k: round(max(0.0, (s[k] - prev[k]) / dt), 1)
                                                    for k in ("fetched", "served", "read") if k in s}})
            prev = s
        return out

    def end_idle(self, *, force: bool = False) -> None:
        now = time.time()
        for label in [k for k, t in self.live.items() if force or now - t.updated >= IDLE_END]:
            record = self.live.pop(label).record()
            self.history.append(record)
            self._finished.append(record)
            if len(self._finished) > MAX_TRANSFERS:  # the database is failing: keep the newest
                del self._finished[: len(self._finished) - MAX_TRANSFERS]

    async def flush(self) -> None:
        """Write what changed since the last flush, in one transaction on a worker thread."""
        if self._db is None or not (self._finished or self._dirty_images or self._dirty_peers):
            return
        batch = (list(self._finished),
                 [(k, *(getattr(self.images[k], f) for f in IMAGE_FIELDS), self.images[k].last)
                  for k in self._dirty_images if k in self.images],
                 [(k, self.peers[k].fetched, self.peers[k].served, self.peers[k].last)
                  for k in self._dirty_peers if k in self.peers],
                 dict(self.totals))
        self._finished.clear()
        self._dirty_images.clear()
        self._dirty_peers.clear()
        try:
            await trio.to_thread.run_sync(self._write, *batch)
        except (sqlite3.Error, OSError) as exc:  # e.g. a full disk: the next flush tries again
            log.warning("could not save transfer analytics: %s", exc)
            self._finished[:0] = batch[0]
            self._dirty_images.update(r[0] for r in batch[1])
            self._dirty_peers.update(r[0] for r in batch[2])

    def _open(self, path: Path) -> None:
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.executescript(_SCHEMA)
            for row in db.execute("SELECT path, started, ended, bytes, chunks, ahead_bytes, peers FROM transfers "
                                  "ORDER BY id DESC LIMIT ?", (HISTORY_IN_MEMORY,)):
                self.history.appendleft({"path": row[0], "started": row[1], "ended": row[2], "bytes": row[3],
                                         "chunks": row[4], "ahead_bytes": row[5], "peers": _peers(row[6])})
            cols = ", ".join(IMAGE_FIELDS)
            for row in db.execute(f"SELECT path, {cols}, last FROM image_access ORDER BY last LIMIT ? OFFSET "
                                  f"MAX(0, (SELECT COUNT(*) FROM image_access) - ?)", (MAX_IMAGES, MAX_IMAGES)):
                self.images[row[0]] = ImageCounts(*row[1:])
            for row in db.execute("SELECT peer, fetched, served, last FROM peer_bytes ORDER BY last LIMIT ? OFFSET "
                                  "MAX(0, (SELECT COUNT(*) FROM peer_bytes) - ?)", (MAX_PEERS, MAX_PEERS)):
                self.peers[row[0]] = PeerCounts(*row[1:])
            for key, value in db.execute("SELECT key, value FROM totals"):
                if key in self.totals:
                    self.totals[key] = int(value)
        except sqlite3.Error as exc:  # analytics are not worth refusing to mount for
            log.warning("transfer analytics not kept: %s: %s", path, exc)
            return
        self._db = db

    def _write(self, finished: list[dict[str, Any]], images: list[tuple[Any, ...]], peers: list[tuple[Any, ...]],
               totals: dict[str, int]) -> None:
        db = self._db
        assert db is not None
        marks = ", ".join("?" * (len(IMAGE_FIELDS) + 2))
        with db:
            db.execute("BEGIN")
            db.executemany("INSERT INTO transfers (path, started, ended, bytes, chunks, ahead_bytes, peers) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(r["path"], r["started"], r["ended"], r["bytes"], r["chunks"], r["ahead_bytes"],
                             json.dumps(r["peers"])) for r in finished])
            db.executemany(f"INSERT OR REPLACE INTO image_access (path, {', '.join(IMAGE_FIELDS)}, last) "
                           f"VALUES ({marks})", images)
            db.executemany("INSERT OR REPLACE INTO peer_bytes (peer, fetched, served, last) VALUES (?, ?, ?, ?)",
                           peers)
            db.executemany("INSERT OR REPLACE INTO totals (key, value) VALUES (?, ?)", list(totals.items()))
            # Bounded: the newest rows stay.
            db.execute("DELETE FROM transfers WHERE id <= (SELECT MAX(id) FROM transfers) - ?", (MAX_TRANSFERS,))
            db.execute("DELETE FROM image_access WHERE path NOT IN "
                       "(SELECT path FROM image_access ORDER BY last DESC LIMIT ?)", (MAX_IMAGES,))
            db.execute("DELETE FROM peer_bytes WHERE peer NOT IN "
                       "(SELECT peer FROM peer_bytes ORDER BY last DESC LIMIT ?)", (MAX_PEERS,))

    def stored_transfers(self) -> int:
        """How many finished transfers the database keeps (for tests and the API)."""
        if self._db is None:
            return 0
        (n,) = self._db.execute("SELECT COUNT(*) FROM transfers").fetchone()
        return int(n)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _peers(raw: str) -> dict[str, int]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}

"""Lazy fetching of chunks from peers: who holds what, whom to ask, and asking.

* `Holdings`: which manifests each node holds, completely or in part (a bitmap of
  chunk indices), as announced over the sync sessions (HOLDINGS frames), plus this
  node's own. A holdings record is a hint: a stale one costs one DONT_HAVE and the
  next holder, never an error.
* `PeerBook`: per-peer figures measured on real transfers: request latency and
  throughput (EWMA), requests in flight, failures, and a penalty box for peers that
  sent bad bytes or failed (not asked again for a while).
* `Fetcher.get(cid, holders)`: the verified chunk, stored on local disk once;
  concurrent requests for one chunk share one fetch. Holders are tried best first
  (lowest expected time = latency x (1 + requests in flight), so a sequential
  reader's read-ahead spreads over several holders); each attempt has a deadline, and
  the whole fetch has one: when it passes, the read fails with EIO and a log line
  naming the chunk and every peer tried.

Callers: `blixfs.reader.ChunkReader` (reads), `Vfs` read-ahead, `blixfs pull`. All on
the trio thread; `serve` runs the read-ahead tasks in its nursery.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from blixfs.chunkproto import ChunkClient, FetchFailed
from blixfs.chunkstore import ChunkStore
from blixfs.errors import FsError
from blixfs.hashing import ChunkId, short
from blixfs.net.transport import NodeAddr, Transport, TransportError

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT = 5.0
FETCH_TIMEOUT = 20.0
PENALTY_SECONDS = 60.0
FAILURE_PENALTY_SECONDS = 5.0
STALE_SECONDS = 1.0
READ_AHEAD_PARALLEL = 8
_EWMA = 0.2


@dataclass
class PeerStats:
    """What this node measured about one peer."""

    latency: float = 0.002  # seconds per chunk request (EWMA), a guess until measured
    throughput: float = 0.0  # bytes/s (EWMA)
    inflight: int = 0
    bytes_received: int = 0
    chunks_received: int = 0
    failures: int = 0
    bad_data: int = 0
    penalised_until: float = 0.0
    last_ok: float = 0.0
    # Connection management (blixfs.health): the peer's state as last probed.
    state: str = "unknown"  # connected / degraded / unreachable / unknown
    reason: str = ""  # why degraded or unreachable
    rtt_ms: float | None = None  # QUIC's RTT, else the probe's round trip
    loss: float = 0.0
    last_seen: float = 0.0  # wall clock of the last successful probe or transfer
    found_by: str = ""  # ticket / mdns / exchange (holdings) / incoming

    def expected_seconds(self) -> float:
        return self.latency * (1 + self.inflight)


class PeerBook:
    """Peers' measured figures and addresses (see the module docstring)."""

    def __init__(self, self_id: str) -> None:
        self.self_id = self_id
        self.stats: dict[str, PeerStats] = {}
        self.addrs: dict[str, NodeAddr] = {}

    def learn(self, addr: NodeAddr, found_by: str = "ticket") -> None:
        """Remember how to reach a peer (a newer address replaces the old one)."""
        if addr.node_id == self.self_id:
            return
        if addr.addrs or addr.node_id not in self.addrs:
            self.addrs[addr.node_id] = addr
        stats = self.of(addr.node_id)
        if not stats.found_by:
            stats.found_by = found_by

    def forget(self, node_id: str) -> None:
        self.stats.pop(node_id, None)
        self.addrs.pop(node_id, None)

    def addr(self, node_id: str) -> NodeAddr:
        # Without an address the transport reuses a connection the peer opened to us.
        return self.addrs.get(node_id) or NodeAddr(node_id)

    def of(self, node_id: str) -> PeerStats:
        return self.stats.setdefault(node_id, PeerStats())

    def rank(self, holders: Iterable[str]) -> list[str]:
        """Holders best first by expected time = latency x (1 + requests in flight);
        penalised and unreachable ones last.

        A never-measured holder with no request in flight comes first: every holder is
        asked once and measured, so the nearest one is found rather than assumed. While
        that first request runs it counts with the best measured latency, so it is not
        flooded before it has answered. Requests in flight are how a sequential reader's
        read-ahead spreads over several holders.
        """
        now = time.monotonic()
        unique = [h for h in dict.fromkeys(holders) if h != self.self_id]
        measured = [self.of(h).latency for h in unique if self.of(h).chunks_received]
        prior = min(measured) if measured else PeerStats.latency

        def key(h: str) -> tuple[bool, bool, float]:
            st = self.of(h)
            unmeasured = st.chunks_received == 0
            latency = prior if unmeasured else st.latency
            return (st.penalised_until > now or st.state == "unreachable", not (unmeasured and st.inflight == 0),
                    latency * (1 + st.inflight))

        return sorted(unique, key=key)

    def record_ok(self, node_id: str, nbytes: int, seconds: float) -> None:
        s = self.of(node_id)
        s.latency = seconds if s.chunks_received == 0 else (1 - _EWMA) * s.latency + _EWMA * seconds
        rate = nbytes / max(seconds, 1e-6)
        s.throughput = rate if s.chunks_received == 0 else (1 - _EWMA) * s.throughput + _EWMA * rate
        s.bytes_received += nbytes
        s.chunks_received += 1
        s.last_ok = time.monotonic()
        s.last_seen = time.time()

    def penalise(self, node_id: str, seconds: float, *, bad_data: bool) -> None:
        s = self.of(node_id)
        s.failures += 1
        s.bad_data += int(bad_data)
        s.penalised_until = time.monotonic() + seconds


@dataclass
class NodeHoldings:
    seq: int = 0
    complete: set[bytes] = field(default_factory=set)
    partial: dict[bytes, bytearray] = field(default_factory=dict)  # manifest id -> bitmap of chunk indices
    addr: NodeAddr | None = None  # where the node says it can be reached
    free: int = 0  # bytes its cache can still take, as it announced

    def holds(self, manifest_id: bytes, index: int | None) -> bool:
        if manifest_id in self.complete:
            return True
        bits = self.partial.get(manifest_id)
        if bits is None or index is None:
            return False
        return index // 8 < len(bits) and bool(bits[index // 8] >> (index % 8) & 1)


class Holdings:
    """Who holds which manifests. See the module docstring."""

    def __init__(self, self_id: str) -> None:
        self.self_id = self_id
        self.nodes: dict[str, NodeHoldings] = {}
        # seq starts from the clock: a restarted node's announcements must beat its old ones.
        self.own = self.nodes.setdefault(self_id, NodeHoldings(seq=time.time_ns()))
        self._held: dict[bytes, int] = {}  # set bits of each of own.partial's bitmaps
        self.changed = trio.Event()  # set when this node's own holdings change (to announce them)

    def holders(self, manifest_id: bytes, index: int | None = None) -> list[str]:
        return [n for n, h in self.nodes.items() if n != self.self_id and h.holds(manifest_id, index)]

    def update(self, node_id: str, record: NodeHoldings) -> bool:
        """Take a peer's announcement if it is newer than what we have; True if taken."""
        if node_id == self.self_id:
            return False
        current = self.nodes.get(node_id)
        if current is not None and current.seq >= record.seq:
            return False
        self.nodes[node_id] = record
        return True

    def _touched(self) -> None:
        self.own.seq += 1
        self.changed.set()

    def note_chunk(self, manifest_id: bytes, index: int, count: int) -> None:
        """This node now holds chunk ``index`` of a manifest of ``count`` chunks.

        Called on every read of a fetched file, so it is O(1): a bit already set returns at
        once, and a count of set bits says when the manifest is complete.
        """
        if manifest_id in self.own.complete or not 0 <= index < count:
            return
        bits = self.own.partial.get(manifest_id)
        if bits is None:
            bits = self.own.partial[manifest_id] = bytearray(math.ceil(count / 8))
            self._held[manifest_id] = 0
        mask = 1 << (index % 8)
        if bits[index // 8] & mask:
            return
        bits[index // 8] |= mask
        self._held[manifest_id] += 1
        if self._held[manifest_id] == count:
            del self.own.partial[manifest_id], self._held[manifest_id]
            self.own.complete.add(manifest_id)
        self._touched()

    def note_free(self, free: int) -> None:
        """This node's cache room; announced when it moved by more than 1% of itself (or 64 MiB)."""
        if abs(free - self.own.free) > max(64 << 20, self.own.free // 100):
            self.own.free = free
            self._touched()

    def note_complete(self, manifest_id: bytes) -> None:
        self.own.partial.pop(manifest_id, None)
        self._held.pop(manifest_id, None)
        if manifest_id not in self.own.complete:
            self.own.complete.add(manifest_id)
            self._touched()

    def evicted(self, cids: set[ChunkId], manifest_ids: Callable[[bytes], Iterable[ChunkId] | None]) -> None:
        """This node evicted ``cids``; what it announces follows, so peers do not ask it for them.

        A version held whole that lost chunks is announced as partial, with the chunks it
        still holds; a partial one loses those bits. A version whose manifest went, or is
        unknown (``manifest_ids`` gives a manifest's chunk ids, None if unknown), is dropped.
        """
        for mid in [*self.own.complete, *self.own.partial]:
            ids = manifest_ids(mid)
            if ids is None or mid in cids:
                self._drop(mid)
                continue
            ids = list(ids)
            lost = [i for i, c in enumerate(ids) if c in cids]
            if not lost:
                continue
            if mid in self.own.complete:
                self.own.complete.discard(mid)
                bits = self.own.partial[mid] = bytearray(b"\xff" * (len(ids) // 8))
                if len(ids) % 8:
                    bits.append((1 << (len(ids) % 8)) - 1)
                self._held[mid] = len(ids)
            bits = self.own.partial[mid]
            for i in lost:
                mask = 1 << (i % 8)
                if bits[i // 8] & mask:
                    bits[i // 8] &= ~mask
                    self._held[mid] -= 1
            if self._held[mid] == 0:
                self._drop(mid)
            self._touched()

    def _drop(self, manifest_id: bytes) -> None:
        """Stop announcing ``manifest_id`` at all."""
        if manifest_id in self.own.complete or manifest_id in self.own.partial:
            self.own.complete.discard(manifest_id)
            self.own.partial.pop(manifest_id, None)
            self._held.pop(manifest_id, None)
            self._touched()


@dataclass
class Transfer:
    """Progress of one file's content arriving from peers (reads and pulls)."""

    bytes: int = 0
    chunks: int = 0
    started: float = field(default_factory=time.monotonic)
    updated: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        return self.bytes / max(self.updated - self.started, 1e-3)


class _Load:
    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: FsError | None = None


class Fetcher:
    """Fetches chunks from peers into the local store. See the module docstring."""

    def __init__(self, store: ChunkStore, transport: Transport, peers: PeerBook, *,
                 attempt_timeout: float = ATTEMPT_TIMEOUT, fetch_timeout: float = FETCH_TIMEOUT) -> None:
        self.store = store
        self.transport = transport
        self.client = ChunkClient(transport)
        self.peers = peers
        self.attempt_timeout = attempt_timeout
        self.fetch_timeout = fetch_timeout
        self._loading: dict[ChunkId, _Load] = {}
        self._queued: set[ChunkId] = set()  # read-ahead tasks not finished yet
        self._limit = trio.CapacityLimiter(READ_AHEAD_PARALLEL)
        self._nursery: trio.Nursery | None = None
        self.bytes_fetched = 0
        self.chunks_fetched = 0
        self.transfers: dict[str, Transfer] = {}  # by file path; see `recent_transfers`
        # Called after each chunk is stored (the daemon enforces the cache budget there).
        self.on_stored: Callable[[], object] | None = None
        # Called with each chunk fetched, so a reader keeps read-ahead in memory, not only on disk.
        self.on_fetched: Callable[[ChunkId, bytes], object] | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def loading(self, cid: ChunkId) -> bool:
        return cid in self._loading

    def recent_transfers(self, seconds: float = 60.0) -> dict[str, Transfer]:
        """Files that received content in the last ``seconds`` (older ones are forgotten)."""
        now = time.monotonic()
        for label in [k for k, t in self.transfers.items() if now - t.updated > seconds]:
            del self.transfers[label]
        return dict(self.transfers)

    async def get(self, cid: ChunkId, holders: Sequence[str], label: str | None = None, *,
                  must_store: bool = False) -> bytes:
        """The verified chunk from a holder, stored locally; FsError(EIO) if none could serve it.

        A chunk the store refuses (a full disk) is still returned, for a read to be served
        from memory, unless ``must_store``: then FsError(ENOSPC). Callers that announce or
        promise to hold the chunk (pulls, replicas) must ask for that: holding it in memory
        is not holding it. ``label`` (a file path) counts the bytes towards that file's
        `Transfer`.
        """
        data = await self._get(cid, holders, label)
        if must_store and not self.store.has(cid):
            raise FsError(errno.ENOSPC, f"chunk {short(cid)} was fetched but could not be stored")
        return data

    async def _get(self, cid: ChunkId, holders: Sequence[str], label: str | None) -> bytes:
        pending = self._loading.get(cid)
        if pending is None:
            held = self.store.get(cid) if self.store.has(cid) else None
            if held is not None:  # e.g. a read-ahead that waited for the limiter while a read fetched it
                return held
            pending = self._loading[cid] = _Load()
            try:
                pending.data = await self._fetch(cid, holders)
                if label is not None:
                    t = self.transfers.setdefault(label, Transfer())
                    t.bytes += len(pending.data)
                    t.chunks += 1
                    t.updated = time.monotonic()
            except FsError as exc:
                pending.error = exc
            finally:
                del self._loading[cid]
                pending.done.set()
        else:
            await pending.done.wait()
        if pending.data is None:
            raise pending.error or FsError(errno.EIO, f"chunk {short(cid)} could not be fetched")
        return pending.data

    def prefetch(self, items: Iterable[tuple[ChunkId, Sequence[str]]], label: str | None = None) -> None:
        """Fetch these chunks in the background (read-ahead); no-op until `serve` runs.

        A sequential reader asks for the same window on every read: a chunk already queued,
        being fetched or held is skipped, so each chunk costs one task and one fetch."""
        if self._nursery is None:
            return
        for cid, holders in items:
            if cid not in self._queued and cid not in self._loading and not self.store.has(cid):
                self._queued.add(cid)
                self._nursery.start_soon(self._prefetch_one, cid, holders, label)

    async def _prefetch_one(self, cid: ChunkId, holders: Sequence[str], label: str | None) -> None:
        try:
            async with self._limit:
                # A read may have fetched it (or be fetching it) while this task waited its turn.
                if cid not in self._loading and not self.store.has(cid):
                    await self.get(cid, holders, label)
        except FsError as exc:
            log.debug("read-ahead of chunk %s failed: %s", short(cid), exc)
        finally:
            self._queued.discard(cid)

    async def _fetch(self, cid: ChunkId, holders: Sequence[str]) -> bytes:
        tried: list[str] = []
        reasons: list[str] = []
        with trio.move_on_after(self.fetch_timeout):
            for peer in self.peers.rank(holders):
                tried.append(peer[:16])
                stats = self.peers.of(peer)
                stats.inflight += 1
                try:
                    with trio.fail_after(self.attempt_timeout):
                        fetched = await self.client.fetch(self.peers.addr(peer), cid)
                except FetchFailed as exc:
                    reasons.append(str(exc))
                    if exc.bad_data:
                        log.warning("%s: penalised for %.0f s", exc, PENALTY_SECONDS)
                    self.peers.penalise(peer, PENALTY_SECONDS if exc.bad_data else FAILURE_PENALTY_SECONDS,
                                        bad_data=exc.bad_data)
                    continue
                except (TransportError, trio.TooSlowError) as exc:
                    reasons.append(f"{peer[:16]}: {exc or 'timed out'}")
                    self.peers.penalise(peer, FAILURE_PENALTY_SECONDS, bad_data=False)
                    continue
                finally:
                    stats.inflight -= 1
                if fetched is None:
                    reasons.append(f"{peer[:16]}: does not hold it (stale holdings)")
                    # Asked again only after the others: its announcement is out of date.
                    self.peers.penalise(peer, STALE_SECONDS, bad_data=False)
                    continue
                self.peers.record_ok(peer, len(fetched.data), fetched.seconds)
                self.bytes_fetched += len(fetched.data)
                self.chunks_fetched += 1
                try:
                    self.store.put(fetched.data, verified_id=cid)
                except OSError as exc:  # full disk: still serve this read, from memory
                    log.warning("fetched chunk %s could not be stored: %s", short(cid), exc)
                if self.on_fetched is not None:
                    self.on_fetched(cid, fetched.data)
                if self.on_stored is not None:
                    self.on_stored()
                return fetched.data
        detail = "; ".join(reasons) or "no holder known"
        log.error("chunk %s: no peer could serve it within %.0f s (tried: %s): %s", short(cid), self.fetch_timeout,
                  ", ".join(tried) or "nobody", detail)
        raise FsError(errno.EIO, f"chunk {short(cid)} unavailable (tried {', '.join(tried) or 'nobody'})")

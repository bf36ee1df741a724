"""Fetching chunks from peers: asking, verifying, storing once.

`Fetcher.get(cid, holders, locate=...)` returns the verified chunk, stored on local disk
once; concurrent requests for one chunk share one fetch (single flight). Holders are
tried best first (`blixfs.peers.PeerBook.rank`: lowest expected time = latency x (1 +
requests in flight), so a sequential reader's read-ahead spreads over several holders).
When every holder it was given failed or did not hold the chunk, the fetch asks
``locate`` once for more (the content layer finds holders by content: other versions
that hold the same chunk, and peers that answer HAVE for it, `blixfs.content`). Each
attempt has a deadline, and so does the whole fetch: when it passes, the read fails with
EIO and a log line naming the chunk, every peer tried and why each failed.

A read keeps its deadline for the holders it can count on: the author of the version
and holders that proved they hold data (`PeerBook.trusted`), and holders that served
before (measured). Holders on their own word alone (HOLDINGS, HAVE answers: a hostile
member can claim anything and then stall) get a short attempt deadline
(`EXPLORE_TIMEOUT`, or a few times their measured latency), one unmeasured holder is
explored at a time across all fetches, and once the attempts on untrusted holders have
used `UNTRUSTED_SHARE` of the fetch deadline, the trusted ones still untried go first. A
holder that fails is penalised (ranked last) for a time that doubles with each failure
in a row (`PeerBook.penalise`). The last candidate of a fetch gets the full attempt
deadline: it may be the only one that has the chunk, over a slow link.

Priorities (`blixfs.priority`, docs/design.md "Transfer priorities"). A demand read
(``priority=DEMAND``, the default of `get`) is never queued: it goes straight to its
holders. Every other fetch (trace prefetch, read-ahead, pulls, replicas, pages of whole
versions) goes through one `blixfs.scheduling.FairQueue` of `FETCH_SLOTS`: by class,
then file by file in turn, then first come first served. A non-demand fetch then takes
its bytes from the ``max_background`` limit (`blixfs.limits`; its wait is not counted
against the fetch deadline). While demand fetches are under way, and for
`DEMAND_LINGER_SECONDS` after the last one (a guest's next read comes soon), at most
`BACKGROUND_WHILE_DEMAND` BACKGROUND fetches run instead of `FETCH_SLOTS` (a gate they
pass before the queue): the CPU, the disk and the connections (the bytes of all classes
share one QUIC connection per peer) are the demand reads' first, and the server sends
demand answers first as well (`blixfs.chunkproto`). Background work still moves
meanwhile, at that pace. TRACE and AHEAD fetches are not cut back: they are the chunks a
reader asks for next, and fetched two at a time a sequential reader would catch up with
its own read-ahead and wait for every chunk as a demand read. A
demand read that wants a chunk a background fetch is already getting waits for that
fetch. (Without `serve` running, the slots come back as soon as demand fetches end.)

Who holds what is `blixfs.holdings`; how peers measure is `blixfs.peers`.

Callers: `blixfs.content.Content` (reads, read-ahead, pulls, replicas), on the trio
thread; `serve` runs the read-ahead tasks in its nursery.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from blixfs import metrics
from blixfs.chunkproto import ChunkClient, FetchFailed
from blixfs.chunkstore import ChunkStore
from blixfs.errors import FsError
from blixfs.hashing import ChunkId, short
from blixfs.limits import Limits
from blixfs.net.transport import Transport, TransportError
from blixfs.peers import PeerBook
from blixfs.priority import Priority
from blixfs.scheduling import FairQueue

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT = 5.0
FETCH_TIMEOUT = 20.0
PENALTY_SECONDS = 60.0
FAILURE_PENALTY_SECONDS = 5.0
EXPLORE_TIMEOUT = 1.0  # an attempt on a holder never measured nor trusted (a claim), unless it is the last
UNTRUSTED_SHARE = 0.25  # of the fetch deadline, at most, spent on untrusted holders while trusted ones remain
LATENCY_FACTOR = 10.0  # an untrusted but measured holder gets this many times its latency (EXPLORE..ATTEMPT)
STALE_SECONDS = 1.0
READ_AHEAD_PARALLEL = 8  # workers of one whole-version fetch (and of its pages)
FETCH_SLOTS = 16  # non-demand fetches under way at once, all classes and files together
BACKGROUND_WHILE_DEMAND = 2  # BACKGROUND fetches at once while demand fetches run (and DEMAND_LINGER_SECONDS after)
DEMAND_LINGER_SECONDS = 0.5  # after a demand fetch, background stays cut back this long
CHUNK_ESTIMATE = 256 * 1024  # bytes a non-demand fetch takes from the background limit before it asks

# Told of each chunk fetched: file label, peer, bytes, why ("read", "ahead", "pull"), chunk id.
OnChunk = Callable[[str | None, str, int, str, ChunkId], object]

# Asked with the peers already tried when every given holder failed: more holders to try.
Locate = Callable[[frozenset[str]], Awaitable[list[str]]]


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
    __slots__ = ("data", "done", "error", "priority")

    def __init__(self, priority: Priority) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: FsError | None = None
        self.priority = priority  # the class its requests carry


class Fetcher:
    """Fetches chunks from peers into the local store. See the module docstring."""

    def __init__(self, store: ChunkStore, transport: Transport, peers: PeerBook, *,
                 attempt_timeout: float = ATTEMPT_TIMEOUT, fetch_timeout: float = FETCH_TIMEOUT,
                 allowed: Callable[[str], bool] | None = None,
                 on_stored: Callable[[], object] | None = None,
                 on_fetched: Callable[[ChunkId, bytes], object] | None = None,
                 on_dont_have: Callable[[str, ChunkId], object] | None = None,
                 on_chunk: OnChunk | None = None, limits: Limits | None = None) -> None:
        """Hooks, all optional and fixed for the fetcher's life: ``allowed(peer)`` says whether
        a peer (hex id) may be asked at all (access control, `blixfs.members`; None: anyone);
        ``on_stored()`` runs after each fetched chunk is stored (the daemon enforces the cache
        budget there); ``on_fetched(cid, data)`` gets each chunk fetched (the content layer's
        reader keeps read-ahead in memory, not only on disk); ``on_dont_have(peer, cid)`` hears
        of each DONT_HAVE answer (the content layer forgets what that peer was said to hold);
        ``on_chunk(label, peer, nbytes, why, cid)`` hears of each chunk fetched, from which peer,
        for which file and why ("read", "ahead" or "pull": `blixfs.analytics`). ``limits``:
        the node's bandwidth limits (its ``background`` bucket is used; None: none), which
        the daemon may change at run time."""
        self.store = store
        self.transport = transport
        self.client = ChunkClient(transport)
        self.peers = peers
        self.attempt_timeout = attempt_timeout
        self.fetch_timeout = fetch_timeout
        self._loading: dict[ChunkId, _Load] = {}
        self._queued: set[ChunkId] = set()  # read-ahead tasks not finished yet
        self.queue = FairQueue(FETCH_SLOTS, "fetch")
        # BACKGROUND fetches pass this gate before the queue; it narrows while demand reads run.
        self.background_gate = trio.CapacityLimiter(FETCH_SLOTS)
        self.limits = limits or Limits.create()
        self._demand_fetches = 0  # demand fetches under way
        self._demand_until = 0.0  # trio time until which background stays cut back after the last one
        self._relaxing: trio.CancelScope | None = None  # of the task opening the background gate again
        self._exploring = 0  # attempts under way on holders never measured (one at a time)
        self.explore_timeout = min(EXPLORE_TIMEOUT, attempt_timeout)
        self._nursery: trio.Nursery | None = None
        self.bytes_fetched = 0
        self.chunks_fetched = 0
        self.transfers: dict[str, Transfer] = {}  # by file path; see `recent_transfers`
        self._may_ask = allowed
        self._on_stored = on_stored
        self._on_fetched = on_fetched
        self._on_dont_have = on_dont_have
        self._on_chunk = on_chunk

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
                  must_store: bool = False, locate: Locate | None = None,
                  priority: Priority | None = None) -> bytes:
        """The verified chunk from a holder, stored locally; FsError(EIO) if none could serve it.

        ``priority`` is the fetch's class (None: DEMAND, or BACKGROUND with ``must_store``);
        anything but DEMAND waits its turn and its background bytes first (module docstring).

        ``locate`` is asked once for more holders when those given are used up (see the
        module docstring). A chunk the store refuses (a full disk) is still returned, for a
        read to be served from memory, unless ``must_store``: then FsError(ENOSPC). Callers
        that announce or promise to hold the chunk (pulls, replicas) must ask for that:
        holding it in memory is not holding it. ``label`` (a file path) counts the bytes
        towards that file's `Transfer`.
        """
        if priority is None:
            priority = Priority.BACKGROUND if must_store else Priority.DEMAND
        # A trace prefetch is fetched ahead of its reader, not a read that missed (analytics).
        why = "pull" if must_store else "ahead" if priority is Priority.TRACE else "read"
        if priority is Priority.DEMAND:
            self._demand_fetches += 1
            self.background_gate.total_tokens = BACKGROUND_WHILE_DEMAND
            if self._relaxing is not None:
                self._relaxing.deadline = math.inf  # not while this one runs
            try:
                data = await self._get(cid, holders, label, locate, why, priority)
            finally:
                self._demand_fetches -= 1
                self._demand_until = trio.current_time() + DEMAND_LINGER_SECONDS
                self._demand_over()
        else:
            data = await self._scheduled(cid, holders, label, locate, why, priority)
        if must_store and not self.store.has(cid):
            raise FsError(errno.ENOSPC, f"chunk {short(cid)} was fetched but could not be stored")
        return data

    async def _scheduled(self, cid: ChunkId, holders: Sequence[str], label: str | None, locate: Locate | None,
                         why: str, priority: Priority) -> bytes:
        """A non-demand fetch: (BACKGROUND: the gate, then) a slot of the queue, then the
        background limit's bytes, then `_get`."""
        if priority is Priority.BACKGROUND:
            borrower = object()  # one task may fetch many, one after another (a pull's worker)
            await self.background_gate.acquire_on_behalf_of(borrower)
            try:
                return await self._queued_fetch(cid, holders, label, locate, why, priority)
            finally:
                self.background_gate.release_on_behalf_of(borrower)
        return await self._queued_fetch(cid, holders, label, locate, why, priority)

    async def _queued_fetch(self, cid: ChunkId, holders: Sequence[str], label: str | None, locate: Locate | None,
                            why: str, priority: Priority) -> bytes:
        async with self.queue.slot(priority, label):
            if cid in self._loading:  # a read is fetching it: wait for that, no bytes of our own
                return await self._get(cid, holders, label, locate, why, priority)
            held = self.store.get(cid) if self.store.has(cid) else None
            if held is not None:  # a read fetched it while this one waited its turn
                return held
            bucket = self.limits.background
            await bucket.take(CHUNK_ESTIMATE, priority)
            fetched = 0
            try:
                data = await self._get(cid, holders, label, locate, why, priority)
                fetched = len(data)
            finally:
                bucket.charge(fetched - CHUNK_ESTIMATE)  # settled: the real size (0 when it failed)
            return data

    def _demand_over(self) -> None:
        """A demand fetch ended: the background gate opens again DEMAND_LINGER_SECONDS after the
        last one (by a task in `serve`'s nursery; at once without one)."""
        if self._demand_fetches:
            return
        if self._nursery is None:
            self.background_gate.total_tokens = FETCH_SLOTS
        elif self._relaxing is not None:
            self._relaxing.deadline = self._demand_until
        else:
            self._relaxing = trio.CancelScope(deadline=self._demand_until)
            self._nursery.start_soon(self._relax, self._relaxing)

    async def _relax(self, scope: trio.CancelScope) -> None:
        """Open the background gate again when ``scope``'s deadline (moved by each demand
        fetch's start and end) passes."""
        try:
            with scope:
                await trio.sleep_forever()
        finally:
            self._relaxing = None
        self.background_gate.total_tokens = FETCH_SLOTS

    async def _get(self, cid: ChunkId, holders: Sequence[str], label: str | None, locate: Locate | None,
                   why: str, priority: Priority = Priority.DEMAND) -> bytes:
        pending = self._loading.get(cid)
        if pending is None:
            held = self.store.get(cid) if self.store.has(cid) else None
            if held is not None:  # e.g. a read-ahead that waited for its turn while a read fetched it
                return held
            pending = self._loading[cid] = _Load(priority)
            started = time.perf_counter()
            try:
                pending.data, peer = await self._fetch(cid, holders, locate, pending)
                metrics.fetch_seconds.labels("ok").observe(time.perf_counter() - started)
                if self._on_chunk is not None:
                    self._on_chunk(label, peer, len(pending.data), why, cid)
                if label is not None:
                    t = self.transfers.setdefault(label, Transfer())
                    t.bytes += len(pending.data)
                    t.chunks += 1
                    t.updated = time.monotonic()
            except FsError as exc:
                pending.error = exc
                metrics.fetch_seconds.labels("failed").observe(time.perf_counter() - started)
            finally:
                del self._loading[cid]
                pending.done.set()
        else:
            await pending.done.wait()
        if pending.data is None:
            raise pending.error or FsError(errno.EIO, f"chunk {short(cid)} could not be fetched")
        return pending.data

    def prefetch(self, items: Iterable[tuple[ChunkId, Sequence[str], Locate | None]], label: str | None = None, *,
                 priority: Priority = Priority.AHEAD) -> None:
        """Fetch these chunks in the background at class ``priority`` (AHEAD: read-ahead;
        TRACE: a trace's order); no-op until `serve` runs. Tasks wait their turn in the
        queue (module docstring).

        A sequential reader asks for the same window on every read: a chunk already queued,
        being fetched or held is skipped, so each chunk costs one task and one fetch."""
        if self._nursery is None:
            return
        for cid, holders, locate in items:
            if cid not in self._queued and cid not in self._loading and not self.store.has(cid):
                self._queued.add(cid)
                self._nursery.start_soon(self._prefetch_one, cid, holders, label, locate, priority)

    async def _prefetch_one(self, cid: ChunkId, holders: Sequence[str], label: str | None,
                            locate: Locate | None, priority: Priority) -> None:
        try:
            await self._scheduled(cid, holders, label, locate, "ahead", priority)
        except FsError as exc:
            log.debug("read-ahead of chunk %s failed: %s", short(cid), exc)
        finally:
            self._queued.discard(cid)

    def _deadline(self, peer: str, last: bool, remaining: float) -> float:
        """The attempt deadline for ``peer`` (module docstring)."""
        stats = self.peers.of(peer)
        if last or self.peers.is_trusted(peer):
            wanted = self.attempt_timeout
        elif stats.chunks_received:
            wanted = min(self.attempt_timeout, max(self.explore_timeout, LATENCY_FACTOR * stats.latency))
        else:
            wanted = self.explore_timeout
        return max(0.0, min(wanted, remaining))

    async def _fetch(self, cid: ChunkId, holders: Sequence[str], locate: Locate | None,
                     load: _Load) -> tuple[bytes, str]:
        """The verified chunk and the peer that served it; FsError(EIO) when none could."""
        tried: list[str] = []
        reasons: list[str] = []
        asked: set[str] = set()
        end = trio.current_time() + self.fetch_timeout
        untrusted_budget = self.fetch_timeout * UNTRUSTED_SHARE
        untrusted_spent = 0.0
        with trio.move_on_after(self.fetch_timeout):
            queue = self.peers.rank(self._allowed(holders), explore=self._exploring == 0)
            while True:
                while queue:
                    peer = queue.pop(0)
                    trusted = self.peers.is_trusted(peer)
                    if not trusted and untrusted_spent >= untrusted_budget \
                            and any(self.peers.is_trusted(p) for p in queue):
                        queue.append(peer)  # the trusted holders still untried go first
                        continue
                    asked.add(peer)
                    tried.append(peer[:16])
                    last = not queue and locate is None
                    started = trio.current_time()
                    exploring = self.peers.of(peer).chunks_received == 0 and not trusted
                    self._exploring += exploring
                    try:
                        data = await self._attempt(peer, cid, reasons,
                                                   self._deadline(peer, last, end - trio.current_time()), load)
                    finally:
                        self._exploring -= exploring
                    if not trusted:
                        untrusted_spent += trio.current_time() - started
                    if data is not None:
                        return data, peer
                if locate is None:
                    break
                # Every holder we were told of failed or lacks it: find holders by content, once.
                more = [p for p in await locate(frozenset(asked)) if p not in asked]
                locate = None
                queue = self.peers.rank(self._allowed(more), explore=self._exploring == 0)
        detail = "; ".join(reasons) or "no holder known"
        log.error("chunk %s: no peer could serve it within %.0f s (tried: %s): %s", short(cid), self.fetch_timeout,
                  ", ".join(tried) or "nobody", detail)
        raise FsError(errno.EIO, f"chunk {short(cid)} unavailable (tried {', '.join(tried) or 'nobody'})")

    def _allowed(self, holders: Sequence[str]) -> list[str]:
        """Holders this node may ask: a node not in a closed namespace's member list never is."""
        return [h for h in holders if self._may_ask is None or self._may_ask(h)]

    async def _attempt(self, peer: str, cid: ChunkId, reasons: list[str], seconds: float,
                       load: _Load) -> bytes | None:
        """One request to ``peer`` within ``seconds``: the verified chunk, stored; None (and a
        reason) if not had."""
        stats = self.peers.of(peer)
        stats.inflight += 1
        try:
            with trio.fail_after(seconds):
                fetched = await self.client.fetch(self.peers.addr(peer), cid, load.priority)
        except FetchFailed as exc:
            reasons.append(str(exc))
            given = self.peers.penalise(peer, PENALTY_SECONDS if exc.bad_data else FAILURE_PENALTY_SECONDS,
                                        bad_data=exc.bad_data)
            if exc.bad_data:
                log.warning("%s: penalised for %.0f s", exc, given)
            return None
        except (TransportError, trio.TooSlowError) as exc:
            reasons.append(f"{peer[:16]}: {str(exc) or 'timed out'}")
            self.peers.penalise(peer, FAILURE_PENALTY_SECONDS, bad_data=False)
            return None
        finally:
            stats.inflight -= 1
        if fetched is None:
            reasons.append(f"{peer[:16]}: does not hold it")
            if self._on_dont_have is not None:
                self._on_dont_have(peer, cid)
            return None
        self.peers.record_ok(peer, len(fetched.data), fetched.seconds)
        metrics.count_fetched(peer, len(fetched.data))
        self.bytes_fetched += len(fetched.data)
        self.chunks_fetched += 1
        try:
            self.store.put(fetched.data, verified_id=cid)
        except OSError as exc:  # full disk: still serve this read, from memory
            log.warning("fetched chunk %s could not be stored: %s", short(cid), exc)
        if self._on_fetched is not None:
            self._on_fetched(cid, fetched.data)
        if self._on_stored is not None:
            self._on_stored()
        return fetched.data

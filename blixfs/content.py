"""The content of file versions: manifests, holders found by content, and fetching.

One place for what the VFS, the daemon (`blixfs pull`), replication and GC need to know
about a version's content:

* **Manifests.** `manifest(mid)` decodes a manifest root held here (cached, LRU);
  `load(mid, holders)` fetches it first when only peers hold it. A manifest that does
  not decode is EIO, never a crash.
* **Pages** of manifest trees (`blixfs.manifest`) are read lazily like chunks: `page`
  gives one held here (memory LRU, then the store), `load_page` fetches it from the
  version's holders, and `walk(fn, mid, author)` runs a synchronous walk ``fn(get)``,
  loading each page it misses and running it again: the caller then uses the ids with
  no await in between. A page that does not fit its place in the tree is EIO.
* **Holders by content** (docs/protocol.md 14.2). Whoever holds the *bytes* of a chunk
  can serve it, whatever version it read them under. `holders(cid, manifest, index,
  author)` gathers, cheapest first: the nodes whose holdings say they hold chunk
  ``index`` of ``manifest``; those holding the same chunk at the same index of any other
  version whose manifest is decoded here (a VM image changes in place: its versions
  share most chunks at the same places); peers that answered HAVE for it; and the
  version's author. When all of them fail, `locate` asks the connected peers with one
  HAVE for a window of the version's missing chunks, so a node that writes 4 KiB into a
  file it never held, and every node that reads the version it committed, find the
  unchanged chunks on whichever nodes hold them.
* **Fetching a version whole** (`fetch_version`): every missing chunk, stored (not only
  read), with progress; used by `blixfs pull` and by replica targets. Chunks are taken in
  an order of the fetch's own, from whoever can send them soonest (`blixfs.swarm`).

Callers: `Vfs` (reads, writes, commits), the daemon, the replicator, on the trio thread.
Before the daemon connects it to the network (`connect`), only what is held here is readable.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from lru import LRU

from blixfs.chunkproto import FetchFailed
from blixfs.chunkstore import ChunkStore
from blixfs.errors import FsError
from blixfs.fetcher import ATTEMPT_TIMEOUT, READ_AHEAD_PARALLEL, Fetcher, Locate
from blixfs.hashing import HOLE, ChunkId, short
from blixfs.holdings import Holdings, NodeHoldings
from blixfs.manifest import Manifest, ManifestError, MissingPage, PageGet, iter_chunks, iter_tree, lookup, stored_bytes
from blixfs.net.transport import TransportError
from blixfs.peers import PeerBook
from blixfs.priority import Priority
from blixfs.reader import ChunkReader, Fetch
from blixfs.swarm import ChunkPicker, pick_cost

log = logging.getLogger(__name__)

MANIFEST_CACHE = 256  # decoded manifests kept in memory
STORED_TTL = 30.0  # seconds a version's stored bytes are reused while some of its pages are not here
PAGE_CACHE = 1024  # manifest pages kept in memory (16 MiB: 512 Ki chunk ids, 128 GiB at 256 KiB)
HINT_CAPACITY = 1 << 17  # chunk ids whose HAVE answers are remembered (128 Ki x 256 KiB = 32 GiB of content)
LOCATE_WINDOW = 256  # chunks of a version asked about in one HAVE (64 MiB at 256 KiB)
LOCATE_PEERS = 16  # connected peers asked at once
ORDER_WINDOW = 4096  # missing chunks of a version a whole-version fetch picks from (1 GiB at 256 KiB)
PICK_WAIT = 0.5  # seconds a whole-version fetch's worker waits, at most, when every holder is busy

Progress = Callable[[int, int], Awaitable[None] | None]


@dataclass
class VersionFetch:
    """What `Content.fetch_version` did."""

    manifest: Manifest
    fetched_bytes: int = 0
    missing_bytes: int = 0  # what was missing when it started
    failed: list[str] = field(default_factory=list)


def read_manifest(store: ChunkStore, mid: bytes) -> Manifest | None:
    """The manifest ``mid`` decoded from ``store``; None if not held there or invalid (logged).
    For callers without a `Content` (offline GC, the cache policy); the rest use `Content`."""
    raw = store.get(ChunkId(mid))
    if raw is None:
        return None
    try:
        return Manifest.decode(raw)
    except ManifestError as exc:
        log.error("manifest %s held here is invalid: %s", short(mid), exc)
        return None


def walk_held(store: ChunkStore, mid: bytes) -> tuple[Manifest | None, list[ChunkId]]:
    """Every page and non-hole chunk id of version ``mid`` read from ``store``, streamed page
    by page (the root's id is not included), and the root; (None, []) when the root is not
    held. `MissingPage` when a page is not held here, `ManifestError` when one is invalid."""
    m = read_manifest(store, mid)
    if m is None:
        return None, []
    return m, [cid for _, _, cid in iter_tree(m, store.get)]


T = TypeVar("T")


@dataclass(frozen=True)
class Network:
    """What the content layer reads through once the node is on the network (`Content.connect`).

    ``fetcher`` is built with this content layer's hooks: ``on_fetched=content.reader.remember``
    (chunks fetched ahead are kept in memory) and ``on_dont_have=content.forget_holder`` (a
    DONT_HAVE drops what that peer was said to hold); ``connected()`` lists the peers a
    HAVE may be sent to."""

    fetcher: Fetcher
    holdings: Holdings
    peers: PeerBook
    connected: Callable[[], list[str]]


class Content:
    """See the module docstring. One per node (the VFS's chunk store).

    The VFS builds it before the node is on the network (the mount starts the daemon
    after), so the network comes in one step: the daemon builds the fetcher with this
    layer's hooks (`Network`) and calls `connect` once, before it serves."""

    def __init__(self, store: ChunkStore, *, cache_chunks: int = 64) -> None:
        self.store = store
        self.reader = ChunkReader(store, cache_chunks=cache_chunks)
        self._net: Network | None = None
        self._manifests: LRU[bytes, Manifest] = LRU(MANIFEST_CACHE)
        self._pages: LRU[ChunkId, bytes] = LRU(PAGE_CACHE)
        self._stored: LRU[bytes, tuple[int, float]] = LRU(MANIFEST_CACHE)  # bytes, valid until
        self._hints: LRU[ChunkId, tuple[str, ...]] = LRU(HINT_CAPACITY)
        self._locating: dict[ChunkId, trio.Event] = {}
        self.have_queries = 0

    def connect(self, network: Network) -> None:
        """Put this node on the network, once (the daemon, before it serves): from then on
        chunks not held here are fetched from their holders instead of reading as missing."""
        assert self._net is None, "the content layer is connected once"
        self._net = network

    @property
    def fetcher(self) -> Fetcher | None:
        return self._net.fetcher if self._net is not None else None

    @property
    def holdings(self) -> Holdings | None:
        return self._net.holdings if self._net is not None else None

    @property
    def peers(self) -> PeerBook | None:
        return self._net.peers if self._net is not None else None

    def _connected(self) -> list[str]:
        return self._net.connected() if self._net is not None else []

    # ------------------------------------------------------------------ manifests

    def manifest(self, mid: bytes) -> Manifest | None:
        """The decoded manifest if held here (or cached); None if not. EIO if it does not decode."""
        cached: Manifest | None = self._manifests.get(mid)
        if cached is not None:
            return cached
        raw = self.store.get(ChunkId(mid))
        return None if raw is None else self._decode(mid, raw)

    def cached_manifest(self, mid: bytes) -> Manifest | None:
        """The manifest if decoded already: never reads the disk (attributes, listings)."""
        cached: Manifest | None = self._manifests.get(mid)
        return cached

    def held_chunks(self, mid: bytes) -> tuple[int, list[tuple[int, ChunkId]], bool] | None:
        """A held version's chunk count, its non-hole (index, id) pairs under the pages in the
        store (a subtree whose page is not is left out), and whether every page is there;
        None if its root is not held or anything is invalid. For the holdings on eviction."""
        try:
            m = self.manifest(mid)
        except FsError:
            return None
        if m is None:
            return None
        out: list[tuple[int, ChunkId]] = []
        missing: list[MissingPage] = []
        try:
            for level, start, cid in iter_tree(m, lambda pid: self.page(pid) if self.store.has(pid) else None,
                                               on_missing=missing.append):
                if level < 0:
                    out.append((start, cid))
        except ManifestError as exc:
            log.error("manifest %s held here has an invalid page: %s", short(mid), exc)
            return None
        return m.count, out, not missing

    def stored_bytes(self, mid: bytes, m: Manifest) -> int:
        """Bytes version ``mid``'s chunks occupy (holes none), from the pages held here; a
        subtree whose page is not here counts whole (an upper bound: replica room is never
        overcommitted). Cached: for good once exact (a version is immutable), for
        `STORED_TTL` seconds while pages are missing (attributes ask on every getattr)."""
        now = time.monotonic()
        cached: tuple[int, float] | None = self._stored.get(mid)
        if cached is not None and now < cached[1]:
            return cached[0]
        try:
            total, exact = stored_bytes(m, lambda pid: self.page(pid) if self.store.has(pid) else None)
        except ManifestError:
            return m.size
        self._stored[mid] = (total, math.inf if exact else now + STORED_TTL)
        return total

    # ------------------------------------------------------------------ pages

    def page(self, pid: ChunkId) -> bytes | None:
        """A manifest page held here (memory, then the store; sync); None if not held."""
        raw: bytes | None = self._pages.get(pid)
        if raw is None:
            raw = self.store.get(pid)
            if raw is not None:
                self._pages[pid] = raw
        return raw

    def cached_page(self, pid: ChunkId) -> bytes | None:
        """A page in memory: never reads the disk (hints gathered on every read)."""
        raw: bytes | None = self._pages.get(pid)
        return raw

    async def load_page(self, pid: ChunkId, mid: bytes | None, author: bytes | None,
                        holders: Sequence[str] = (), *, priority: Priority | None = None) -> bytes:
        """Page ``pid`` of version ``mid``: held here, or fetched (verified by its id) from the
        version's holders, its author, or peers that answer HAVE, at class ``priority`` (None:
        a demand read's); EIO if it cannot be had."""
        raw = self.page(pid)
        if raw is not None:
            return raw
        everyone = [*holders, *(self._version_holders(mid, None, author) if mid is not None else [])]
        got = await self.reader.get(pid, self._fetch(pid, lambda: everyone, None, self._locator(pid, None, 0, author),
                                                     priority))
        if got is None:
            raise FsError(errno.EIO, f"manifest page {short(pid)} is not held by this node and no peer is known "
                                     "to hold it")
        raw = bytes(got)
        self._pages[pid] = raw
        return raw

    async def walk(self, fn: Callable[[PageGet], T], mid: bytes | None, author: bytes | None,
                   holders: Sequence[str] = (), *, priority: Priority | None = None) -> T:
        """``fn(get)``, a synchronous walk of version ``mid``'s tree, run again after loading
        each page it missed (`MissingPage`, at class ``priority``); the pages it used stay
        readable through `page` until the caller next awaits. EIO if a page cannot be had or
        is invalid."""
        loaded: dict[ChunkId, bytes] = {}

        def get(pid: ChunkId) -> bytes | None:
            return loaded.get(pid) or self.page(pid)
        while True:
            try:
                return fn(get)
            except MissingPage as missing:
                loaded[missing.pid] = await self.load_page(missing.pid, mid, author, holders, priority=priority)
            except ManifestError as exc:
                raise FsError(errno.EIO, f"manifest {short(mid or b'')} has an invalid page: {exc}") from exc

    def _cached_id(self, m: Manifest, index: int) -> ChunkId | None:
        """Chunk ``index`` of ``m`` if its pages are in memory; None otherwise (a hint only)."""
        if index >= m.count:
            return None
        try:
            return lookup(m, self.cached_page, index)
        except (MissingPage, ManifestError):
            return None

    async def load(self, mid: bytes, author: bytes | None = None, holders: Sequence[str] = (), *,
                   priority: Priority | None = None) -> Manifest:
        """The manifest, fetched from its holders when not held here at class ``priority``
        (None: a demand read's; pulls, replicas and trace prefetch say theirs); EIO if it
        cannot be had."""
        m = self.manifest(mid)
        if m is not None:
            return m
        cid = ChunkId(mid)
        everyone = [*holders, *self._version_holders(mid, None, author)]
        raw = await self.reader.get(cid, self._fetch(cid, lambda: everyone, None, self._locator(cid, None, 0, author),
                                                     priority))
        if raw is None:
            raise FsError(errno.EIO, f"manifest {short(mid)} is not held by this node and no peer is known to hold it")
        return self._decode(mid, bytes(raw))

    def _decode(self, mid: bytes, raw: bytes) -> Manifest:
        try:
            m = Manifest.decode(raw)
        except ManifestError as exc:
            raise FsError(errno.EIO, f"manifest {short(mid)} is invalid: {exc}") from exc
        self._manifests[mid] = m
        return m

    def remember(self, mid: bytes, m: Manifest) -> None:
        """A manifest this node just stored (a commit): decoded already, keep it."""
        self._manifests[mid] = m

    # ------------------------------------------------------------------ holders

    def _trust(self, author: bytes) -> str:
        """The version's author is a writer (its entry carries the namespace signature) and
        wrote the content: a read keeps its deadline for it (`blixfs.fetcher`), unlike for
        holders on their own word (HOLDINGS, HAVE answers)."""
        node = author.hex()
        if self.peers is not None:
            self.peers.trusted.add(node)
        return node

    def _version_holders(self, mid: bytes, index: int | None, author: bytes | None) -> list[str]:
        found = self.holdings.holders(mid, index) if self.holdings is not None else []
        return [*found, self._trust(author)] if author is not None else found

    def holders(self, cid: ChunkId, mid: bytes | None, index: int, author: bytes | None) -> list[str]:
        """Nodes likely to hold chunk ``cid`` (chunk ``index`` of version ``mid``), best
        evidence first; see the module docstring. Cheap: no I/O, no network."""
        out: list[str] = []
        holdings = self.holdings
        if holdings is not None:
            if mid is not None:
                out += holdings.holders(mid, index)
            for other, m in self._manifests.items():
                if other != mid and self._cached_id(m, index) == cid:
                    out += holdings.holders(other, index)
        out += self._hints.get(cid, ())
        if author is not None:
            out.append(self._trust(author))
        return list(dict.fromkeys(out))

    def _locator(self, cid: ChunkId, manifest: Manifest | None, index: int, author: bytes | None) -> Locate:
        async def locate(tried: frozenset[str]) -> list[str]:
            return await self.locate(cid, manifest, index, tried)
        return locate

    def forget_holder(self, peer: str, cid: ChunkId) -> None:
        """``peer`` answered DONT_HAVE for ``cid`` (the fetcher's ``on_dont_have`` hook): it is
        no longer offered as a holder found by HAVE."""
        hinted = self._hints.get(cid)
        if hinted is not None and peer in hinted:
            rest = tuple(p for p in hinted if p != peer)
            if rest:
                self._hints[cid] = rest
            else:
                del self._hints[cid]

    async def locate(self, cid: ChunkId, manifest: Manifest | None, index: int, tried: frozenset[str]) -> list[str]:
        """Holders of ``cid`` not in ``tried``, found by asking connected peers (HAVE) about a
        window of ``manifest``'s missing chunks from ``index`` on; concurrent locates of
        overlapping windows share one round of questions."""
        pending = self._locating.get(cid)
        if pending is not None:
            await pending.wait()
            return [p for p in self._hints.get(cid, ()) if p not in tried]
        if self.fetcher is None or self.peers is None:
            return []
        window = [cid]
        if manifest is not None:
            for i in range(index + 1, min(index + LOCATE_WINDOW, manifest.count)):
                c = self._cached_id(manifest, i)
                if c is not None and c != HOLE and c != cid and c not in self._locating and c not in self._hints \
                        and not self.store.has(c):
                    window.append(c)
        window = list(dict.fromkeys(window))
        asked = [p for p in self.peers.rank(self._connected()) if p not in tried][:LOCATE_PEERS]
        if not asked:
            return []
        done = trio.Event()
        for c in window:
            self._locating[c] = done
        try:
            async with trio.open_nursery() as nursery:
                for peer in asked:
                    nursery.start_soon(self._ask_have, peer, window)
        finally:
            for c in window:
                if self._locating.get(c) is done:
                    del self._locating[c]
            done.set()
        found = [p for p in self._hints.get(cid, ()) if p not in tried]
        log.debug("chunk %s: %d holders found by asking %d peers about %d chunks", short(cid), len(found),
                  len(asked), len(window))
        return found

    async def _ask_have(self, peer: str, window: list[ChunkId]) -> None:
        assert self.fetcher is not None and self.peers is not None
        self.have_queries += 1
        try:
            with trio.fail_after(ATTEMPT_TIMEOUT):
                answer = await self.fetcher.client.have(self.peers.addr(peer), window)
        except (FetchFailed, TransportError, trio.TooSlowError) as exc:  # that peer is not asked this round
            log.debug("HAVE to %s failed: %s", peer[:16], exc or "timed out")
            return
        for c, held in zip(window, answer, strict=True):
            if held:
                hinted = self._hints.get(c, ())
                if peer not in hinted:
                    self._hints[c] = (*hinted, peer)

    # ------------------------------------------------------------------ chunks

    async def chunk(self, cid: ChunkId, mid: bytes | None, index: int, author: bytes | None,
                    label: str | None = None) -> bytes | None:
        """The verified bytes of chunk ``index`` of version ``mid``: from memory, the store,
        or its holders; None if not held and no network; FsError(EIO) if no holder could
        serve it in time."""
        manifest = self._manifests.get(mid) if mid is not None else None
        return await self.reader.get(cid, self._fetch(cid, lambda: self.holders(cid, mid, index, author), label,
                                                      self._locator(cid, manifest, index, author)))

    async def chunk_range(self, cid: ChunkId, mid: bytes | None, index: int, author: bytes | None,
                          offset: int, length: int, label: str | None = None) -> bytes | None:
        """Bytes [offset, offset + length) of chunk ``index`` of version ``mid`` (fewer past
        its end): checked by block from memory or the store when held here, else the chunk
        is fetched whole and verified by BLAKE3 as `chunk` does (then kept in memory, so the
        rest of it is read from there). None and FsError(EIO) as for `chunk`."""
        part = self.reader.get_range(cid, offset, length)
        if part is not None:
            return part
        data = await self.chunk(cid, mid, index, author, label)
        return None if data is None else data[offset : offset + length]

    def _fetch(self, cid: ChunkId, holders: Callable[[], Sequence[str]], label: str | None,
               locate: Locate, priority: Priority | None = None) -> Fetch | None:
        """How the reader fetches ``cid`` when not held here (None: not on the network), at
        class ``priority`` (None: DEMAND). ``holders`` is asked only then: gathering them is
        not free."""
        fetcher = self.fetcher
        if fetcher is None:
            return None

        async def fetch() -> bytes:
            return await fetcher.get(cid, holders(), label, locate=locate, priority=priority)
        return fetch

    async def fetch_chunk(self, cid: ChunkId, mid: bytes | None, index: int, author: bytes | None,
                          label: str | None = None, *, priority: Priority = Priority.AHEAD) -> None:
        """Fetch chunk ``index`` (``cid``) of version ``mid`` into the store (memory too) unless
        held, from its holders, at ``priority`` (trace prefetch: `blixfs.traces`). FsError
        (EIO) when no holder could serve it; a no-op when this node is not on the network."""
        fetcher = self.fetcher
        if fetcher is None or self.store.has(cid):
            return
        manifest = self._manifests.get(mid) if mid is not None else None
        await fetcher.get(cid, self.holders(cid, mid, index, author), label,
                          locate=self._locator(cid, manifest, index, author), priority=priority)

    def prefetch(self, wanted: dict[ChunkId, int], mid: bytes | None, author: bytes | None,
                 label: str | None = None, *, priority: Priority = Priority.AHEAD) -> None:
        """Read-ahead: chunks (id -> index in version ``mid``) a sequential reader wants next,
        fetched at class ``priority`` (`blixfs.fetcher`)."""
        manifest = self._manifests.get(mid) if mid is not None else None
        missing = self.reader.prefetch(wanted)
        fetcher = self.fetcher
        if fetcher is not None:
            fetcher.prefetch(((cid, self.holders(cid, mid, wanted[cid], author),
                               self._locator(cid, manifest, wanted[cid], author)) for cid in missing), label,
                             priority=priority)

    # ------------------------------------------------------------------ whole versions

    async def fetch_version(self, mid: bytes, *, author: bytes | None, label: str | None,
                            extra_holders: Sequence[str] = (), progress: Progress | None = None,
                            parallel: int = READ_AHEAD_PARALLEL,
                            priority: Priority = Priority.BACKGROUND) -> VersionFetch:
        """Fetch and store every page, then every chunk, of version ``mid`` not held here,
        announcing each chunk in the holdings, then the version as held whole. Failures are
        collected, not raised (the caller decides); FsError only when the root itself cannot
        be had or a page is invalid (EIO). Streams: pages level by level, then chunks through
        ``parallel`` workers from a window of at most `ORDER_WINDOW` missing ones, never a
        list of every chunk; each worker picks its next chunk by who can send it soonest
        (`blixfs.swarm`), so nodes pulling one version at once serve each other. Every fetch
        is of class ``priority`` (pulls and replicas: BACKGROUND; `blixfs pull --priority`)."""
        fetcher = self.fetcher
        if fetcher is None:
            raise FsError(errno.EIO, "this node is not on the network")
        m = await self.load(mid, author, extra_holders, priority=priority)
        if not self.store.has(ChunkId(mid)):  # held in memory only (full disk): not held
            raise FsError(errno.ENOSPC, f"manifest {short(mid)} could not be stored")
        report = VersionFetch(m)
        if not await self._fetch_pages(m, mid, author, label, extra_holders, report, priority):
            return report
        try:
            report.missing_bytes = sum(m.length(i) for i, cid in iter_chunks(m, self.store.get)
                                       if not self.store.has(cid))
        except (MissingPage, ManifestError) as exc:  # evicted or corrupted meanwhile
            report.failed.append(f"manifest {short(mid)}: {exc}")
            return report
        # Which chunk next: the one the soonest holder can send, rarest first, from a window
        # in an order of this fetch's own (`blixfs.swarm`): hosts pulling one image at once
        # serve each other instead of all waiting on its source.
        holdings = self.holdings
        whole = NodeHoldings(complete={mid})
        sources = [(self._trust(author), whole)] if author is not None else []
        sources += [(p, whole) for p in extra_holders]
        peers = self.peers
        picker = ChunkPicker(mid, lambda: [*sources, *(holdings.version_holders(mid) if holdings else [])],
                             (lambda node: pick_cost(peers, node)) if peers is not None else lambda _: 0.0)
        under_way = 0
        returned = trio.Event()  # set when one of this fetch's requests returns: holders less busy
        missing = iter_chunks(m, self.store.get)

        def refill() -> None:
            """Keep `ORDER_WINDOW` missing chunks to pick from (synchronous: pages held here)."""
            nonlocal missing
            if len(picker) > ORDER_WINDOW // 2:
                return
            try:
                for index, cid in missing:
                    if not self.store.has(cid):
                        picker.add(index, cid)
                        if len(picker) >= ORDER_WINDOW:
                            return
            except (MissingPage, ManifestError) as exc:
                report.failed.append(f"manifest {short(mid)}: {exc}")
            missing = iter(())

        async def one(index: int, cid: ChunkId) -> None:
            try:
                if not self.store.has(cid):
                    holders = [*extra_holders, *self.holders(cid, mid, index, author)]
                    await fetcher.get(cid, holders, label, must_store=True, priority=priority,
                                      locate=self._locator(cid, m, index, author))
            except FsError as exc:
                report.failed.append(str(exc))
                return
            report.fetched_bytes += m.length(index)
            if self.holdings is not None:
                self.holdings.note_chunk(mid, index, m.count)
            if progress is not None:
                result = progress(report.fetched_bytes, report.missing_bytes)
                if result is not None:
                    await result

        async def worker() -> None:
            nonlocal under_way, returned
            while True:
                refill()
                item = picker.take(force=not under_way)
                if item is None:
                    if not picker:
                        return
                    # Every holder of the candidates is busy: wait for one of ours to return
                    # (or a while: other nodes' holdings may have arrived meanwhile).
                    with trio.move_on_after(PICK_WAIT):
                        await returned.wait()
                    continue
                under_way += 1
                try:
                    await one(*item)  # no await between the pick and the request: in-flight counts are current
                finally:
                    under_way -= 1
                    returned.set()
                    returned = trio.Event()

        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)
        if not report.failed and self.holdings is not None:
            self.holdings.note_complete(mid)
        return report

    async def fetch_pages(self, mid: bytes, author: bytes | None, holders: Sequence[str] = ()) -> Manifest:
        """Fetch and store version ``mid``'s root and every page not held here (not its
        chunks): what GC needs to know what the version references, and replication its
        exact size. FsError (EIO) when one cannot be had; only the root when this node is
        not on the network."""
        m = await self.load(mid, author, holders, priority=Priority.BACKGROUND)
        if self.fetcher is None:
            return m
        report = VersionFetch(m)
        if not await self._fetch_pages(m, mid, author, None, holders, report):
            raise FsError(errno.EIO, f"pages of {short(mid)} could not be had: {report.failed[0]}")
        self._stored.pop(mid, None)  # an estimate made without them
        return m

    async def _fetch_pages(self, m: Manifest, mid: bytes, author: bytes | None, label: str | None,
                           extra_holders: Sequence[str], report: VersionFetch,
                           priority: Priority = Priority.BACKGROUND) -> bool:
        """Fetch and store the pages of ``m`` not held here, one level per round (a page's
        children are known once it is here); False (failures in ``report``) if one cannot be."""
        fetcher = self.fetcher
        assert fetcher is not None
        for _ in range(m.depth + 1):
            missing: list[MissingPage] = []
            try:
                for level, start, pid in iter_tree(m, self.store.get, on_missing=missing.append, chunks=False):
                    if level == 0 and not self.store.has(pid):
                        missing.append(MissingPage(pid, level, start))
            except ManifestError as exc:
                raise FsError(errno.EIO, f"manifest {short(mid)} has an invalid page: {exc}") from exc
            if not missing:
                return True

            async def one(page: MissingPage) -> None:
                holders = [*extra_holders, *self._version_holders(mid, None, author)]
                try:
                    await fetcher.get(page.pid, holders, label, must_store=True, priority=priority,
                                      locate=self._locator(page.pid, None, 0, author))
                except FsError as exc:
                    report.failed.append(str(exc))
            limit = trio.CapacityLimiter(READ_AHEAD_PARALLEL)

            async def limited(page: MissingPage, limit: trio.CapacityLimiter = limit) -> None:
                async with limit:
                    await one(page)
            async with trio.open_nursery() as nursery:
                for page in missing:
                    nursery.start_soon(limited, page)
            if report.failed:
                return False
        return True

    def holds_whole(self, mid: bytes) -> bool:
        """Whether every page and chunk of held manifest ``mid`` is in the store."""
        try:
            m = self.manifest(mid)
            return m is not None and all(self.store.has(c) for _, _, c in iter_tree(m, self.store.get))
        except (FsError, MissingPage, ManifestError):
            return False

    def holds_complete(self, mid: bytes) -> bool:
        """Whether this node announces version ``mid`` as held whole (no network: False)."""
        return self.holdings is not None and mid in self.holdings.own.complete

    def note_held(self, mid: bytes, m: Manifest, *, whole: bool = False) -> None:
        """Announce which chunks of version ``mid`` (root ``m``) this node holds: whole
        (``whole``: the caller knows), or the chunks found in the store (a commit over
        content only partly held here; a subtree whose page is not here is not announced).
        Holes are held by everyone: a version whose every page and data chunk is here is whole."""
        if self.holdings is None:
            return
        if whole:
            self.holdings.note_complete(mid)
            return
        held: list[int] = []
        complete = True
        try:
            for level, start, cid in iter_tree(m, self.store.get, on_missing=lambda _: None):
                if not self.store.has(cid):
                    complete = False
                elif level < 0:
                    held.append(start)
        except ManifestError as exc:
            log.error("manifest %s held here has an invalid page: %s", short(mid), exc)
            return
        if complete:
            self.holdings.note_complete(mid)
            return
        for i in held:
            self.holdings.note_chunk(mid, i, m.count)

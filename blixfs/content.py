"""The content of file versions: manifests, holders found by content, and fetching.

One place for what the VFS, the daemon (`blixfs pull`), replication and GC need to know
about a version's content:

* **Manifests.** `manifest(mid)` decodes a manifest held here (cached, LRU);
  `load(mid, holders)` fetches it first when only peers hold it. A manifest that does
  not decode is EIO, never a crash.
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
  read), with progress; used by `blixfs pull` and by replica targets.

Callers: `Vfs` (reads, writes, commits), the daemon, the replicator, on the trio thread.
Before the daemon connects it to the network (`connect`), only what is held here is readable.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio
from lru import LRU

from blixfs.chunkproto import FetchFailed
from blixfs.chunkstore import ChunkStore
from blixfs.errors import FsError
from blixfs.fetcher import ATTEMPT_TIMEOUT, READ_AHEAD_PARALLEL, Fetcher, Locate
from blixfs.hashing import HOLE, ChunkId, short
from blixfs.holdings import Holdings
from blixfs.manifest import Manifest, ManifestError
from blixfs.net.transport import TransportError
from blixfs.peers import PeerBook
from blixfs.reader import ChunkReader, Fetch

log = logging.getLogger(__name__)

MANIFEST_CACHE = 256  # decoded manifests kept in memory
HINT_CAPACITY = 1 << 17  # chunk ids whose HAVE answers are remembered (128 Ki x 256 KiB = 32 GiB of content)
LOCATE_WINDOW = 256  # chunks of a version asked about in one HAVE (64 MiB at 256 KiB)
LOCATE_PEERS = 16  # connected peers asked at once

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

    def chunk_ids(self, mid: bytes) -> list[ChunkId] | None:
        """A held manifest's chunk ids (holes included); None if not held or invalid."""
        try:
            m = self.manifest(mid)
        except FsError:
            return None
        return list(m.ids) if m is not None else None

    async def load(self, mid: bytes, author: bytes | None = None, holders: Sequence[str] = ()) -> Manifest:
        """The manifest, fetched from its holders when not held here; EIO if it cannot be had."""
        m = self.manifest(mid)
        if m is not None:
            return m
        cid = ChunkId(mid)
        everyone = [*holders, *self._version_holders(mid, None, author)]
        raw = await self.reader.get(cid, self._fetch(cid, lambda: everyone, None, self._locator(cid, None, 0, author)))
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
                if other != mid and index < len(m.ids) and m.ids[index] == cid:
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
            for c in manifest.ids[index + 1 : index + LOCATE_WINDOW]:
                if c != HOLE and c != cid and c not in self._locating and c not in self._hints \
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
               locate: Locate) -> Fetch | None:
        """How the reader fetches ``cid`` when not held here (None: not on the network).
        ``holders`` is asked only then: gathering them is not free."""
        fetcher = self.fetcher
        if fetcher is None:
            return None

        async def fetch() -> bytes:
            return await fetcher.get(cid, holders(), label, locate=locate)
        return fetch

    def prefetch(self, wanted: dict[ChunkId, int], mid: bytes | None, author: bytes | None,
                 label: str | None = None) -> None:
        """Read-ahead: chunks (id -> index in version ``mid``) a sequential reader wants next."""
        manifest = self._manifests.get(mid) if mid is not None else None
        missing = self.reader.prefetch(wanted)
        fetcher = self.fetcher
        if fetcher is not None:
            fetcher.prefetch(((cid, self.holders(cid, mid, wanted[cid], author),
                               self._locator(cid, manifest, wanted[cid], author)) for cid in missing), label)

    # ------------------------------------------------------------------ whole versions

    async def fetch_version(self, mid: bytes, *, author: bytes | None, label: str | None,
                            extra_holders: Sequence[str] = (), progress: Progress | None = None,
                            parallel: int = READ_AHEAD_PARALLEL) -> VersionFetch:
        """Fetch and store every chunk of version ``mid`` not held here, announcing each in
        the holdings, then the version as held whole. Failures are collected, not raised
        (the caller decides); FsError only when the manifest itself cannot be had."""
        fetcher = self.fetcher
        if fetcher is None:
            raise FsError(errno.EIO, "this node is not on the network")
        m = await self.load(mid, author, extra_holders)
        if not self.store.has(ChunkId(mid)):  # held in memory only (full disk): not held
            raise FsError(errno.ENOSPC, f"manifest {short(mid)} could not be stored")
        missing = [(i, cid) for i, cid in enumerate(m.ids) if cid != HOLE and not self.store.has(cid)]
        report = VersionFetch(m, missing_bytes=sum(m.length(i) for i, _ in missing))
        limit = trio.CapacityLimiter(parallel)

        async def one(index: int, cid: ChunkId) -> None:
            async with limit:
                try:
                    if not self.store.has(cid):
                        holders = [*extra_holders, *self.holders(cid, mid, index, author)]
                        await fetcher.get(cid, holders, label, must_store=True,
                                          locate=self._locator(cid, m, index, author))
                except FsError as exc:
                    report.failed.append(str(exc))
                    return
            report.fetched_bytes += m.length(index)
            if self.holdings is not None:
                self.holdings.note_chunk(mid, index, len(m.ids))
            if progress is not None:
                result = progress(report.fetched_bytes, report.missing_bytes)
                if result is not None:
                    await result

        async with trio.open_nursery() as nursery:
            for index, cid in missing:
                nursery.start_soon(one, index, cid)
        if not report.failed and self.holdings is not None:
            self.holdings.note_complete(mid)
        return report

    def holds_whole(self, mid: bytes) -> bool:
        """Whether every chunk of held manifest ``mid`` is in the store."""
        ids = self.chunk_ids(mid)
        return ids is not None and all(self.store.has(c) for c in set(ids) if c != HOLE)

    def holds_complete(self, mid: bytes) -> bool:
        """Whether this node announces version ``mid`` as held whole (no network: False)."""
        return self.holdings is not None and mid in self.holdings.own.complete

    def note_held(self, mid: bytes, ids: Iterable[ChunkId], *, whole: bool = False) -> None:
        """Announce which chunks of version ``mid`` (chunk list ``ids``) this node holds:
        whole (``whole``: the caller knows), or the chunks found in the store (a commit over
        content only partly held here)."""
        if self.holdings is None:
            return
        if whole:
            self.holdings.note_complete(mid)
            return
        ids = list(ids)
        held = [i for i, c in enumerate(ids) if c == HOLE or self.store.has(c)]
        if len(held) == len(ids):
            self.holdings.note_complete(mid)
            return
        for i in held:
            self.holdings.note_chunk(mid, i, len(ids))

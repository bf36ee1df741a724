"""Replication: every file reaches R nodes holding all of it, and data written here is never
the last copy the cache throws away.

Writer side (`Replicator.run`, a reconcile loop, once a second): for each live file whose
current version's content this node wrote (the store's written versions: a chmod or xattr
set on another node makes that node the entry's author, not the data's; an index kept up
to date from namespace changes, `Replicator._own_files`, not a scan of the namespace), count the nodes
whose holdings say they hold that version whole, this one included when it does (a node
that wrote 4 KiB into an image it never held holds only what it wrote). Below the file's
R (`user.blixfs.copies`, else the namespace default), ask more peers to hold it (the HOLD
request of ``blixfs/chunks/1``), best first: peers already holding part of it, then the
lowest measured latency. A target that has not completed within `TARGET_PATIENCE`
seconds, or has gone, is replaced. At R the version is *durable*: its chunks, written
here, become evictable like fetched ones.

A holder counts only while it *proves* it holds the version (docs/design.md, "Proofs of
holding"): holdings are claims (signed by their holder, but a holder can lie about
itself), so the writer challenges every node that claims the version whole with a PROVE
(``blixfs/chunks/1``: a fresh nonce and a few random ranges of its chunks; the answer is
BLAKE3 of the nonce and those bytes), before counting it and again every
`PROVE_INTERVAL`. The writer computes the expected answer from the chunks it holds, or
fetches one chunk of the version first (verified by its id, from any holder) when it
holds none any more. A holder whose answer is wrong (or DONT_HAVE) stops counting at
once; one that does not answer, once its last proof is older than `PROOF_TTL`. When the
proven copies fall below R, the version is marked not durable again: the cache policy
protects every chunk of it again and more holders are asked.
Being a loop rather than a queue is what makes it resume after a crash: the state it
needs is the namespace and the holdings, both rebuilt on start.

Target side (`Replicator.on_hold`): a HOLD makes this node keep data that skips the
cache budget, so it is accepted only from write capability (the request carries a
namespace-key signature naming this node, the version and the path), for a version the
namespace references at that path, within this node's room for replicas (`REPLICA_SHARE`
of its cache budget, less the replicas it holds: the room it announces as HOLDINGS
`free`), at most `HOLD_BURST` at once and `HOLD_RATE` a second per peer. Accepted, it
records the version in ``replicas.json`` (its chunks are never evicted while it is
referenced: `Node.protected_chunks`), and pulls it in the background from the asking
node and the other holders, found by content (`blixfs.content`). A replica follows its
file: when the version it holds is superseded, the target holds the new version too
(usually a few changed chunks) and lets the old one go only once the new one is whole
here, so the chunks both share are never the last copy nobody keeps.

Placement rule (docs/design.md): a peer that reads an image keeps it in its cache and
counts as a holder, so the images a host's VMs use are the ones it is asked to keep.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import secrets
import time
from dataclasses import dataclass, field

import trio
from lru import LRU

from blixfs import crypto
from blixfs.chunkproto import FetchFailed, hold_signed_bytes, prove_digest, prove_range, request_hold, request_prove
from blixfs.content import Content
from blixfs.entry import COPIES_KEY, Entry, Kind
from blixfs.errors import FsError
from blixfs.hashing import HOLE, ChunkId, short
from blixfs.holdings import Holdings
from blixfs.manifest import Manifest, ManifestError, iter_tree, lookup
from blixfs.namespace import LOOP_PAGE_ENTRIES
from blixfs.net.transport import Transport, TransportError
from blixfs.node import Node
from blixfs.peers import PeerBook
from blixfs.priority import Priority
from blixfs.sync import SyncService

log = logging.getLogger(__name__)

DEFAULT_COPIES = 2
TICK_SECONDS = 1.0
TICK_BATCH = 256  # files looked at per round between yields to the event loop
RECENT_VERSIONS = 4096  # versions of recently changed paths remembered (`Replicator._own_files`)
TARGET_PATIENCE = 60.0
HOLD_TIMEOUT = 5.0
PROVE_INTERVAL = 300.0  # each holder of each version written here is challenged again this often
PROVE_TIMEOUT = 10.0  # for one proof: a few small reads on the holder, one round trip
PROOF_TTL = 2 * PROVE_INTERVAL + PROVE_TIMEOUT  # a holder that stopped answering counts this long after its last pass
PROVE_RANGES = 4  # ranges per challenge
PROVE_LENGTH = 4096  # bytes per range
STARTUP_GRACE = 60.0  # after start, holdings and proofs are being rebuilt: nothing is un-marked yet
CHALLENGE_REUSE = 10.0  # seconds the ranges of one version serve every holder's challenge (new nonce each)
REPLICA_SHARE = 0.5  # of the cache budget, at most, holds replicas for others (pinned: never evicted)
HOLD_BURST = 64  # HOLD requests one peer may make at once ...
HOLD_RATE = 4.0  # ... and then per second (a writer asks for each file below R every round)
HOLD_PEERS = 4096  # peers whose HOLD rate is tracked (the least recently seen is forgotten)
HOLD_MANIFEST_TIMEOUT = 3.0  # a HOLD target fetches the manifest from the asker to know its size (asker waits 5 s)


@dataclass
class Proof:
    """The last challenges of one holder for one version (monotonic times)."""

    passed: float = -math.inf  # when its last proof passed
    checked: float = -math.inf  # when the last challenge was sent
    failed: bool = False  # its last answer was wrong or DONT_HAVE: not counted until it passes again
    inflight: bool = False

    def valid(self, now: float) -> bool:
        return not self.failed and now - self.passed < PROOF_TTL


@dataclass
class FileReplication:
    """Where one file's current version stands."""

    path: str
    manifest: bytes
    want: int
    holders: list[str] = field(default_factory=list)  # other nodes that proved they hold it whole
    claimed: list[str] = field(default_factory=list)  # other nodes whose holdings say so (not all proven)
    targets: dict[str, float] = field(default_factory=dict)  # asked peers -> when
    here: bool = True  # this node holds it whole

    @property
    def copies(self) -> int:
        return len(self.holders) + int(self.here)

    @property
    def state(self) -> str:
        if self.copies >= self.want:
            return "durable"
        return "replicating" if self.targets else "local-only"


class Replicator:
    def __init__(self, node: Node, transport: Transport, sync: SyncService, holdings: Holdings, peers: PeerBook,
                 content: Content, *, default_copies: int = DEFAULT_COPIES) -> None:
        self.node = node
        self.transport = transport
        self.sync = sync
        self.holdings = holdings
        self.peers = peers
        self.content = content
        self.default_copies = default_copies
        self.files: dict[str, FileReplication] = {}
        self._durable: set[bytes] = set()  # versions whose chunks were already marked evictable
        self._pulling: set[bytes] = set()
        self._nursery: trio.Nursery | None = None
        self.proofs: dict[tuple[str, bytes], Proof] = {}  # (holder, manifest id) -> its last challenges
        self.prove_interval = PROVE_INTERVAL
        self._started = time.monotonic()
        self._challenges: dict[bytes, tuple[float, tuple[list[tuple[int, int, int]], list[bytes]]]] = {}
        self._hold_tokens: LRU[str, tuple[float, float]] = LRU(HOLD_PEERS)  # peer -> (tokens, when)
        self._too_big: LRU[bytes, bool] = LRU(HOLD_PEERS)  # new versions a replica did not follow (no room)
        self.holds_refused = 0
        self._own: dict[str, Entry] = {}  # `_own_files`' index: path -> its live entry
        self._dirty: set[str] = set()  # paths changed since `_own_files` last looked
        self._written: set[bytes] = set()  # the written versions `_own` was built from ...
        self._written_generation = -1  # ... as of this `written_generation`
        self._built = False  # `_own` was built by its one pass over the namespace
        self._recent: LRU[bytes, str] = LRU(RECENT_VERSIONS)  # versions of changed paths -> the path
        self._elsewhere: dict[bytes, str] = {}  # replicas found referenced at another path than their record's
        self._unreferenced: set[bytes] = set()  # replicas nothing referenced at the last look (until a change does)
        node.replica.listeners.append(self._on_change)

    # ----------------------------------------------------------------- writer side

    def copies(self, e: Entry) -> int:
        value = e.meta.get(COPIES_KEY)
        return int(value) if value is not None and value.isdigit() else self.default_copies

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started = time.monotonic()
            task_status.started()
            while True:
                try:
                    await self.tick()
                except Exception:  # one bad round must not stop replication for good
                    log.exception("replication round failed")
                await trio.sleep(TICK_SECONDS)

    def _on_change(self, entries: list[Entry], source: str | None) -> None:
        """Replica listener (every applied change, local or a peer's): what `_own_files` and
        `drop_unreferenced_replicas` must look at again. O(1) per entry."""
        for e in entries:
            if e.manifest is not None and not e.deleted:
                self._recent[e.manifest] = e.path
                self._unreferenced.discard(e.manifest)
            # Only a path in the index, or content written here, can change the index: a peer's
            # 100,000 entries of a session start cost no lookups at the next round.
            if not self._built or e.path in self._own or e.manifest in self._written:
                self._dirty.add(e.path)

    async def _own_files(self) -> list[Entry]:
        """Live files whose current content this node wrote (whoever authored the entry).

        Kept as an index (`_own`), not found by decoding every entry each round: built by
        one pass over the namespace (a page at a time, yielding between pages) at the first
        round, then brought up to date from the paths that changed (`_on_change`) and the
        versions noted as written since (`written_generation`: a commit notes its version
        right after the entry is applied; `_recent` finds the path of such a version even if
        a round ran in between). Work per round: the changes, plus one query of the written
        versions when they changed."""
        chunks, namespace = self.node.chunks, self.node.namespace
        generation = chunks.written_generation
        if generation != self._written_generation:
            written = set(chunks.written_versions())
            new, self._written, self._written_generation = written - self._written, written, generation
            if not self._built:
                with contextlib.closing(namespace.pages_since({}, LOOP_PAGE_ENTRIES)) as pages:
                    for page in pages:
                        self._dirty.update(e.path for e in page if e.manifest in written and not e.deleted)
                        await trio.lowlevel.checkpoint()
                self._built = True
            else:
                self._dirty.update(path for mid in new if (path := self._recent.get(mid)) is not None)
        dirty, self._dirty = self._dirty, set()
        for i, path in enumerate(dirty):
            if i and i % TICK_BATCH == 0:
                await trio.lowlevel.checkpoint()
            e = namespace.get(path)
            if e is not None and e.kind is Kind.FILE and e.manifest is not None and e.manifest in self._written:
                self._own[path] = e
            else:
                self._own.pop(path, None)
        return list(self._own.values())

    async def tick(self) -> None:
        now = time.monotonic()
        if self.node.replicas():
            await self.drop_unreferenced_replicas()  # replicas follow their files (see the module docstring)
        self.holdings.note_free(self.replica_room())
        seen: dict[str, FileReplication] = {}
        for i, e in enumerate(await self._own_files()):
            if i and i % TICK_BATCH == 0:
                await trio.lowlevel.checkpoint()  # many files written here: FUSE requests run between them
            assert e.manifest is not None
            rep = self.files.get(e.path)
            if rep is None or rep.manifest != e.manifest:
                rep = FileReplication(e.path, e.manifest, self.copies(e))
            rep.want = self.copies(e)
            rep.here = e.manifest in self.holdings.own.complete
            rep.claimed = [p for p in self.holdings.holders(e.manifest) if self._member(p)]
            self._challenge_due(rep, now)
            rep.holders = [p for p in rep.claimed if self._proven(p, e.manifest, now)]
            rep.targets = {p: t for p, t in rep.targets.items() if now - t < TARGET_PATIENCE and p not in rep.holders}
            seen[e.path] = rep
            if rep.state == "durable":
                self._mark_durable(e.manifest)
            else:
                # Holders whose first proof is under way still count against un-marking, and
                # nothing is un-marked while holdings arrive after a start (they are not kept
                # across restarts): a restart must not protect every durable version at once.
                first = [p for p in rep.claimed if self._first_proof_pending(p, e.manifest)]
                settled = now - self._started > min(STARTUP_GRACE, self.prove_interval)
                if settled and rep.copies + len(first) < rep.want:
                    self._mark_not_durable(e.manifest, rep)
                await self._ask(rep, now)
        self.files = seen
        live = {(p, r.manifest) for r in seen.values() for p in r.claimed}
        for key in [k for k, proof in self.proofs.items() if k not in live and not proof.inflight]:
            del self.proofs[key]  # holders that no longer claim it, versions superseded
        for mid in [m for m, (at, _) in self._challenges.items() if now - at >= CHALLENGE_REUSE]:
            del self._challenges[mid]

    # ----------------------------------------------------------------- proofs of holding

    def _proven(self, peer: str, manifest_id: bytes, now: float) -> bool:
        proof = self.proofs.get((peer, manifest_id))
        return proof is not None and proof.valid(now)

    def _first_proof_pending(self, peer: str, manifest_id: bytes) -> bool:
        proof = self.proofs.get((peer, manifest_id))
        return proof is None or (proof.inflight and proof.passed == -math.inf and not proof.failed)

    def _challenge_due(self, rep: FileReplication, now: float) -> None:
        """Start a proof for each claimed holder not challenged within `prove_interval`."""
        if self._nursery is None:
            return
        for peer in rep.claimed:
            proof = self.proofs.setdefault((peer, rep.manifest), Proof())
            if not proof.inflight and now - proof.checked >= self.prove_interval:
                proof.inflight, proof.checked = True, now
                self._nursery.start_soon(self._prove, peer, rep.manifest, proof)

    async def _challenge(self, manifest_id: bytes) -> tuple[list[tuple[int, int, int]], list[bytes]] | None:
        """Random ranges of the version and their bytes, shared by the challenges of one
        round (`CHALLENGE_REUSE` seconds: each holder still gets its own nonce, so no answer
        serves twice, and the writer reads the ranges once, not once per holder)."""
        cached = self._challenges.get(manifest_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < CHALLENGE_REUSE:
            return cached[1]
        challenge = await self._new_challenge(manifest_id)
        if challenge is not None:
            self._challenges[manifest_id] = (now, challenge)
        return challenge

    async def _new_challenge(self, manifest_id: bytes) -> tuple[list[tuple[int, int, int]], list[bytes]] | None:
        """Random ranges of the version and their bytes; None when this node cannot know the
        answer (the manifest and every chunk gone here, and no holder could serve one).

        Ranges are taken from chunks held here; when none is (all evicted after the version
        became durable), one chunk is fetched first, verified by its id, from any holder:
        verification makes the expected answer trustworthy whoever served it."""
        try:
            m = await self.content.load(manifest_id, holders=[p for p in self.holdings.holders(manifest_id)],
                                        priority=Priority.BACKGROUND)
        except FsError as exc:
            log.info("cannot challenge the holders of %s: its manifest is not to be had (%s)", short(manifest_id),
                     exc)
            return None
        held, anyone = self._sample(m)
        picked: list[tuple[int, ChunkId]]
        if held:
            picked = held
        elif anyone:
            picked = anyone
        elif m.count:  # no data chunk under the pages held here: look the first chunk up
            try:
                picked = [(0, await self.content.walk(lambda get: lookup(m, get, 0), manifest_id, None,
                                                      self.holdings.holders(manifest_id),
                                                      priority=Priority.BACKGROUND))]
            except FsError as exc:
                log.info("cannot challenge the holders of %s: %s", short(manifest_id), exc)
                return None
        else:
            return None
        ranges: list[tuple[int, int, int]] = []
        parts: list[bytes] = []
        for index, cid in picked:
            try:
                data = bytes(m.length(index)) if cid == HOLE else await self.content.chunk(cid, manifest_id, index,
                                                                                          None)
            except FsError as exc:
                log.info("cannot challenge the holders of %s: chunk %d is not to be had (%s)", short(manifest_id),
                         index, exc)
                return None
            if data is None:
                return None
            length = min(PROVE_LENGTH, len(data))
            offset = random.randrange(0, len(data) - length + 1)
            ranges.append((index, offset, length))
            parts.append(prove_range(data, offset, length))
        return ranges, parts

    def _sample(self, m: Manifest) -> tuple[list[tuple[int, ChunkId]], list[tuple[int, ChunkId]]]:
        """Up to PROVE_RANGES random data chunks of ``m`` held here, and one random data chunk,
        as (index, id), in one streaming pass over the pages held here (reservoir sampling:
        no list of every chunk)."""
        held: list[tuple[int, ChunkId]] = []
        data: list[tuple[int, ChunkId]] = []
        seen_held = seen_data = 0
        try:
            for level, index, cid in iter_tree(m, self.content.page, on_missing=lambda _: None):
                if level >= 0:
                    continue
                seen_data += 1
                if random.randrange(seen_data) == 0:
                    data = [(index, cid)]
                if self.node.chunks.has(cid):
                    seen_held += 1
                    if len(held) < PROVE_RANGES:
                        held.append((index, cid))
                    else:
                        slot = random.randrange(seen_held)
                        if slot < PROVE_RANGES:
                            held[slot] = (index, cid)
        except ManifestError as exc:
            log.error("a page of a version held here is invalid: %s", exc)
        return held, data

    async def _prove(self, peer: str, manifest_id: bytes, proof: Proof) -> None:
        """Challenge ``peer`` about ``manifest_id`` once and record the outcome in ``proof``."""
        try:
            challenge = await self._challenge(manifest_id)
            if challenge is None:
                return  # the last outcome stands until it expires
            ranges, parts = challenge
            nonce = secrets.token_bytes(32)
            try:
                with trio.fail_after(PROVE_TIMEOUT):
                    answer = await request_prove(self.transport, self.peers.addr(peer), ChunkId(manifest_id), nonce,
                                                 ranges)
            except (TransportError, trio.TooSlowError) as exc:
                log.info("holder %s of %s did not answer its proof (%s): counted until %.0f s after its last pass",
                         peer[:16], short(manifest_id), exc or "timed out", PROOF_TTL)
                return
            except FetchFailed as exc:
                answer = None
                log.info("%s", exc)
            if answer is not None and answer == prove_digest(nonce, parts):
                if proof.failed or proof.passed == -math.inf:
                    log.info("holder %s proved it holds %s", peer[:16], short(manifest_id))
                proof.passed, proof.failed = time.monotonic(), False
                self.peers.trusted.add(peer)  # reads keep their deadline for it (blixfs.fetcher)
            else:
                if not proof.failed:
                    log.warning("holder %s claims %s but failed its proof (%s): not counted as a copy", peer[:16],
                                short(manifest_id), "does not hold it" if answer is None else "wrong answer")
                proof.failed = True
                self.peers.trusted.discard(peer)
        finally:
            proof.inflight = False

    def _mark_durable(self, manifest_id: bytes) -> None:
        if manifest_id in self._durable:
            return
        m = self.content.manifest(manifest_id) if self.node.chunks.has(ChunkId(manifest_id)) else None
        ids: set[ChunkId] = set()
        if m is not None:
            try:  # pages and chunks held here (a subtree whose page is not here holds nothing here)
                ids = {c for _, _, c in iter_tree(m, self.node.chunks.get, on_missing=lambda _: None)}
            except ManifestError as exc:
                log.error("version %s held here has an invalid page: %s", short(manifest_id), exc)
        # The cache policy stops protecting its chunks (those of versions written here that
        # are not durable yet stay protected), and the ones written here become evictable.
        self.node.chunks.set_written_versions(durable=[manifest_id])
        changed = self.node.chunks.mark_replicated(ids | {ChunkId(manifest_id)})
        self._durable.add(manifest_id)
        log.info("version %s is durable: %d chunks written here may now be evicted", short(manifest_id), changed)

    def _member(self, peer: str) -> bool:
        """A node outside a closed namespace's member list (revoked) is never asked to HOLD and
        its copies never count (blixfs.members)."""
        try:
            return self.node.replica.members.allows(bytes.fromhex(peer))
        except ValueError:
            return False

    def _mark_not_durable(self, manifest_id: bytes, rep: FileReplication) -> None:
        """Proven copies fell below R: protect every chunk of the version again (the cache
        policy keeps all chunks of written versions not durable, `Node.protected_chunks`,
        also those `mark_replicated` made evictable; what was evicted meanwhile is held by
        the holders that proved it) and look for holders again."""
        if not self.node.chunks.written_versions().get(manifest_id):
            return
        self.node.chunks.set_written_versions(undurable=[manifest_id])
        self._durable.discard(manifest_id)
        if self.node.cache is not None:
            self.node.cache.invalidate()
        log.warning("version %s of %s is no longer durable: %d proven copies of %d; its chunks are protected again",
                    short(manifest_id), rep.path, rep.copies, rep.want)

    def _candidates(self, rep: FileReplication) -> list[str]:
        connected = {s.peer for s in self.sync.sessions() if s.synced.is_set()}
        now = time.monotonic()

        def refuted(peer: str) -> bool:  # claimed it and failed its proof lately: asking again is in vain
            proof = self.proofs.get((peer, rep.manifest))
            return proof is not None and proof.failed and now - proof.checked < self.prove_interval

        others = [p for p in connected if p not in rep.holders and p not in rep.targets and not refuted(p)
                  and self._member(p)]
        partial = self.holdings.nodes

        def held_part(peer: str) -> int:
            bits = partial.get(peer)
            got = bits.partial.get(rep.manifest) if bits is not None else None
            return sum(bin(b).count("1") for b in got) if got else 0

        m = self.content.cached_manifest(rep.manifest)
        size = self.content.stored_bytes(rep.manifest, m) if m is not None else 0

        def room(peer: str) -> int:
            record = partial.get(peer)
            return record.free if record is not None else 0

        # Placement: peers that read it (they hold part: its VMs run there), then peers with room
        # for all of it (most room first), then the fastest.
        return sorted(others, key=lambda p: (-held_part(p), room(p) < size, -room(p),
                                             self.peers.of(p).expected_seconds()))

    async def _ask(self, rep: FileReplication, now: float) -> None:
        needed = rep.want - rep.copies - len(rep.targets)
        for peer in self._candidates(rep)[: max(0, needed)]:
            try:
                with trio.fail_after(HOLD_TIMEOUT):
                    accepted = await request_hold(self.transport, self.peers.addr(peer), ChunkId(rep.manifest),
                                                  rep.path, self.node.replica.keys.secret)
            except (TransportError, trio.TooSlowError) as exc:
                log.info("peer %s could not be asked to hold %s: %s", peer[:16], rep.path, exc)
                continue
            if accepted:
                rep.targets[peer] = now
                log.info("asked %s to hold %s (%d of %d copies)", peer[:16], rep.path,
                         1 + len(rep.holders) + len(rep.targets), rep.want)

    def report(self) -> list[dict[str, object]]:
        out = []
        for rep in sorted(self.files.values(), key=lambda r: r.path):
            progress = {p[:16]: self.progress(p, rep.manifest) for p in rep.targets}
            out.append({"path": rep.path, "manifest": rep.manifest.hex(), "state": rep.state,
                        "copies": rep.copies, "want": rep.want, "targets": progress,
                        "unproven": [p[:16] for p in rep.claimed if p not in rep.holders]})
        return out

    def progress(self, peer: str, manifest_id: bytes) -> float:
        """The share of version ``manifest_id`` that ``peer``'s holdings say it holds (0 to 1)."""
        record = self.holdings.nodes.get(peer)
        if record is None:
            return 0.0
        if manifest_id in record.complete:
            return 1.0
        bits = record.partial.get(manifest_id)
        m = self.content.cached_manifest(manifest_id)
        if bits is None or m is None:
            return 0.0
        try:
            total = sum(1 for level, _, _ in iter_tree(m, self.content.cached_page, on_missing=lambda _: None)
                        if level < 0) or 1
        except ManifestError:
            return 0.0
        return round(sum(bin(b).count("1") for b in bits) / total, 3)

    # ----------------------------------------------------------------- target side

    def replica_budget(self) -> int:
        """Bytes of replicas this node keeps for others at most: `REPLICA_SHARE` of its cache."""
        return int(self.node.cache_size() * REPLICA_SHARE)

    def replica_bytes(self) -> int:
        """Bytes of the replicas held for others (each version's stored bytes; chunks two of
        them share count twice: an upper bound). Versions whose manifest is not here yet
        count nothing until it is."""
        total = 0
        for mid in self.node.replicas():
            m = self.content.cached_manifest(mid)
            if m is None and self.node.chunks.has(ChunkId(mid)):
                try:
                    m = self.content.manifest(mid)
                except FsError:
                    m = None
            total += self.content.stored_bytes(mid, m) if m is not None else 0
        return total

    def replica_room(self) -> int:
        """What this node still takes as replicas (announced as HOLDINGS ``free``)."""
        return max(0, self.replica_budget() - self.replica_bytes())

    def _hold_allowed(self, peer: str) -> bool:
        """Token bucket per peer: `HOLD_BURST` at once, `HOLD_RATE` a second after that."""
        now = time.monotonic()
        tokens, at = self._hold_tokens.get(peer, (float(HOLD_BURST), now))
        tokens = min(float(HOLD_BURST), tokens + (now - at) * HOLD_RATE)
        allowed = tokens >= 1.0
        self._hold_tokens[peer] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def _refuse_hold(self, peer: str, manifest_id: bytes, path: str, why: str) -> bool:
        self.holds_refused += 1
        log.info("peer %s asked this node to hold %s of %r: refused (%s)", peer[:16], short(manifest_id), path, why)
        return False

    async def on_hold(self, manifest_id: ChunkId, path: str, peer: str, signature: bytes) -> bool:
        """A peer asks this node to hold a version whole (the chunk server's HOLD); True if
        accepted. Refused (logged, `holds_refused`):

        * beyond the peer's rate (`HOLD_BURST`, then `HOLD_RATE` a second), checked first:
          a flood costs a token bucket per peer, nothing else;
        * without write capability: ``signature`` must be the namespace key's over
          `hold_signed_bytes` (this node, the version, the path). Every writer holds the
          namespace secret, so any writer can ask; a read-only member cannot;
        * for a version the namespace does not reference at ``path`` (live or kept as a
          conflict): a writer's HOLD that arrives before its entry is asked again on its
          next round (every second);
        * beyond this node's room for replicas (`replica_room`, as announced): the size is
          the version's stored bytes, from its manifest, fetched from the asker first
          when not held here (within `HOLD_MANIFEST_TIMEOUT`, else refused). A version
          already held as a replica is accepted again at no cost.
        """
        if self._nursery is None:
            return False
        if not self._hold_allowed(peer):
            return self._refuse_hold(peer, manifest_id, path, "rate limit")
        keys = self.node.replica.keys
        if not crypto.verify(keys.id, hold_signed_bytes(bytes.fromhex(self.holdings.self_id), manifest_id, path),
                             signature):
            return self._refuse_hold(peer, manifest_id, path, "not signed with the namespace key: no write capability")
        if not any(v.manifest == manifest_id and not v.deleted for v in self.node.namespace.versions(path)):
            return self._refuse_hold(peer, manifest_id, path, "not a version of that path in the namespace")
        if manifest_id not in self.node.replicas():
            try:
                with trio.fail_after(HOLD_MANIFEST_TIMEOUT):
                    m = await self.content.fetch_pages(manifest_id, None, holders=[peer])  # its exact size
            except (FsError, trio.TooSlowError) as exc:
                return self._refuse_hold(peer, manifest_id, path, f"its manifest could not be had: {exc}")
            room = self.replica_room()
            size = self.content.stored_bytes(manifest_id, m)
            if size > room:
                return self._refuse_hold(peer, manifest_id, path, f"{size} bytes, room for replicas is {room}")
        replicas = self.node.replicas()
        if manifest_id not in replicas:
            replicas[manifest_id] = path
            self.node.set_replicas(replicas)
        if manifest_id not in self.holdings.own.complete and manifest_id not in self._pulling:
            self._pulling.add(manifest_id)
            self._nursery.start_soon(self._pull, manifest_id, path, peer)
        return True

    async def _pull(self, manifest_id: ChunkId, path: str, asker: str | None, follows: bytes | None = None) -> None:
        """Fetch the version whole. When it replaces ``follows`` (a replica following its file,
        not a HOLD: nobody checked its size), it is pulled only if it fits the room for
        replicas once the old version goes; otherwise this node keeps the old version only
        (its chunks may be the last copies of the ones the versions share) and says so."""
        try:
            author = next((v.author for v in self.node.namespace.versions(path) if v.manifest == manifest_id), None)
            if follows is not None:
                m = await self.content.fetch_pages(manifest_id, author)  # its exact size
                old = self.content.manifest(follows) if self.node.chunks.has(ChunkId(follows)) else None
                replicas = self.node.replicas()
                others = self.replica_bytes() - (self.content.stored_bytes(follows, old) if old is not None else 0)
                if manifest_id not in replicas:
                    others += self.content.stored_bytes(manifest_id, m)  # its record was not written yet: count it
                if others > self.replica_budget():
                    self._too_big[manifest_id] = True
                    replicas.pop(manifest_id, None)
                    self.node.set_replicas(replicas)
                    log.warning("not following %s to its new version %s: %d bytes of replicas would exceed the "
                                "budget of %d; keeping the old version", path, short(manifest_id), others,
                                self.replica_budget())
                    return
            result = await self.content.fetch_version(manifest_id, author=author, label=path,
                                                      extra_holders=[asker] if asker else [])
            if result.failed:
                log.warning("could not pull %s to hold it: %d chunks failed, e.g. %s (will try again)", path,
                            len(result.failed), result.failed[0])
            else:
                log.info("now holding %s (%s) for durability", path, short(manifest_id))
        except FsError as exc:
            log.warning("could not pull %s to hold it: %s (will be asked again)", path, exc)
        finally:
            self._pulling.discard(manifest_id)

    async def drop_unreferenced_replicas(self) -> int:
        """Replicas follow their files: a held version that is superseded makes this node hold
        the file's current version too, and the old record goes once the new one is whole
        here (until then its chunks stay protected: the new version may need them and be
        held nowhere else). Versions of files that are gone are forgotten (GC then frees
        them). Returns how many records were dropped.

        Whether a version is still referenced is asked of its path's versions (a renamed
        file's: of the path it was found at); only a version referenced at neither is
        looked for in the whole namespace, in one paged pass, and the answer "nowhere" is
        kept until a change references it again (`_on_change`): a replica following its
        file costs no pass per round."""
        namespace = self.node.namespace
        replicas = self.node.replicas()

        def referenced_at(mid: bytes, path: str | None) -> bool:
            return path is not None and any(v.manifest == mid and not v.deleted for v in namespace.versions(path))

        unknown = {mid for mid, path in replicas.items() if not referenced_at(mid, path)
                   and not referenced_at(mid, self._elsewhere.get(mid)) and mid not in self._unreferenced}
        if unknown:
            found: dict[bytes, str] = {}
            with contextlib.closing(namespace.pages_since({}, LOOP_PAGE_ENTRIES)) as pages:
                for page in pages:
                    found.update((e.manifest, e.path) for e in page if e.manifest in unknown and not e.deleted)
                    await trio.lowlevel.checkpoint()
            self._elsewhere.update(found)
            self._unreferenced.update(unknown - set(found))
        self._elsewhere = {m: p for m, p in self._elsewhere.items() if m in replicas}
        self._unreferenced &= set(replicas)
        kept: dict[bytes, str] = {}
        for mid, path in replicas.items():
            if mid not in self._unreferenced:  # referenced at its path or elsewhere
                kept[mid] = path
                continue
            current = self.node.namespace.get(path)
            if current is None or current.kind is not Kind.FILE or current.manifest is None:
                continue  # the file is gone (or empty): nothing of it to keep
            if current.manifest in self._too_big:  # it did not fit (`_pull`): keep what we had
                kept[mid] = path
                continue
            kept[current.manifest] = path
            if current.manifest not in self.holdings.own.complete:
                kept[mid] = path  # until the new version is whole here
                if self._nursery is not None and current.manifest not in self._pulling:
                    self._pulling.add(current.manifest)
                    self._nursery.start_soon(self._pull, ChunkId(current.manifest), path, None, mid)
        if kept != replicas:
            self.node.set_replicas(kept)
            if self.node.cache is not None:
                self.node.cache.invalidate()
        return len(set(replicas) - set(kept))

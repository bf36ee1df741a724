"""The sync protocol (``blixfs/sync/1``): reconcile on connect, then push live.

One bidirectional stream per session. Both sides send HELLO (namespace id, version
vector). Each then sends every entry the other is missing (`entries_since` the
other's vector), then SYNCED with the vector it had *before* collecting them: once
the receiver has applied everything before SYNCED it knows at least that much, and
advances its own vector. After that, every entry that changes a replica (local
writes, or entries from another peer: this is how changes spread) is pushed to all
sessions but the one it came from. Live entries never advance a vector, so an entry
lost to a broken session is sent again by the next reconciliation.

The work on connect is proportional to what the two sides' vectors say differs.

Errors: a malformed or oversized frame, a HELLO for another namespace, or a first
frame that is not HELLO closes the session with an error frame or a reset (codes in
docs/protocol.md) and a log line naming the peer; the replica is untouched by
anything that failed to decode, and entries that decode but fail validation are
refused one by one (`Replica.merge_remote`). Every await on the peer has a deadline
except waiting for the first byte of the next frame after HELLO (live entries may not
come for hours; the rest of a frame has `FRAME_TIMEOUT`); a dead connection ends that
wait through the transport (keep-alives, idle timeout) and the dialing side reconnects
with backoff. A peer that holds sessions open without sending is bounded by the stream
limits (`SESSIONS_PER_PEER`, `SESSIONS_TOTAL`, which members with a synced session and
peers this node dialed may exceed: `Transport.register`).

Callers: the node daemon (`blixfs.daemon`), which registers `handle` for the ALPN and
runs `maintain` for every peer it should dial, in its nursery.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import trio

from blixfs import crypto, lowprio, metrics
from blixfs.entry import Entry
from blixfs.frames import (
    MAX_ENTRY_BYTES,
    EncodedEntries,
    Entries,
    ErrorFrame,
    Frame,
    FrameError,
    Hello,
    HoldingsFrame,
    Synced,
    encode,
    encode_entries,
    holdings_signed_bytes,
    read_frame,
)
from blixfs.holdings import Holdings, NodeHoldings
from blixfs.members import is_reserved
from blixfs.net.transport import CODE_APP_MIN, NodeAddr, Stream, Transport, TransportError
from blixfs.replica import MAX_FUTURE_NS, Replica

log = logging.getLogger(__name__)

ALPN = b"blixfs/sync/1"
CODE_BAD_FRAME = CODE_APP_MIN + 1
CODE_WRONG_NAMESPACE = CODE_APP_MIN + 2
CODE_OVERLOADED = CODE_APP_MIN + 3
CODE_NOT_MEMBER = CODE_APP_MIN + 4  # the peer is not in this closed namespace's member list
HELLO_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0
# A frame's bytes after its first must arrive within this (a 1 MiB frame at 20 KB/s): a peer
# that stops mid-frame ends its session. Between frames there is no deadline (live phase).
FRAME_TIMEOUT = 60.0
BATCH_BYTES = 256 * 1024
APPLY_SLICE = 16  # entries of a received frame applied in one transaction, between yields to the event loop
DIFF_PAGE = 64  # entries read from the store (as stored, not decoded) between two yields to the event loop
LIVE_QUEUE = 10_000  # frames queued for one session's live sending, at most
LIVE_QUEUE_BYTES = 16 << 20  # and bytes: frames are up to 1 MiB, so a count alone bounded nothing
# Other nodes' holdings records kept (protocol.md section 10): at most this many nodes, and
# this many bytes as announced (each id 32 bytes, bitmaps as sent; in memory about 3x).
MAX_HOLDINGS_NODES = 1024
HOLDINGS_TABLE_BYTES = 32 << 20
# Authors a version vector may hold (protocol.md section 8). A HELLO fits 26,213 (MAX_FRAME):
# a vector never reaches that, and what is sent is cut to this many (`sendable_vector`).
MAX_VECTOR_AUTHORS = 16_384
BACKOFF_MIN, BACKOFF_MAX = 0.2, 30.0
# Incoming sessions served at once per peer (one is normal; more while a dead one has not
# timed out yet) and in all: register `handle` with these (the transport resets the excess).
SESSIONS_PER_PEER = 4
SESSIONS_TOTAL = 512


@dataclass
class SessionInfo:
    peer: str
    started: float
    synced: trio.Event = field(default_factory=trio.Event)  # the peer's initial entries are applied
    entries_received: int = 0
    entries_sent: int = 0
    refused: int = 0
    authors: set[bytes] = field(default_factory=set)  # of valid entries received in this session
    holdings_refused: int = 0  # HOLDINGS not taken: the table was full
    last_entry: float = 0.0  # trio time of the last ENTRIES frame received (the metrics' sync lag)
    entries_to_send: int = 0  # the peer is this many entries behind this node: diff and live queue not sent yet


def _batches(entries: list[Entry]) -> list[list[bytes]]:
    """``entries`` serialized, in frames of about `BATCH_BYTES` (`_batches_of`)."""
    return _batches_of([e.serialize() for e in entries])


def _batches_of(serialized: list[bytes]) -> list[list[bytes]]:
    """Serialized entries in frames of about `BATCH_BYTES`, for `encode_entries`. An entry
    larger than `MAX_ENTRY_BYTES` (stored before `Replica.commit_local` refused them) is
    left out with a log line: receivers refuse the whole frame, and the entry would be in
    every later diff."""
    out: list[list[bytes]] = []
    batch: list[bytes] = []
    size = 0
    for data in serialized:
        n = len(data) + 4
        if n - 4 > MAX_ENTRY_BYTES:
            log.warning("not sending %s: its entry is %d bytes, more than a peer accepts (%d)", _path_of(data),
                        n - 4, MAX_ENTRY_BYTES)
            continue
        if batch and size + n > BATCH_BYTES:
            out.append(batch)
            batch, size = [], 0
        batch.append(data)
        size += n
    if batch:
        out.append(batch)
    return out


def _path_of(serialized: bytes) -> str:
    """The path of a serialized entry, for a log line (decoded only then)."""
    try:
        return Entry.deserialize(serialized).path
    except (ValueError, KeyError, TypeError):
        return "an undecodable entry"


def sendable_vector(vector: dict[bytes, int], held: set[bytes]) -> dict[bytes, int]:
    """``vector`` cut to `MAX_VECTOR_AUTHORS` authors, those this node holds versions of first,
    so that HELLO and SYNCED always fit a frame (a vector stored before the bound, or grown by
    a peer's lies, could not be sent: `encode` raised and the session's dialer died).

    Leaving an author out is always safe: in HELLO the peer then sends all it holds of that
    author (duplicates), in SYNCED the receiver advances nothing for it."""
    if len(vector) <= MAX_VECTOR_AUTHORS:
        return vector
    order = sorted(vector, key=lambda a: (a not in held, a))
    log.warning("version vector of %d authors: sending %d of them", len(vector), MAX_VECTOR_AUTHORS)
    return {a: vector[a] for a in sorted(order[:MAX_VECTOR_AUTHORS])}


def frame_bytes(frame: Entries | HoldingsFrame) -> int:
    """About what ``frame`` takes on the wire (for the live queue's byte budget)."""
    if isinstance(frame, HoldingsFrame):
        return 64 + len(frame.addr) + 32 * len(frame.complete) + sum(36 + len(b) for _, b in frame.partial)
    return 5 + sum(4 + len(e.serialize()) for e in frame.entries)


def record_bytes(record: NodeHoldings) -> int:
    """What a holdings record announced, in bytes (for the table's budget)."""
    return 64 + 32 * len(record.complete) + sum(36 + len(b) for b in record.partial.values())


@dataclass
class _Queued:
    frame: Entries | HoldingsFrame | None  # None: dropped, skipped when its turn comes
    size: int


class LiveQueue:
    """The frames waiting to be sent live on one session, with a byte budget.

    HOLDINGS are coalesced: only the newest record of a node matters, so a newer frame of
    a node replaces a queued one in place. Over `LIVE_QUEUE_BYTES` (or `LIVE_QUEUE`
    frames), the oldest queued HOLDINGS are dropped (hints: the next session start sends
    the table again); if entries alone exceed it, `put` returns False and the caller
    closes the session (the peer reconciles when it reconnects). Trio thread only.
    """

    def __init__(self) -> None:
        self._items: deque[_Queued] = deque()
        self._holdings: dict[bytes, _Queued] = {}  # node id -> its queued item
        self.bytes = 0
        self._wakeup = trio.Event()

    def put(self, frame: Entries | HoldingsFrame) -> bool:
        size = frame_bytes(frame)
        if isinstance(frame, HoldingsFrame):
            queued = self._holdings.get(frame.node_id)
            if queued is not None:
                old = queued.frame
                assert isinstance(old, HoldingsFrame)
                if old.seq < frame.seq:
                    self.bytes += size - queued.size
                    queued.frame, queued.size = frame, size
                return True
        item = _Queued(frame, size)
        self._items.append(item)
        if isinstance(frame, HoldingsFrame):
            self._holdings[frame.node_id] = item
        self.bytes += size
        self._wakeup.set()
        if self.bytes > LIVE_QUEUE_BYTES or len(self._items) > LIVE_QUEUE:
            for old_item in list(self._items):
                if self.bytes <= LIVE_QUEUE_BYTES:
                    break
                if isinstance(old_item.frame, HoldingsFrame) and old_item is not item:
                    self._drop(old_item)
            if self.bytes > LIVE_QUEUE_BYTES and isinstance(frame, HoldingsFrame):
                self._drop(item)  # a hint that does not fit is dropped, not the session
            self._items = deque(i for i in self._items if i.frame is not None)
        return self.bytes <= LIVE_QUEUE_BYTES and len(self._items) <= LIVE_QUEUE

    def _drop(self, item: _Queued) -> None:
        frame = item.frame
        assert isinstance(frame, HoldingsFrame)
        self._holdings.pop(frame.node_id, None)
        self.bytes -= item.size
        item.frame = None

    async def get(self) -> Entries | HoldingsFrame:
        while True:
            while self._items:
                item = self._items.popleft()
                frame = item.frame
                if frame is None:
                    continue
                self.bytes -= item.size
                if isinstance(frame, HoldingsFrame):
                    self._holdings.pop(frame.node_id, None)
                return frame
            self._wakeup = trio.Event()
            await self._wakeup.wait()


class _Session:
    def __init__(self, info: SessionInfo) -> None:
        self.info = info
        self.queue = LiveQueue()
        self.scope = trio.CancelScope()


HOLDINGS_BUDGET = 900 * 1024  # bytes of manifest ids and bitmaps per HOLDINGS frame (frames are at most 1 MiB)


def holdings_frame(node_id: str, record: NodeHoldings, secret: bytes | None = None) -> HoldingsFrame:
    """The frame announcing ``record``: a peer's record is the frame its holder signed, as
    received (relays cannot forge or alter it); this node's own is built and signed with
    ``secret`` (its endpoint key; None: unsigned, which every receiver refuses). What does
    not fit `HOLDINGS_BUDGET` is left out (whole manifests first, then partial ones by
    size), with a log line: holdings are hints."""
    if record.signed is not None:
        return record.signed
    complete = sorted(record.complete)[: HOLDINGS_BUDGET // 32]
    room = HOLDINGS_BUDGET - 32 * len(complete)
    partial: list[tuple[bytes, bytes]] = []
    for mid, bits in sorted(record.partial.items()):
        if 36 + len(bits) > room:
            continue
        partial.append((mid, bytes(bits)))
        room -= 36 + len(bits)
    if len(complete) < len(record.complete) or len(partial) < len(record.partial):
        log.warning("holdings of %s too large for one frame: announcing part of them", node_id[:16])
    frame = HoldingsFrame(bytes.fromhex(node_id), record.seq, complete, partial,
                          record.addr.to_bytes() if record.addr is not None else b"", min(record.free, (1 << 64) - 1))
    if secret is None:
        return frame
    return replace(frame, signature=crypto.sign(secret, holdings_signed_bytes(frame)))


def holdings_verified(frame: HoldingsFrame) -> bool:
    """Whether the frame's holder (its node id, an endpoint key) signed it. A record of a node id
    that is no valid key, unsigned, or altered on the way does not verify. ~60 us."""
    return crypto.verify(frame.node_id, holdings_signed_bytes(frame), frame.signature)


def holdings_record(frame: HoldingsFrame) -> NodeHoldings:
    """The record a frame announces; an address that does not decode is dropped (it is only a hint)."""
    try:
        addr = NodeAddr.from_bytes(frame.addr) if frame.addr else None
    except ValueError:
        addr = None
    if addr is not None and addr.node_id != frame.node_id.hex():
        addr = None
    return NodeHoldings(frame.seq, set(frame.complete), {m: bytearray(b) for m, b in frame.partial}, addr,
                        frame.free, frame)


class SyncService:
    """Sync sessions of one replica. See the module docstring."""

    def __init__(self, replica: Replica, transport: Transport, holdings: Holdings | None = None, *,
                 on_address: Callable[[NodeAddr], object] | None = None,
                 vouched: Callable[[str], bool] | None = None,
                 on_session_synced: Callable[[SessionInfo], None] | None = None) -> None:
        """Hooks, fixed for the service's life: ``on_address(addr)`` gets each peer address
        learnt from holdings records; ``vouched(node_id)`` says whether this node has itself
        reached a node (a probe answered, a transfer): such a node's record may evict those
        of nodes only heard of when the table is full (None: nobody is vouched for);
        ``on_session_synced(info)`` runs when a session has caught up."""
        self.replica = replica
        self.transport = transport
        self.holdings = holdings
        self._sessions: dict[int, _Session] = {}
        self._next_id = 0
        self._on_session_synced = on_session_synced
        self._on_address = on_address
        self._vouched: Callable[[str], bool] = vouched if vouched is not None else lambda node_id: False
        self._sizes: dict[str, tuple[NodeHoldings, int]] = {}  # `_record_bytes`' cache
        replica.listeners.append(self._push)

    def sessions(self) -> list[SessionInfo]:
        return [s.info for s in self._sessions.values()]

    def _push(self, entries: list[Entry], source: str | None) -> None:
        self._send_to_all(Entries(entries), source)
        if any(is_reserved(e.path) for e in entries):
            self._drop_non_members()

    def _member(self, peer: str) -> bool:
        """Whether ``peer`` may sync: any role in a closed namespace, anyone in an open one."""
        try:
            return self.replica.members.allows(bytes.fromhex(peer))
        except ValueError:
            return False

    def _drop_non_members(self) -> None:
        """End the sessions of peers the member list no longer has (a revoke just arrived or
        was made here); they are refused when they redial."""
        for sid, session in list(self._sessions.items()):
            if not self._member(session.info.peer):
                log.warning("peer %s is no longer a member of the namespace: closing its session",
                            session.info.peer[:16])
                session.scope.cancel()
                del self._sessions[sid]

    def _send_to_all(self, frame: Entries | HoldingsFrame, source: str | None) -> None:
        for sid, session in list(self._sessions.items()):
            if session.info.peer == source:
                continue
            if isinstance(frame, Entries):
                session.info.entries_to_send += len(frame.entries)
            if not session.queue.put(frame):
                # A peer that cannot keep up is dropped; it reconciles when it reconnects.
                log.warning("peer %s is too slow for live updates (%d bytes queued): closing its session",
                            session.info.peer[:16], session.queue.bytes)
                session.scope.cancel()
                del self._sessions[sid]

    def queued_bytes(self) -> int:
        """Bytes waiting in the live queues of all sessions (for tests and reports)."""
        return sum(s.queue.bytes for s in self._sessions.values())

    async def announce_holdings(self) -> None:
        """Tell every session when this node's holdings change (paced: `Holdings.next_announcement`)."""
        if self.holdings is None:
            return
        while True:
            await self.holdings.next_announcement()
            try:
                self._send_to_all(holdings_frame(self.holdings.self_id, self.holdings.own, self.holdings.secret), None)
            except Exception:  # runs in the services nursery: a bug here must not end the daemon
                log.exception("announcing holdings failed")

    async def handle(self, stream: Stream, peer_id: str) -> None:
        """Stream handler for incoming sessions (registered for `ALPN`)."""
        try:
            await self._session(stream, peer_id, initiator=False)
        except TransportError as exc:  # the peer went away: it redials if it wants to
            log.info("session from %s ended: %s", peer_id[:16], exc)
        except Exception:  # a full disk, a bug: this session ends, the peer redials (see maintain)
            log.exception("sync session from %s failed", peer_id[:16])
            await stream.reset(CODE_BAD_FRAME)

    async def maintain(self, peer: NodeAddr, resolve: Callable[[str], NodeAddr] | None = None) -> None:
        """Keep a session with ``peer`` open for as long as this runs: dial, sync, redial.

        ``resolve`` gives the peer's current address before each dial (an address learnt
        later, e.g. on the LAN, or a node that moved); without it ``peer`` is used as is.
        """
        backoff = BACKOFF_MIN
        while True:
            started = trio.current_time()
            target = resolve(peer.node_id) if resolve is not None else peer
            try:
                if not self._member(peer.node_id):  # outside a closed namespace's list: not dialed
                    raise FrameError("not a member of the namespace")
                stream = await self.transport.open_stream(target, ALPN)
                async with stream:
                    await self._session(stream, peer.node_id, initiator=True)
            except (TransportError, FrameError) as exc:
                log.info("sync with %s ended: %s", peer.node_id[:16], exc)
            except Exception:
                # Whatever one session hits (a full disk: sqlite3.Error, OSError; a bug) costs
                # that session only: this task runs in the daemon's services nursery, which
                # an exception would end, taking the mount down. Retried with backoff.
                log.exception("sync session with %s failed", peer.node_id[:16])
            if trio.current_time() - started > 10 * BACKOFF_MAX:
                backoff = BACKOFF_MIN  # it had been up for a while: retry soon
            # Jitter spreads the redials of a fleet that lost the same peer.
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _session(self, stream: Stream, peer: str, *, initiator: bool) -> None:
        replica = self.replica
        info = SessionInfo(peer=peer, started=trio.current_time())
        if not self._member(peer):
            # Checked before any HELLO: a non-member of a closed namespace learns nothing of it.
            log.warning("peer %s is not a member of this closed namespace: no session", peer[:16])
            metrics.count_refused("sync", "not_member")
            if not initiator:
                with trio.move_on_after(SEND_TIMEOUT):
                    await stream.send_all(encode(ErrorFrame(CODE_NOT_MEMBER, "not a member of this namespace")))
                await stream.reset(CODE_NOT_MEMBER)
            return
        try:
            hello = Hello(replica.keys.id, sendable_vector(replica.store.vector(), replica.store.authors()))
            if initiator:
                await self._send(stream, encode(hello))
            with trio.fail_after(HELLO_TIMEOUT):
                theirs = await read_frame(stream)
            if not isinstance(theirs, Hello):
                raise FrameError(f"expected HELLO, got {type(theirs).__name__}")
            if theirs.namespace_id != replica.keys.id:
                log.warning("peer %s asked for namespace %s, which this node does not hold",
                            peer[:16], theirs.namespace_id.hex()[:16])
                metrics.count_refused("sync", "wrong_namespace")
                await self._send(stream, encode(ErrorFrame(CODE_WRONG_NAMESPACE, "unknown namespace")))
                await stream.reset(CODE_WRONG_NAMESPACE)
                return
            if not initiator:
                await self._send(stream, encode(hello))
            session = _Session(info)
            sid = self._next_id
            self._next_id += 1
            # Registered before the diff is taken: a change made while we send it is queued.
            self._sessions[sid] = session
            if not self._member(peer):
                # A revoke arrived while the HELLOs were exchanged: `_drop_non_members` ran
                # before this session was registered, so it is refused here instead.
                self._sessions.pop(sid, None)
                log.warning("peer %s was revoked while its session started: closing it", peer[:16])
                metrics.count_refused("sync", "not_member")
                await stream.reset(CODE_NOT_MEMBER)
                return
            try:
                with session.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._sender, stream, session, theirs.vector)
                        await self._receiver(stream, info)
                        nursery.cancel_scope.cancel()
            except* FrameError as group:
                await self._refuse(stream, peer, _first(group))
            except* (TransportError, trio.TooSlowError) as group:
                log.info("session with %s ended: %s", peer[:16], _first(group))
            finally:
                self._sessions.pop(sid, None)
        except FrameError as exc:
            await self._refuse(stream, peer, exc)
        except trio.TooSlowError:
            log.warning("peer %s did not say HELLO within %.0f s: closing the session", peer[:16], HELLO_TIMEOUT)
            metrics.count_refused("sync", "hello_timeout")
            await stream.reset(CODE_BAD_FRAME)

    @staticmethod
    async def _refuse(stream: Stream, peer: str, exc: BaseException) -> None:
        log.warning("peer %s sent a bad frame (%s): closing the session", peer[:16], exc)
        metrics.count_refused("sync", "bad_frame")
        await stream.reset(CODE_BAD_FRAME)

    async def _send(self, stream: Stream, data: bytes) -> None:
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)

    async def _sender(self, stream: Stream, session: _Session, their_vector: dict[bytes, int]) -> None:
        store = self.replica.store
        # Before the diff: everything up to it is in the diff or beats it.
        vector = sendable_vector(store.vector(), store.authors())
        if self.holdings is not None:  # who holds what, before the entries that will be read
            for node_id, record in list(self.holdings.nodes.items()):
                if node_id == self.holdings.self_id or record.signed is not None:
                    await self._send(stream, encode(holdings_frame(node_id, record, self.holdings.secret)))
        # The diff streams from one snapshot of the store, a page at a time: neither the whole
        # namespace in memory nor a long stretch of the event loop (FUSE requests, other
        # sessions run between pages). A change applied meanwhile is in the live queue. The
        # entries go out as stored: decoding each only to encode it again was most of the work.
        session.info.entries_to_send += store.count_since(their_vector)
        with contextlib.closing(store.serialized_pages_since(their_vector, DIFF_PAGE)) as pages:
            for page in pages:
                for batch in _batches_of(page):
                    await self._send(stream, encode_entries(batch))
                    session.info.entries_sent += len(batch)
                    session.info.entries_to_send = max(0, session.info.entries_to_send - len(batch))
                await lowprio.yield_to_foreground()
        await self._send(stream, encode(Synced(vector)))
        while True:
            frame = await session.queue.get()
            if isinstance(frame, HoldingsFrame):
                await self._send(stream, encode(frame))
                continue
            for batch in _batches(frame.entries):
                await self._send(stream, encode_entries(batch))
                session.info.entries_sent += len(batch)
                session.info.entries_to_send = max(0, session.info.entries_to_send - len(batch))

    def _advance(self, vector: dict[bytes, int], info: SessionInfo) -> None:
        """Take a peer's SYNCED vector as our knowledge, with care: a peer vouches only for
        entries it sent us. If we refused any (bad signature, clock skew), the vector stays:
        the next reconciliation offers them again. Nobody speaks for our own author, and no
        claim reaches past the future bound entries themselves must respect.

        Only authors this node holds versions of, or received valid versions of in this
        session, advance: a peer naming invented authors (read capability suffices) would
        otherwise grow the vector without bound, and with it every HELLO. Nor does the
        vector grow past `MAX_VECTOR_AUTHORS` authors."""
        if info.refused:
            log.info("not advancing the version vector after %s: %d entries were refused", info.peer[:16],
                     info.refused)
            return
        store = self.replica.store
        horizon = time.time_ns() + MAX_FUTURE_NS
        current = store.vector()
        known = store.authors() | info.authors
        advance: dict[bytes, int] = {}
        room = MAX_VECTOR_AUTHORS - len(current)
        ignored = 0
        for a, t in vector.items():
            if a == self.replica.author or a not in known:
                ignored += a != self.replica.author
                continue
            if a not in current:
                if room <= 0:
                    ignored += 1
                    continue
                room -= 1
            advance[a] = min(t, horizon)
        if ignored:
            log.info("SYNCED from %s named %d authors this node holds nothing of (or too many): not advanced",
                     info.peer[:16], ignored)
        if advance:
            store.advance_vector(advance)

    def _room_for(self, node_id: str, record: NodeHoldings, info: SessionInfo) -> bool:
        """Whether the holdings table may take ``record`` for ``node_id``: at most
        `MAX_HOLDINGS_NODES` nodes and `HOLDINGS_TABLE_BYTES` announced bytes. Anyone with
        read capability can announce any number of invented nodes, each up to a frame: a
        record that does not fit is ignored (not stored, not relayed), with a log line."""
        assert self.holdings is not None
        nodes, own = self.holdings.nodes, self.holdings.self_id  # our own record is not a peer's to fill
        sessions = {s.info.peer for s in self._sessions.values()}
        for gone in [n for n in self._sizes if n not in nodes]:
            del self._sizes[gone]

        def fits() -> tuple[bool, str]:
            if node_id not in nodes and len(nodes) >= MAX_HOLDINGS_NODES:
                return False, f"{len(nodes)} nodes"
            used = sum(self._record_bytes(n, r) for n, r in nodes.items() if n not in (node_id, own))
            used += record_bytes(record)
            return used <= HOLDINGS_TABLE_BYTES, f"{used} bytes"

        ok, problem = fits()
        if ok:
            return True
        if node_id in sessions or self._vouched(node_id):
            # A node we reach ourselves displaces nodes we only heard of, largest first.
            unproven = sorted((n for n in nodes if n != self.holdings.self_id and n not in sessions
                               and not self._vouched(n)), key=lambda n: -record_bytes(nodes[n]))
            for victim in unproven:
                del nodes[victim]
                ok, problem = fits()
                if ok:
                    log.info("holdings table full: records of nodes never reached dropped for %s", node_id[:16])
                    return True
        info.holdings_refused += 1
        metrics.count_refused("sync", "holdings_full")
        if info.holdings_refused % 100 == 1:
            log.warning("holdings of %s relayed by %s ignored: the table would hold %s (%d ignored from this peer)",
                        node_id[:16], info.peer[:16], problem, info.holdings_refused)
        return False

    def _record_bytes(self, node_id: str, record: NodeHoldings) -> int:
        """`record_bytes`, cached while the table holds the same record object (others'
        records are replaced by `Holdings.update`, never changed in place)."""
        cached = self._sizes.get(node_id)
        if cached is None or cached[0] is not record:
            cached = self._sizes[node_id] = (record, record_bytes(record))
        return cached[1]

    async def _receiver(self, stream: Stream, info: SessionInfo) -> None:
        """Read frames and hand them, in order, to `_apply_frames`. An ENTRIES frame's checks
        (signatures, in worker processes) start as soon as it is read, so they run while the
        frame before it is applied on this thread: a session start costs about its
        signature checks, not their sum with decoding and SQLite. At most two frames wait
        here besides the one being applied (bounded memory: frames are at most 1 MiB)."""
        send, receive = trio.open_memory_channel[tuple[Frame, _Checks | None]](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._apply_frames, receive, info)
            async with send:
                while True:
                    frame = await read_frame(stream, rest_within=FRAME_TIMEOUT, defer_entries=True)
                    if frame is None:
                        return
                    checks = None
                    if isinstance(frame, EncodedEntries):
                        checks = _Checks()
                        nursery.start_soon(checks.run, self.replica, frame.raw)
                    await send.send((frame, checks))
                    if isinstance(frame, ErrorFrame):
                        return

    async def _apply_frames(self, frames: trio.MemoryReceiveChannel[tuple[Frame, _Checks | None]],
                            info: SessionInfo) -> None:
        async with frames:
            async for frame, checks in frames:
                await self._apply_frame(frame, checks, info)

    async def _apply_frame(self, frame: Frame, checks: _Checks | None, info: SessionInfo) -> None:
        if isinstance(frame, EncodedEntries):
            assert checks is not None
            entries, problems = await checks.result()
            # In slices, yielding between them: a frame holds up to ~350 entries, whose SQLite
            # apply and listeners would keep FUSE requests waiting tens of ms (64 entries took
            # 4-11 ms on a loaded 2-core machine, 16 take ~1). In order, so access control sees
            # the member records of the slices before.
            for i in range(0, len(entries), APPLY_SLICE):
                await lowprio.yield_to_foreground()
                part = entries[i:i + APPLY_SLICE]
                _, refused = self.replica.merge_checked(part, problems[i:i + APPLY_SLICE], info.peer)
                info.entries_received += len(part)
                info.refused += refused
                info.last_entry = trio.current_time()
                metrics.sync_entries_received.labels(metrics.peer_label(info.peer)).inc(len(part))
                metrics.count_refused("sync", "bad_entry", refused)
                if not refused:  # valid (signed) versions by these authors: SYNCED may speak for them
                    info.authors.update(e.author for e in part)
            store = self.replica.store
            if store.checkpoint_due():  # in a thread: the event loop serves FUSE meanwhile
                await trio.to_thread.run_sync(store.checkpoint)
        elif isinstance(frame, Synced):
            self._advance(frame.vector, info)
            if not info.synced.is_set():
                info.synced.set()
                log.info("synced with %s: %d entries received", info.peer[:16], info.entries_received)
                if self._on_session_synced is not None:
                    self._on_session_synced(info)
        elif isinstance(frame, HoldingsFrame):
            record = holdings_record(frame)
            if self.holdings is not None and frame.node_id.hex() == self.holdings.self_id:
                pass  # our own, relayed back (or forged): we know our holdings
            elif self.holdings is not None and not self.holdings.newer(frame.node_id.hex(), record.seq):
                pass  # a copy of a record we hold (in a mesh each comes from every session): not even verified
            elif not holdings_verified(frame):
                log.warning("peer %s sent holdings of %s not signed by that node: refused", info.peer[:16],
                            frame.node_id.hex()[:16])
                metrics.count_refused("sync", "holdings_unsigned")
            elif record.seq > time.time_ns() + MAX_FUTURE_NS:
                log.warning("peer %s relayed holdings with a sequence number from the future: ignored",
                            info.peer[:16])
            elif self.holdings is not None and self._room_for(frame.node_id.hex(), record, info) \
                    and self.holdings.update(frame.node_id.hex(), record):
                if record.addr is not None and self._on_address is not None:
                    self._on_address(record.addr)
                self._send_to_all(frame, info.peer)  # relay: nodes that only know us learn it too
        elif isinstance(frame, ErrorFrame):
            log.warning("peer %s closed the session: %s (code %d)", info.peer[:16], frame.message, frame.code)
        else:
            raise FrameError(f"unexpected {type(frame).__name__} during a session")


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of ``group``, out of nested groups (the receiver's nursery nests one)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class _Checks:
    """The decoding and checks of one ENTRIES frame (`Replica.check_received`), run ahead of
    its turn to be applied."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._entries: list[Entry] = []
        self._problems: list[str | None] = []
        self._error: BaseException | None = None

    async def run(self, replica: Replica, raw: Sequence[bytes]) -> None:
        try:
            self._entries, self._problems = await replica.check_received(raw)
        except Exception as exc:  # handed to the applying task, which ends the session with it
            self._error = exc
        finally:
            self._done.set()

    async def result(self) -> tuple[list[Entry], list[str | None]]:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._entries, self._problems

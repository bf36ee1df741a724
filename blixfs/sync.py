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
except waiting for live entries; a dead connection ends that wait through the
transport (keep-alives, idle timeout) and the dialing side reconnects with backoff.

Callers: the node daemon (`blixfs.daemon`), which registers `handle` for the ALPN and
runs `maintain` for every peer it should dial, in its nursery.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from blixfs import crypto
from blixfs.entry import Entry
from blixfs.frames import (
    Entries,
    ErrorFrame,
    FrameError,
    Hello,
    HoldingsFrame,
    Synced,
    encode,
    holdings_signed_bytes,
    read_frame,
)
from blixfs.holdings import Holdings, NodeHoldings
from blixfs.net.transport import CODE_APP_MIN, NodeAddr, Stream, Transport, TransportError
from blixfs.replica import MAX_FUTURE_NS, Replica

log = logging.getLogger(__name__)

ALPN = b"blixfs/sync/1"
CODE_BAD_FRAME = CODE_APP_MIN + 1
CODE_WRONG_NAMESPACE = CODE_APP_MIN + 2
CODE_OVERLOADED = CODE_APP_MIN + 3
HELLO_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0
BATCH_BYTES = 256 * 1024
LIVE_QUEUE = 10_000
BACKOFF_MIN, BACKOFF_MAX = 0.2, 30.0


@dataclass
class SessionInfo:
    peer: str
    started: float
    synced: trio.Event = field(default_factory=trio.Event)  # the peer's initial entries are applied
    entries_received: int = 0
    entries_sent: int = 0
    refused: int = 0


def _batches(entries: list[Entry]) -> list[list[Entry]]:
    out: list[list[Entry]] = []
    batch: list[Entry] = []
    size = 0
    for e in entries:
        n = len(e.serialize()) + 4
        if batch and size + n > BATCH_BYTES:
            out.append(batch)
            batch, size = [], 0
        batch.append(e)
        size += n
    if batch:
        out.append(batch)
    return out


class _Session:
    def __init__(self, info: SessionInfo) -> None:
        self.info = info
        self.send, self.receive = trio.open_memory_channel[Entries | HoldingsFrame](LIVE_QUEUE)
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

    def __init__(self, replica: Replica, transport: Transport, holdings: Holdings | None = None) -> None:
        self.replica = replica
        self.transport = transport
        self.holdings = holdings
        self._sessions: dict[int, _Session] = {}
        self._next_id = 0
        self.on_session_synced: Callable[[SessionInfo], None] | None = None
        self.on_address: Callable[[NodeAddr], None] | None = None  # a peer's address learnt from holdings
        replica.listeners.append(self._push)

    def sessions(self) -> list[SessionInfo]:
        return [s.info for s in self._sessions.values()]

    def _push(self, entries: list[Entry], source: str | None) -> None:
        self._send_to_all(Entries(entries), source)

    def _send_to_all(self, frame: Entries | HoldingsFrame, source: str | None) -> None:
        for sid, session in list(self._sessions.items()):
            if session.info.peer == source:
                continue
            try:
                session.send.send_nowait(frame)
            except trio.WouldBlock:
                # A peer that cannot keep up is dropped; it reconciles when it reconnects.
                log.warning("peer %s is too slow for live updates: closing its session", session.info.peer[:16])
                session.scope.cancel()
                del self._sessions[sid]

    async def announce_holdings(self) -> None:
        """Tell every session when this node's holdings change (at most 5 times a second)."""
        if self.holdings is None:
            return
        while True:
            await self.holdings.changed.wait()
            await trio.sleep(0.2)  # gather the changes of a burst of fetched chunks into one frame
            self.holdings.changed = trio.Event()
            self._send_to_all(holdings_frame(self.holdings.self_id, self.holdings.own, self.holdings.secret), None)

    async def handle(self, stream: Stream, peer_id: str) -> None:
        """Stream handler for incoming sessions (registered for `ALPN`)."""
        try:
            await self._session(stream, peer_id, initiator=False)
        except TransportError as exc:  # the peer went away: it redials if it wants to
            log.info("session from %s ended: %s", peer_id[:16], exc)

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
                stream = await self.transport.open_stream(target, ALPN)
                async with stream:
                    await self._session(stream, peer.node_id, initiator=True)
            except (TransportError, FrameError) as exc:
                log.info("sync with %s ended: %s", peer.node_id[:16], exc)
            if trio.current_time() - started > 10 * BACKOFF_MAX:
                backoff = BACKOFF_MIN  # it had been up for a while: retry soon
            # Jitter spreads the redials of a fleet that lost the same peer.
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _session(self, stream: Stream, peer: str, *, initiator: bool) -> None:
        replica = self.replica
        info = SessionInfo(peer=peer, started=trio.current_time())
        try:
            hello = Hello(replica.keys.id, replica.store.vector())
            if initiator:
                await self._send(stream, encode(hello))
            with trio.fail_after(HELLO_TIMEOUT):
                theirs = await read_frame(stream)
            if not isinstance(theirs, Hello):
                raise FrameError(f"expected HELLO, got {type(theirs).__name__}")
            if theirs.namespace_id != replica.keys.id:
                log.warning("peer %s asked for namespace %s, which this node does not hold",
                            peer[:16], theirs.namespace_id.hex()[:16])
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
            try:
                with session.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._sender, stream, session, theirs.vector)
                        await self._receiver(stream, info)
                        nursery.cancel_scope.cancel()
            except* FrameError as group:
                await self._refuse(stream, peer, group.exceptions[0])
            except* (TransportError, trio.TooSlowError) as group:
                log.info("session with %s ended: %s", peer[:16], group.exceptions[0])
            finally:
                self._sessions.pop(sid, None)
        except FrameError as exc:
            await self._refuse(stream, peer, exc)
        except trio.TooSlowError:
            log.warning("peer %s did not say HELLO within %.0f s: closing the session", peer[:16], HELLO_TIMEOUT)
            await stream.reset(CODE_BAD_FRAME)

    @staticmethod
    async def _refuse(stream: Stream, peer: str, exc: BaseException) -> None:
        log.warning("peer %s sent a bad frame (%s): closing the session", peer[:16], exc)
        await stream.reset(CODE_BAD_FRAME)

    async def _send(self, stream: Stream, data: bytes) -> None:
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(data)

    async def _sender(self, stream: Stream, session: _Session, their_vector: dict[bytes, int]) -> None:
        store = self.replica.store
        vector = store.vector()  # before the diff: everything up to it is in the diff or beats it
        diff = list(store.entries_since(their_vector))
        if self.holdings is not None:  # who holds what, before the entries that will be read
            for node_id, record in list(self.holdings.nodes.items()):
                if node_id == self.holdings.self_id or record.signed is not None:
                    await self._send(stream, encode(holdings_frame(node_id, record, self.holdings.secret)))
        for batch in _batches(diff):
            await self._send(stream, encode(Entries(batch)))
            session.info.entries_sent += len(batch)
        await self._send(stream, encode(Synced(vector)))
        async for frame in session.receive:
            if isinstance(frame, HoldingsFrame):
                await self._send(stream, encode(frame))
                continue
            for batch in _batches(frame.entries):
                await self._send(stream, encode(Entries(batch)))
                session.info.entries_sent += len(batch)

    def _advance(self, vector: dict[bytes, int], info: SessionInfo) -> None:
        """Take a peer's SYNCED vector as our knowledge, with care: a peer vouches only for
        entries it sent us. If we refused any (bad signature, clock skew), the vector stays:
        the next reconciliation offers them again. Nobody speaks for our own author, and no
        claim reaches past the future bound entries themselves must respect."""
        if info.refused:
            log.info("not advancing the version vector after %s: %d entries were refused", info.peer[:16],
                     info.refused)
            return
        horizon = time.time_ns() + MAX_FUTURE_NS
        self.replica.store.advance_vector({a: min(t, horizon) for a, t in vector.items() if a != self.replica.author})

    async def _receiver(self, stream: Stream, info: SessionInfo) -> None:
        while True:
            frame = await read_frame(stream)
            if frame is None:
                return
            if isinstance(frame, Entries):
                _, refused = await self.replica.merge_remote(frame.entries, info.peer)
                info.entries_received += len(frame.entries)
                info.refused += refused
            elif isinstance(frame, Synced):
                self._advance(frame.vector, info)
                if not info.synced.is_set():
                    info.synced.set()
                    log.info("synced with %s: %d entries received", info.peer[:16], info.entries_received)
                    if self.on_session_synced is not None:
                        self.on_session_synced(info)
            elif isinstance(frame, HoldingsFrame):
                record = holdings_record(frame)
                if self.holdings is not None and frame.node_id.hex() == self.holdings.self_id:
                    pass  # our own, relayed back (or forged): we know our holdings
                elif not holdings_verified(frame):
                    log.warning("peer %s sent holdings of %s not signed by that node: refused", info.peer[:16],
                                frame.node_id.hex()[:16])
                elif record.seq > time.time_ns() + MAX_FUTURE_NS:
                    log.warning("peer %s relayed holdings with a sequence number from the future: ignored",
                                info.peer[:16])
                elif self.holdings is not None and self.holdings.update(frame.node_id.hex(), record):
                    if record.addr is not None and self.on_address is not None:
                        self.on_address(record.addr)
                    self._send_to_all(frame, info.peer)  # relay: nodes that only know us learn it too
            elif isinstance(frame, ErrorFrame):
                log.warning("peer %s closed the session: %s (code %d)", info.peer[:16], frame.message, frame.code)
                return
            else:
                raise FrameError(f"unexpected {type(frame).__name__} during a session")


"""Holdings: which file versions (manifests) each node holds, whole or in part.

Every node announces its own on its sync sessions (HOLDINGS frames: the manifests it holds
whole, a bitmap of chunk indices for the others, its address and cache room), relayed to
every other session. A holdings record is a hint: a stale one costs one DONT_HAVE and the
next holder, never an error. Holders of a chunk are found by content, not only by the
version being read: see `blixfs.content`.

Callers: the sync service (announcing and taking records), the content layer and the
replicator (who holds what), the VFS and the store (this node's own changes). All on the
trio thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from blixfs.frames import HoldingsFrame
from blixfs.hashing import ChunkId
from blixfs.net.transport import NodeAddr

ANNOUNCE_GATHER = 0.2  # seconds from a change of this node's holdings to their announcement
PARTIAL_INTERVAL = 1.0  # ... at least, while only chunks of versions held in part were added


@dataclass
class NodeHoldings:
    seq: int = 0
    complete: set[bytes] = field(default_factory=set)
    partial: dict[bytes, bytearray] = field(default_factory=dict)  # manifest id -> bitmap of chunk indices
    addr: NodeAddr | None = None  # where the node says it can be reached
    free: int = 0  # bytes it will still take as replicas for others, as it announced
    signed: HoldingsFrame | None = None  # a peer's record: the frame its holder signed, relayed as is

    def holds(self, manifest_id: bytes, index: int | None) -> bool:
        if manifest_id in self.complete:
            return True
        bits = self.partial.get(manifest_id)
        if bits is None or index is None:
            return False
        return index // 8 < len(bits) and bool(bits[index // 8] >> (index % 8) & 1)


class Holdings:
    """Who holds which manifests. See the module docstring."""

    def __init__(self, self_id: str, secret: bytes | None = None, addr: NodeAddr | None = None) -> None:
        """``secret``: this node's endpoint secret, which signs its own HOLDINGS; ``addr``:
        where this node says it can be reached (its transport's address)."""
        self.self_id = self_id
        self.secret = secret
        self.nodes: dict[str, NodeHoldings] = {}
        # seq starts from the clock: a restarted node's announcements must beat its old ones.
        self.own = self.nodes.setdefault(self_id, NodeHoldings(seq=time.time_ns(), addr=addr))
        self._held: dict[bytes, int] = {}  # set bits of each of own.partial's bitmaps
        self.changed = trio.Event()  # set when this node's own holdings change (to announce them)
        self._urgent = trio.Event()  # ... by more than chunks added to a version held in part

    def holders(self, manifest_id: bytes, index: int | None = None) -> list[str]:
        return [n for n, h in self.nodes.items() if n != self.self_id and h.holds(manifest_id, index)]

    def version_holders(self, manifest_id: bytes) -> list[tuple[str, NodeHoldings]]:
        """Other nodes whose records name ``manifest_id``, whole or in part, with the records
        (a fetch weighs which of its missing chunks each holds: `blixfs.swarm`)."""
        return [(n, h) for n, h in self.nodes.items()
                if n != self.self_id and (manifest_id in h.complete or manifest_id in h.partial)]

    def newer(self, node_id: str, seq: int) -> bool:
        """Whether a record of ``node_id`` numbered ``seq`` would replace the one held (cheap:
        the sync service skips the signature check of copies it would drop anyway)."""
        current = self.nodes.get(node_id)
        return current is None or current.seq < seq

    def update(self, node_id: str, record: NodeHoldings) -> bool:
        """Take a peer's announcement if it is newer than what we have; True if taken. The
        caller (the sync service) has checked its holder's signature (`record.signed`)."""
        if node_id == self.self_id or not self.newer(node_id, record.seq):
            return False
        self.nodes[node_id] = record
        return True

    def _touched(self, *, urgent: bool = True) -> None:
        self.own.seq += 1
        self.changed.set()
        if urgent:
            self._urgent.set()

    async def next_announcement(self) -> None:
        """Wait until this node's own record is due to be announced (the sync service then
        sends it to every session), and start gathering the next changes.

        A burst of changes becomes one frame `ANNOUNCE_GATHER` after the first. While the
        only changes are chunks added to versions held in part (a pull or a read under
        way, each fetched chunk a change), announcements come at most every
        `PARTIAL_INTERVAL`: every session relays each one to every other session, so in a
        mesh of N nodes each costs about N x N frames sent, received and decoded. A whole
        version, an eviction or a new room for replicas goes out after the gather time."""
        await self.changed.wait()
        await trio.sleep(ANNOUNCE_GATHER)
        if not self._urgent.is_set():
            with trio.move_on_after(PARTIAL_INTERVAL - ANNOUNCE_GATHER):
                await self._urgent.wait()
        self.changed = trio.Event()
        self._urgent = trio.Event()

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
        else:
            self._touched(urgent=False)

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

    def evicted(self, cids: set[ChunkId],
                versions: Callable[[bytes], tuple[int, list[tuple[int, ChunkId]], bool] | None]) -> None:
        """This node evicted ``cids``; what it announces follows, so peers do not ask it for them.

        ``versions(mid)`` gives a version's chunk count, its non-hole (index, id) pairs under
        the pages held here, and whether every page is held; None if its root is unknown.
        A version held whole that lost chunks or pages is announced as partial, with the
        chunks it still holds; a partial one loses those bits. A version whose root went,
        or is unknown, is dropped.
        """
        for mid in [*self.own.complete, *self.own.partial]:
            known = versions(mid)
            if known is None or mid in cids:
                self._drop(mid)
                continue
            count, pairs, all_pages = known
            lost = [i for i, c in pairs if c in cids]
            if mid in self.own.complete:
                if not lost and all_pages:
                    continue
                self.own.complete.discard(mid)
                bits = self.own.partial[mid] = bytearray(-(-count // 8))
                self._held[mid] = 0
                for i, c in pairs:
                    if c not in cids:
                        bits[i // 8] |= 1 << (i % 8)
                        self._held[mid] += 1
            elif not lost:
                continue
            else:
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

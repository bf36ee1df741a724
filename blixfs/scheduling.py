"""Priority scheduling of transfers: who gets the next slot.

`FairQueue` hands out a fixed number of slots. A caller that finds none free waits; when
a slot frees, it goes to the waiter of the best (lowest) `blixfs.priority.Priority`
class, and within a class to the next *owner* in round robin (a peer on the serving
side, a file on the requesting side), first come first served within an owner. So:

* a request of a better class never waits behind a queue of worse ones, only for one
  slot to free (callers that must not wait at all, demand reads, bypass the queue or
  get a queue of their own);
* an owner that queues thousands of requests of one class gets its turn like an owner
  that queues one: fair share per owner within a class, whatever class it claims;
* memory is bounded by the callers: each waiter is one task (on the serving side, one
  stream, which the transport bounds per peer and in all).

O(1) per grant: one FIFO per (class, owner), one round-robin deque of owners per class.
The number of slots may change at any time (`set_slots`): fewer takes effect as holders
leave (none is interrupted), more grants waiters at once, in the same order.

Callers: `blixfs.fetcher.Fetcher` (non-demand fetches), `blixfs.chunkproto.ChunkServer`
(requests to serve), on the trio thread.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import trio

from blixfs import metrics
from blixfs.priority import Priority


class _Ticket:
    __slots__ = ("granted", "owner", "priority")

    def __init__(self, priority: int, owner: Hashable) -> None:
        self.priority = priority
        self.owner = owner
        self.granted = trio.Event()


class FairQueue:
    """``slots`` concurrent holders; waiters by class, then owners in round robin."""

    def __init__(self, slots: int, side: str) -> None:
        if slots < 1:
            raise ValueError("a FairQueue has at least one slot")
        self.slots = slots
        self.side = side
        self.busy = 0
        self._waiting = 0
        # per class: owner -> FIFO of tickets, and the owners with waiters in turn order
        self._queues: list[dict[Hashable, collections.deque[_Ticket]]] = [{} for _ in Priority]
        self._turns: list[collections.deque[Hashable]] = [collections.deque() for _ in Priority]
        self._counted = [metrics.priority_requests.labels(side, metrics.PRIORITY_NAMES[p]) for p in Priority]
        self._queued = [metrics.priority_queue_seconds.labels(side, metrics.PRIORITY_NAMES[p]) for p in Priority]

    def set_slots(self, slots: int) -> None:
        """Hold at most ``slots`` (>= 1) from now on (module docstring)."""
        if slots < 1:
            raise ValueError("a FairQueue has at least one slot")
        self.slots = slots
        while self.busy < self.slots and self._waiting:
            self.busy += 1
            self._grant()

    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting

    @asynccontextmanager
    async def slot(self, priority: Priority, owner: Hashable = None) -> AsyncIterator[None]:
        """Hold one slot for the body; waits its turn (module docstring) when none is free."""
        p = int(priority)
        self._counted[p].inc()
        if self.busy < self.slots and not self._waiting:
            self.busy += 1
            await trio.lowlevel.checkpoint()
        else:
            await self._wait(_Ticket(p, owner))
        try:
            yield
        finally:
            self._release()

    async def _wait(self, ticket: _Ticket) -> None:
        queues, turns = self._queues[ticket.priority], self._turns[ticket.priority]
        fifo = queues.get(ticket.owner)
        if fifo is None:
            fifo = queues[ticket.owner] = collections.deque()
            turns.append(ticket.owner)
        fifo.append(ticket)
        self._waiting += 1
        started = trio.current_time()
        try:
            await ticket.granted.wait()
        except BaseException:
            if ticket.granted.is_set():  # granted and cancelled at once: hand the slot on
                self._release()
            else:
                self._withdraw(ticket)
            raise
        finally:
            self._queued[ticket.priority].inc(trio.current_time() - started)

    def _withdraw(self, ticket: _Ticket) -> None:
        queues, turns = self._queues[ticket.priority], self._turns[ticket.priority]
        fifo = queues[ticket.owner]
        fifo.remove(ticket)
        self._waiting -= 1
        if not fifo:
            del queues[ticket.owner]
            turns.remove(ticket.owner)

    def _release(self) -> None:
        """Free a slot: to the next waiter (module docstring), if any and within the slots."""
        if self.busy > self.slots or not self._waiting:
            self.busy -= 1
            return
        self._grant()  # the slot passes on: busy stays the same

    def _grant(self) -> None:
        """Give a slot (counted in busy already) to the next waiter: best class, owners in turn."""
        for queues, turns in zip(self._queues, self._turns, strict=True):
            if not turns:
                continue
            owner = turns.popleft()
            fifo = queues[owner]
            ticket = fifo.popleft()
            if fifo:
                turns.append(owner)  # its next request waits for the other owners' turns
            else:
                del queues[owner]
            self._waiting -= 1
            ticket.granted.set()
            return
        raise AssertionError("no waiter to grant a slot to")

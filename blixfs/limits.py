"""Bandwidth limits: token buckets whose waiters are served by transfer class.

Two limits, both optional and changeable at run time (``blixfs limit``, the control
socket's ``limits`` op): ``max_upload`` caps the chunk bytes this node serves to peers,
``max_background`` the chunk bytes it fetches for anything but a demand read (trace
prefetch, read-ahead, pulls, replication). Demand fetches never take from the
background bucket; on the upload bucket, a demand request goes before every waiting
request of a later class (`blixfs.priority.Priority`).

`TokenBucket` contract: `take(n, priority)` returns once the caller's ``n`` bytes fit
the rate. Waiters are served one at a time in (priority, arrival) order, so a demand
request never waits behind a queue of background ones, only behind the one being
served. A take may leave the bucket in debt (a 256 KiB chunk over a 100 KiB/s limit
still goes, and the next waits for the debt to be repaid), so the long-run rate is the
limit whatever the request sizes; at most `burst` bytes go faster than the rate. A
bucket without a rate (None) never waits. Changing the rate wakes the waiters: a new
rate applies from that moment on.

Callers: `blixfs.chunkproto.ChunkServer` (upload), `blixfs.fetcher.Fetcher`
(background), `blixfs.daemon` (the ``limits`` op), on the trio thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
from dataclasses import dataclass

import trio

from blixfs import metrics
from blixfs.priority import Priority

log = logging.getLogger(__name__)

MIN_RATE = 1000  # bytes/s (1K): a lower limit would make one chunk take minutes
MAX_RATE = 10**15  # bytes/s (1000T): more is not a limit (and keeps JSON integers exact)
BURST_SECONDS = 0.1  # of rate, at least BURST_MIN: what may go at once after an idle spell
BURST_MIN = 256 * 1024  # one default chunk
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:B|B/S|/S)?\s*$", re.IGNORECASE)
UNLIMITED_WORDS = ("off", "none", "unlimited", "0")


class RateError(ValueError):
    """A rate that is not a number of bytes per second like 20M, 500K or 1G."""


def parse_rate(text: str | int | None) -> int | None:
    """Bytes per second from ``text``: an integer, or a number with a decimal suffix K, M,
    G, T (20M = 20,000,000 bytes/s; an optional B or /s after it); None for no limit
    ("off", "none", "unlimited", 0, or None itself). RateError for anything else, or a rate
    outside MIN_RATE..MAX_RATE."""
    if text is None:
        return None
    if isinstance(text, bool):
        raise RateError("a rate is a number of bytes per second, not true/false")
    if isinstance(text, int):
        value = text
    else:
        if text.strip().lower() in UNLIMITED_WORDS:
            return None
        m = _RATE.match(text) if len(text) <= 40 else None
        if m is None:
            raise RateError(f"{text[:40]!r} is not a rate in bytes per second like 20M, 500K or 1G (or off)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])  # at most 40 digits: finite
    if value == 0:
        return None
    if not MIN_RATE <= value <= MAX_RATE:
        raise RateError(f"a rate must be between {format_rate(MIN_RATE)} and {format_rate(MAX_RATE)} per second "
                        "(or off)")
    return value


def format_rate(rate: int | None) -> str:
    """``rate`` in the form `parse_rate` reads (20M, 1.5G); "off" for None."""
    if rate is None:
        return "off"
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if rate >= scale:
            return f"{rate / scale:.4g}{unit}"
    return str(rate)


class _Waiter:
    __slots__ = ("arrival", "priority", "turn")

    def __init__(self, priority: int, arrival: int) -> None:
        self.priority = priority
        self.arrival = arrival
        self.turn = trio.Event()

    def __lt__(self, other: _Waiter) -> bool:
        return (self.priority, self.arrival) < (other.priority, other.arrival)


class TokenBucket:
    """A rate limit in bytes per second (None: none); see the module docstring."""

    def __init__(self, name: str, rate: int | None = None) -> None:
        self.name = name
        self._rate: int | None = None
        self._tokens = 0.0
        self._stamp = 0.0
        self._waiters: list[_Waiter] = []  # a heap by (priority, arrival)
        self._arrivals = itertools.count()
        self._changed = trio.Event()
        self.waited_seconds = 0.0
        self._waited = metrics.limit_wait_seconds.labels(name)
        self._gauge = metrics.limit_rate.labels(name)
        self.set_rate(rate)
        self._tokens = self.burst  # a new bucket starts full

    @property
    def rate(self) -> int | None:
        return self._rate

    @property
    def burst(self) -> float:
        return max(BURST_MIN, (self._rate or 0) * BURST_SECONDS)

    def waiting(self) -> int:
        return len(self._waiters)

    def set_rate(self, rate: int | None) -> None:
        """Apply ``rate`` (bytes/s, None: no limit) from now on; waiters are re-examined."""
        self._refill()
        self._rate = rate
        self._tokens = min(self._tokens, self.burst)
        self._gauge.set(rate or 0)
        self._changed.set()
        self._changed = trio.Event()

    def _refill(self) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:  # set before the trio run (construction): start full
            now = self._stamp
        if self._rate is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def take(self, n: int, priority: Priority = Priority.DEMAND) -> None:
        """Wait until ``n`` bytes may go at the rate, served in (priority, arrival) order."""
        if self._rate is None and not self._waiters:
            await trio.lowlevel.checkpoint()
            return
        me = _Waiter(int(priority), next(self._arrivals))
        heapq.heappush(self._waiters, me)
        started = trio.current_time()
        try:
            while True:
                if self._waiters[0] is not me:
                    await me.turn.wait()  # set when the waiter before it leaves
                    me.turn = trio.Event()
                    continue
                self._refill()
                if self._rate is None or self._tokens > 0:
                    break
                changed = self._changed  # a new rate: look again at once
                with trio.move_on_after(-self._tokens / self._rate + 1e-4):
                    await changed.wait()
        finally:
            head = self._waiters[0] is me
            self._waiters.remove(me)
            heapq.heapify(self._waiters)
            if head and self._waiters:
                self._waiters[0].turn.set()
        self._refill()
        if self._rate is not None:
            self._tokens -= n
        waited = trio.current_time() - started
        if waited > 0:
            self.waited_seconds += waited
            self._waited.inc(waited)

    def charge(self, n: int) -> None:
        """Count ``n`` more (or, negative, fewer) bytes than were taken: a fetch takes its
        estimate before it asks and settles the difference once the chunk is here."""
        if self._rate is not None:
            self._refill()
            self._tokens = min(self.burst, self._tokens - n)


@dataclass
class Limits:
    """The node's two bandwidth limits (the daemon's; `blixfs limit`)."""

    upload: TokenBucket
    background: TokenBucket

    @classmethod
    def create(cls, max_upload: int | None = None, max_background: int | None = None) -> Limits:
        return cls(TokenBucket("upload", max_upload), TokenBucket("background", max_background))

    def report(self) -> dict[str, int | None]:
        return {"max_upload": self.upload.rate, "max_background": self.background.rate}

    def set(self, changes: dict[str, int | None]) -> None:
        """Apply ``changes``: ``max_upload`` and/or ``max_background`` in bytes/s (None: no
        limit); a limit not named keeps its rate. ValueError for another name."""
        unknown = set(changes) - {"max_upload", "max_background"}
        if unknown:
            raise ValueError(f"no limit named {sorted(unknown)[0]!r}")
        for name, bucket in (("max_upload", self.upload), ("max_background", self.background)):
            if name in changes:
                bucket.set_rate(changes[name])
                log.info("%s now %s/s", name.replace("_", "-"), format_rate(changes[name]))

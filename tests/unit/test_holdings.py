"""What a node announces it holds, as it reads and evicts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from blixfs.hashing import ChunkId
from blixfs.holdings import ANNOUNCE_GATHER, PARTIAL_INTERVAL, Holdings

MID = b"\x01" * 32
IDS = [ChunkId(bytes([i + 10]) * 32) for i in range(10)]
HELD = (len(IDS), list(enumerate(IDS)), True)  # count, (index, id) pairs, every page held


def test_reading_every_chunk_makes_a_version_complete() -> None:
    h = Holdings("me")
    for i in range(len(IDS)):
        h.note_chunk(MID, i, len(IDS))
    assert MID in h.own.complete and MID not in h.own.partial


def test_evicting_chunks_of_a_complete_version_announces_the_rest() -> None:
    h = Holdings("me")
    h.note_complete(MID)
    seq = h.own.seq
    h.evicted({IDS[3], IDS[9]}, lambda mid: HELD)
    assert MID not in h.own.complete and h.own.seq > seq
    assert [h.own.holds(MID, i) for i in range(len(IDS))] == [i not in (3, 9) for i in range(len(IDS))]
    h.note_chunk(MID, 3, len(IDS))  # read again
    h.note_chunk(MID, 9, len(IDS))
    assert MID in h.own.complete  # the count of held chunks stayed right


def test_evicting_a_partial_versions_chunks_clears_their_bits_then_drops_it() -> None:
    h = Holdings("me")
    h.note_chunk(MID, 0, len(IDS))
    h.note_chunk(MID, 5, len(IDS))
    h.evicted({IDS[5]}, lambda mid: HELD)
    assert h.own.holds(MID, 0) and not h.own.holds(MID, 5)
    h.evicted({IDS[0]}, lambda mid: HELD)
    assert MID not in h.own.partial


def test_a_version_whose_manifest_is_gone_or_unknown_is_dropped() -> None:
    h = Holdings("me")
    h.note_complete(MID)
    h.note_chunk(b"\x02" * 32, 1, 4)
    h.evicted({ChunkId(MID)}, lambda mid: HELD)
    assert MID not in h.own.complete
    h.evicted({IDS[0]}, lambda mid: None)
    assert h.own.partial == {}


def test_evicting_unrelated_chunks_changes_nothing() -> None:
    h = Holdings("me")
    h.note_complete(MID)
    seq = h.own.seq
    h.evicted({ChunkId(b"\x99" * 32)}, lambda mid: HELD)
    assert MID in h.own.complete and h.own.seq == seq


def test_a_complete_version_that_lost_a_page_keeps_announcing_the_chunks_still_listed() -> None:
    h = Holdings("me")
    h.note_complete(MID)
    h.evicted({ChunkId(b"\x77" * 32)}, lambda mid: (len(IDS), list(enumerate(IDS))[:4], False))
    assert MID not in h.own.complete
    assert [h.own.holds(MID, i) for i in range(len(IDS))] == [i < 4 for i in range(len(IDS))]


async def _announced_after(h: Holdings, change: Callable[[], object]) -> float:
    start = trio.current_time()
    change()
    await h.next_announcement()
    return trio.current_time() - start


async def test_chunks_of_a_partial_version_are_announced_paced_other_changes_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    h = Holdings("me")
    # A pull adds a chunk after chunk: at most one frame a second (every frame is relayed by every session).
    assert await _announced_after(h, lambda: h.note_chunk(MID, 0, len(IDS))) == pytest.approx(PARTIAL_INTERVAL)
    # A whole version (or an eviction) goes out after the gather time.
    for i in range(1, len(IDS) - 1):
        h.note_chunk(MID, i, len(IDS))
    last = len(IDS) - 1
    assert await _announced_after(h, lambda: h.note_chunk(MID, last, len(IDS))) == pytest.approx(ANNOUNCE_GATHER)
    assert await _announced_after(h, lambda: h.evicted({IDS[0]}, lambda mid: HELD)) == pytest.approx(ANNOUNCE_GATHER)
    # An urgent change during the partial wait cuts it short.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.next_announcement)
        h.note_chunk(MID, 0, len(IDS))
        await trio.sleep(0.5)
        h.note_complete(b"\x03" * 32)
    assert trio.current_time() < 0.5 + 2 * ANNOUNCE_GATHER + 3 * PARTIAL_INTERVAL

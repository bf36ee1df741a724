"""What a node announces it holds, as it reads and evicts."""

from __future__ import annotations

from blixfs.hashing import ChunkId
from blixfs.holdings import Holdings

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

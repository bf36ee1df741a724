"""Which missing chunk a whole-version fetch takes next (blixfs.swarm)."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from blixfs.hashing import ChunkId
from blixfs.holdings import Holdings, NodeHoldings
from blixfs.peers import PeerBook
from blixfs.swarm import MAX_HOLDERS, ChunkPicker, pick_cost

MID = b"\x01" * 32
COUNT = 16


def cid(i: int) -> ChunkId:
    return ChunkId(i.to_bytes(4, "big") * 8)


def partial(count: int, held: set[int]) -> NodeHoldings:
    record = NodeHoldings()
    bits = record.partial[MID] = bytearray(-(-count // 8))
    for i in held:
        bits[i // 8] |= 1 << (i % 8)
    return record


def picker(holders: dict[str, NodeHoldings], expected: dict[str, float], seed: int = 0) -> ChunkPicker:
    p = ChunkPicker(MID, lambda: list(holders.items()), lambda n: expected[n], random.Random(seed))
    for i in range(COUNT):
        p.add(i, cid(i))
    return p


def drain(p: ChunkPicker) -> list[int]:
    out = []
    while (item := p.take()) is not None:
        out.append(item[0])
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.sets(st.integers(0, COUNT - 1)), st.floats(0.001, 10), st.floats(0.001, 10))
def test_every_chunk_is_taken_once_whatever_the_holders(seed: int, held: set[int], seed_cost: float,
                                                        host_cost: float) -> None:
    p = picker({"seed": NodeHoldings(complete={MID}), "host": partial(COUNT, held)},
               {"seed": seed_cost, "host": host_cost}, seed)
    taken = drain(p)
    assert sorted(taken) == list(range(COUNT)) and len(p) == 0 and p.take() is None


def test_each_fetch_has_an_order_of_its_own() -> None:
    orders = {tuple(drain(picker({"seed": NodeHoldings(complete={MID})}, {"seed": 1.0}, s))) for s in range(5)}
    assert len(orders) == 5


def test_a_loaded_seed_is_asked_for_what_nobody_else_holds_and_an_idle_host_for_what_it_holds() -> None:
    host = partial(COUNT, {3, 4})
    costs = {"seed": 2.0, "host": 0.05}
    p = picker({"seed": NodeHoldings(complete={MID}), "host": host}, costs)
    assert {p.take()[0], p.take()[0]} == {3, 4}  # type: ignore[index]  # the idle host's chunks first
    costs["host"] = 5.0  # now the host is the busier one: the seed gets the rest
    assert p.take()[0] not in (3, 4)  # type: ignore[index]
    q = picker({"seed": NodeHoldings(complete={MID}), "host": host}, {"seed": 0.01, "host": 0.5})
    # The seed is soonest for every chunk: it is asked for chunks the host cannot give (rarest first).
    assert not {q.take()[0] for _ in range(COUNT - 2)} & {3, 4}  # type: ignore[index]


def test_holders_not_counted_on_are_ignored() -> None:
    p = picker({"seed": NodeHoldings(complete={MID}), "liar": NodeHoldings(complete={MID})},
               {"seed": 1.0, "liar": math.inf})
    assert len(drain(p)) == COUNT
    q = picker({"seed": NodeHoldings(complete={MID}), "penalised": partial(COUNT, {2, 5})},
               {"seed": 1.0, "penalised": math.inf})
    assert {q.take()[0], q.take()[0]} & {2, 5} == set()  # type: ignore[index]  # rarest among what the seed gives


def test_peerbook_expected_spreads_load_and_measures_a_new_holder_one_request_at_a_time() -> None:
    book = PeerBook("me")
    for new in ("claim", "author"):  # on its own word, or the version's author: never measured
        assert book.expected(new) < 1  # worth one request, which measures it
        book.of(new).inflight = 1
        assert book.expected(new) == math.inf  # ... one at a time
    book.record_ok("host", 256 * 1024, 0.1)
    book.of("host").inflight = 3
    assert math.isclose(book.expected("host"), 0.4)
    book.penalise("host", 5, bad_data=False)
    assert book.expected("host") == math.inf
    book.record_ok("author", 256 * 1024, 0.1)
    book.of("author").state = "unreachable"
    assert book.expected("author") == math.inf


def test_a_busy_holder_gets_no_more_requests_until_one_returns() -> None:
    book = PeerBook("me")
    book.record_ok("seed", 256 * 1024, 2.0)  # answers slowly: loaded by others
    assert pick_cost(book, "seed") == 2.0  # one request is always allowed
    book.of("seed").inflight = 1
    assert pick_cost(book, "seed") == math.inf  # a second would take ~4 s: over BUSY_SECONDS
    book.record_ok("fast", 256 * 1024, 0.05)
    book.of("fast").inflight = 7
    assert math.isclose(pick_cost(book, "fast"), 0.4)  # a fast holder takes many at once


def test_when_every_holder_is_busy_nothing_is_taken_unless_forced() -> None:
    costs = {"seed": math.inf, "host": math.inf}
    p = picker({"seed": NodeHoldings(complete={MID}), "host": partial(COUNT, {1})}, costs)
    assert p.take() is None and len(p) == COUNT
    assert p.take(force=True) is not None and len(p) == COUNT - 1  # nothing of ours under way: ask anyway
    costs["host"] = 0.1
    assert p.take() == (1, cid(1))


def test_version_holders_are_the_other_nodes_naming_it() -> None:
    h = Holdings("me")
    h.note_chunk(MID, 1, COUNT)  # our own: never listed
    h.update("whole", NodeHoldings(seq=1, complete={MID}))
    h.update("part", NodeHoldings(seq=1, partial={MID: bytearray(2)}))
    h.update("other", NodeHoldings(seq=1, complete={b"\x02" * 32}))
    assert sorted(n for n, _ in h.version_holders(MID)) == ["part", "whole"]


def test_a_crowd_of_claimants_is_weighed_only_up_to_the_soonest_holders() -> None:
    calls = [0]

    class Counted(NodeHoldings):
        def holds(self, manifest_id: bytes, index: int | None) -> bool:
            calls[0] += 1
            return super().holds(manifest_id, index)

    holders: dict[str, NodeHoldings] = {f"claim{i}": Counted(complete={MID}) for i in range(1000)}
    holders["host"] = partial(COUNT, {7})
    p = picker(holders, {n: 1.0 for n in holders} | {"host": 0.1})
    assert p.take() == (7, cid(7))  # the soonest holder is among those weighed
    assert calls[0] <= COUNT * MAX_HOLDERS  # not COUNT x 1000

"""Whom a fetch asks first."""

from __future__ import annotations

import time

from blixfs.peers import PeerBook


def test_a_holder_never_measured_is_asked_first_once() -> None:
    book = PeerBook("me")
    book.record_ok("near", 256 * 1024, 0.001)
    assert book.rank(["near", "new"]) == ["new", "near"]  # measured by asking it
    book.of("new").inflight = 1  # its first request is under way: not flooded meanwhile
    assert book.rank(["near", "new"]) == ["near", "new"]


def test_measured_holders_by_latency_and_load_penalised_last() -> None:
    book = PeerBook("me")
    book.record_ok("slow", 256 * 1024, 0.004)
    book.record_ok("fast", 256 * 1024, 0.001)
    assert book.rank(["slow", "fast", "me"]) == ["fast", "slow"]  # never itself
    book.of("fast").inflight = 4  # 0.001 x 5 > 0.004 x 1: the load spreads
    assert book.rank(["slow", "fast"]) == ["slow", "fast"]
    book.of("fast").inflight = 0
    book.penalise("fast", 60, bad_data=True)
    assert book.rank(["fast", "slow"]) == ["slow", "fast"]
    assert book.of("fast").penalised_until > time.monotonic()
    book.record_ok("other", 256 * 1024, 0.010)
    book.of("slow").state = "unreachable"  # the health probe's verdict: asked last too
    assert book.rank(["slow", "fast", "other"]) == ["other", "fast", "slow"]


def test_trusted_holders_before_claims_and_one_claim_explored_first() -> None:
    book = PeerBook("me")
    book.trusted.add("author")  # never measured, but the version's author
    assert book.rank(["fake1", "fake2", "author"]) == ["fake1", "author", "fake2"]
    assert book.rank(["fake1", "fake2", "author"], explore=False) == ["author", "fake1", "fake2"]
    book.of("fake1").inflight = 1  # being explored: the next claim is not explored meanwhile by this rank
    assert book.rank(["fake1", "fake2", "author"]) == ["fake2", "author", "fake1"]


def test_penalties_double_with_each_failure_in_a_row_and_reset_on_success() -> None:
    book = PeerBook("me")
    given = [book.penalise("staller", 5, bad_data=False) for _ in range(4)]
    assert given == [5, 10, 20, 40]
    assert max(book.penalise("staller", 5, bad_data=False) for _ in range(20)) == 600  # capped
    book.record_ok("staller", 1024, 0.001)
    assert book.penalise("staller", 5, bad_data=False) == 5

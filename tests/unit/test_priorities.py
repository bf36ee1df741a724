"""Transfer priorities and bandwidth limits, unit by unit: rate parsing, the token bucket,
the fair queue, the GETP op codec (fuzzed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from blixfs.chunkproto import (
    _REQUEST,
    DEFAULT_CLASS,
    OP_GET,
    OP_GETP,
    encode_request,
    request_class,
    send_priority,
)
from blixfs.cli import main
from blixfs.hashing import ChunkId
from blixfs.limits import BURST_MIN, MAX_RATE, MIN_RATE, Limits, RateError, TokenBucket, format_rate, parse_rate
from blixfs.priority import Priority
from blixfs.scheduling import FairQueue

# ------------------------------------------------------------------ rates


@pytest.mark.parametrize(("text", "rate"), [
    ("20M", 20_000_000), ("500K", 500_000), ("1G", 10**9), ("1.5G", 1_500_000_000), ("20m", 20_000_000),
    ("20MB", 20_000_000), ("20M/s", 20_000_000), ("20MB/s", 20_000_000), (" 4096 ", 4096), ("2T", 2 * 10**12),
    ("off", None), ("none", None), ("0", None), ("unlimited", None), (None, None), (0, None), (1_000_000, 1_000_000),
])
def test_parse_rate_reads_decimal_units_and_off(text: str | int | None, rate: int | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "20X", "-5M", "1e6", "20 M B", "M", "999", "5000T", "0.5K"])
def test_parse_rate_refuses_what_is_not_a_rate_with_a_clear_error(text: str) -> None:
    with pytest.raises(RateError) as info:
        parse_rate(text)
    assert "rate" in str(info.value)


def test_parse_rate_refuses_booleans_and_out_of_range_integers() -> None:
    for bad in (True, MIN_RATE - 1, MAX_RATE + 1, -1):
        with pytest.raises(RateError):
            parse_rate(bad)


@given(st.integers(MIN_RATE, MAX_RATE))
def test_format_rate_reads_back_close_to_the_rate(rate: int) -> None:
    back = parse_rate(format_rate(rate))
    assert back is not None and abs(back - rate) <= rate * 1e-3


def test_format_rate_of_no_limit() -> None:
    assert format_rate(None) == "off" and format_rate(20_000_000) == "20M"


# ------------------------------------------------------------------ token bucket


async def test_a_bucket_holds_its_rate_over_time(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket("upload", 1_000_000)
    start = trio.current_time()
    for _ in range(40):
        await bucket.take(250_000)
    elapsed = trio.current_time() - start
    # 10 MB at 1 MB/s: the burst goes at once, and the last take starts once the 9.75 MB
    # before it are paid for.
    assert (9_750_000 - BURST_MIN) / 1e6 - 0.01 <= elapsed <= 9.8


async def test_a_bucket_without_a_rate_never_waits(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket("background")
    start = trio.current_time()
    for _ in range(100):
        await bucket.take(10**9)
    assert trio.current_time() == start and bucket.waited_seconds == 0


async def test_demand_waiters_go_before_background_waiters(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket("upload", 100_000)
    await bucket.take(1_000_000)  # in debt for 10 s: everyone below waits
    order: list[str] = []

    async def one(name: str, priority: Priority) -> None:
        await bucket.take(100_000, priority)
        order.append(name)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(one, f"background{i}", Priority.BACKGROUND)
            await trio.sleep(0.01)
        nursery.start_soon(one, "ahead", Priority.AHEAD)
        await trio.sleep(0.01)
        nursery.start_soon(one, "demand", Priority.DEMAND)
    assert order[:2] == ["demand", "ahead"]
    assert order[2:] == [f"background{i}" for i in range(5)]  # first come first served within a class


async def test_a_new_rate_applies_at_once_to_waiters(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket("upload", MIN_RATE)
    await bucket.take(10_000_000)  # hours of debt at the old rate
    done = trio.Event()

    async def waiter() -> None:
        await bucket.take(1000)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1)
        assert not done.is_set()
        bucket.set_rate(None)  # off
        with trio.fail_after(0.1):
            await done.wait()


async def test_a_cancelled_waiter_passes_its_turn_on(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket("upload", 100_000)
    await bucket.take(1_000_000)
    got: list[str] = []

    async def one(name: str) -> None:
        await bucket.take(1, Priority.BACKGROUND)
        got.append(name)

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as first:
            nursery.start_soon(one, "never")
            await trio.sleep(0.01)
        nursery.start_soon(one, "second")
        await trio.sleep(0.01)
        first.cancel()
        nursery.cancel_scope.deadline = trio.current_time() + 30
    assert got == ["second"] or got == ["never", "second"]
    assert bucket.waiting() == 0


async def test_charge_settles_an_estimate(autojump_clock: trio.abc.Clock) -> None:
    bucket = TokenBucket("background", 1_000_000)
    await bucket.take(BURST_MIN)  # the burst is spent
    bucket.charge(4_000_000)  # the fetch was much bigger than its estimate: 4 s of debt
    start = trio.current_time()
    await bucket.take(1)
    assert 3.9 <= trio.current_time() - start <= 4.1


def test_limits_report_and_set() -> None:
    limits = Limits.create(20_000_000, None)
    assert limits.report() == {"max_upload": 20_000_000, "max_background": None}
    limits.set({"max_background": 5_000_000})
    assert limits.report() == {"max_upload": 20_000_000, "max_background": 5_000_000}
    limits.set({"max_upload": None})
    assert limits.report() == {"max_upload": None, "max_background": 5_000_000}
    with pytest.raises(ValueError, match="no limit named"):
        limits.set({"max_download": 1})


# ------------------------------------------------------------------ fair queue


async def _run_queue(queue: FairQueue, requests: list[tuple[Priority, str]], hold: float = 1.0) -> list[str]:
    """Start a blocker holding every slot, queue ``requests`` in order, return the order served."""
    served: list[str] = []
    release = trio.Event()

    async def blocker() -> None:
        async with queue.slot(Priority.BACKGROUND, "blocker"):
            await release.wait()

    async def one(priority: Priority, owner: str, name: str) -> None:
        async with queue.slot(priority, owner):
            served.append(name)
            await trio.sleep(hold)

    async with trio.open_nursery() as nursery:
        for _ in range(queue.slots):
            nursery.start_soon(blocker)
        await trio.sleep(0.01)
        for i, (priority, owner) in enumerate(requests):
            nursery.start_soon(one, priority, owner, f"{owner}{i}")
            await trio.sleep(0.001)
        release.set()
    assert queue.busy == 0 and queue.waiting() == 0
    return served


async def test_fair_queue_serves_better_classes_first(autojump_clock: trio.abc.Clock) -> None:
    queue = FairQueue(1, "fetch")
    order = await _run_queue(queue, [(Priority.BACKGROUND, "b"), (Priority.BACKGROUND, "b"), (Priority.AHEAD, "a"),
                                     (Priority.TRACE, "t"), (Priority.DEMAND, "d")])
    assert order == ["d4", "t3", "a2", "b0", "b1"]


async def test_fair_queue_takes_owners_in_turn_within_a_class(autojump_clock: trio.abc.Clock) -> None:
    queue = FairQueue(1, "serve")
    flood = [(Priority.DEMAND, "x")] * 6
    order = await _run_queue(queue, [*flood, (Priority.DEMAND, "y"), (Priority.DEMAND, "y")])
    # y's first request is served second although six of x's came before it.
    assert order == ["x0", "y6", "x1", "y7", "x2", "x3", "x4", "x5"]


async def test_fair_queue_withdraws_a_cancelled_waiter(autojump_clock: trio.abc.Clock) -> None:
    queue = FairQueue(1, "fetch")
    async with queue.slot(Priority.BACKGROUND):
        with trio.move_on_after(1):
            async with queue.slot(Priority.DEMAND, "gone"):
                raise AssertionError("no slot was free")
        assert queue.waiting() == 0
    assert queue.busy == 0
    async with queue.slot(Priority.DEMAND):
        assert queue.busy == 1


async def test_fair_queue_slots_change_without_breaking_the_order(autojump_clock: trio.abc.Clock) -> None:
    queue = FairQueue(4, "fetch")
    running = 0
    most = 0
    order: list[str] = []

    async def one(priority: Priority, name: str) -> None:
        nonlocal running, most
        async with queue.slot(priority, name[0]):
            running += 1
            most = max(most, running)
            order.append(name)
            await trio.sleep(1)
            running -= 1

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, Priority.BACKGROUND, f"b{i}")
        await trio.sleep(0.1)
        queue.set_slots(1)  # the four running go on; then one at a time
        for i in range(3):
            nursery.start_soon(one, Priority.BACKGROUND, f"c{i}")
            await trio.sleep(0.01)
        nursery.start_soon(one, Priority.TRACE, "t")
        await trio.sleep(2.4)  # t ran alone from 1.0, then c0 from 2.0
        assert order[4:] == ["t", "c0"] and most == 4 and running == 1
        queue.set_slots(3)  # c1 and c2 start at once
        await trio.sleep(0.1)
        assert sorted(order[6:]) == ["c1", "c2"] and running == 3  # granted in order, woken in any
    assert queue.busy == 0
    with pytest.raises(ValueError):
        queue.set_slots(0)


def test_fair_queue_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        FairQueue(0, "fetch")


# ------------------------------------------------------------------ GETP codec


def test_getp_carries_the_class_in_the_op_byte() -> None:
    cid = ChunkId(bytes(range(32)))
    assert encode_request(cid)[1] == OP_GET
    for p in Priority:
        raw = encode_request(cid, 5, 7, priority=p)
        version, op, got, offset, length = _REQUEST.unpack(raw)
        assert (version, got, offset, length) == (1, cid, 5, 7) and len(raw) == 46
        assert op == OP_GETP + p and request_class(op) is p
    assert request_class(OP_GET) is DEFAULT_CLASS is Priority.AHEAD
    assert send_priority(Priority.DEMAND) > send_priority(Priority.TRACE) > send_priority(Priority.BACKGROUND)


@given(st.integers(0, 255))
def test_request_class_decodes_every_op_byte(op: int) -> None:
    got = request_class(op)
    if op == OP_GET:
        assert got is DEFAULT_CLASS
    elif OP_GETP <= op <= OP_GETP + 3:
        assert got is Priority(op - OP_GETP)
    else:
        assert got is None


# ------------------------------------------------------------------ CLI


def test_cli_refuses_a_bad_rate_before_mounting(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "mount", str(tmp_path / "mnt"),
                                       "--max-background", "lots"])
    assert result.exit_code == 2 and "--max-background" in result.output and "not a rate" in result.output
    assert not (tmp_path / "home").exists()  # refused before the node was opened


def test_cli_limit_and_pull_need_a_daemon(tmp_path: Path) -> None:
    home = ["--home", str(tmp_path)]
    result = CliRunner().invoke(main, [*home, "limit", "--max-upload", "20M"])
    assert result.exit_code == 1 and "no daemon is running" in result.output
    result = CliRunner().invoke(main, [*home, "pull", "--priority", "urgent", "x"])
    assert result.exit_code == 2 and "urgent" in result.output

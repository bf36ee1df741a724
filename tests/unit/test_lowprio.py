"""Low-priority threads for the event loop's CPU work (blixfs.lowprio)."""

from __future__ import annotations

import os
import threading

import pytest
import trio

from blixfs import lowprio


async def test_runs_in_a_thread_of_lower_priority_and_returns_its_result() -> None:
    def where() -> tuple[int, int]:
        return threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    tid, nice = await lowprio.run_sync(where)
    assert tid != threading.get_native_id()
    assert nice >= lowprio.NICE


async def test_an_exception_is_raised_in_the_caller() -> None:
    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await lowprio.run_sync(fail)


async def test_a_cancelled_caller_stops_waiting_and_the_work_ends_on_its_own() -> None:
    release, finished = threading.Event(), threading.Event()

    def slow() -> int:
        release.wait(30)
        finished.set()
        return 1

    with trio.move_on_after(0.05) as scope:
        await lowprio.run_sync(slow)
    assert scope.cancelled_caught and not finished.is_set()
    release.set()
    assert await trio.to_thread.run_sync(finished.wait, 30)
    assert await lowprio.run_sync(lambda: 2) == 2  # the pool goes on serving

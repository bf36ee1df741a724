"""Low-priority threads and worker processes for the event loop's CPU work (blixfs.lowprio)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import trio

from blixfs import lowprio
from tests.conftest import REPO, process_gone, wait_for


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


# Module level: worker processes import them by name.
def where_and_how_nice() -> tuple[int, int]:
    return os.getpid(), os.getpriority(os.PRIO_PROCESS, 0)


def refuse(text: str) -> None:
    raise ValueError(text)


def die_if_in_a_worker(parent: int) -> str:
    """Kill the worker this runs in (as the OOM killer would); in the parent, say so."""
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return "ran in the parent"


async def test_a_worker_process_runs_the_call_at_lower_priority_and_returns_its_result() -> None:
    assert await lowprio.processes_started()
    assert len(lowprio.worker_pids()) >= lowprio.PROCESSES
    pid, nice = await lowprio.run_in_process(where_and_how_nice)
    assert pid != os.getpid() and pid in lowprio.worker_pids()
    assert nice >= lowprio.NICE


async def test_an_exception_in_a_worker_process_is_raised_in_the_caller() -> None:
    with pytest.raises(ValueError, match="no thanks"):
        await lowprio.run_in_process(refuse, "no thanks")
    assert await lowprio.run_in_process(len, b"four") == 4  # the worker goes on serving


async def test_a_killed_worker_costs_its_call_a_thread_and_the_next_call_gets_a_new_worker() -> None:
    assert await lowprio.processes_started()
    before = set(lowprio.worker_pids())
    answers: list[str] = []

    async def call() -> None:
        answers.append(await lowprio.run_in_process(die_if_in_a_worker, os.getpid()))
    # Calls kill whichever worker serves them until none of the first ones is left (which
    # dispatching thread takes a call is the executor's choice): each is answered all the same.
    for _ in range(50):
        if not before & set(lowprio.worker_pids()):
            break
        async with trio.open_nursery() as nursery:
            for _ in range(lowprio.PROCESSES):
                nursery.start_soon(call)
    assert answers and set(answers) == {"ran in the parent"}
    assert not before & set(lowprio.worker_pids())
    pid, _ = await lowprio.run_in_process(where_and_how_nice)
    assert pid != os.getpid() and pid not in before


def test_workers_exit_when_the_process_that_started_them_is_killed() -> None:
    script = textwrap.dedent("""
        import sys, time, trio
        from blixfs import lowprio
        assert trio.run(lowprio.processes_started)
        print(*lowprio.worker_pids(), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == lowprio.PROCESSES and not any(process_gone(pid) for pid in workers)
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: all(process_gone(pid) for pid in workers), 60, "the workers to exit after their parent")


async def test_yielding_to_the_foreground_lets_work_that_arrived_during_a_slice_run_first() -> None:
    order: list[str] = []
    send, receive = trio.open_memory_channel[str](100)

    async def foreground() -> None:  # a FUSE request's handler, woken when one arrives
        async for request in receive:
            order.append(request)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(foreground)
        for i in range(20):
            send.send_nowait(f"request {i}")  # arrives while slice i is being applied
            await lowprio.yield_to_foreground()
            order.append(f"slice {i}")
        nursery.cancel_scope.cancel()
    # With a plain checkpoint each pair would come in either order (trio reverses half its batches).
    assert order == [item for i in range(20) for item in (f"request {i}", f"slice {i}")]


async def test_yielding_to_the_foreground_still_returns_when_the_loop_never_idles() -> None:
    async def busy() -> None:
        while True:
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        with trio.fail_after(60):  # each yield waits at most FOREGROUND_WAIT
            for _ in range(10):
                await lowprio.yield_to_foreground()
        nursery.cancel_scope.cancel()

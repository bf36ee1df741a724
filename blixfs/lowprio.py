"""CPU work for the event loop's callers, in threads the kernel schedules behind it.

`run_sync` runs a function in one of `THREADS` threads kept for this purpose, each at
nice `NICE` (Linux: a thread's nice value is its own), and waits for it without holding
a trio worker thread. For work that releases the GIL and keeps a core busy for
seconds: a sync's signature checks (`blixfs.replica`, libsodium). At the default nice
of the daemon's other threads those checks took both cores of a 2-core machine and the
event loop, waiting to be scheduled, answered FUSE requests 50-150 ms late (p99); at
nice 10 the kernel gives the event loop's thread ~10x their share whenever it is
runnable, and the checks the rest.

Cancellation: a caller that is cancelled stops waiting; the function runs to its end
in its thread (callers give it bounded work: one frame's checks) and its result is
dropped. Raising the nice value needs no privilege; a thread that cannot (a seccomp
filter, a platform without per-thread nice) runs at the process's priority.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

log = logging.getLogger(__name__)

THREADS = 2  # one per core here; the work releases the GIL
NICE = 10

_T = TypeVar("_T")
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _lower_priority() -> None:
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(NICE, os.getpriority(os.PRIO_PROCESS, tid)))  # never raised
    except (OSError, AttributeError) as exc:
        log.debug("could not lower the priority of a background thread: %s", exc)


def _get_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="blixfs-lowprio",
                                                          initializer=_lower_priority)
        return _pool


async def run_sync(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a low-priority thread; its exception is raised here."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future[_T]) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the loop ended while fn ran
            token.run_sync_soon(done.set)

    future = _get_pool().submit(fn)
    future.add_done_callback(wake)
    await done.wait()
    return future.result()

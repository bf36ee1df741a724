"""CPU work for the event loop's callers, in threads and processes the kernel schedules behind it.

`run_sync` runs a function in one of `THREADS` threads kept for this purpose, each at
nice `NICE` (Linux: a thread's nice value is its own), and waits for it without holding
a trio worker thread. For work that releases the GIL and keeps a core busy for
seconds. At the default nice of the daemon's other threads such work took both cores
of a 2-core machine and the event loop, waiting to be scheduled, answered FUSE requests
50-150 ms late (p99); at nice 10 the kernel gives the event loop's thread ~10x their
share whenever it is runnable, and the work the rest.

`run_in_process` runs a module-level function on picklable arguments in one of
`PROCESSES` worker processes instead, also at nice `NICE`: for CPU work that is partly
Python, such as a sync's checks of each received entry (`blixfs.replica`: decoding,
field checks, two libsodium signature checks). Threads share the GIL with the event
loop, and handing it back and forth between check threads and the loop on this
machine kind cost the loop more than the checks' own Python: a 16-entry SQLite apply
slice took 3-5 ms of its wall time for under 1 ms of CPU, and FUSE requests waited
behind it. A worker is ``python -m blixfs.lowprio`` (never a fork: the daemon has iroh's
and trio's threads; nor multiprocessing's spawn, which runs the parent's main script
again in the child), fed pickles on its stdin by one dispatching thread of the daemon
that owns it. It ignores SIGINT (Ctrl-C is the daemon's to handle) and exits when its
stdin closes, so it never outlives the daemon, killed or not. Workers start once, at
`processes_started` (the daemon's start: ~0.3 s of imports each) or at the first call.
If one cannot be started or dies, `run_in_process` logs it and runs that call in a
low-priority thread instead (slower, never wrong); the next call starts a new worker.
Only this module's own workers ever unpickle what it sends, and it only unpickles
what they answer: no peer's bytes are unpickled, they travel as ``bytes`` values.

Cancellation: a caller that is cancelled stops waiting; the function runs to its end
in its thread or process (callers give it bounded work: one frame's checks) and its
result is dropped. Raising the nice value needs no privilege; a thread that cannot (a
seccomp filter, a platform without per-thread nice) runs at the process's priority.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import importlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any, TypeVar

import trio
import trio.testing

log = logging.getLogger(__name__)

THREADS = 2  # one per core here; the work releases the GIL
PROCESSES = 2  # one per core here
NICE = 10
PRELOAD = ("blixfs.replica",)  # what the workers import at start, off the first call's time
FOREGROUND_WAIT = 0.005  # `yield_to_foreground`: the longest wait for the loop to be idle

_T = TypeVar("_T")
_LENGTH = struct.Struct(">I")
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_dispatch: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_local = threading.local()  # a dispatching thread's worker process
_workers: list[_Worker] = []  # every worker started and not yet stopped (for `stop_processes`)


class WorkerDied(Exception):
    """A worker process exited or could not be started (the call then runs in a thread)."""


class _Worker:
    """One ``python -m blixfs.lowprio`` process, used by one dispatching thread at a time."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # The worker imports this package exactly as the daemon did, wherever it came from.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "blixfs.lowprio", *PRELOAD], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env)
        except OSError as exc:  # no exec, no fds, no memory
            raise WorkerDied(f"could not start a worker process: {exc}") from exc
        with _pool_lock:
            _workers.append(self)

    def call(self, fn: Callable[..., _T], args: Sequence[Any]) -> _T:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = pickle.dumps((fn, tuple(args)), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(_LENGTH.pack(len(request)) + request)
            self.proc.stdin.flush()
            ok, value = pickle.loads(_read_message(self.proc.stdout))
        except (OSError, EOFError, ValueError) as exc:  # the worker died mid-call (pipe closed)
            self.stop()
            raise WorkerDied(f"worker process {self.proc.pid} exited ({self.proc.poll()})") from exc
        if not ok:
            raise value
        result: _T = value
        return result

    def stop(self) -> None:
        with _pool_lock:
            if self in _workers:
                _workers.remove(self)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the worker exits at end of input
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _read_message(stream: IO[bytes]) -> bytes:
    """One length-prefixed message; EOFError at end of input."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError("end of input")
    (length,) = _LENGTH.unpack(header)
    body = stream.read(length)
    if len(body) < length:
        raise EOFError("end of input inside a message")
    return body


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


def _get_dispatch() -> concurrent.futures.ThreadPoolExecutor:
    # Its threads only write and wait on their worker's pipes: not niced (the worker is).
    global _dispatch
    with _pool_lock:
        if _dispatch is None:
            _dispatch = concurrent.futures.ThreadPoolExecutor(PROCESSES, thread_name_prefix="blixfs-worker")
        return _dispatch


def _in_worker(fn: Callable[..., _T], args: Sequence[Any]) -> _T:
    """Run on a dispatching thread: ``fn(*args)`` in this thread's worker, started if needed."""
    worker: _Worker | None = getattr(_local, "worker", None)
    if worker is None or worker.proc.poll() is not None:
        worker = _local.worker = _Worker()
    try:
        return worker.call(fn, args)
    except WorkerDied:
        _local.worker = None
        raise


async def _wait(future: concurrent.futures.Future[_T]) -> _T:
    """The result of ``future``, awaited without holding a trio worker thread."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: concurrent.futures.Future[_T]) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the loop ended while fn ran
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()
    return future.result()


async def yield_to_foreground(longest: float = FOREGROUND_WAIT) -> None:
    """Between the slices of background work done on the event loop (a sync's apply): return
    once no other task is ready to run, after the loop polled for I/O, so that a FUSE
    request the kernel queued during the slice is answered before the next slice, not after
    it in the same batch (trio runs a batch of ready tasks in either order). At most
    ``longest`` seconds: a loop kept busy by others (a guest's steady I/O, another session)
    slows the background work down, never stops it."""
    with trio.move_on_after(longest):
        await trio.testing.wait_all_tasks_blocked()


async def run_sync(fn: Callable[[], _T]) -> _T:
    """``fn()`` in a low-priority thread; its exception is raised here."""
    return await _wait(_get_pool().submit(fn))


async def run_in_process(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a low-priority worker process (``fn`` at module level, ``args`` and
    the result picklable); its exception is raised here. Runs it in a low-priority thread
    instead when the worker cannot be started or dies (logged)."""
    try:
        return await _wait(_get_dispatch().submit(_in_worker, fn, args))
    except WorkerDied as exc:
        log.warning("%s: running this in a thread", exc)
    return await run_sync(lambda: fn(*args))


def _ready() -> int:
    return os.getpid()


async def processes_started() -> bool:
    """Start the `PROCESSES` workers now and wait until each answered (the daemon's start,
    so its first sync does not wait for them); False, logged, when one could not start."""
    dispatch = _get_dispatch()
    try:
        # One call per dispatching thread, all at once: each starts its worker.
        barrier = threading.Barrier(PROCESSES)

        def start() -> int:
            barrier.wait(timeout=60)
            return _in_worker(_ready, ())
        pids = [dispatch.submit(start) for _ in range(PROCESSES)]
        for future in pids:
            await _wait(future)
    except (WorkerDied, threading.BrokenBarrierError) as exc:
        log.warning("worker processes could not start (%s): CPU work runs in threads", exc)
        return False
    return True


def worker_pids() -> list[int]:
    """The worker processes running now (for tests and benchmarks)."""
    with _pool_lock:
        return [w.proc.pid for w in _workers]


def stop_processes() -> None:
    """Stop every worker process (the next `run_in_process` starts new ones). Called at the
    daemon's exit; a worker also exits by itself when the daemon dies."""
    with _pool_lock:
        workers = list(_workers)
    for worker in workers:
        worker.stop()


def _serve(preload: Sequence[str]) -> None:
    """A worker's main loop: pickled (fn, args) in on stdin, pickled (ok, value) out on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, max(NICE, os.getpriority(os.PRIO_PROCESS, 0)))
    for name in preload:
        importlib.import_module(name)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the answers
    while True:
        try:
            fn, args = pickle.loads(_read_message(source))
        except EOFError:
            return
        try:
            answer = pickle.dumps((True, fn(*args)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # handed to the caller, raised there
            try:
                answer = pickle.dumps((False, exc), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # an exception that does not pickle: its text does
                answer = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
        sink.write(_LENGTH.pack(len(answer)) + answer)
        sink.flush()


atexit.register(stop_processes)  # a tidy exit: each worker ends its call, then goes


if __name__ == "__main__":
    _serve(sys.argv[1:])

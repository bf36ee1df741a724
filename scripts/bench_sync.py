#!/usr/bin/env python3
"""Benchmark the replicated namespace's sync between two processes over real iroh on loopback.

    .venv/bin/python scripts/bench_sync.py [--entries N] [--runs 3] [--live 300] [--interval-ms 20]

What it measures (goals from the issues: 10,000 entries in under 2 s, and within 2x of the
time the same run spends checking their signatures alone; live p50 under 20 ms):

1. Initial sync. A serving node (this script with --serve, in a subprocess) holds N signed
   entries (default 10,000: per VM image a directory, ``images/vm-00001/disk.qcow2`` with a
   manifest and image metadata, and a ``seed.iso``) in its own `SqliteNamespaceStore` on disk.
   A fresh node (new key, new iroh endpoint, empty SQLite store in a temp dir) dials it with
   `SyncService.maintain`; the time runs from the dial until the session's ``synced`` event
   (every entry verified and applied, vector advanced). Repeated ``--runs`` times with a
   fresh receiver each time; the median and every run are reported, with a split of where
   the receiver's time went (frame decoding, signature checks, SQLite apply, the rest:
   dial, handshake, the server's work and the network) and the server's own diff/encode
   time. Afterwards the fresh store is checked to hold exactly N live entries and the
   server's vector, and the same entries, decoded, are checked again alone (`_check_all`:
   fields and both signatures, in the same worker processes, as many batches as the session
   had frames): the ratio sync / checks alone is the figure to keep within 2x.
2. Live propagation. On the last receiver's open session, the server commits single
   entries one at a time (``--live`` of them, one every ``--interval-ms``), each carrying
   its creation time (``time.time_ns()`` before signing) as ``mtime_ns``; the receiver's
   replica listener records arrival minus creation (same machine, same clock). Reported
   as p50/p90/p99/max, with the server's commit time and the receiver's merge time.

The instrumentation wraps a few library functions in each process (store methods, frame
decoding, signature checks) to time them; it adds microseconds, not milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import blixfs.frames
import blixfs.lowprio
import blixfs.replica
import blixfs.sync
from blixfs import crypto
from blixfs.entry import Entry, Kind
from blixfs.namespace import PAGE_ENTRIES, Outcome, SqliteNamespaceStore
from blixfs.net.iroh_transport import open_iroh_transport
from blixfs.net.transport import NodeAddr
from blixfs.replica import NamespaceKeys, Replica
from blixfs.sync import ALPN, SessionInfo, SyncService

GOAL_SYNC_S = 2.0  # for 10,000 entries
GOAL_SYNC_ENTRIES = 10_000
GOAL_P50_MS = 20.0
COMMIT_BATCH = 500
LIVE_PREFIX = "live/"
SCRIPT = os.path.abspath(__file__)
SYNC_TIMEOUT = 60.0


# --- shared ------------------------------------------------------------------------------


def _timed(fn: Callable[..., Any], into: dict[str, float], key: str) -> Callable[..., Any]:
    """``fn`` wrapped to add its wall time to ``into[key]`` (sync functions only)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def _timed_async(fn: Callable[..., Any], into: dict[str, float], key: str) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            into[key] = into.get(key, 0.0) + time.perf_counter() - start

    return wrapper


# --- server ------------------------------------------------------------------------------


def image_entries(replica: Replica, n: int) -> list[Entry]:
    """``n`` entries shaped like an image library: per VM a directory, a disk with metadata, a seed ISO."""
    author = replica.author
    out: list[Entry] = []

    def add(path: str, kind: Kind, size: int = 0, meta: Mapping[str, str] | None = None) -> None:
        ts = replica.stamp(None)
        manifest = blake3.blake3(path.encode()).digest() if kind is Kind.FILE else None
        out.append(Entry(path=path, kind=kind, mode=0o644 if kind is Kind.FILE else 0o755, uid=1000, gid=1000,
                         size=size, mtime_ns=ts, ctime_ns=ts, author=author, timestamp_ns=ts, manifest=manifest,
                         meta=meta or {}))

    add("images", Kind.DIR)
    vm = 0
    while len(out) < n:
        vm += 1
        base = f"images/vm-{vm:05d}"
        add(base, Kind.DIR)
        if len(out) < n:
            meta = {"name": f"vm-{vm:05d}", "version": f"1.{vm % 7}.{vm % 13}", "os": "ubuntu-24.04",
                    "arch": "x86_64" if vm % 3 else "aarch64", "tags": "prod,web,lts", "uploaded_by": "ci@build-07"}
            add(f"{base}/disk.qcow2", Kind.FILE, size=(8 + vm % 56) << 30, meta=meta)
        if len(out) < n:
            add(f"{base}/seed.iso", Kind.FILE, size=374_784)
    return out[:n]


class ServerStats:
    """The serving node's own time per session: diff query and frame encoding."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.bytes_sent = 0

    def take(self) -> dict[str, float]:
        out = {**self.times, "bytes_sent": float(self.bytes_sent)}
        self.times.clear()  # in place: the wrappers hold this dict
        self.bytes_sent = 0
        return out


def instrument_server(store: SqliteNamespaceStore, stats: ServerStats) -> None:
    original_pages = store.serialized_pages_since  # what the sender reads its diff with

    def pages_since(vector: Mapping[bytes, int], page: int = PAGE_ENTRIES) -> Generator[list[bytes], None, None]:
        pages = original_pages(vector, page)
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(pages)
                except StopIteration:
                    return
                finally:
                    stats.times["diff"] = stats.times.get("diff", 0.0) + time.perf_counter() - start
                yield batch
        finally:
            pages.close()

    store.serialized_pages_since = pages_since  # type: ignore[method-assign]
    blixfs.sync._batches_of = _timed(blixfs.sync._batches_of, stats.times, "batch")
    original_encode = blixfs.frames.encode  # what blixfs.sync calls
    original_encode_entries = blixfs.frames.encode_entries  # for ENTRIES of the diff and live pushes

    def encode(frame: blixfs.frames.Frame) -> bytes:
        start = time.perf_counter()
        data = original_encode(frame)
        stats.times["encode"] = stats.times.get("encode", 0.0) + time.perf_counter() - start
        stats.bytes_sent += len(data)
        return data

    def encode_entries(serialized: list[bytes]) -> bytes:
        start = time.perf_counter()
        data = original_encode_entries(serialized)
        stats.times["encode"] = stats.times.get("encode", 0.0) + time.perf_counter() - start
        stats.bytes_sent += len(data)
        return data

    blixfs.sync.encode = encode  # type: ignore[attr-defined]
    blixfs.sync.encode_entries = encode_entries  # type: ignore[attr-defined]


def say(obj: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _db_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("server.db*"))


async def live_writes(replica: Replica, count: int, interval: float) -> dict[str, Any]:
    commit_ms: list[float] = []
    start = trio.current_time()
    for i in range(count):
        await trio.sleep_until(start + i * interval)
        created = time.time_ns()
        ts = replica.stamp(None)
        e = Entry(path=f"{LIVE_PREFIX}probe-{i:05d}", kind=Kind.FILE, mode=0o644, uid=1000, gid=1000, size=4096,
                  mtime_ns=created, ctime_ns=created, author=replica.author, timestamp_ns=ts,
                  manifest=blake3.blake3(b"%d" % created).digest())
        t0 = time.perf_counter()
        replica.commit_local([e])
        commit_ms.append((time.perf_counter() - t0) * 1000)
    return {"commit_ms": commit_ms}


async def serve(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    store = SqliteNamespaceStore(directory / "server.db")
    try:
        keys = NamespaceKeys.generate()
        node_secret = crypto.generate_secret()
        replica = Replica(store, keys, node_secret)
        started = time.perf_counter()
        entries = image_entries(replica, args.entries)
        for i in range(0, len(entries), COMMIT_BATCH):
            replica.commit_local(entries[i:i + COMMIT_BATCH])
        setup_s = time.perf_counter() - started
        db_bytes = _db_bytes(directory)
        stats = ServerStats()
        instrument_server(store, stats)
        async with open_iroh_transport(node_secret, bind_addr="127.0.0.1:0") as transport:
            sync = SyncService(replica, transport)
            transport.register(ALPN, sync.handle)
            say({"addr": str(transport.addr()), "namespace": keys.id.hex(), "author": replica.author.hex(),
                 "vector": store.vector()[replica.author], "setup_s": setup_s, "db_bytes": db_bytes})
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buffer = b""
            while chunk := await stdin.receive_some():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    command, *params = line.decode().split()
                    if command == "stats":
                        say(stats.take())
                    elif command == "live":
                        say(await live_writes(replica, int(params[0]), float(params[1]) / 1000))
    finally:
        store.close()


# --- the measuring node ------------------------------------------------------------------


class Server:
    """The serving subprocess, spoken to by lines on its stdin/stdout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    async def read(self, within: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with trio.fail_after(within):
            line = await trio.to_thread.run_sync(self.proc.stdout.readline, abandon_on_cancel=True)
        if not line:
            raise RuntimeError(f"the server process ended (exit code {self.proc.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


@dataclass
class SyncRun:
    total_s: float
    cpu_s: float  # CPU time of the receiving process (all its threads) during the run
    first_frame_s: float
    times: dict[str, float]
    frames: int
    server: dict[str, float]
    live_entries: int
    verify_alone_s: float = 0.0  # the same entries' checks alone, same batches and threads, after the run

    @property
    def verify_ratio(self) -> float:
        return self.total_s / self.verify_alone_s

    @property
    def rate(self) -> float:
        return self.live_entries / self.total_s


@dataclass
class Receiver:
    """Instrumentation of one fresh receiving node."""

    times: dict[str, float] = field(default_factory=dict)
    frames: int = 0
    first_frame: float | None = None
    live_latency_ms: dict[str, float] = field(default_factory=dict)
    live_merge_ms: list[float] = field(default_factory=list)
    live_expected: int = 0
    server_live: dict[str, Any] = field(default_factory=dict)
    live_done: trio.Event = field(default_factory=trio.Event)

    def on_change(self, entries: list[Entry], source: str | None) -> None:
        now = time.time_ns()
        for e in entries:
            if e.path.startswith(LIVE_PREFIX):
                self.live_latency_ms[e.path] = (now - e.mtime_ns) / 1e6
        if self.live_expected and len(self.live_latency_ms) >= self.live_expected:
            self.live_done.set()


def instrument_receiver(replica: Replica, rx: Receiver) -> None:
    """Time the receiver's merge work; the wrappers are per process, re-pointed for each run.
    A session decodes and checks a frame in worker processes (`Replica.check_received`, timed
    as verify) while the one before it is merged (`Replica.merge_checked`: access control,
    SQLite apply, listeners)."""
    store = replica.store
    store.apply = _timed(store.apply, rx.times, "apply")  # type: ignore[method-assign]
    original_merge = replica.merge_checked
    original_check = replica.check_received

    async def check_received(raw: Sequence[bytes]) -> tuple[list[Entry], list[str | None]]:
        if rx.first_frame is None:  # once per ENTRIES frame
            rx.first_frame = time.perf_counter()
        rx.frames += 1
        return await original_check(raw)

    def merge_checked(entries: Sequence[Entry], checked: Sequence[str | None], peer: str) -> tuple[list[Outcome], int]:
        start = time.perf_counter()
        try:
            return original_merge(entries, checked, peer)
        finally:
            elapsed = time.perf_counter() - start
            rx.times["merge"] = rx.times.get("merge", 0.0) + elapsed
            if len(entries) == 1 and entries[0].path.startswith(LIVE_PREFIX):
                rx.live_merge_ms.append(elapsed * 1000)

    replica.merge_checked = merge_checked  # type: ignore[method-assign]
    replica.check_received = check_received  # type: ignore[method-assign]
    replica.listeners.append(rx.on_change)


_ORIGINAL_DECODE = blixfs.frames.decode
_ORIGINAL_CHECK_ALL = blixfs.replica._check_all
_ORIGINAL_CHECK_RECEIVED = blixfs.replica.check_received


async def sync_once(server: Server, peer: NodeAddr, setup: dict[str, Any], workdir: Path, run: int,
                    live: tuple[int, float] | None) -> tuple[SyncRun, Receiver]:
    rx = Receiver()
    blixfs.frames.decode = _timed(_ORIGINAL_DECODE, rx.times, "decode")
    blixfs.replica.check_received = _timed_async(_ORIGINAL_CHECK_RECEIVED, rx.times, "verify")
    store = SqliteNamespaceStore(workdir / f"receiver-{run}.db")
    try:
        replica = Replica(store, NamespaceKeys(bytes.fromhex(setup["namespace"])), crypto.generate_secret())
        instrument_receiver(replica, rx)
        async with open_iroh_transport(crypto.generate_secret(), bind_addr="127.0.0.1:0") as transport:
            synced: list[tuple[float, float, dict[str, float], int]] = []
            done = trio.Event()

            def on_synced(info: SessionInfo) -> None:
                # what the initial sync took, before any live entry adds to the counters
                synced.append((time.perf_counter(), cpu_now(), dict(rx.times), rx.frames))
                done.set()

            sync = SyncService(replica, transport, on_session_synced=on_synced)
            transport.register(ALPN, sync.handle)
            async with trio.open_nursery() as nursery:
                start, start_cpu = time.perf_counter(), cpu_now()
                nursery.start_soon(sync.maintain, peer)
                with trio.fail_after(SYNC_TIMEOUT):
                    await done.wait()
                total = synced[0][0] - start
                server.send("stats")
                server_times = await server.read(10)
                if live is not None:
                    count, interval_ms = live
                    rx.live_expected = count
                    server.send(f"live {count} {interval_ms}")
                    rx.server_live = await server.read(count * interval_ms / 1000 + 30)
                    with trio.move_on_after(5):
                        await rx.live_done.wait()
                nursery.cancel_scope.cancel()
        received = [e for e in store.entries() if not e.path.startswith(LIVE_PREFIX)]
        verify_alone = await verify_alone_s(received, bytes.fromhex(setup["namespace"]), max(1, synced[0][3]))
        live_entries = sum(1 for e in received if not e.deleted)
        vector = store.vector().get(bytes.fromhex(setup["author"]), 0)
        if live_entries != setup["entries"]:
            raise RuntimeError(f"run {run}: the fresh store holds {live_entries} live entries, not {setup['entries']}")
        if vector < setup["vector"]:
            raise RuntimeError(f"run {run}: the fresh store's vector was not advanced ({vector} < {setup['vector']})")
    finally:
        store.close()
    assert rx.first_frame is not None
    _, end_cpu, times, frames = synced[0]
    return SyncRun(total, end_cpu - start_cpu, rx.first_frame - start, times, frames, server_times, live_entries,
                   verify_alone), rx


async def verify_alone_s(entries: list[Entry], namespace_id: bytes, frames: int) -> float:
    """Seconds to check ``entries`` (fields and both signatures, `Replica.check`'s work: worker
    processes) and nothing else, in as many batches as the session had frames: the floor of
    an initial sync, which must check every entry it applies. Fresh copies, decoded already
    (the sync decodes them too, in the same worker processes): no cached hash."""
    fresh = [Entry.deserialize(e.serialize()) for e in entries]
    size = math.ceil(len(fresh) / frames)
    now = time.time_ns()
    start = time.perf_counter()
    for i in range(0, len(fresh), size):
        problems = await _ORIGINAL_CHECK_ALL(fresh[i:i + size], namespace_id, now)
        assert not any(problems), problems
    return time.perf_counter() - start


def cpu_now() -> float:
    """CPU seconds used so far by this process (all threads) and its check worker processes."""
    total = time.process_time()
    for pid in blixfs.lowprio.worker_pids():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f}"


def report(args: argparse.Namespace, setup: dict[str, Any], runs: list[SyncRun], rx: Receiver) -> None:
    n = setup["entries"]
    print()
    print(f"blixfs sync benchmark: two processes, iroh QUIC on loopback, SQLite stores on disk ({args.tmp})")
    print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}; load average "
          f"{args.load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")
    if args.load_before > 0.5:
        print("WARNING: the machine was busy before the benchmark started; the results include that contention")
    print(f"server: {n:,} entries committed in {setup['setup_s']:.2f} s (batches of {COMMIT_BATCH}), "
          f"database {setup['db_bytes'] / 1e6:.1f} MB")
    print()
    print("Initial sync of a fresh node (dial -> session synced), per run [ms]:")
    print(f"{'run':>4} {'total':>8} {'rx cpu':>8} {'entries/s':>10} {'1st frame':>9} {'decode':>8} {'verify':>8}"
          f" {'apply':>8} {'merge':>8} {'other':>8} {'frames':>7} {'MB':>6} |"
          f" {'srv diff':>8} {'srv batch':>9} {'srv enc':>8}")
    for i, r in enumerate(runs, 1):
        t = r.times
        work = t.get("decode", 0.0) + t.get("merge", 0.0)
        print(f"{i:>4} {ms(r.total_s)} {ms(r.cpu_s)} {r.rate:10,.0f} {ms(r.first_frame_s):>9} {ms(t.get('decode', 0))}"
              f" {ms(t.get('verify', 0))} {ms(t.get('apply', 0))} {ms(t.get('merge', 0))} {ms(r.total_s - work)}"
              f" {r.frames:7d} {r.server.get('bytes_sent', 0) / 1e6:6.2f} | {ms(r.server.get('diff', 0))}"
              f" {ms(r.server.get('batch', 0)):>9} {ms(r.server.get('encode', 0))}")
    print("  rx cpu: CPU time of the receiving process, all threads, and its check worker processes;")
    print("  decode: frames -> entries' bytes; verify: decoding, field and signature checks (worker processes);"
          " apply: SQLite;")
    print("  merge = verify + apply + listeners; other = total - decode - merge (dial, handshake, waiting for")
    print("  the server and the network); srv: the server's diff query, batching and frame encoding.")
    print(f"  every run: the fresh store holds {n:,} live entries and the server's vector.")

    print()
    print("Initial sync against checking the same entries alone (same process, same batches and threads,")
    print("right after each run): the goal is within 2x.")
    for i, r in enumerate(runs, 1):
        print(f"  run {i}: sync {r.total_s:.3f} s, checks alone {r.verify_alone_s:.3f} s, ratio {r.verify_ratio:.2f}"
              f"  {'OK' if r.verify_ratio <= 2 else 'MISSED'}")
    median_s = statistics.median(r.total_s for r in runs)
    goal_s = GOAL_SYNC_S * n / GOAL_SYNC_ENTRIES
    lat = list(rx.live_latency_ms.values())
    print()
    if len(lat) < args.live:
        print(f"WARNING: only {len(lat)} of {args.live} live entries arrived")
    commit = rx.server_live.get("commit_ms", [0.0])
    print(f"Live propagation of single entries ({len(lat)} entries, one every {args.interval_ms:g} ms): "
          f"server commit_local p50 {statistics.median(commit):.2f} ms, "
          f"receiver merge_remote p50 {statistics.median(rx.live_merge_ms):.2f} ms")
    print()
    rows: list[tuple[str, str, str, str]] = [
        (f"initial sync, {n:,} entries (median of {len(runs)})", f"{median_s:.3f} s",
         f"< {goal_s:.2f} s" + ("" if n == GOAL_SYNC_ENTRIES else " (scaled)"), f"{median_s / goal_s:.2f}"),
        ("  entries/s (median run)", f"{n / median_s:,.0f}", f"> {GOAL_SYNC_ENTRIES / GOAL_SYNC_S:,.0f}", ""),
        ("  runs", ", ".join(f"{r.total_s:.3f}" for r in runs) + " s", "", ""),
    ]
    if lat:
        p50, p90, p99 = (percentile(lat, q) for q in (50, 90, 99))
        rows += [
            ("live latency p50", f"{p50:.2f} ms", f"< {GOAL_P50_MS:g} ms", f"{p50 / GOAL_P50_MS:.2f}"),
            ("live latency p90", f"{p90:.2f} ms", "", ""),
            ("live latency p99", f"{p99:.2f} ms", "", ""),
            ("live latency max", f"{max(lat):.2f} ms", "", ""),
        ]
    checks = statistics.median(r.verify_ratio for r in runs)
    rows.insert(1, ("  sync / checks alone (median)", f"{checks:.2f}", "<= 2", f"{checks / 2:.2f}"))
    print(f"{'metric':44} {'result':>26} {'goal':>14} {'ratio':>6}  verdict")
    for name, result, goal, ratio in rows:
        verdict = ("OK" if float(ratio) < 1 else "MISSED") if ratio else ""
        print(f"{name:44} {result:>26} {goal:>14} {ratio:>6}  {verdict}")
    print("(ratio = result / goal; below 1 meets the goal)")


async def measure(args: argparse.Namespace, server: Server, workdir: Path) -> None:
    setup = await server.read(120)
    setup["entries"] = args.entries
    peer = NodeAddr.parse(setup["addr"])
    print(f"server up: {args.entries:,} entries in {setup['setup_s']:.2f} s; syncing {args.runs} fresh nodes",
          file=sys.stderr)
    runs: list[SyncRun] = []
    rx = Receiver()
    await blixfs.lowprio.processes_started()  # as a daemon starts them, before any session
    for run in range(1, args.runs + 1):
        live = (args.live, args.interval_ms) if run == args.runs else None
        result, rx = await sync_once(server, peer, setup, workdir, run, live)
        runs.append(result)
        print(f"  run {run}: {result.total_s:.3f} s ({result.rate:,.0f} entries/s)", file=sys.stderr)
    report(args, setup, runs, rx)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=10_000, help="entries the serving node holds")
    parser.add_argument("--runs", type=int, default=3, help="initial syncs, each by a fresh node")
    parser.add_argument("--live", type=int, default=300, help="single entries for the live latency")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="between live entries")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]
    if args.entries < 1 or args.runs < 1 or args.live < 1:
        parser.error("--entries, --runs and --live must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(name)s %(levelname)s: %(message)s")

    if args.serve:
        # The measuring process owns this one's lifetime (it closes our stdin); Ctrl-C reaches it alone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        trio.run(serve, args)
        return

    with tempfile.TemporaryDirectory(prefix="blixfs-bench-sync-") as tmp:
        args.tmp = tmp
        proc = subprocess.Popen([sys.executable, SCRIPT, "--serve", "--dir", tmp, "--entries", str(args.entries)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        interrupted = False
        try:
            trio.run(measure, args, Server(proc), Path(tmp))
        except* KeyboardInterrupt:  # bare, or inside the nurseries' exception groups
            interrupted = True
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if interrupted:
        print("interrupted: server stopped, temporary files removed", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

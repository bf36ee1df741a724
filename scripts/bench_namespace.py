#!/usr/bin/env python3
"""Benchmark: FUSE latency on a namespace of 100,000 entries while a peer syncs and replicates.

    sudo .venv/bin/python scripts/bench_namespace.py [--entries 100000] [--files 8] [--file-mib 4]

Two ``blixfs mount`` daemons on loopback (real iroh, real FUSE, homes on the local disk).
Node A's namespace is filled offline with ``--entries`` signed entries (an image library:
per VM a directory, a disk image with metadata and a seed ISO; their content is not held,
only the namespace counts here). Then, side by side in one run, on A's mount:

1. idle: nothing else happens;
2. busy: a fresh node B joins A and mounts (its session start streams A's whole namespace
   to it: A pages its diff out, B checks and applies it), while ``--files`` files are
   written into A's mount and replicated to B (A's replicator asks B to hold them).
   Until B holds every entry and every file is durable.

and on B's mount during (2). Each phase samples stat (a random path of the 100,000: a
kernel cache miss), readdir of a random VM directory and statfs, one every 2 ms from a
thread, and prints p50/p99/max per operation, with the ratio busy/idle. Goal: p99 under
10 ms during replication and sync. Needs root (FUSE). Not a test: figures depend on the
machine (and on what else runs on it: the load average is printed).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_replication import cli, durable, mounted, status, wait  # noqa: E402
from bench_sync import image_entries  # noqa: E402

from blixfs.node import Node  # noqa: E402

GOAL_P99_MS = 10.0
SAMPLE_INTERVAL = 0.002
COMMIT_BATCH = 1000
MiB = 1 << 20


def populate(home: Path, n: int) -> float:
    """``n`` entries committed into the (not yet mounted) node at ``home``; seconds taken."""
    node = Node.open(home)
    try:
        started = time.perf_counter()
        entries = image_entries(node.replica, n)
        for i in range(0, len(entries), COMMIT_BATCH):
            node.replica.commit_local(entries[i:i + COMMIT_BATCH])
        return time.perf_counter() - started
    finally:
        node.close()


class Sampler:
    """FUSE operations on one mount from a thread, timed, until stopped."""

    def __init__(self, mnt: Path, vms: int) -> None:
        self.mnt, self.vms = mnt, vms
        self.times: dict[str, list[float]] = {"stat": [], "readdir": [], "statfs": []}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._rng = random.Random(7)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _time(self, op: str, fn: Callable[[Path], object], path: Path) -> None:
        start = time.perf_counter()
        try:
            fn(path)
        except OSError:  # on B, a path not synced yet: ENOENT is an answer too
            self.errors += 1
        self.times[op].append((time.perf_counter() - start) * 1000)

    def _run(self) -> None:
        ops = ("stat", "readdir", "statfs")
        i = 0
        while not self._stop.is_set():
            vm = self._rng.randrange(1, self.vms + 1)
            base = self.mnt / "images" / f"vm-{vm:05d}"
            op = ops[i % 3]
            i += 1
            if op == "stat":
                self._time(op, os.stat, base / self._rng.choice(("disk.qcow2", "seed.iso")))
            elif op == "readdir":
                self._time(op, os.listdir, base)
            else:
                self._time(op, os.statvfs, self.mnt)
            time.sleep(SAMPLE_INTERVAL)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=8, help="files written into A and replicated during the busy phase")
    ap.add_argument("--file-mib", type=int, default=4)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts FUSE filesystems")
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="blixfs-bench-ns-", dir=args.workdir))
    vms = (args.entries - 1) // 3
    try:
        a, b = work / "home-a", work / "home-b"
        setup_s = populate(a, args.entries)
        print(f"node A: {args.entries:,} entries committed in {setup_s:.1f} s", file=sys.stderr)
        with ExitStack() as stack:
            t = time.perf_counter()
            stack.enter_context(mounted(a, work / "mnt-a"))
            mount_s = time.perf_counter() - t
            with Sampler(work / "mnt-a", vms) as idle:
                time.sleep(args.idle_seconds)
            ticket = cli(a, "share", "--write").strip().splitlines()[-1]
            cli(b, "join", ticket)
            with Sampler(work / "mnt-a", vms) as busy_a:
                t = time.perf_counter()
                stack.enter_context(mounted(b, work / "mnt-b"))
                with Sampler(work / "mnt-b", vms) as busy_b:
                    for i in range(args.files):
                        with open(work / "mnt-a" / f"file-{i}", "wb") as f:
                            f.write(os.urandom(args.file_mib * MiB))
                    wait(lambda: any(s["synced"] for s in status(b)["sessions"]), 600,
                         "B to hold A's namespace (its session with A synced)")
                    synced_s = time.perf_counter() - t
                    wait(lambda: all(durable(a, f"file-{i}") for i in range(args.files)), 600,
                         "the files to be durable")
                    busy_s = time.perf_counter() - t
        print(f"\nblixfs namespace benchmark: {args.entries:,} entries, 2 nodes on loopback (iroh), FUSE mounts,"
              f" {os.cpu_count()} CPUs ({time.strftime('%Y-%m-%d %H:%M')})")
        print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")
        print(f"A mounted in {mount_s:.1f} s; B joined, mounted and held all {args.entries:,} entries after"
              f" {synced_s:.1f} s; {args.files} files of {args.file_mib} MiB durable after {busy_s:.1f} s")
        print(f"\n{'operation':10} {'phase':22} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
              f" {'p99/idle':>9} {'goal p99':>9}  verdict")
        for op in ("stat", "readdir", "statfs"):
            base = pct(idle.times[op], 99)
            for name, sampler in (("A idle", idle), ("A during sync+repl", busy_a), ("B during sync+repl", busy_b)):
                v = sampler.times[op]
                p99 = pct(v, 99)
                print(f"{op:10} {name:22} {len(v):6d} {pct(v, 50):8.2f} {p99:8.2f} {max(v, default=0):8.2f}"
                      f" {p99 / base:9.2f} {GOAL_P99_MS:9.0f}  {'OK' if p99 < GOAL_P99_MS else 'MISSED'}")
        print(f"(B's errors: {busy_b.errors} operations on paths not synced yet, answered ENOENT)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

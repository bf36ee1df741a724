#!/usr/bin/env python3
"""What the metrics cost the read path, measured side by side in one run.

    .venv/bin/python scripts/bench_metrics.py [--reads 20000] [--rounds 5]

In process, no FUSE and no network: a file of 64 MiB in a `Vfs` over the memory chunk
store, read in 4 KiB requests at random offsets (qemu's worst case: the most requests per
byte) through

* the FUSE handler as mounted (`mount.ops.BlixOperations.read`, wrapped by `_translated`,
  which times every request into ``blixfs_fuse_request_duration_seconds``; the reader
  counts each chunk lookup's hit), and
* the same handler unwrapped (``__wrapped__``: no timing, no error mapping),

alternating for --rounds rounds; prints microseconds per request (median of rounds) and
the ratio. The chunk reader's own counters run in both (they are inside the VFS), so
their cost is reported apart: a hit counter's ``inc`` and a histogram ``observe``, each
timed alone. Not a test: the figures depend on the machine and its neighbours.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blixfs import metrics
from blixfs.vfs import ROOT_INO
from mount.ops import BlixOperations
from tests.helpers import make_vfs, write_file

SIZE = 64 << 20


async def bench(reads: int, rounds: int) -> None:
    vfs = make_vfs()
    await write_file(vfs, "img", os.urandom(SIZE))
    ops = BlixOperations(vfs)
    ino = (await vfs.lookup(ROOT_INO, "img")).ino
    fh = await vfs.open(ino, os.O_RDONLY)
    offsets = [random.randrange(SIZE // 4096) * 4096 for _ in range(reads)]
    wrapped = ops.read
    bare = BlixOperations.read.__wrapped__  # type: ignore[attr-defined]

    async def instrumented() -> float:
        started = time.perf_counter()
        for off in offsets:
            await wrapped(fh, off, 4096)
        return (time.perf_counter() - started) / reads

    async def plain() -> float:
        started = time.perf_counter()
        for off in offsets:
            await bare(ops, fh, off, 4096)
        return (time.perf_counter() - started) / reads

    await plain()  # warm the reader's memory and the page cache alike for both
    with_m, without = [], []
    for _ in range(rounds):
        without.append(await plain())
        with_m.append(await instrumented())
    a, b = statistics.median(with_m), statistics.median(without)
    print(f"4 KiB reads, {reads} per round, {rounds} rounds (median)")
    print(f"  through the instrumented handler: {a * 1e6:7.2f} us/request")
    print(f"  through the bare handler:         {b * 1e6:7.2f} us/request")
    print(f"  ratio instrumented / bare:        {a / b:7.3f}  ({(a - b) * 1e6:+.2f} us)")
    hist = metrics.fuse_request_seconds.labels("bench")
    counter = metrics.cache_hits.labels("memory")
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        hist.observe(0.0001)
    observe = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for _ in range(n):
        counter.inc()
    inc = (time.perf_counter() - started) / n
    print(f"  alone: histogram observe {observe * 1e6:.2f} us, counter inc {inc * 1e6:.2f} us")
    metrics.fuse_request_seconds.remove("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trio.run(bench, args.reads, args.rounds)


if __name__ == "__main__":
    main()

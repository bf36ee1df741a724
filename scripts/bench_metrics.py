#!/usr/bin/env python3
"""What the metrics cost the read path, measured side by side in one run.

    .venv/bin/python scripts/bench_metrics.py [--reads 5000] [--rounds 20]

In process, no FUSE and no network: a file of 64 MiB in a `Vfs` over the memory chunk
store, read in 4 KiB requests at random offsets (qemu's worst case: the most requests per
byte) through

* the FUSE handler as mounted (`mount.ops.BlixOperations.read`, wrapped by `_translated`,
  which times every request into ``blixfs_fuse_request_duration_seconds``), and
* the same handler in a copy of that wrapper without the timing (what it was before the
  metrics),

alternating for --rounds rounds; prints microseconds per request (the best round, the
figure least disturbed by neighbours, and the median) and the ratio. The chunk reader's
hit counter runs in both (it is inside the VFS), so its cost is printed apart, beside
a histogram observation of ours (`metrics.HotHistogram`) and of prometheus-client's
`Histogram`. Not a test: the figures depend on the machine and its neighbours.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio
from prometheus_client import Histogram

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blixfs import metrics
from blixfs.errors import FsError
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

    async def untimed(*args: object) -> bytes:  # `_translated` as it was, without the timing
        try:
            data: bytes = await bare(*args)
            return data
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            metrics.fuse_errors.inc()
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def instrumented() -> float:
        started = time.perf_counter()
        for off in offsets:
            await wrapped(fh, off, 4096)
        return (time.perf_counter() - started) / reads

    async def plain() -> float:
        started = time.perf_counter()
        for off in offsets:
            await untimed(ops, fh, off, 4096)
        return (time.perf_counter() - started) / reads

    await plain()  # warm the reader's memory and the page cache alike for both
    with_m, without = [], []
    for i in range(rounds):  # alternate which goes first: neighbours' load comes and goes
        pair = (plain, instrumented) if i % 2 else (instrumented, plain)
        for run in pair:
            (without if run is plain else with_m).append(await run())
    print(f"4 KiB reads at random offsets, {reads} per round, {rounds} rounds each")
    for what, pick in (("best", min), ("median", statistics.median)):
        a, b = pick(with_m), pick(without)
        print(f"  {what:6}: timed handler (as mounted) {a * 1e6:6.2f} us/request, same wrapper untimed "
              f"{b * 1e6:6.2f} us; ratio {a / b:.3f} ({(a - b) * 1e6:+.2f} us)")
    ours = metrics.fuse_request_seconds.labels("bench")
    theirs = Histogram("bench_seconds", "bench", buckets=metrics.FUSE_BUCKETS, registry=None)
    counter = metrics.cache_hits.labels("memory")

    def each(call: Callable[[], object], n: int = 100_000) -> float:
        started = time.perf_counter()
        for _ in range(n):
            call()
        return (time.perf_counter() - started) / n * 1e6

    print(f"  alone: HotHistogram observe {each(lambda: ours.observe(0.0001)):.2f} us, prometheus-client "
          f"Histogram observe {each(lambda: theirs.observe(0.0001)):.2f} us, counter inc {each(counter.inc):.2f} us")
    metrics.fuse_request_seconds.remove("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    trio.run(bench, args.reads, args.rounds)


if __name__ == "__main__":
    main()

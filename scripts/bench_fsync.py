#!/usr/bin/env python3
"""4 KiB write + fsync on blixfs against the local disk, side by side in one run.

    .venv/bin/python scripts/bench_fsync.py [--sizes 1,100] [--fsyncs 300] [--growth-fsyncs 1000]
                                            [--workdir /var/tmp]

Needs FUSE (root). Not a test: the figures depend on the machine and its neighbours.

**latency**: for each size (GiB), a sparse image in a mount (made by ftruncate and closed:
one published version) and one on the local disk beside it (``--workdir``, /var/tmp by
default), then ``--fsyncs`` rounds of pwrite of 4 KiB at a random 4 KiB-aligned place and
fsync, alternating between the two so both see the same machine load. p50 and p99 of each,
and the ratio; goal: 100 GiB <= 10x local, and within 1.5x of the 1 GiB figure.

**growth**: ``--growth-fsyncs`` 4 KiB writes + fsync at distinct chunks of the 100 GiB image,
then close (one publish): how much the node's chunk store grew, against the bytes of the
chunks those writes touched (goal <= 1.1x), and the journal's size before the close.

The node and its mount are removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import MountedNode, fuse_available  # noqa: E402

GiB = 1 << 30
CHUNK = 256 * 1024


def note(message: str) -> None:
    print(f"[bench_fsync {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def store_bytes(node: MountedNode) -> int:
    return int(json.loads(node.cli("status", "--json").stdout)["store"]["bytes"])


def journal_bytes(node: MountedNode) -> int:
    return sum(p.stat().st_size for p in (node.home / "journal").glob("*.jnl"))


def sparse(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def latency(mounted: Path, local: Path, size: int, rounds: int, rng: random.Random) -> tuple[list[float], list[float]]:
    """Seconds of each 4 KiB pwrite + fsync on the mounted and the local image, interleaved."""
    times: tuple[list[float], list[float]] = ([], [])
    fds = (os.open(mounted, os.O_RDWR), os.open(local, os.O_RDWR))
    block = os.urandom(4096)
    try:
        for _ in range(rounds):
            offset = rng.randrange(size // 4096) * 4096
            for fd, out in zip(fds, times, strict=True):
                start = time.perf_counter()
                os.pwrite(fd, block, offset)
                os.fsync(fd)
                out.append(time.perf_counter() - start)
    finally:
        for fd in fds:
            os.close(fd)
    return times


def growth(node: MountedNode, size: int, count: int, rng: random.Random) -> tuple[int, int, int, float]:
    """(store growth, bytes of touched chunks, journal bytes before close, seconds of the close)."""
    image = node.mnt / "growth.img"
    sparse(image, size)
    before = store_bytes(node)
    chunks = rng.sample(range(size // CHUNK), count)
    fd = os.open(image, os.O_RDWR)
    try:
        for c in chunks:
            os.pwrite(fd, os.urandom(4096), c * CHUNK + rng.randrange(CHUNK // 4096) * 4096)
            os.fsync(fd)
        journal = journal_bytes(node)
    finally:
        start = time.perf_counter()
        os.close(fd)
        closed = time.perf_counter() - start
    return store_bytes(node) - before, count * CHUNK, journal, closed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,100", help="image sizes in GiB, comma-separated")
    parser.add_argument("--fsyncs", type=int, default=300, help="rounds per size (each: one fsync per side)")
    parser.add_argument("--growth-fsyncs", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="where the local image lives")
    args = parser.parse_args()
    reason = fuse_available()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench_fsync-", dir=args.workdir))
    node = MountedNode(home=work / "home", mnt=work / "mnt", log_path=work / "node.log",
                       extra_args=["--copies", "1", "--no-mdns"])
    rng = random.Random(11)
    rows = []
    try:
        node.start()
        for gib in (int(s) for s in args.sizes.split(",")):
            size = gib * GiB
            mounted, local = node.mnt / f"img{gib}", work / f"local{gib}.img"
            sparse(mounted, size)
            sparse(local, size)
            note(f"{gib} GiB: {args.fsyncs} rounds of 4 KiB write + fsync")
            ours, theirs = latency(mounted, local, size, args.fsyncs, rng)
            rows.append((gib, statistics.median(theirs), pct(theirs, 0.99), statistics.median(ours), pct(ours, 0.99)))
            local.unlink()
        note(f"growth: {args.growth_fsyncs} fsyncs at distinct chunks of a 100 GiB image")
        grew, touched, journal, closed = growth(node, 100 * GiB, args.growth_fsyncs, rng)
    finally:
        node.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print("\n| 4 KiB write + fsync | local p50 | local p99 | blixfs p50 | blixfs p99 | p50 ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for gib, lp50, lp99, bp50, bp99 in rows:
        print(f"| {gib} GiB sparse image | {lp50 * 1e3:.2f} ms | {lp99 * 1e3:.2f} ms | {bp50 * 1e3:.2f} ms | "
              f"{bp99 * 1e3:.2f} ms | {bp50 / lp50:.1f}x |")
    by_size = {r[0]: r[3] for r in rows}
    if 1 in by_size and 100 in by_size:
        print(f"\n100 GiB vs 1 GiB blixfs p50: {by_size[100] / by_size[1]:.2f}x (goal <= 1.5x); "
              f"100 GiB vs local: {rows[-1][3] / rows[-1][1]:.1f}x (goal <= 10x)")
    print(f"\nstore growth after {args.growth_fsyncs} fsyncs of 4 KiB at distinct chunks of a 100 GiB image, "
          f"then close: {grew / 2**20:.1f} MiB against {touched / 2**20:.1f} MiB of touched chunks = "
          f"{grew / touched:.2f}x (goal <= 1.1x); journal before the close {journal / 2**20:.1f} MiB; "
          f"the close (one publish) took {closed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: sequential write/read of a file and 4 KiB random reads, through a blixfs
mount and on the local disk underneath, measured side by side in one run.

    .venv/bin/python scripts/bench_mount.py [--size-mib 1024] [--chunk-size 256K 64K] [--workdir DIR]

For each chunk size it mounts a fresh node (its home on the same disk as the
local-disk baseline) and prints MB/s, IOPS and the ratio mount/local. Needs root
(FUSE). Not a test: the figures depend on the machine and its neighbours.

What is measured:
* write: 1 MiB writes of data that does not dedup, then fsync (durable in both cases).
* warm read: 1 MiB reads after dropping the kernel's page cache (drop_caches), so both
  sides read from the disk: "warm" means the chunks are local to the node (not fetched
  from a peer), as opposed to the lazy-fetch issue's cold reads.
* cached read: the same again without dropping: what a re-reading guest sees.
* 4 KiB random reads with O_DIRECT, one at a time: every request reaches the daemon.
* 4 KiB random writes with O_DIRECT, one at a time, then one fsync (counted in the IOPS).
* the FUSE floor: the same 4 KiB random reads of a file system that only answers
  (`scripts/fuse_floor.py`: pyfuse3 on trio, no disk, no blixfs code), mounted beside:
  the ceiling any pyfuse3 daemon reaches on this machine (docs/design.md, "Where a 4 KiB
  O_DIRECT read's time goes"); and the floor with a disk read: the same file system
  answering each read with one read of a file on the same disk as blixfs's chunk store
  reads a block (`fuse_floor.py --disk`), after drop_caches like the others: the ceiling of
  a daemon that reads the disk once per request.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import random
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def unique_blocks(count: int, block: bytes, salt: int) -> Iterator[bytes]:
    """``count`` 1 MiB blocks no two 4 KiB pieces of which are alike, and unlike those of
    any other ``salt``: nothing dedups, not even against an earlier round."""
    buf = bytearray(block)
    for i in range(count):
        for off in range(0, len(buf), 4096):
            struct.pack_into("<QQQ", buf, off, i, off, salt)
        yield bytes(buf)


def write_file(path: Path, size: int, block: bytes, salt: int) -> float:
    blocks = list(unique_blocks(size // len(block), block, salt))  # made before timing
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for b in blocks:
            os.write(fd, b)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size / (time.perf_counter() - t)


DROP = "3"  # --drop-caches


def drop_caches() -> None:
    """Empty the kernel page cache, so the next read comes from the disk (for both sides);
    with --drop-caches 3 (the default) also the cached inodes and directory entries, which
    costs blixfs a lookup from disk on the first read of each chunk file."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(DROP + "\n")


def read_file(path: Path, drop: bool) -> float:
    if drop:
        drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        total = 0
        while chunk := os.read(fd, MiB):
            total += len(chunk)
        return total / (time.perf_counter() - t)
    finally:
        os.close(fd)


def random_reads(path: Path, size: int, count: int) -> tuple[float, float, float]:
    """IOPS, p50 and p99 latency (ms) of O_DIRECT 4 KiB reads at random aligned offsets."""
    rng = random.Random(7)
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    lat = []
    try:
        t0 = time.perf_counter()
        for _ in range(count):
            off = rng.randrange(size // 4096) * 4096
            t = time.perf_counter()
            os.preadv(fd, [buf], off)
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    lat.sort()
    return count / elapsed, statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99)] * 1e3


def random_writes(path: Path, size: int, count: int) -> tuple[float, float, float]:
    """IOPS (the closing fsync included), p50 and p99 latency (ms) of O_DIRECT 4 KiB writes
    of fresh data at random aligned offsets, one at a time."""
    rng = random.Random(11)
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    lat = []
    try:
        t0 = time.perf_counter()
        for i in range(count):
            off = rng.randrange(size // 4096) * 4096
            struct.pack_into("<QQ", buf, 0, i, off)
            t = time.perf_counter()
            os.pwritev(fd, [buf], off)
            lat.append(time.perf_counter() - t)
        os.fsync(fd)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    lat.sort()
    return count / elapsed, statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99)] * 1e3


@contextmanager
def floor_mounted(mnt: Path, size_mib: int, disk: Path | None = None) -> Iterator[Path]:
    """`scripts/fuse_floor.py` mounted at ``mnt`` (reading ``disk`` if given): yields its file."""
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "fuse_floor.py"), str(mnt),
                             "--size-mib", str(size_mib)] + (["--disk", str(disk)] if disk else []))
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the FUSE floor file system did not come up within 30 s")
            time.sleep(0.05)
        yield mnt / "bench.bin"
    finally:
        proc.terminate()
        proc.wait(60)


@contextmanager
def mounted(home: Path, mnt: Path, chunk_size: str, tree: Path = REPO) -> Iterator[None]:
    mnt.mkdir(parents=True, exist_ok=True)
    name = f"blixfs-bench-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        proc = subprocess.Popen(
            [sys.executable, "-m", "blixfs.cli", "--home", str(home), "mount", str(mnt), "--chunk-size", chunk_size],
            cwd=tree, env={**os.environ, "NOTIFY_SOCKET": "@" + name},
        )
        ready, _, _ = select.select([notify], [], [], 30)
        if not ready:
            proc.kill()
            raise SystemExit("blixfs mount did not come up within 30 s")
        notify.recv(100)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    ap.add_argument("--chunk-size", nargs="+", default=["256K", "64K"], help="chunk sizes to compare")
    ap.add_argument("--random-reads", type=int, default=20000, help="number of 4 KiB random reads")
    ap.add_argument("--random-writes", type=int, default=5000, help="number of 4 KiB random writes")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each figure is their median (default 3)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to put files (default: a temp dir on /var/tmp)")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also mount a node running the blixfs code of this tree (e.g. `git worktree add` of "
                         "main), first chunk size: before and after measured side by side in one run")
    ap.add_argument("--drop-caches", choices=["1", "3"], default="3",
                    help="what to drop before cold reads: 1 page cache, 3 also inodes and dentries (default)")
    args = ap.parse_args()
    global DROP
    DROP = args.drop_caches
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts FUSE filesystems")
    size = args.size_mib * MiB
    block = os.urandom(MiB)
    work = Path(tempfile.mkdtemp(prefix="blixfs-bench-", dir=args.workdir or "/var/tmp"))
    try:
        local = work / "local.bin"
        print(f"file {args.size_mib} MiB, {args.rounds} rounds (medians), drop_caches={DROP}, workdir {work}")
        # This VM's disk swings 2-3x between runs: each figure is the median of
        # --rounds, and the local and mounted measurements alternate within a round.
        files = {"local": local}
        samples: dict[str, dict[str, list[float]]] = {}
        iops_of: dict[str, tuple[float, float, float]] = {}
        wiops_of: dict[str, tuple[float, float, float]] = {}
        reads: dict[str, list[tuple[float, float, float]]] = {}
        writes: dict[str, list[tuple[float, float, float]]] = {}
        with contextlib.ExitStack() as stack:
            for cs in args.chunk_size:
                stack.enter_context(mounted(work / f"home-{cs}", work / f"mnt-{cs}", cs))
                files[cs] = work / f"mnt-{cs}" / "bench.bin"
            if args.baseline_tree is not None:  # measured last in each round: --rounds 2+ and compare orders
                cs = args.chunk_size[0]
                stack.enter_context(mounted(work / "home-base", work / "mnt-base", cs, args.baseline_tree.resolve()))
                files[f"base {cs}"] = work / "mnt-base" / "bench.bin"
            floor = stack.enter_context(floor_mounted(work / "mnt-floor", args.size_mib))
            backing = work / "floor-disk.bin"  # blocks and digests, as a chunk store lays them out
            write_file(backing, size + size // 2048 + MiB, block, 1 << 32)  # a salt no round uses
            floor_disk = stack.enter_context(floor_mounted(work / "mnt-floor-disk", args.size_mib, backing))
            for rnd in range(args.rounds):
                for name, f in files.items():
                    got = samples.setdefault(name, {})
                    got.setdefault("write", []).append(write_file(f, size, block, rnd))
                    got.setdefault("warm read", []).append(read_file(f, drop=True))
                    got.setdefault("cached read", []).append(read_file(f, drop=False))
                for name, f in files.items():
                    drop_caches()
                    reads.setdefault(name, []).append(random_reads(f, size, args.random_reads))
                reads.setdefault("floor", []).append(random_reads(floor, size, args.random_reads))
                drop_caches()
                reads.setdefault("floor+disk", []).append(random_reads(floor_disk, size, args.random_reads))
                for name, f in files.items():
                    writes.setdefault(name, []).append(random_writes(f, size, args.random_writes))
        for name in reads:
            iops_of[name] = tuple(statistics.median(r[i] for r in reads[name]) for i in range(3))  # type: ignore[assignment]
        for name in writes:
            wiops_of[name] = tuple(statistics.median(r[i] for r in writes[name]) for i in range(3))  # type: ignore[assignment]
        local_mbps = {k: statistics.median(v) for k, v in samples.pop("local").items()}
        rows = [(cs, {k: statistics.median(v) for k, v in samples[cs].items()}, iops_of[cs]) for cs in samples]
        print(f"\n{'':14}{'local disk':>14}" + "".join(f"{'blixfs ' + cs:>16}{'ratio':>8}" for cs, _, _ in rows))
        for key in ("write", "warm read", "cached read"):
            line = f"{key + ' MB/s':14}{local_mbps[key] / 1e6:14.0f}"
            for _, medians, _ in rows:
                line += f"{medians[key] / 1e6:16.0f}{medians[key] / local_mbps[key]:8.2f}"
            print(line)
        for label, measured in (("4K rand read", iops_of), ("4K rand write", wiops_of)):
            base_iops = measured["local"]
            line = f"{label + ' IOPS':14}{base_iops[0]:14.0f}"
            for cs, _, _ in rows:
                line += f"{measured[cs][0]:16.0f}{measured[cs][0] / base_iops[0]:8.2f}"
            print(line)
            line = f"{'  p50/p99 ms':14}{base_iops[1]:8.3f}/{base_iops[2]:.3f}"
            for cs, _, _ in rows:
                line += f"{measured[cs][1]:>10.3f}/{measured[cs][2]:.3f}{'':8}"
            print(line)
        floor_iops = iops_of["floor"]
        print(f"{'FUSE floor':14}{'':14}{floor_iops[0]:16.0f}{floor_iops[0] / iops_of['local'][0]:8.2f}"
              f"   (a pyfuse3 file system that only answers: scripts/fuse_floor.py)")
        print(f"{'  p50/p99 ms':14}{'':14}{floor_iops[1]:>10.3f}/{floor_iops[2]:.3f}")
        floor_iops = iops_of["floor+disk"]
        print(f"{'floor + disk':14}{'':14}{floor_iops[0]:16.0f}{floor_iops[0] / iops_of['local'][0]:8.2f}"
              f"   (the same, answering with one disk read per request: fuse_floor.py --disk)")
        print(f"{'  p50/p99 ms':14}{'':14}{floor_iops[1]:>10.3f}/{floor_iops[2]:.3f}")
        print("\ngoals: warm sequential read >= 0.5x local disk, write >= 0.3x (issue 2); "
              "4K random read >= 0.4x (issue 11)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: the cost of one commit (4 KiB write + fsync) on sparse images of 1, 20 and
100 GiB, with manifest trees, beside what the flat manifest (BXM1) of the same image
costs to encode, hash and store, measured side by side in one run.

    .venv/bin/python scripts/bench_manifest.py [--sizes-gib 1 20 100] [--commits 50] [--workdir DIR]

In process (a Vfs over a disk chunk store in DIR, 256 KiB chunks), no FUSE, no network:
it isolates what a commit costs the VFS and the store. For each size it prints the p50
commit time and the bytes the store grew by per commit; the "flat" columns are the time
and bytes of encoding + storing a BXM1 manifest of that image (what every commit did
before manifest trees), the ratio is tree / flat. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import trio

from blixfs.chunkstore import DiskChunkStore
from blixfs.crypto import generate_secret
from blixfs.hashing import HOLE, ChunkId
from blixfs.manifest import DEFAULT_CHUNK_SIZE, Manifest, chunk_count
from blixfs.namespace import MemoryNamespaceStore
from blixfs.replica import NamespaceKeys, Replica
from blixfs.vfs import ROOT_INO, Vfs

GiB = 1 << 30


async def tree_commits(home: Path, size: int, commits: int) -> tuple[float, float]:
    """p50 ms of a 4 KiB write + fsync, and store bytes per commit."""
    store = DiskChunkStore(home)
    replica = Replica(MemoryNamespaceStore(), NamespaceKeys.generate(), generate_secret())
    vfs = Vfs(replica, store, chunk_size=DEFAULT_CHUNK_SIZE)
    fh, attr = await vfs.create(ROOT_INO, "disk.img", 0o644, os.O_RDWR, 0, 0)
    await vfs.setattr(attr.ino, size=size)
    await vfs.fsync(fh, False)
    rng = random.Random(1)
    before = store.stats().bytes
    times = []
    for _ in range(commits):
        offset = rng.randrange(0, size // 4096) * 4096
        t0 = time.perf_counter()
        await vfs.write(fh, offset, os.urandom(4096))
        await vfs.fsync(fh, False)
        times.append(time.perf_counter() - t0)
    grown = store.stats().bytes - before
    await vfs.release(fh)
    store.close()
    return statistics.median(times) * 1000, grown / commits


def flat_commit(home: Path, size: int, commits: int) -> tuple[float, float]:
    """p50 ms of encoding, hashing and storing (durably) a BXM1 manifest of a ``size`` image
    with one changed chunk per commit, and its bytes."""
    store = DiskChunkStore(home)
    n = chunk_count(size, DEFAULT_CHUNK_SIZE)
    ids = [HOLE] * n
    rng = random.Random(1)
    times, length = [], 0
    for _ in range(commits):
        ids[rng.randrange(n)] = ChunkId(os.urandom(32))
        t0 = time.perf_counter()
        raw = Manifest(size, DEFAULT_CHUNK_SIZE, tuple(ids), legacy=True).encode()
        store.put(raw)
        store.sync()
        times.append(time.perf_counter() - t0)
        length = len(raw)
    store.close()
    return statistics.median(times) * 1000, float(length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gib", type=int, nargs="+", default=[1, 20, 100])
    parser.add_argument("--commits", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    print(f"{'image':>8} | {'tree ms p50':>11} | {'tree bytes/commit':>17} | {'flat ms p50':>11} | "
          f"{'flat bytes/commit':>17} | {'ms ratio':>8} | {'bytes ratio':>11}")
    for gib in args.sizes_gib:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            tree_ms, tree_bytes = trio.run(tree_commits, Path(tmp) / "tree", gib * GiB, args.commits)
            flat_ms, flat_bytes = flat_commit(Path(tmp) / "flat", gib * GiB, min(args.commits, 20))
        print(f"{gib:>5} GiB | {tree_ms:>11.2f} | {tree_bytes:>17,.0f} | {flat_ms:>11.2f} | {flat_bytes:>17,.0f} | "
              f"{tree_ms / flat_ms:>8.3f} | {tree_bytes / flat_bytes:>11.3f}")
    print("tree bytes include the changed 256 KiB chunk; flat bytes are the manifest alone.")


if __name__ == "__main__":
    main()

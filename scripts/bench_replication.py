#!/usr/bin/env python3
"""Benchmark: upload on write and replication, side by side with a plain copy, in one run.

    .venv/bin/python scripts/bench_replication.py [--size-mib 1024] [--writes 64]

Starts two blixfs nodes on loopback (homes on the local disk, B joined to A) and measures:
* the time from the start of ``cp`` of a file into A's mount until A reports it durable
  with 2 copies (B holds it whole), against a plain ``cp`` of the same file from one
  directory to another on the same disk, plus ``sync`` (what the copy costs to be durable);
* write amplification: N random writes of 4 KiB, 64 KiB and 1 MiB into the durable image,
  fsync, until the new version is durable again: bytes A served to B / bytes written.
  Fixed 256 KiB chunks: a 4 KiB write costs one chunk (64x); the manifest adds 36 bytes
  per chunk of the file per version.
Needs root (FUSE). Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from blixfs.daemon import ask_daemon  # noqa: E402

MiB = 1 << 20


def cli(home: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "blixfs.cli", "--home", str(home), *args], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout


@contextmanager
def mounted(home: Path, mnt: Path) -> Iterator[None]:
    mnt.mkdir(parents=True, exist_ok=True)
    name = f"blixfs-bench-{uuid.uuid4().hex}"
    log_path = home.parent / f"{home.name}.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(log_path, "ab") as log:
        notify.bind("\0" + name)
        proc = subprocess.Popen([sys.executable, "-m", "blixfs.cli", "--home", str(home), "mount", str(mnt)],
                                cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": "@" + name},
                                stdout=subprocess.DEVNULL, stderr=log)
        if not select.select([notify], [], [], 30)[0]:
            proc.kill()
            raise SystemExit(f"{home} did not mount within 30 s")
        notify.recv(100)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


def status(home: Path) -> dict[str, Any]:
    reply = ask_daemon(home, {"op": "status"})
    assert reply is not None and reply.get("ok"), reply
    return reply


def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def durable(home: Path, path: str, not_manifest: str | None = None) -> bool:
    for r in status(home)["replication"]:
        if r["path"] == path and r["state"] == "durable" and r["manifest"] != not_manifest:
            return True
    return False


def manifest_of(home: Path, path: str) -> str:
    return next(r["manifest"] for r in status(home)["replication"] if r["path"] == path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--writes", type=int, default=64, help="random writes per size for the amplification figures")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts FUSE filesystems")
    work = Path(tempfile.mkdtemp(prefix="blixfs-bench-repl-", dir=args.workdir))
    size = args.size_mib * MiB
    try:
        src = work / "src.img"
        with open(src, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        # Plain copy between two directories on the same disk, made durable.
        (work / "dir-a").mkdir()
        (work / "dir-b").mkdir()
        shutil.copyfile(src, work / "dir-a" / "img")
        os.sync()
        t = time.perf_counter()
        subprocess.run(["cp", str(work / "dir-a" / "img"), str(work / "dir-b" / "img")], check=True)
        os.sync()
        plain = time.perf_counter() - t

        a, b = work / "home-a", work / "home-b"
        with ExitStack() as stack:
            stack.enter_context(mounted(a, work / "mnt-a"))
            ticket = cli(a, "share", "--write").strip().splitlines()[-1]
            cli(b, "join", ticket)
            stack.enter_context(mounted(b, work / "mnt-b"))
            wait(lambda: any(s["synced"] for s in status(a)["sessions"]), 20, "a and b to sync")
            t = time.perf_counter()
            subprocess.run(["cp", str(src), str(work / "mnt-a" / "img")], check=True)
            copied = time.perf_counter() - t
            wait(lambda: durable(a, "img"), 600, "the image to become durable")
            to_durable = time.perf_counter() - t

            rng = random.Random(1)
            amplification = {}
            for write_size in (4096, 65536, MiB):
                before_manifest = manifest_of(a, "img")
                served = status(a)["served"]["bytes"]
                fd = os.open(work / "mnt-a" / "img", os.O_WRONLY)
                for _ in range(args.writes):
                    offset = rng.randrange(0, size - write_size, 4096)
                    os.pwrite(fd, os.urandom(write_size), offset)
                os.fsync(fd)
                os.close(fd)
                wait(lambda m=before_manifest: durable(a, "img", not_manifest=m), 120, "the new version durable")
                sent = status(a)["served"]["bytes"] - served
                amplification[write_size] = (sent, args.writes * write_size)

        print(f"\nreplication benchmark, {args.size_mib} MiB, 2 nodes on loopback ({time.strftime('%Y-%m-%d')})")
        print(f"  plain cp between two directories + sync   {plain:7.2f} s   {size / plain / 1e6:7.0f} MB/s")
        print(f"  cp into blixfs (local commit)             {copied:7.2f} s   {size / copied / 1e6:7.0f} MB/s")
        print(f"  cp into blixfs until durable, 2 copies    {to_durable:7.2f} s   {size / to_durable / 1e6:7.0f} MB/s"
              f"   ratio to plain copy {plain / to_durable:5.2f}")
        print(f"\n  write amplification, {args.writes} random writes each (bytes sent to the replica / written):")
        for write_size, (sent, written) in amplification.items():
            print(f"    {write_size // 1024:5d} KiB writes   sent {sent / MiB:8.2f} MiB for {written / MiB:7.2f} MiB"
                  f"   = {sent / written:6.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

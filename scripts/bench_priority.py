#!/usr/bin/env python3
"""Benchmark transfer priorities and the upload limit between blixfs nodes on loopback.

    .venv/bin/python scripts/bench_priority.py [--pull-mib 1024] [--random-mib 128] [--reads 200]
                                               [--limit-seconds 30] [--after-seconds 10] [--workdir DIR]

Needs root (FUSE); a few minutes. Not a test: the figures depend on the machine and its
neighbours (print the load average beside them). Three real ``blixfs mount`` processes
(scripts/bench_fetch.py's `BenchNode`, all ``--copies 1`` so that nothing replicates on
its own): A holds everything (written into its mount, untimed) and serves with
``--max-upload 20M``; B and C join A.

(1) Upload limit. C pulls big1.img (``blixfs pull``, background class) from A alone
    while the benchmark samples the bytes C has fetched every second for
    ``--limit-seconds``: the rate C receives, i.e. what A serves, against A's 20 MB/s (goal
    +-10%). Then ``blixfs limit --max-upload 40M`` on A, at run time, and the same for
    ``--after-seconds`` against 40 MB/s; then the limit is lifted (``off``) and C stops
    (so that A alone serves B below).
(2) Demand reads during a pull. Cold 4 KiB O_DIRECT reads, one at a time, at random
    offsets of a file only A holds (each in a chunk not read before and away from the
    read-ahead window: each fetches one chunk from A), on B: (i) with nothing else going
    on, (ii) while B pulls the big image from A (``blixfs pull``: background, the class
    of replication) and (iii) while B pulls big2.img at ``--priority demand``:
    what the reads would see if the pull were not background (the old behaviour, all
    fetches equal). Each phase reads its own file, so every read is cold. Goal: the p99
    of (ii) <= 2x the p99 of (i). A phase whose pull ended before its reads did is
    flagged: its later reads ran without contention.

Every read is checked against the written bytes. Every mount, process and temp dir is
removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_fetch  # noqa: E402 - the node harness of the fetch benchmark
from bench_fetch import BenchNode, MiB, cold_offsets, note, pct, random_reads, visible, wait_for, wait_ready  # noqa: E402

from blixfs.daemon import ask_daemon  # noqa: E402

UPLOAD = 20_000_000
RAISED = 40_000_000


def fetched(node: BenchNode) -> int:
    reply = ask_daemon(node.home, {"op": "status"})
    if reply is None or not reply.get("ok"):
        raise RuntimeError(f"node {node.name} does not answer on its control socket")
    return int(reply["fetched"]["bytes"])


def start_pull(node: BenchNode, name: str, priority: str = "background") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "blixfs.cli", "--home", str(node.home), "pull", "--priority",
                             priority, name], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> None:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"blixfs pull failed: {err.strip()}")


def sample_rate(node: BenchNode, seconds: float, pull: subprocess.Popen[str]) -> tuple[float, list[float]]:
    """Bytes/s ``node`` fetched over ``seconds`` (from a sample at each end), and the rate of
    each 1-second step, while ``pull`` runs."""
    t0, b0 = time.monotonic(), fetched(node)
    steps: list[float] = []
    last_t, last_b = t0, b0
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)  # a sampling interval, not a wait for a condition
        t, b = time.monotonic(), fetched(node)
        steps.append((b - last_b) / (t - last_t))
        last_t, last_b = t, b
        if pull.poll() is not None:
            outp, err = pull.communicate()
            err = outp + err
            raise RuntimeError(f"the pull ended before the measurement did (use a bigger --pull-mib): "
                               f"exit status {pull.returncode} {err.strip()[-300:]}")
    return (last_b - b0) / (last_t - t0), steps


def reads_during(node: BenchNode, path: Path, offsets: list[int], expected: bytes,
                 pull: subprocess.Popen[str] | None) -> tuple[list[float], bool]:
    """Latencies of the cold reads, and whether the pull (if any) outlasted them."""
    if pull is not None:
        start = fetched(node)
        wait_for(lambda: fetched(node) > start + 16 * MiB, 60, "the pull under way")
    lat = random_reads(path, offsets, expected)
    return lat, pull is None or pull.poll() is None


def run(args: argparse.Namespace, work: Path, nodes: dict[str, BenchNode]) -> dict[str, Any]:
    from blixfs.cli import CHUNK_SIZES
    from blixfs.vfs import READ_AHEAD_BYTES

    chunk = CHUNK_SIZES["256K"]
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    load = Path("/proc/loadavg").read_text().split()[0]
    a.launch()
    wait_ready([a])
    ticket = a.cli("share").strip().splitlines()[-1]
    for n in (b, c):
        n.cli("join", ticket)
        n.launch()
    wait_ready([b, c])
    note("writing the files into a's mount (untimed)")
    rng = random.Random(1)
    pull_size, rsize = args.pull_mib * MiB, args.random_mib * MiB
    bench_fetch.write_files([a.mnt / "big1.img"], pull_size, rng)
    bench_fetch.write_files([a.mnt / "big2.img"], pull_size, rng)
    rand = {}
    for phase in ("idle", "background", "demand"):
        _, rand[phase] = bench_fetch.write_files([a.mnt / f"rand-{phase}.img"], rsize, rng, keep=True)
    names = [("big1.img", pull_size), ("big2.img", pull_size)] + [(f"rand-{p}.img", rsize) for p in rand]
    wait_for(lambda: all(visible(n, name, size) for n in (b, c) for name, size in names), 60, "the files on b, c")
    out: dict[str, Any] = {"load_at_start": load}

    note(f"(1) c pulls big1.img from a under --max-upload 20M for {args.limit_seconds} s")
    pull = start_pull(c, "big1.img")
    try:
        wait_for(lambda: fetched(c) > 8 * MiB, 60, "c's pull under way")
        rate20, steps20 = sample_rate(c, args.limit_seconds, pull)
        a.cli("limit", "--max-upload", "40M")
        time.sleep(1.0)  # the first second after the change: answers already admitted at 20 MB/s
        rate40, steps40 = sample_rate(c, args.after_seconds, pull)
        a.cli("limit", "--max-upload", "off")
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait(10)
    c.stop()  # what it holds of big1.img must not serve b's pull in (2): a alone serves b
    out["upload"] = {"limit": UPLOAD, "rate": rate20, "steps": steps20,
                     "raised_limit": RAISED, "raised_rate": rate40, "raised_steps": steps40}

    note(f"(2) cold 4 KiB reads on b: {args.reads} per phase")
    lat: dict[str, list[float]] = {}
    outlasted: dict[str, bool] = {}
    for phase, pulled in (("idle", None), ("background", "big1.img"), ("demand", "big2.img")):
        offsets = cold_offsets(rsize, chunk, args.reads, READ_AHEAD_BYTES, random.Random(hash(phase) & 0xFFFF))
        proc = start_pull(b, pulled, phase) if pulled is not None else None
        try:
            lat[phase], outlasted[phase] = reads_during(b, b.mnt / f"rand-{phase}.img", offsets, rand[phase], proc)
            if proc is not None:
                finish(proc)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    out["reads"] = {p: {"p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3, "max_ms": max(v) * 1e3,
                        "pull_outlasted_reads": outlasted[p]} for p, v in lat.items()}
    out["load_at_end"] = Path("/proc/loadavg").read_text().split()[0]
    return out


def report(out: dict[str, Any]) -> None:
    up = out["upload"]
    print(f"\nload average {out['load_at_start']} at start, {out['load_at_end']} at end (2 cores, shared)")
    print("(1) upload limit, measured by the puller")
    for label, limit, rate, steps in (("--max-upload 20M", up["limit"], up["rate"], up["steps"]),
                                      ("blixfs limit --max-upload 40M", up["raised_limit"], up["raised_rate"],
                                       up["raised_steps"])):
        print(f"    {label:32} {rate / 1e6:6.2f} MB/s over {len(steps)} s = {rate / limit:.3f}x the limit "
              f"(1 s steps {min(steps) / 1e6:.1f}..{max(steps) / 1e6:.1f} MB/s)")
    print("(2) cold 4 KiB reads on b (p50 / p99 / max, ms)")
    base = out["reads"]["idle"]["p99_ms"]
    for phase, r in out["reads"].items():
        flag = "" if r["pull_outlasted_reads"] else "  (the pull ended before the reads did)"
        print(f"    {phase:11} {r['p50_ms']:7.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.2f}   "
              f"p99 {r['p99_ms'] / base:.2f}x idle{flag}")
    print("    idle: nothing else; background: while b pulls 1 image (class background, as replication);"
          " demand: while b pulls at --priority demand (no priorities)")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pull-mib", type=int, default=1024, help="size of each pulled image (default 1024)")
    ap.add_argument("--random-mib", type=int, default=128, help="size of each randomly read file (default 128)")
    ap.add_argument("--reads", type=int, default=200, help="cold 4 KiB reads per phase (default 200)")
    ap.add_argument("--limit-seconds", type=float, default=30.0, help="measurement at 20M (default 30)")
    ap.add_argument("--after-seconds", type=float, default=10.0, help="measurement at 40M (default 10)")
    ap.add_argument("--workdir", type=Path, default=None, help="where homes and files go (default: /var/tmp)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts FUSE filesystems")
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="blixfs-priority-", dir=args.workdir or "/var/tmp"))
    margs = {"a": ("--copies", "1", "--max-upload", "20M"), "b": ("--copies", "1"), "c": ("--copies", "1")}
    nodes = {n: BenchNode(n, work / f"home-{n}", work / f"mnt-{n}", work / f"{n}.log", margs[n]) for n in "abc"}
    bench_fetch.run_with_nodes("bench_priority", work, nodes, lambda: report(run(args, work, nodes)))

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What the dashboard costs the read path: scripts/bench_fetch.py without and with it, side by side.

    .venv/bin/python scripts/bench_dashboard.py [--pairs 2] [-- BENCH_FETCH_ARGS...]

Needs root (as bench_fetch). Runs bench_fetch ``--pairs`` times without ``--dashboard`` and
as many times with it (every node serving its dashboard, all four /api/ pages of b, c and d
fetched every second for the whole run), alternating which goes first in each pair so a
machine that gets busier or quieter does not favour one side. Prints, per figure, the median
of each side and their ratio (with / without): within the spread of the runs is "nothing
measurable". Not a test: the figures depend on the machine and its neighbours.

BENCH_FETCH_ARGS default to a shorter run than bench_fetch's own defaults:
--size-mib 512 --random-mib 128 --random-reads 200 --raw-mib 128 --rounds 1.

Before the pairs it measures what one API request costs the daemon, in CPU time (robust
to a busy machine, unlike wall-clock figures): one node with 20 files, its CPU over 10 s
idle and over 10 s answering /api/ pages as fast as one client asks (a new connection
each, as a browser's poll may be). A page open in a browser asks one page every 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ARGS = ["--size-mib", "512", "--random-mib", "128", "--random-reads", "200", "--raw-mib", "128",
                "--rounds", "1"]
FIGURES = [("cold_b", "(b) cold seq read on b, from a", "MB/s"),
           ("cold_c", "(c) cold seq read on c, from a and b", "MB/s"),
           ("warm_b", "(d) warm seq read on b", "MB/s"),
           ("random_p50_ms", "(e) cold 4 KiB read on d, p50", "ms"),
           ("random_p99_ms", "    p99", "ms"),
           ("raw", "(a) raw iroh, best", "MB/s")]


def api_cost(work: Path) -> tuple[float, float, int]:
    """(idle CPU ms/s, CPU ms per request, requests) of one node's daemon (module docstring)."""
    home, mnt = work / "home", work / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "blixfs.cli", "--home", str(home), "mount", str(mnt),
                             "--dashboard", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        url = ""
        deadline = time.monotonic() + 60
        while not url.startswith("http") and time.monotonic() < deadline:
            time.sleep(0.2)
            url = subprocess.run([sys.executable, "-m", "blixfs.cli", "--home", str(home), "dashboard"],
                                 capture_output=True, text=True, cwd=REPO).stdout.strip()
        if not url.startswith("http"):
            raise SystemExit("the node did not start its dashboard")
        for i in range(20):
            (mnt / f"img{i}").write_bytes(os.urandom(300_000))

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        time.sleep(3)
        c0, t0 = cpu(), time.monotonic()
        time.sleep(10)
        idle = (cpu() - c0) / (time.monotonic() - t0)
        c0, t0, n = cpu(), time.monotonic(), 0
        while time.monotonic() - t0 < 10:
            for page in ("overview", "transfers", "topology", "images"):
                with urllib.request.urlopen(f"{url}/api/{page}", timeout=30) as answer:
                    answer.read()
                n += 1
        busy = cpu() - c0 - idle * (time.monotonic() - t0)
        return idle * 1e3, busy * 1e3 / n, n
    finally:
        proc.terminate()
        proc.wait(60)


def run_once(dashboard: bool, extra: list[str], out: Path) -> dict[str, float]:
    cmd = [sys.executable, str(REPO / "scripts/bench_fetch.py"), *extra, "--json", str(out)]
    if dashboard:
        cmd.append("--dashboard")
    print(f"[bench_dashboard] {'with' if dashboard else 'without'} the dashboard: {' '.join(cmd[1:])}",
          file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    figures: dict[str, float] = json.loads(out.read_text())
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2, help="runs on each side (default 2)")
    ap.add_argument("rest", nargs="*", help="arguments for bench_fetch.py (after --)")
    args = ap.parse_args()
    extra = args.rest or DEFAULT_ARGS
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        idle_ms, per_request_ms, requests = api_cost(Path(tmp))
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            for side in order:
                runs[side].append(run_once(side, extra, Path(tmp) / f"run-{i}-{int(side)}.json"))
    print(f"\nbench_fetch without and with the dashboard, {args.pairs} run(s) each, medians "
          f"({' '.join(extra)})")
    print(f"{'':42}{'without':>10}{'with':>10}{'ratio':>8}   runs without / with")
    for key, label, unit in FIGURES:
        off = [r[key] for r in runs[False]]
        on = [r[key] for r in runs[True]]
        m_off, m_on = statistics.median(off), statistics.median(on)
        spread = f"{', '.join(f'{v:.1f}' for v in off)} / {', '.join(f'{v:.1f}' for v in on)}"
        print(f"{label:42}{m_off:>7.1f} {unit:<3}{m_on:>6.1f} {unit:<3}{m_on / m_off:>7.2f}   {spread}")
    polled = [int(r["dashboard_requests"]) for r in runs[True]]
    print(f"dashboard /api/ pages fetched per run with it: {', '.join(map(str, polled))}")
    print(f"\nCPU of one daemon: {idle_ms:.1f} ms/s idle; {per_request_ms:.2f} ms per /api/ request "
          f"({requests} requests in 10 s, one client): a browser tab (one page every 2 s) costs "
          f"{per_request_ms / 2 / 10:.3f}% of a core, bench_fetch --dashboard (4 pages/s per node) "
          f"{per_request_ms * 4 / 10:.2f}%")


if __name__ == "__main__":
    main()

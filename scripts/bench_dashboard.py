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
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
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
    with tempfile.TemporaryDirectory() as tmp:
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
    requests = [int(r["dashboard_requests"]) for r in runs[True]]
    print(f"dashboard /api/ pages fetched per run with it: {', '.join(map(str, requests))}")


if __name__ == "__main__":
    main()

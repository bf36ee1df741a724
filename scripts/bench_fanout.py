#!/usr/bin/env python3
"""Fan-out: one seed and N hosts on slow links all pull the same image at once.

    .venv/bin/python scripts/bench_fanout.py [--size-mib 256] [--hosts 8] [--rate-mbit 50]
                                             [--workdir DIR] [--json OUT]

Needs root (network namespaces, tc, FUSE); at full size about 5 minutes. Not a test: the
figures depend on the machine and on what else runs on it. The hosts are network
namespaces on one bridge, built by the netns tests' harness (tests/netns/harness.py), and
each runs a real ``blixfs mount`` process (tests/netns/nodes.py) talking real iroh over its
veth. Every host's link, the seed's included, is shaped to --rate-mbit each way with tc
(a token bucket on both ends of its veth: `Host.shape`).

1. The seed writes an image of --size-mib random (non-dedupable) bytes into its mount
   (``--copies 1``: its replicator asks nobody to hold it, so nobody pulls it early).
2. **Alone**: a fresh host joins, sees the file, and runs ``blixfs pull`` of it with no
   other host around: the time one host takes by itself. That host then restarts with an
   empty store (its holdings, announced empty, replace what it announced) and stops, so
   the fan-out hosts neither use nor wait on it.
3. **Fan-out**: --hosts fresh hosts join, find each other (mDNS on the bridge) and see the
   file; then all pull it at the same moment (one thread each, control socket).

Printed: per host the pull time, and the bytes received from the seed and from other hosts
(the pull's ``peers`` answer: bytes received per peer while the pull ran); the ratio
last-host-done / alone (goal <= 2: a single server would need about N times as long, since
the seed's link carries every byte); and a sha256 check of the file read from every host's
mount afterwards (untimed: all local by then). Each host's daemon log stays in the
workdir when --workdir is given.

Every mount, process, namespace and temp dir is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The netns tests' own hosts and nodes: the benchmark runs exactly what the tests run.
from tests.conftest import fuse_available  # noqa: E402
from tests.netns.harness import Lan, netns_unavailable, sweep_stale  # noqa: E402
from tests.netns.nodes import LanNode, start_all  # noqa: E402

IMAGE = "fanout.img"
GOAL = 2.0  # last host done, as a multiple of one host alone
WRITE_BLOCK = 4 << 20


def note(message: str) -> None:
    print(f"[bench_fanout {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait(condition: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def write_image(path: Path, size: int, seed: int) -> str:
    """``size`` pseudo-random bytes (no two chunks alike) written to ``path``; their sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.randbytes(min(WRITE_BLOCK, left))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(WRITE_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sees(node: LanNode, size: int) -> bool:
    try:
        return (node.mnt / IMAGE).stat().st_size == size
    except OSError:
        return False


@dataclass
class Pull:
    node: LanNode
    name: str
    started: float = 0.0
    ended: float = 0.0
    reply: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def seconds(self) -> float:
        return self.ended - self.started

    def split(self, seed_id: str) -> tuple[int, int]:
        """Bytes received from the seed and from other hosts during the pull."""
        peers: dict[str, int] = self.reply.get("peers", {})
        from_seed = sum(b for p, b in peers.items() if seed_id.startswith(p))
        return from_seed, sum(peers.values()) - from_seed


def run_pull(pull: Pull, start: threading.Barrier | None) -> None:
    if start is not None:
        start.wait()
    pull.started = time.monotonic()
    try:
        pull.reply = pull.node.pull(IMAGE)
    except Exception as exc:  # reported with the figures, never hidden
        pull.error = str(exc)
    pull.ended = time.monotonic()


def cpu_seconds(nodes: list[LanNode]) -> float:
    """CPU time (user + system) the nodes' daemons used so far (0 for one not running)."""
    total = 0.0
    for n in nodes:
        if n.proc is None:
            continue
        try:
            fields = Path(f"/proc/{n.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    size = args.size_mib << 20
    lan = Lan()
    nodes: list[LanNode] = []

    def node(name: str, *extra: str) -> LanNode:
        host = lan.add_host()
        host.shape(args.rate_mbit)
        made = LanNode(host, workdir / f"home-{name}", workdir / f"mnt-{name}", ["--copies", "1", *extra])
        nodes.append(made)
        return made

    try:
        sweep_stale()
        lan.create()
        seed = node("seed")
        seed.cli("status")
        seed.start()
        seed_id = seed.node_id()
        ticket = seed.cli("share").strip().splitlines()[-1]
        note(f"seed {seed_id[:16]} on {seed.host.ip}; links shaped to {args.rate_mbit:g} Mbit/s each way")
        source = workdir / "image.src"
        want = write_image(source, size, args.seed)
        begin = time.monotonic()
        shutil.copyfile(source, seed.mnt / IMAGE)
        source.unlink()
        note(f"seed wrote {args.size_mib} MiB in {time.monotonic() - begin:.1f} s")

        # Alone: one fresh host, nobody else pulling.
        alone = node("alone")
        alone.cli("join", ticket)
        alone.start()
        wait(lambda: sees(alone, size), 120, "the image on the lone host")
        solo = Pull(alone, "alone")
        note("alone: pulling")
        cpu = cpu_seconds([seed, alone])
        run_pull(solo, None)
        solo_cpu = cpu_seconds([seed, alone]) - cpu
        if solo.error:
            raise RuntimeError(solo.error)
        solo_ok = sha256_of(alone.mnt / IMAGE) == want
        note(f"alone: {solo.seconds():.1f} s")
        # Forget it again: restarted with an empty store it announces empty holdings, which
        # replace the full ones everywhere; then it stops, and nobody asks it anything.
        alone_id = alone.node_id()
        alone.stop()
        shutil.rmtree(alone.home / "chunks")
        alone.start()
        wait(lambda: (p := seed.peers().get(alone_id)) is not None
             and p["holds_complete"] == 0 and p["holds_partial"] == 0, 60, "the lone host's holdings to be empty")
        alone.stop()

        # Fan-out: N fresh hosts, all at once.
        hosts = [node(f"h{i + 1}") for i in range(args.hosts)]
        for h in hosts:
            h.cli("join", ticket)
        start_all(hosts)
        ids = {h.host.ip: h.node_id() for h in hosts}
        wait(lambda: all(sees(h, size) for h in hosts), 120, "the image on every host")

        def meshed() -> bool:
            for h in hosts:
                sessions = {p for p, r in h.peers().items() if r["session"] == "synced"}
                if not {ids[o.host.ip] for o in hosts if o is not h} | {seed_id} <= sessions:
                    return False
            return True
        try:
            wait(meshed, 90, "every host to have a session with every other host", interval=0.5)
        except RuntimeError as exc:
            note(f"warning: {exc}; pulling anyway")
        pulls = [Pull(h, f"h{i + 1}") for i, h in enumerate(hosts)]
        barrier = threading.Barrier(len(pulls))
        threads = [threading.Thread(target=run_pull, args=(p, barrier)) for p in pulls]
        load_before = os.getloadavg()[0]
        note(f"fan-out: {len(pulls)} hosts pulling at once")
        cpu = cpu_seconds([seed, *hosts])
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fanout_cpu = cpu_seconds([seed, *hosts]) - cpu
        load_after = os.getloadavg()[0]
        failed = [p for p in pulls if p.error]
        checks = {p.name: (not p.error and sha256_of(p.node.mnt / IMAGE) == want) for p in pulls}
        first = min(p.started for p in pulls)
        last = max(p.ended for p in pulls)
        rows = []
        for p in pulls:
            from_seed, from_hosts = p.split(seed_id)
            rows.append({"host": p.name, "seconds": round(p.ended - first, 2), "from_seed": from_seed,
                         "from_hosts": from_hosts, "sha256_ok": checks[p.name], "error": p.error})
        from_seed_total = sum(r["from_seed"] for r in rows)
        from_hosts_total = sum(r["from_hosts"] for r in rows)
        result = {
            "size_mib": args.size_mib, "hosts": args.hosts, "rate_mbit": args.rate_mbit,
            "alone_seconds": round(solo.seconds(), 2), "alone_sha256_ok": solo_ok,
            "alone_from_seed": solo.split(seed_id)[0],
            "last_seconds": round(last - first, 2), "ratio": round((last - first) / solo.seconds(), 2),
            "hosts_detail": rows, "from_seed_total": from_seed_total, "from_hosts_total": from_hosts_total,
            "failed": len(failed), "loadavg_before": load_before, "loadavg_after": load_after,
            "ideal_alone_seconds": round(size * 8 / (args.rate_mbit * 1e6), 1),
            "alone_cpu_seconds": round(solo_cpu, 1), "fanout_cpu_seconds": round(fanout_cpu, 1),
        }
        return result
    finally:
        for n in nodes:
            try:
                n.stop()
            except Exception as exc:  # keep stopping the others
                note(f"stopping {n.host.ip}: {exc}")
        lan.destroy()


def report(r: dict[str, Any]) -> None:
    mib = 1 << 20
    print(f"fan-out of {r['size_mib']} MiB to {r['hosts']} hosts, every link {r['rate_mbit']:g} Mbit/s each way "
          f"(the wire alone: {r['ideal_alone_seconds']} s per copy)")
    print(f"  one host alone: {r['alone_seconds']:.1f} s ({r['size_mib'] / r['alone_seconds']:.1f} MiB/s), "
          f"{r['alone_from_seed'] / mib:.0f} MiB from the seed, sha256 {'ok' if r['alone_sha256_ok'] else 'WRONG'}")
    print(f"  {'host':<6} {'done after s':>12} {'MiB/s':>7} {'from seed MiB':>14} {'from hosts MiB':>15}  sha256")
    for row in r["hosts_detail"]:
        rate = r["size_mib"] / row["seconds"] if row["seconds"] else 0.0
        print(f"  {row['host']:<6} {row['seconds']:>12.1f} {rate:>7.1f} {row['from_seed'] / mib:>14.0f} "
              f"{row['from_hosts'] / mib:>15.0f}  {'ok' if row['sha256_ok'] else 'WRONG'}"
              + (f"  error: {row['error']}" if row["error"] else ""))
    total = r["from_seed_total"] + r["from_hosts_total"]
    print(f"  in all: {r['from_seed_total'] / mib:.0f} MiB from the seed, {r['from_hosts_total'] / mib:.0f} MiB "
          f"from other hosts ({100 * r['from_hosts_total'] / max(total, 1):.0f}%)")
    verdict = "met" if r["ratio"] <= GOAL and not r["failed"] else "NOT met"
    print(f"  last host done after {r['last_seconds']:.1f} s = {r['ratio']:.2f}x one host alone "
          f"(goal <= {GOAL:g}x: {verdict}; one server alone would need ~{r['hosts']}x)")
    chunks_alone = r["alone_from_seed"] / (256 << 10)
    chunks_fanout = (r["from_seed_total"] + r["from_hosts_total"]) / (256 << 10)
    per_alone = 1e3 * r["alone_cpu_seconds"] / max(chunks_alone, 1)
    per_fanout = 1e3 * r["fanout_cpu_seconds"] / max(chunks_fanout, 1)
    print(f"  daemons' CPU (senders and receivers): alone {r['alone_cpu_seconds']:.1f} s ({per_alone:.1f} ms per "
          f"256 KiB moved), fan-out {r['fanout_cpu_seconds']:.1f} s ({per_fanout:.1f} ms per 256 KiB moved)")
    print(f"  load average {r['loadavg_before']:.1f} before, {r['loadavg_after']:.1f} after the fan-out "
          f"({os.cpu_count()} CPUs, shared with whatever else runs here)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--hosts", type=int, default=8, help="hosts pulling at once (default 8)")
    parser.add_argument("--rate-mbit", "--rate", type=float, default=50.0,
                        help="every link's rate each way, Mbit/s (default 50)")
    parser.add_argument("--seed", type=int, default=14, help="seed of the image's pseudo-random bytes")
    parser.add_argument("--workdir", type=Path, default=None, help="keep homes and daemon logs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.hosts < 1 or args.size_mib < 1 or args.rate_mbit <= 0:
        parser.error("--hosts, --size-mib and --rate-mbit must be positive")
    for reason in (netns_unavailable(), fuse_available()):
        if reason is not None:
            print(f"bench_fanout: {reason}", file=sys.stderr)
            return 2
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-fanout-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = bench(args, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    ok = result["ratio"] <= GOAL and not result["failed"] and all(r["sha256_ok"] for r in result["hosts_detail"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

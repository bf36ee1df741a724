#!/usr/bin/env python3
"""Benchmark booting a real Linux guest under qemu (TCG) from blixfs mounts, side by side.

    .venv/bin/python scripts/bench_vm.py [--rounds N] [--cache MODE] [--timeout S] [--workdir DIR]
                                         [--keep] [--snapshot-boot]

Needs root (FUSE, drop_caches) and qemu-system-x86_64 (scripts/install.sh); about a
minute. Not a test: the figures depend on the machine and its neighbours. The guest is
scripts/build_guest.sh's (built once, then cached): it reads and checks 8 MiB of its ext4
root, writes 4 MiB with fsync, and prints a marker on its serial console before powering
off. Every boot writes to its disk (never -snapshot, except the optional extra one). Boots:

(1) local: from a copy of the image in a temp dir on the local disk;
(2) writer: node A copies the image into its mount and boots that copy from it;
(3) cold: node C, which joined A after A wrote the image and holds none of it (checked:
    it fetched nothing before), boots A's other copy from C's mount, fetching on demand;
(4) warm: C boots the same file again, its chunks now on C.
With --snapshot-boot, (5): a fresh node D boots a third pristine copy cold with qemu
-snapshot (reads over the network, writes to a temp overlay on the local disk).

All nodes run ``--copies 1`` so that no replica moves the image before a cold boot. The
page cache is dropped before every boot (local included). Each boot's time runs from
qemu's start to its exit (the guest powers off right after its marker). With --rounds N
every boot is repeated N times, each round on fresh copies and fresh cold nodes, and the
median is printed; the ratio to (1) is printed beside it with the goal: every boot
succeeds, cold <= 1.3x local. A round takes about 40 s here.

Every qemu, mount, node and temp dir is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The tests' own node runner and guest helpers: the benchmark boots exactly what the tests boot.
from tests.conftest import MountedNode, fetched_bytes, fuse_available, visible  # noqa: E402
from tests.guest.qemu import BootResult, Guest, boot, build_guest, qemu_missing  # noqa: E402

logger = logging.getLogger("bench_vm")
IMAGE = "root.qcow2"
COLD_GOAL = 1.3  # cold boot from a node that held nothing, as a multiple of the local boot


def note(message: str) -> None:
    print(f"[bench_vm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    """Every boot starts with a cold page cache, so local disk is not read from memory either."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)






def write_ticket(node: MountedNode) -> str:
    return node.cli("share", "--write").stdout.strip().splitlines()[-1]


@dataclass
class Row:
    label: str
    result: BootResult | None
    note: str = ""


class Bench:
    """The nodes and boots of one run; ``close`` removes every node and mount it made."""

    def __init__(self, guest: Guest, work: Path, *, cache: str | None, timeout: float) -> None:
        self.guest = guest
        self.work = work
        self.cache = cache
        self.timeout = timeout
        self.nodes: list[MountedNode] = []
        self.rows: list[Row] = []

    def node(self, name: str, join: MountedNode | None = None) -> MountedNode:
        """A ``blixfs mount`` daemon (``--copies 1``), joined to ``join``'s namespace if given."""
        node = MountedNode(home=self.work / f"home-{name}", mnt=self.work / f"mnt-{name}",
                           log_path=self.work / f"{name}.log", extra_args=["--copies", "1"])
        self.nodes.append(node)
        if join is not None:
            node.cli("join", write_ticket(join))
        node.start()
        note(f"node {name} mounted at {node.mnt}")
        return node

    def boot(self, label: str, image: Path, *, snapshot: bool = False) -> BootResult:
        drop_caches()
        note(f"booting {label}: {image}")
        serial = self.work / f"serial-{len(self.rows) + 1}.log"
        result = boot(self.guest, image, serial, timeout=self.timeout, cache=self.cache, snapshot=snapshot)
        status = "ok" if result.ok else f"FAILED ({result.failure})"
        note(f"  {label}: {status} in {result.exit_s:.1f} s")
        if not result.ok:
            note(f"  serial console:\n{result.serial.strip()}")
        self.rows.append(Row(label, result))
        return result

    def close(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.cleanup()
            except BaseException as exc:  # pytest.fail inside the runner is a BaseException; keep going
                note(f"cleanup of {node.mnt} failed: {exc!r}")


LOCAL, WRITER, COLD, WARM, SNAPSHOT = (
    "(1) local disk", "(2) writer's mount (A)", "(3) cold, node that held nothing (C)",
    "(4) warm, same node again (C)", "(5) cold -snapshot, fresh node (D)")


def cold_node(bench: Bench, name: str, a: MountedNode, image: str) -> MountedNode:
    """A node that joins A now and has fetched nothing (checked) once it sees ``image``."""
    node = bench.node(name, join=a)
    size = (a.mnt / image).stat().st_size
    wait_for(lambda: visible(node, image, size), 60, f"{image} on {name}")
    if fetched_bytes(node):
        raise RuntimeError(f"{name} fetched before its cold boot: it is not cold")
    return node


def run(bench: Bench, rounds: int, snapshot_boot: bool) -> None:
    """``rounds`` times: boots (1)-(4) (and (5)), each round on fresh copies and fresh cold nodes.

    Nodes stay up until the end (see below); a cold node of a later round may fetch from an
    earlier round's node, which holds the same chunks, as well as from A.
    """
    guest = bench.guest
    a = bench.node("a")  # running from the start, so that every boot shares the machine with it
    for r in range(1, rounds + 1):
        note(f"round {r}/{rounds}")
        local = bench.work / f"local-{r}" / IMAGE
        local.parent.mkdir()
        shutil.copyfile(guest.image, local)
        bench.boot(LOCAL, local)

        # Fresh copies on A: (2) boots one, (3) and (4) another, pristine until C writes it,
        # (5) a third: every cold boot starts from the pristine image.
        names = {WRITER: f"writer-{r}.qcow2", COLD: f"root-{r}.qcow2", SNAPSHOT: f"pristine-{r}.qcow2"}
        for label, name in names.items():
            if label != SNAPSHOT or snapshot_boot:
                subprocess.run(["cp", str(guest.image), str(a.mnt / name)], check=True)
        bench.boot(WRITER, a.mnt / names[WRITER])

        c = cold_node(bench, f"c{r}", a, names[COLD])
        bench.boot(COLD, c.mnt / names[COLD])
        cold_fetched = fetched_bytes(c)
        bench.rows[-1].note = f"fetched {cold_fetched / (1 << 20):.1f} MiB"
        bench.boot(WARM, c.mnt / names[COLD])
        bench.rows[-1].note = f"fetched {(fetched_bytes(c) - cold_fetched) / (1 << 20):.1f} MiB more"
        # c stays up until the end: every copy has the same chunks, and a later cold node that
        # hears c holds some would first wait out a connect timeout (4 s) to c if it were gone.

        if snapshot_boot:
            d = cold_node(bench, f"d{r}", a, names[SNAPSHOT])
            bench.boot(SNAPSHOT, d.mnt / names[SNAPSHOT], snapshot=True)
            bench.rows[-1].note = f"fetched {fetched_bytes(d) / (1 << 20):.1f} MiB; writes to a local overlay"


def report(rows: list[Row]) -> None:
    """One line per kind of boot: median time of its successful boots, ratio to local's median."""
    labels = list(dict.fromkeys(row.label for row in rows))
    results = {label: [row for row in rows if row.label == label and row.result is not None] for label in labels}

    def median_ok(label: str) -> float | None:
        times = [row.result.exit_s for row in results.get(label, []) if row.result is not None and row.result.ok]
        return statistics.median(times) if times else None

    base = median_ok(LOCAL)
    print()
    print(f"{'boot':<38} {'ok':>5} {'median':>8} {'x local':>8}  each boot (s, to exit; F = failed)   notes")
    for label in labels:
        done = results[label]
        ok = sum(1 for row in done if row.result is not None and row.result.ok)
        med = median_ok(label)
        ratio = f"{med / base:.2f}x" if med is not None and base else "-"
        each = " ".join(f"{row.result.exit_s:.1f}{'' if row.result.ok else 'F'}" for row in done
                        if row.result is not None)
        notes = "; ".join(dict.fromkeys(
            (row.note if row.result.ok else f"{row.result.failure} ({row.note})" if row.note else
             str(row.result.failure)) for row in done if row.result is not None))
        shown = f"{med:.1f} s" if med is not None else "-"
        print(f"{label:<38} {ok:>2}/{len(done):<2} {shown:>8} {ratio:>8}  {each:<36}  {notes}")
    required = [row for row in rows if row.label != SNAPSHOT]
    every_ok = bool(required) and all(row.result is not None and row.result.ok for row in required)
    cold = median_ok(COLD)
    print()
    print(f"goal: every boot succeeds: {'MET' if every_ok else 'NOT MET'}")
    if cold is None or base is None:
        print(f"goal: cold <= {COLD_GOAL}x local: NOT MET (no successful cold boot, or no local one)")
    else:
        met = "MET" if cold / base <= COLD_GOAL else "NOT MET"
        print(f"goal: cold <= {COLD_GOAL}x local: {met} ({cold / base:.2f}x, medians)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="qemu -drive cache= mode for every boot (default: qemu's, "
                        "writeback; e.g. none for O_DIRECT)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a boot may take before it is killed")
    parser.add_argument("--workdir", type=Path, default=None, help="where the nodes, mounts and logs go "
                        "(default: a temp dir, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, serial consoles) at the end")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every boot this many times (fresh copies, fresh cold nodes); medians are printed")
    parser.add_argument("--snapshot-boot", action="store_true",
                        help="also boot cold with qemu -snapshot on a fresh node (reads only through the mount)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    reason = fuse_available() or qemu_missing()
    if reason:
        print(f"bench_vm: {reason}", file=sys.stderr)
        return 2
    note("building the guest (cached after the first time)")
    guest = build_guest()
    note(f"guest: {guest.dir}")
    work = Path(tempfile.mkdtemp(prefix="bench-vm-", dir=args.workdir))
    bench = Bench(guest, work, cache=args.cache, timeout=args.timeout)
    try:
        run(bench, args.rounds, args.snapshot_boot)
    except BaseException as exc:  # incl. Ctrl-C and the runner's pytest.fail: report what ran, then clean up
        note(f"stopped: {exc!r}")
        for node in bench.nodes:
            note(f"log of {node.log_path.name} (tail):\n{node.log()[-3000:]}")
        report(bench.rows)
        raise
    finally:
        bench.close()
        if args.keep:
            note(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(bench.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark booting a real Linux guest under qemu (TCG) from blixfs mounts, side by side.

    .venv/bin/python scripts/bench_vm.py [--cache MODE] [--timeout S] [--workdir DIR] [--keep]
                                         [--snapshot-boot]

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
qemu's start to its exit (the guest powers off right after its marker); the ratio to
(1) is printed beside it with the goal: every boot succeeds, cold <= 1.3x local.

Every qemu, mount, node and temp dir is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
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
from tests.conftest import MountedNode, fuse_available  # noqa: E402
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


def visible(node: MountedNode, name: str, size: int) -> bool:
    try:
        return (node.mnt / name).stat().st_size == size
    except FileNotFoundError:
        return False


def fetched_bytes(node: MountedNode) -> int:
    fetched: int = json.loads(node.cli("status", "--json").stdout)["daemon"]["fetched"]["bytes"]
    return fetched


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


def run(bench: Bench, snapshot_boot: bool) -> None:
    guest = bench.guest
    local = bench.work / "local" / IMAGE
    local.parent.mkdir()
    shutil.copyfile(guest.image, local)
    bench.boot("(1) local disk", local)

    a = bench.node("a")
    # Two copies on A: (2) boots one, (3) and (4) boot the other, pristine until C writes it.
    subprocess.run(["cp", str(guest.image), str(a.mnt / "writer.qcow2")], check=True)
    subprocess.run(["cp", str(guest.image), str(a.mnt / IMAGE)], check=True)
    if snapshot_boot:  # a third, for (5): every cold boot starts from the pristine image
        subprocess.run(["cp", str(guest.image), str(a.mnt / "pristine.qcow2")], check=True)
    bench.boot("(2) writer's mount (A)", a.mnt / "writer.qcow2")

    size = (a.mnt / IMAGE).stat().st_size
    c = bench.node("c", join=a)
    wait_for(lambda: visible(c, IMAGE, size), 60, "the image on c")
    if fetched_bytes(c):
        raise RuntimeError("c fetched before its cold boot: it is not cold")
    bench.boot("(3) cold, node that held nothing (C)", c.mnt / IMAGE)
    cold_fetched = fetched_bytes(c)
    bench.rows[-1].note = f"fetched {cold_fetched / (1 << 20):.1f} MiB"
    bench.boot("(4) warm, same node again (C)", c.mnt / IMAGE)
    bench.rows[-1].note = f"fetched {(fetched_bytes(c) - cold_fetched) / (1 << 20):.1f} MiB more"

    if snapshot_boot:
        d = bench.node("d", join=a)
        wait_for(lambda: visible(d, "pristine.qcow2", size), 60, "the image on d")
        if fetched_bytes(d):
            raise RuntimeError("d fetched before its cold boot: it is not cold")
        bench.boot("(5) cold -snapshot, fresh node (D)", d.mnt / "pristine.qcow2", snapshot=True)
        bench.rows[-1].note = f"fetched {fetched_bytes(d) / (1 << 20):.1f} MiB; writes to a local overlay"


def report(rows: list[Row]) -> None:
    base = rows[0].result.exit_s if rows and rows[0].result and rows[0].result.ok else None
    print()
    print(f"{'boot':<40} {'result':<8} {'to marker':>10} {'to exit':>9} {'x local':>8}  notes")
    for row in rows:
        r = row.result
        if r is None:
            continue
        ratio = f"{r.exit_s / base:.2f}x" if base and r.ok else "-"
        marker = f"{r.marker_s:.1f} s" if r.marker_s is not None else "-"
        result = "ok" if r.ok else "FAIL"
        extra = row.note if r.ok else f"{r.failure} {row.note}".strip()
        print(f"{row.label:<40} {result:<8} {marker:>10} {r.exit_s:>7.1f} s {ratio:>8}  {extra}")
    required = [r for r in rows if "-snapshot" not in r.label]
    every_ok = all(r.result is not None and r.result.ok for r in required) and len(required) == 4
    cold = next((r for r in rows if r.label.startswith("(3)")), None)
    cold_ratio = cold.result.exit_s / base if base and cold and cold.result and cold.result.ok else None
    print()
    print(f"goal: every boot succeeds: {'MET' if every_ok else 'NOT MET'}")
    if cold_ratio is None:
        print(f"goal: cold <= {COLD_GOAL}x local: NOT MET (the cold boot failed)")
    else:
        met = "MET" if cold_ratio <= COLD_GOAL else "NOT MET"
        print(f"goal: cold <= {COLD_GOAL}x local: {met} ({cold_ratio:.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="qemu -drive cache= mode for every boot (default: qemu's, "
                        "writeback; e.g. none for O_DIRECT)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a boot may take before it is killed")
    parser.add_argument("--workdir", type=Path, default=None, help="where the nodes, mounts and logs go "
                        "(default: a temp dir, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, serial consoles) at the end")
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
        run(bench, args.snapshot_boot)
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

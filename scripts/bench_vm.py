#!/usr/bin/env python3
"""Benchmark a VM's disk on blixfs against the local disk, side by side in one run.

    .venv/bin/python scripts/bench_vm.py [--parts boot,io,fsync] [--rounds N] [--cache MODE]
                                         [--timeout S] [--workdir DIR] [--keep] [--snapshot-boot]
                                         [--fsync-sizes 1,20,100] [--fsyncs N] [--growth-fsyncs N]

Needs root (FUSE, drop_caches), qemu-system-x86_64 and qemu-img (scripts/install.sh); a few
minutes. Not a test: the figures depend on the machine and its neighbours. Three parts:

**io** (`qemu-img bench`): a qcow2 of random data (256 MiB), once on the local disk and once
in a mount, page cache dropped before each run; 4 KiB reads, and 4 KiB writes with a flush
every 16 requests, both with ``-t none`` (O_DIRECT, as qemu ``cache=none``: the page cache
would otherwise measure itself). qemu-img bench walks the image with a fixed step; a step of
4 MiB + 4 KiB scatters the requests over every chunk, as random I/O does.

**fsync**: 4 KiB write + fsync at random 4 KiB-aligned places of a sparse 1, 20 and 100 GiB
image (p50 and p99), local disk beside the mount; then the store growth after many such
fsyncs at distinct places of the 100 GiB image, against the bytes of the chunks they
touched (goal <= 1.1x).

**boot**: boots a real Linux guest under qemu (TCG) from blixfs mounts. The guest is
scripts/build_guest.sh's (built once, then cached): it reads and checks 8 MiB of its ext4
root, writes 4 MiB with fsync, and prints a marker on its serial console before powering
off. Every boot writes to its disk (never -snapshot, except the optional extra one). Boots:

(1) local: from a copy of the image in a temp dir on the local disk;
(2) writer: node A copies the image into its mount and boots that copy from it;
(3) cold: node C, which joined A after A wrote the image and holds none of it (checked:
    it fetched nothing before), boots A's other copy from C's mount, fetching on demand;
(4) warm: C boots the same file again, its chunks now on C;
(6) traced: node T, fresh and cold like C, boots the file A booted in (2): A recorded which
    chunks that boot read and published the trace when qemu closed the image (blixfs.traces);
    T waits until the trace has reached it (``blixfs trace``), then boots, and its mount
    fetches the traced chunks in trace order in the background from qemu's open on. The
    guest wrote to the image in (2): the trace, recorded on the version A opened, is
    inherited by the version T opens for every chunk the writes left unchanged.
With --snapshot-boot, (5): a fresh node D boots a third pristine copy cold with qemu
-snapshot (reads over the network, writes to a temp overlay on the local disk).

All nodes run ``--copies 1`` so that no replica moves the image before a cold boot (and
no replica traffic shares the machine with the io and fsync parts). The
page cache is dropped before every boot (local included). Each boot's time runs from
qemu's start to its exit (the guest powers off right after its marker). With --rounds N
every boot is repeated N times, each round on fresh copies and fresh cold nodes, and the
median is printed; the ratio to (1) is printed beside it with the goal: every boot
succeeds, cold <= 1.3x local, traced <= 1.05x local. A round takes about a minute here.

Every qemu, mount, node and temp dir is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
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
TRACED_GOAL = 1.05  # the same with the trace of an earlier boot on another node prefetched


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

    def __init__(self, guest: Guest | None, work: Path, *, cache: str | None, timeout: float) -> None:
        self.guest = guest
        self.work = work
        self.cache = cache
        self.timeout = timeout
        self.nodes: list[MountedNode] = []
        self.rows: list[Row] = []
        self._io_node: MountedNode | None = None

    def io_node(self) -> MountedNode:
        """One node of its own for the io and fsync parts (made on first use)."""
        if self._io_node is None:
            self._io_node = self.node("io")
        return self._io_node

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
        assert self.guest is not None, "boots need the guest (the boot part builds it)"
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


LOCAL, WRITER, COLD, WARM, SNAPSHOT, TRACED = (
    "(1) local disk", "(2) writer's mount (A)", "(3) cold, node that held nothing (C)",
    "(4) warm, same node again (C)", "(5) cold -snapshot, fresh node (D)",
    "(6) cold with A's boot trace (T)")


def cold_node(bench: Bench, name: str, a: MountedNode, image: str) -> MountedNode:
    """A node that joins A now and has fetched nothing (checked) once it sees ``image``."""
    node = bench.node(name, join=a)
    size = (a.mnt / image).stat().st_size
    wait_for(lambda: visible(node, image, size), 60, f"{image} on {name}")
    if fetched_bytes(node):
        raise RuntimeError(f"{name} fetched before its cold boot: it is not cold")
    return node


def trace_of(node: MountedNode, image: str) -> dict[str, object]:
    """``blixfs trace --json``: the merged access trace ``node`` holds for ``image``."""
    reply: dict[str, object] = json.loads(node.cli("trace", "--json", image).stdout)
    return reply


def run(bench: Bench, rounds: int, snapshot_boot: bool) -> None:
    """``rounds`` times: boots (1)-(4) (and (5)), each round on fresh copies and fresh cold nodes.

    Nodes stay up until the end (see below); a cold node of a later round may fetch from an
    earlier round's node, which holds the same chunks, as well as from A.
    """
    guest = bench.guest
    assert guest is not None
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

        t, booted = cold_node(bench, f"t{r}", a, names[WRITER]), names[WRITER]

        def arrived(t: MountedNode = t, booted: str = booted) -> bool:
            return bool(trace_of(t, booted)["chunks"])
        wait_for(arrived, 60, f"A's trace of {booted} on t{r}")
        traced = len(trace_of(t, booted)["chunks"])  # type: ignore[arg-type]
        if fetched_bytes(t) > (1 << 20):  # its manifest, to map the trace onto it: no data
            raise RuntimeError(f"t{r} fetched data before its cold boot: it is not cold")
        bench.boot(TRACED, t.mnt / names[WRITER])
        bench.rows[-1].note = f"trace of {traced} chunks; fetched {fetched_bytes(t) / (1 << 20):.1f} MiB"

        if snapshot_boot:
            d = cold_node(bench, f"d{r}", a, names[SNAPSHOT])
            bench.boot(SNAPSHOT, d.mnt / names[SNAPSHOT], snapshot=True)
            bench.rows[-1].note = f"fetched {fetched_bytes(d) / (1 << 20):.1f} MiB; writes to a local overlay"


# ------------------------------------------------------------------ io: qemu-img bench

IO_IMAGE_BYTES = 256 << 20
IO_STEP = (4 << 20) + 4096  # scatters 4 KiB requests over every 256 KiB chunk of the image
IO_GOAL = 0.4  # qemu-img bench 4 KiB read and write, as a fraction of the local disk's rate


def qemu_img_bench(image: Path, *, write: bool, count: int) -> float:
    """Requests per second of one ``qemu-img bench`` run (4 KiB, O_DIRECT, depth 1)."""
    drop_caches()
    args = ["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-c", str(count), "-d", "1", "-s", "4096",
            "-S", str(IO_STEP)]
    if write:
        args += ["-w", "--flush-interval=16", "--pattern=90"]
    started = time.monotonic()
    out = subprocess.run([*args, str(image)], check=True, capture_output=True, text=True).stdout
    elapsed = time.monotonic() - started
    for line in out.splitlines():  # "Run completed in 1.234 seconds."
        if line.startswith("Run completed in "):
            elapsed = float(line.split()[3])
    return count / elapsed


def io_part(bench: Bench, count: int) -> list[str]:
    """qemu-img bench 4 KiB reads and writes on a qcow2 of random data, local disk and mount."""
    raw = bench.work / "io-random.raw"
    with open(raw, "wb") as f:
        for _ in range(IO_IMAGE_BYTES >> 20):
            f.write(os.urandom(1 << 20))
    local = bench.work / "io-local.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(local)], check=True)
    raw.unlink()
    node = bench.io_node()
    mounted = node.mnt / "io.qcow2"
    subprocess.run(["cp", str(local), str(mounted)], check=True)
    lines = [f"qemu-img bench, 4 KiB requests, -t none, {count} requests, image {IO_IMAGE_BYTES >> 20} MiB "
             f"of random data, step {IO_STEP} bytes", "",
             f"{'':<34} {'local disk':>12} {'blixfs':>12} {'x local':>8}  goal"]
    for label, write in (("4 KiB reads (req/s)", False), ("4 KiB writes, flush/16 (req/s)", True)):
        note(f"qemu-img bench: {label}")
        here = qemu_img_bench(local, write=write, count=count)
        there = qemu_img_bench(mounted, write=write, count=count)
        ratio = there / here
        lines.append(f"{label:<34} {here:>12.0f} {there:>12.0f} {ratio:>7.2f}x  >= {IO_GOAL}x: "
                     f"{'MET' if ratio >= IO_GOAL else 'NOT MET'}")
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(mounted)], capture_output=True, text=True)
    lines.append(f"qemu-img check of the mounted image after the writes: "
                 f"{'clean' if check.returncode == 0 else 'FAILED: ' + check.stdout.strip()}")
    return lines


# ------------------------------------------------------------------ fsync: cost against image size

CHUNK = 256 << 10  # the node's default chunk size: what a 4 KiB write touches in the store
FSYNC_GOAL_LOCAL = 10.0  # 100 GiB image, as a multiple of the local disk's p50
FSYNC_GOAL_SMALL = 1.5  # 100 GiB image, as a multiple of the 1 GiB image's p50 on blixfs
GROWTH_GOAL = 1.1  # store growth over the bytes of the chunks the writes touched


def fsync_latencies(path: Path, size: int, fsyncs: int, offsets: list[int] | None = None) -> list[float]:
    """Seconds of each 4 KiB pwrite + fsync at random aligned places of a sparse ``size`` file."""
    with open(path, "wb") as f:
        f.truncate(size)
    rng = random.Random(size)
    places = offsets if offsets is not None else [rng.randrange(size // 4096) * 4096 for _ in range(fsyncs)]
    fd = os.open(path, os.O_RDWR)
    try:
        times = []
        for offset in places:
            block = os.urandom(4096)
            started = time.perf_counter()
            os.pwrite(fd, block, offset)
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
    return times


def chunk_store_bytes(home: Path) -> int:
    """Bytes of the chunk files in a node's store (its index and temp files not counted)."""
    total = 0
    for sub in (home / "chunks").iterdir():
        if sub.is_dir() and len(sub.name) == 2:
            total += sum(entry.stat().st_size for entry in os.scandir(sub) if entry.is_file())
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fsync_part(bench: Bench, sizes_gib: list[int], fsyncs: int, growth_fsyncs: int) -> list[str]:
    """The fsync table (local disk and mount, per image size) and the store growth."""
    node = bench.io_node()
    local_dir = bench.work / "fsync-local"
    local_dir.mkdir(exist_ok=True)
    lines = [f"4 KiB write + fsync at random places of a sparse image, {fsyncs} each (ms)", "",
             f"{'image':<12} {'local p50':>10} {'local p99':>10} {'blixfs p50':>11} {'blixfs p99':>11} {'x local':>8}"]
    p50s: dict[int, float] = {}
    local_p50s: dict[int, float] = {}
    for gib in sizes_gib:
        note(f"fsync: {gib} GiB image")
        here = fsync_latencies(local_dir / f"{gib}g.img", gib << 30, fsyncs)
        there = fsync_latencies(node.mnt / f"fsync-{gib}g.img", gib << 30, fsyncs)
        (local_dir / f"{gib}g.img").unlink()
        local_p50s[gib], p50s[gib] = pct(here, 0.5), pct(there, 0.5)
        lines.append(f"{str(gib) + ' GiB':<12} {pct(here, 0.5) * 1e3:>10.2f} {pct(here, 0.99) * 1e3:>10.2f} "
                     f"{pct(there, 0.5) * 1e3:>11.2f} {pct(there, 0.99) * 1e3:>11.2f} "
                     f"{p50s[gib] / local_p50s[gib]:>7.1f}x")
    big, small = max(sizes_gib), min(sizes_gib)
    lines.append("")
    vs_local = p50s[big] / local_p50s[big]
    lines.append(f"goal: {big} GiB p50 <= {FSYNC_GOAL_LOCAL:.0f}x local disk: "
                 f"{'MET' if vs_local <= FSYNC_GOAL_LOCAL else 'NOT MET'} ({vs_local:.1f}x)")
    if big != small:
        vs_small = p50s[big] / p50s[small]
        lines.append(f"goal: {big} GiB p50 <= {FSYNC_GOAL_SMALL}x the {small} GiB image's: "
                     f"{'MET' if vs_small <= FSYNC_GOAL_SMALL else 'NOT MET'} ({vs_small:.2f}x)")
    if growth_fsyncs:
        note(f"store growth: {growth_fsyncs} fsyncs at distinct places of a {big} GiB image")
        rng = random.Random(7)
        chunks = rng.sample(range((big << 30) // CHUNK), growth_fsyncs)
        offsets = [c * CHUNK + rng.randrange(CHUNK // 4096) * 4096 for c in chunks]
        before = chunk_store_bytes(node.home)
        path = node.mnt / f"growth-{big}g.img"
        fsync_latencies(path, big << 30, growth_fsyncs, offsets)  # closed at the end: published
        grown = chunk_store_bytes(node.home) - before
        touched = growth_fsyncs * CHUNK
        lines.append(f"store growth after {growth_fsyncs} 4 KiB fsyncs at distinct places of {big} GiB: "
                     f"{grown / (1 << 20):.1f} MiB for {touched / (1 << 20):.1f} MiB of touched chunks = "
                     f"{grown / touched:.2f}x; goal <= {GROWTH_GOAL}x: "
                     f"{'MET' if grown <= GROWTH_GOAL * touched else 'NOT MET'}")
    for gib in sizes_gib:
        (node.mnt / f"fsync-{gib}g.img").unlink()
    return lines


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
    traced = median_ok(TRACED)
    if traced is None or base is None:
        print(f"goal: traced <= {TRACED_GOAL}x local: NOT MET (no successful traced boot, or no local one)")
    else:
        met = "MET" if traced / base <= TRACED_GOAL else "NOT MET"
        print(f"goal: traced <= {TRACED_GOAL}x local: {met} ({traced / base:.2f}x, medians"
              + (f"; without the trace {cold / base:.2f}x" if cold is not None else "") + ")")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="io,fsync,boot",
                        help="which parts to run, comma-separated, from io, fsync, boot (default: all)")
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
    parser.add_argument("--io-requests", type=int, default=10000, help="requests per qemu-img bench run")
    parser.add_argument("--fsync-sizes", default="1,20,100", help="sparse image sizes in GiB for the fsync table")
    parser.add_argument("--fsyncs", type=int, default=200, help="4 KiB write + fsync per image size")
    parser.add_argument("--growth-fsyncs", type=int, default=1000,
                        help="fsyncs at distinct places for the store growth figure (0: skip it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"io", "fsync", "boot"}
    if unknown or not parts:
        parser.error(f"--parts: unknown part(s) {sorted(unknown)}; choose from io, fsync, boot")
    try:
        sizes = sorted({int(x) for x in args.fsync_sizes.split(",")})
    except ValueError:
        parser.error(f"--fsync-sizes: {args.fsync_sizes!r} is not a comma-separated list of GiB")
    if not sizes or sizes[0] < 1 or args.fsyncs < 1 or args.io_requests < 1 or args.growth_fsyncs < 0:
        parser.error("sizes, --fsyncs and --io-requests must be at least 1")

    reason = fuse_available() or qemu_missing()
    if reason:
        print(f"bench_vm: {reason}", file=sys.stderr)
        return 2
    guest = None
    if "boot" in parts:
        note("building the guest (cached after the first time)")
        guest = build_guest()
        note(f"guest: {guest.dir}")
    work = Path(tempfile.mkdtemp(prefix="bench-vm-", dir=args.workdir))
    bench = Bench(guest, work, cache=args.cache, timeout=args.timeout)
    tables: list[list[str]] = []
    try:
        if "io" in parts:
            tables.append(io_part(bench, args.io_requests))
        if "fsync" in parts:
            tables.append(fsync_part(bench, sizes, args.fsyncs, args.growth_fsyncs))
        if "boot" in parts:
            run(bench, args.rounds, args.snapshot_boot)
    except BaseException as exc:  # incl. Ctrl-C and the runner's pytest.fail: report what ran, then clean up
        note(f"stopped: {exc!r}")
        for node in bench.nodes:
            note(f"log of {node.log_path.name} (tail):\n{node.log()[-3000:]}")
        print_tables(tables)
        if bench.rows:
            report(bench.rows)
        raise
    finally:
        bench.close()
        if args.keep:
            note(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(tables)
    if bench.rows:
        report(bench.rows)
    return 0


def print_tables(tables: list[list[str]]) -> None:
    for lines in tables:
        print()
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

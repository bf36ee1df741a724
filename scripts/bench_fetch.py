#!/usr/bin/env python3
"""Benchmark lazy fetching between blixfs nodes on loopback, one run, figures side by side.

    .venv/bin/python scripts/bench_fetch.py [--size-mib 1024] [--random-mib 256] [--random-reads 300]
                                            [--rounds 3] [--chunk-size 256K] [--workdir DIR]
                                            [--profile OUT.txt [--profile-node a|b]]

Needs root (FUSE, drop_caches); about a minute. Not a test: the figures depend on the
machine and its neighbours. It starts four nodes, each a real ``blixfs mount`` process
with its own home and mount (A writes; B, C and D join A with read-only tickets; all with
``--copies 1`` so that A's replicator does not make a reader pull the files beforehand),
and measures:

(a) raw iroh stream throughput between A's and B's own daemon endpoints: B opens 1, 4
    and 8 concurrent streams to A and A sends 256 KiB blocks down them (a bench ALPN the
    daemons serve only in this benchmark: the nodes run ``blixfs.cli`` through this
    script's ``--as-node`` wrapper, which registers it on the daemon's transport, on a
    connection of its own; nothing else differs). The best of the three is "(a)". For
    comparison, (a') is the same download between two fresh processes running the same
    transport code (scripts/bench_iroh.py).
(b) cold sequential read of a 1 GiB file of random data only A holds, on B (1 MiB reads
    after drop_caches) -> MB/s; goal >= 0.8x (a).
(c) the same on C once B holds the file whole too (holdings gossip: C learns B from A), so
    C may fetch from both; bytes received per peer from ``blixfs peers --json``.
(d) warm sequential read of that file on B (its chunks now on B's disk) after drop_caches,
    against a local-disk file of the same size on the same filesystem; the two alternate
    for --rounds rounds and each figure is the median; goal >= 0.5x local disk.
(e) cold 4 KiB O_DIRECT reads, one at a time, at random aligned offsets of another file
    only A holds, on D -> p50/p99 ms; goal p50 <= 3 ms. Every read is in a chunk not read
    before and away from the VFS read-ahead window, so each one fetches a whole chunk
    from A; each read is checked against the written bytes.

Writing the files into A's mount is not timed. Each reading node must not have fetched
anything before its cold read (checked). (b) and (c) are checked with sha256 after the
timed read (untimed, from the page cache the read filled); the warm reads must fetch
nothing. Alongside (a), (b) and (c) it prints the chunks fetched and the CPU seconds used
by each daemon, the reader, kernel threads, interrupts and other processes: the nodes
share this machine's CPUs, and "NOISY" marks a run where other work took a share.

With --profile, py-spy samples B's daemon (or A's) during (b) (raw format, --threads) and
a summary of where its main (trio) thread's time goes per 256 KiB chunk fetched is
printed; sampling slows (b) down.

With --dashboard, every node also serves its dashboard (mount --dashboard 0) and a thread
of this script fetches all four of its /api/ pages on b, c and d every `DASHBOARD_POLL`
seconds from before (a) to the end: what two browser tabs on each page of each reading
node would ask. scripts/bench_dashboard.py runs the benchmark with and without it, side
by side. With --json OUT, the figures are also written to OUT.

Every mount, process and temp dir is removed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import mmap
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(REPO))

MiB = 1 << 20
BLOCK = 256 * 1024  # send/receive size of the raw stream benchmark: one chunk
BENCH_SOURCE = b"blixfs/bench-source/1"  # request: u64 n; the server sends n bytes, then EOF
BENCH_SOCKET = "bench.sock"  # in a node's home: {"peer", "bytes", "streams"} -> {"seconds"}
RAW_STREAMS = (1, 4, 8)
STARTED = time.monotonic()
# One copy is enough: otherwise A's replicator asks a reader to hold (pull) the files in the
# background, and the "cold" reads are not cold.
MOUNT_ARGS = ("--copies", "1")
DASHBOARD_POLL = 1.0
T = TypeVar("T")


def note(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- inside a node: `blixfs mount` with a bench ALPN on the daemon's own endpoint ------------


def run_as_node(argv: list[str]) -> None:
    """Run ``blixfs ARGV`` (a mount), with the daemon's transport also serving `BENCH_SOURCE`
    and, on ``<home>/bench.sock``, downloads from a peer over this same transport."""
    from contextlib import asynccontextmanager

    import trio

    import blixfs.daemon as daemon
    from blixfs import cli
    from blixfs.net.iroh_transport import IrohTransport
    from blixfs.net.iroh_transport import open_iroh_transport as original
    from blixfs.net.transport import NodeAddr, Stream

    home = Path(argv[argv.index("--home") + 1])

    async def source(stream: Stream, peer_id: str) -> None:
        (n,) = struct.unpack(">Q", await stream.receive_exactly(8))
        block = bytes(BLOCK)
        while n > 0:
            await stream.send_all(block if n >= BLOCK else block[:n])
            n -= BLOCK
        await stream.send_eof()

    async def download(transport: IrohTransport, peer: NodeAddr, total: int, streams: int) -> float:
        async def one(n: int) -> None:
            async with await transport.open_stream(peer, BENCH_SOURCE) as stream:
                await stream.send_all(struct.pack(">Q", n))
                await stream.send_eof()
                got = 0
                while chunk := await stream.receive_some(BLOCK):
                    got += len(chunk)
                if got != n:
                    raise RuntimeError(f"received {got} of {n} bytes")

        await one(BLOCK)  # the connection for this ALPN is dialed here, untimed
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(one, total // streams)
        return time.perf_counter() - start

    async def answer(conn: trio.socket.SocketType, transport: IrohTransport) -> None:
        async with trio.SocketStream(conn) as stream:
            raw = b""
            while not raw.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                raw += chunk
            req = json.loads(raw)
            try:
                reply: dict[str, Any] = {"seconds": await download(
                    transport, NodeAddr.parse(req["peer"]), int(req["bytes"]), int(req["streams"]))}
            except Exception as exc:  # reported to the benchmark, which stops
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def serve_socket(transport: IrohTransport, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = home / BENCH_SOCKET
        path.unlink(missing_ok=True)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(str(path))
        listener.listen(4)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(answer, conn, transport)
        finally:
            listener.close()
            path.unlink(missing_ok=True)

    @asynccontextmanager
    async def with_bench(*args: Any, **kwargs: Any) -> AsyncIterator[IrohTransport]:
        async with original(*args, **kwargs) as transport:
            transport.register(BENCH_SOURCE, source)
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_socket, transport)
                try:
                    yield transport
                finally:
                    nursery.cancel_scope.cancel()

    daemon.open_iroh_transport = with_bench  # type: ignore[attr-defined]
    sys.argv = ["blixfs", *argv]
    cli.main()


# --- the nodes, seen from the benchmark ------------------------------------------------------


@dataclass
class BenchNode:
    """One ``blixfs mount`` process (through `run_as_node`) with its own home."""

    name: str
    home: Path
    mnt: Path
    log_path: Path
    mount_args: tuple[str, ...] = MOUNT_ARGS
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None

    def launch(self) -> None:
        """Start the daemon; `wait_ready` waits for its READY=1 (several start at once)."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        name = f"blixfs-bench-{uuid.uuid4().hex}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind("\0" + name)
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C reaches only the benchmark, which then stops the nodes in order.
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--as-node", "--home", str(self.home), "mount", str(self.mnt),
                 *self.mount_args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": "@" + name},
                start_new_session=True,
            )

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def cli(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run([sys.executable, "-m", "blixfs.cli", "--home", str(self.home), *args],
                                capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"blixfs {' '.join(args)} on {self.name} failed: {result.stderr.strip()}")
        return result.stdout

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.cli("status", "--json"))
        return result

    def peers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = json.loads(self.cli("peers", "--json"))
        return result

    def stop(self) -> None:
        """SIGTERM, wait for the clean unmount; then make sure nothing is left mounted."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            from mount.runner import find_mount

            self.proc = None
            if self.notify is not None:
                self.notify.close()
                self.notify = None
            if find_mount(self.mnt) is not None:
                result = subprocess.run([sys.executable, "-m", "blixfs.cli", "unmount", str(self.mnt)],
                                        capture_output=True, cwd=REPO, check=False, timeout=30)
                if result.returncode != 0 or find_mount(self.mnt) is not None:
                    subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, check=False)


def wait_ready(nodes: list[BenchNode], timeout: float = 30) -> None:
    waiting = {n.notify: n for n in nodes if n.notify is not None}
    deadline = time.monotonic() + timeout
    while waiting:
        for n in waiting.values():
            if n.proc is not None and n.proc.poll() is not None:
                raise RuntimeError(f"node {n.name} exited with status {n.proc.returncode}:\n{n.log_tail()}")
        if time.monotonic() > deadline:
            names = ", ".join(n.name for n in waiting.values())
            raise RuntimeError(f"nodes {names} not mounted within {timeout:.0f} s")
        ready, _, _ = select.select(list(waiting), [], [], 0.1)
        for sock in ready:
            if b"READY=1" in sock.recv(4096):
                del waiting[sock]


def ensure_cold(node: BenchNode) -> None:
    """Fail unless ``node`` has fetched nothing yet (e.g. replication pulled the files)."""
    fetched = node.status()["daemon"]["fetched"]
    if fetched["bytes"]:
        raise RuntimeError(f"node {node.name} is not cold: it fetched {fetched['bytes']} bytes before its read "
                           "(replication or another reader?)")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def visible(node: BenchNode, name: str, size: int) -> bool:
    try:
        return (node.mnt / name).stat().st_size == size
    except FileNotFoundError:
        return False


def ask_node(node: BenchNode, request: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    path = node.home / BENCH_SOCKET
    if not path.exists():
        raise RuntimeError(f"node {node.name} has no {path.name}: the --as-node wrapper did not hook the daemon's "
                           "transport (blixfs.daemon.open_iroh_transport moved?)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        with s.makefile("rb") as f:
            reply: dict[str, Any] = json.loads(f.readline())
    if "error" in reply:
        raise RuntimeError(f"bench download on {node.name} failed: {reply['error']}")
    return reply


# --- measurements ---------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_files(targets: list[Path], size: int, rng: random.Random, *, keep: bool = False) -> tuple[str, bytes]:
    """Write the same ``size`` random bytes to every target, fsync'ed; their sha256, and the
    bytes themselves when ``keep``."""
    h = hashlib.sha256()
    kept = bytearray() if keep else None
    files = [open(t, "wb", buffering=0) for t in targets]  # noqa: SIM115 - closed below
    try:
        for _ in range(size // MiB):
            block = rng.randbytes(MiB)
            h.update(block)
            if kept is not None:
                kept += block
            for f in files:
                f.write(block)
        for f in files:
            os.fsync(f.fileno())
    finally:
        for f in files:
            f.close()
    return h.hexdigest(), bytes(kept or b"")


def read_seq(path: Path) -> float:
    """Bytes/s of a sequential read of the whole file in 1 MiB reads (what `cat` does)."""
    buf = bytearray(MiB)
    with open(path, "rb", buffering=0) as f:
        start = time.perf_counter()
        total = 0
        while n := f.readinto(buf):
            total += n
        return total / (time.perf_counter() - start)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def raw_throughput_fresh(mib: int) -> dict[int, float]:
    """(a'): bench_iroh.py's download between this process and a fresh server process (MB/s)."""
    import trio

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_iroh

    from blixfs.net.iroh_transport import open_iroh_transport
    from blixfs.net.transport import NodeAddr

    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "bench_iroh.py"), "--serve"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    out: dict[int, float] = {}
    try:
        assert proc.stdout is not None
        peer = NodeAddr.parse(proc.stdout.readline().decode())

        async def run() -> None:
            async with open_iroh_transport() as client:
                await bench_iroh.fetch(client, peer, BLOCK)  # dial, untimed
                for streams in RAW_STREAMS:
                    out[streams] = await bench_iroh.download(client, peer, mib * MiB, streams)

        trio.run(run)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return out


def cold_offsets(size: int, chunk: int, count: int, window: int, rng: random.Random) -> list[int]:
    """``count`` 4 KiB-aligned offsets, each in a chunk no earlier one touched, and each more than
    ``window`` away from the furthest end read so far (the VFS's test for a sequential reader:
    such a read triggers no read-ahead, so every read fetches its own chunk, cold)."""
    chunks = list(range(size // chunk))
    rng.shuffle(chunks)
    offsets: list[int] = []
    furthest = -1
    while len(offsets) < count and chunks:
        for i, c in enumerate(chunks):
            off = c * chunk + rng.randrange(chunk // 4096) * 4096
            if abs(off - furthest) > window + chunk:
                offsets.append(off)
                furthest = max(furthest, off + 4096)
                del chunks[i]
                break
        else:
            break
    if len(offsets) < count:
        raise RuntimeError(f"only {len(offsets)} cold offsets fit in {size} bytes: use a larger --random-mib")
    return offsets


def random_reads(path: Path, offsets: list[int], expected: bytes) -> list[float]:
    """Latency (s) of one O_DIRECT 4 KiB read at each offset, in turn, each checked."""
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    lat = []
    try:
        for off in offsets:
            start = time.perf_counter()
            n = os.preadv(fd, [buf], off)
            lat.append(time.perf_counter() - start)
            if n != 4096 or buf[:] != expected[off : off + 4096]:
                raise RuntimeError(f"4 KiB read at {off} returned wrong bytes")
    finally:
        os.close(fd)
    return lat


def cpu_seconds(node: BenchNode) -> float:
    """User + system CPU time the node's daemon has used so far (all its threads)."""
    assert node.proc is not None
    fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """CPU seconds the machine has spent so far (all CPUs, /proc/stat) in tasks, and in
    interrupts (irq + softirq: loopback networking, partly)."""
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in
                                                         Path("/proc/stat").read_text().split()[1:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system) / tick, (irq + softirq) / tick


def kernel_threads_cpu() -> float:
    """CPU seconds used so far by kernel threads (writeback, FUSE's and the block layer's workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if fields[1] in ("0", "2"):  # ppid 2: kthreadd's children; kthreadd itself has ppid 0
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_during(nodes: list[BenchNode], fn: Callable[[], T]) -> tuple[T, dict[str, float]]:
    """``fn()`` and the CPU seconds used meanwhile by each node's daemon (all its threads), by
    this process ("reader": the reads, and the FUSE work the kernel does in them), by kernel
    threads ("kthreads": e.g. writeback of the chunk files), by other processes ("others":
    other users of the machine: a large figure means a noisy measurement), and in interrupts."""
    before = {n.name: cpu_seconds(n) for n in nodes}
    own, kernel, (tasks, irq) = sum(os.times()[:2]), kernel_threads_cpu(), machine_cpu()
    result = fn()
    used = {n.name: cpu_seconds(n) - before[n.name] for n in nodes}
    used["reader"] = sum(os.times()[:2]) - own
    used["kthreads"] = kernel_threads_cpu() - kernel
    tasks_after, irq_after = machine_cpu()
    used["others"] = max(0.0, tasks_after - tasks - sum(used.values()))
    used["irq"] = irq_after - irq
    return result, used


def cpu_text(used: dict[str, float], seconds: float) -> str:
    shown = ", ".join(f"{k} {v:.1f}" for k, v in used.items() if v >= 0.05)
    noisy = used["others"] > 0.1 * seconds
    return (f"CPU-s over {seconds:.1f} s ({os.cpu_count()} CPUs): {shown}"
            + ("  <- NOISY: other work took CPU meanwhile" if noisy else ""))


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


# --- py-spy ----------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(:\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for prefix in (str(REPO) + "/", "/usr/lib/python3.11/", "/usr/local/lib/python3.11/"):
        file = file.replace(prefix, "")
    file = re.sub(r".*/site-packages/", "", file)
    return f"{m.group('fn')} ({file})"


def profile_summary(path: Path, node: str, rate: int, seconds: float, chunks: int, top: int = 22) -> str:
    """Self and total samples by function of the main (trio) thread in a py-spy raw profile
    recorded with --threads, as time per chunk; the other threads' totals on one line."""
    self_n: Counter[str] = Counter()
    total_n: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames.pop(0).split(": ", 1)[-1] if frames[0].startswith("thread (") else "?"
        threads[thread] += n
        if thread != "MainThread":
            continue
        names = [_frame_name(f) for f in frames if f]
        if names:
            self_n[names[-1]] += n
        for fn in set(names):
            total_n[fn] += n
    samples = threads["MainThread"]
    if not samples:
        return "py-spy recorded no samples of the main thread"
    per_chunk = 1e6 / rate / chunks  # microseconds of one sample, spread over the chunks fetched
    busy = samples / rate
    others = ", ".join(f"{t} {n / rate:.1f} s" for t, n in threads.most_common() if t != "MainThread")
    lines = [f"py-spy on {node} during (b), {rate} Hz, {seconds:.1f} s, {chunks} chunks fetched: the main (trio) "
             f"thread ran {busy:.1f} s ({busy / seconds:.0%} of the read) = {busy * 1e6 / chunks:.0f} us per 256 KiB "
             f"chunk fetched (other threads, often idle waits py-spy counts: {others or 'none'})"]
    for title, counter in (("self", self_n), ("total", total_n)):
        lines.append(f"\n  main thread, by {title} time{'':42}{'samples':>8} {'share':>6} {'us/chunk':>9}")
        # the frames every sample shares (click, run_mount, trio.run) say nothing
        for fn, n in [(fn, n) for fn, n in counter.most_common() if n < samples][:top]:
            lines.append(f"  {fn[:72]:72} {n:8d} {n / samples:6.1%} {n * per_chunk:9.1f}")
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--as-node":
        run_as_node(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the sequentially read file (default 1024)")
    ap.add_argument("--random-mib", type=int, default=256, help="size of the randomly read file (default 256)")
    ap.add_argument("--random-reads", type=int, default=300, help="cold 4 KiB reads (default 300)")
    ap.add_argument("--raw-mib", type=int, default=256, help="MiB per raw stream run (default 256)")
    ap.add_argument("--rounds", type=int, default=3, help="warm/local rounds; medians (default 3)")
    ap.add_argument("--chunk-size", choices=["64K", "128K", "256K", "512K", "1024K"], default="256K",
                    help="chunk size the nodes write with (mount --chunk-size; default 256K)")
    ap.add_argument("--workdir", type=Path, default=None, help="where homes and files go (default: /var/tmp)")
    ap.add_argument("--profile", type=Path, default=None, metavar="OUT",
                    help="py-spy record B's daemon during (b) into OUT (raw format) and summarise it")
    ap.add_argument("--profile-node", choices=["a", "b"], default="b", help="whose daemon to profile (default b)")
    ap.add_argument("--profile-rate", type=int, default=300, help="py-spy samples per second (default 300)")
    ap.add_argument("--dashboard", action="store_true",
                    help=f"serve the dashboards and poll all their pages on b, c, d every {DASHBOARD_POLL} s")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures to OUT")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark mounts FUSE filesystems and drops the page cache")
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="blixfs-fetch-", dir=args.workdir or "/var/tmp"))
    mount_args = (*MOUNT_ARGS, "--chunk-size", args.chunk_size, *(("--dashboard", "0") if args.dashboard else ()))
    nodes = {n: BenchNode(n, work / f"home-{n}", work / f"mnt-{n}", work / f"{n}.log", mount_args) for n in "abcd"}
    run_with_nodes("bench_fetch", work, nodes, lambda: run(args, work, nodes))


def run_with_nodes(name: str, work: Path, nodes: Mapping[str, BenchNode], body: Callable[[], object]) -> None:
    """Run a benchmark's ``body`` over ``nodes`` (also bench_priority's): Ctrl-C exits 130, a
    RuntimeError exits with its message after each node's last log lines, and whatever
    happens every node is stopped and ``work`` removed."""
    try:
        body()
    except KeyboardInterrupt:
        note("interrupted: cleaning up")
        raise SystemExit(130) from None
    except RuntimeError as exc:
        for n in nodes.values():
            if n.log_path.exists():
                print(f"--- log of node {n.name} (last lines) ---\n{n.log_tail(15)}", file=sys.stderr)
        raise SystemExit(f"{name}: {exc}") from None
    finally:
        with contextlib.ExitStack() as stack:  # every node is stopped even if one stop fails
            for n in nodes.values():
                stack.callback(n.stop)
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, nodes: dict[str, BenchNode]) -> None:
    from blixfs.cli import CHUNK_SIZES
    from blixfs.vfs import READ_AHEAD_BYTES

    chunk_size = CHUNK_SIZES[args.chunk_size]
    a, b, c, d = (nodes[n] for n in "abcd")
    size, rsize = args.size_mib * MiB, args.random_mib * MiB
    rng = random.Random(1)
    load_at_start = Path("/proc/loadavg").read_text().split()[0]  # other work on the machine skews everything
    offsets = cold_offsets(rsize, chunk_size, args.random_reads + 1, READ_AHEAD_BYTES, random.Random(2))
    note(f"workdir {work}; starting node a")
    a.launch()
    wait_ready([a])
    ticket = a.cli("share").strip().splitlines()[-1]  # read-only: the readers only read
    for n in (b, c, d):
        n.cli("join", ticket)
        n.launch()
    wait_ready([b, c, d])
    ids = {n.name: n.status()["node_id"] for n in nodes.values()}
    names = {v: k for k, v in ids.items()}
    a_addr = a.status()["daemon"]["addr"]
    note("nodes a, b, c, d mounted; writing the files into a's mount (untimed)")
    digest, _ = write_files([a.mnt / "seq.img", work / "local.img"], size, rng)
    _, rand_bytes = write_files([a.mnt / "rand.img"], rsize, rng, keep=True)
    def everywhere() -> bool:
        return all(visible(n, name, sz) for n in (b, c, d) for name, sz in (("seq.img", size), ("rand.img", rsize)))

    wait_for(everywhere, 30, "both files on nodes b, c and d")
    polled = [0]
    stop_polling = threading.Event()
    if args.dashboard:
        urls = [n.cli("dashboard").strip() for n in (b, c, d)]

        def poll() -> None:
            while not stop_polling.wait(DASHBOARD_POLL):
                try:
                    for url in urls:
                        for page in ("overview", "transfers", "topology", "images"):
                            with urllib.request.urlopen(f"{url}/api/{page}", timeout=30) as answer:
                                answer.read()
                            polled[0] += 1
                except OSError as exc:  # the nodes are stopping (the run failed): nothing more to poll
                    note(f"dashboard poll failed: {exc}")
                    return

        threading.Thread(target=poll, daemon=True).start()

    # (a) raw streams between the daemons' own endpoints, A -> B; (a') two fresh processes.
    raw: dict[int, float] = {}
    raw_cpu: dict[int, dict[str, float]] = {}  # CPU ms per 256 KiB moved
    raw_used: dict[int, tuple[dict[str, float], float]] = {}
    raw_bytes = args.raw_mib * MiB
    for streams in RAW_STREAMS:
        request = {"peer": a_addr, "bytes": raw_bytes, "streams": streams}
        reply, cpu = cpu_during(list(nodes.values()), functools.partial(ask_node, b, request))
        raw[streams] = raw_bytes // streams * streams / reply["seconds"] / 1e6
        raw_cpu[streams] = {k: cpu[k] * 1e3 / (raw_bytes / BLOCK) for k in "ab"}
        raw_used[streams] = (cpu, reply["seconds"])
        note(f"(a) daemon endpoints a->b, {streams} stream(s): {raw[streams]:.0f} MB/s")
    fresh = raw_throughput_fresh(args.raw_mib)
    note("(a') fresh processes: " + ", ".join(f"{k} stream(s) {v:.0f} MB/s" for k, v in fresh.items()))
    best_streams = max(raw, key=lambda k: raw[k])
    ref = raw[best_streams]

    # (b) cold sequential read on B, from A only.
    ensure_cold(b)
    drop_caches()
    spy: subprocess.Popen[bytes] | None = None
    if args.profile is not None:
        profiled = nodes[args.profile_node]
        assert profiled.proc is not None
        spy = subprocess.Popen([str(REPO / ".venv/bin/py-spy"), "record", "-p", str(profiled.proc.pid), "-o",
                                str(args.profile), "-f", "raw", "-r", str(args.profile_rate),
                                "--threads"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(1.0)  # py-spy attaches
    started = time.perf_counter()
    try:
        cold1, cpu1 = cpu_during(list(nodes.values()), lambda: read_seq(b.mnt / "seq.img") / 1e6)
    finally:
        spy_seconds = time.perf_counter() - started
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
    note(f"(b) cold read on b: {cold1:.0f} MB/s{' (under py-spy)' if spy else ''}; checking sha256")
    if sha256(b.mnt / "seq.img") != digest:
        raise RuntimeError("b read wrong bytes")
    b_fetched = b.status()["daemon"]["fetched"]["bytes"]
    b_chunks = b.status()["daemon"]["fetched"]["chunks"]

    # (c) cold sequential read on C, from A and B (C learns B's holdings through A).
    def c_sees_b() -> bool:
        return any(p["id"] == ids["b"] and p["holds_complete"] >= 1 for p in c.peers())

    wait_for(c_sees_b, 30, "c to hear that b holds the file whole")
    ensure_cold(c)
    drop_caches()
    cold2, cpu2 = cpu_during(list(nodes.values()), lambda: read_seq(c.mnt / "seq.img") / 1e6)
    note(f"(c) cold read on c: {cold2:.0f} MB/s; checking sha256")
    if sha256(c.mnt / "seq.img") != digest:
        raise RuntimeError("c read wrong bytes")
    c_peers = c.peers()
    per_peer = {names.get(p["id"], p["id"][:8]): p["bytes_received"] for p in c_peers if p["bytes_received"]}
    c_failures = sum(p["failures"] for p in c_peers)
    c_fetched = c.status()["daemon"]["fetched"]

    # (d) warm sequential read on B against the local disk, alternating, medians.
    warm: list[float] = []
    local: list[float] = []
    for rnd in range(args.rounds):
        pair = [(warm, b.mnt / "seq.img"), (local, work / "local.img")]
        for into, path in pair if rnd % 2 == 0 else pair[::-1]:
            drop_caches()
            into.append(read_seq(path) / 1e6)
        note(f"(d) round {rnd + 1}: warm on b {warm[-1]:.0f} MB/s, local disk {local[-1]:.0f} MB/s")
    if b.status()["daemon"]["fetched"]["bytes"] != b_fetched:
        raise RuntimeError("b fetched chunks again during the warm reads: they were not local")

    # (e) cold 4 KiB random reads on D, from A.
    ensure_cold(d)
    drop_caches()
    lat = random_reads(d.mnt / "rand.img", offsets, rand_bytes)[1:]  # the first also fetches the manifest
    d_fetched = d.status()["daemon"]["fetched"]["chunks"]
    p50, p99 = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
    note(f"(e) cold 4 KiB reads on d: p50 {p50:.2f} ms, p99 {p99:.2f} ms ({d_fetched} chunks fetched)")

    stop_polling.set()
    mb = "MB/s"
    w, loc = statistics.median(warm), statistics.median(local)
    if args.json is not None:
        args.json.write_text(json.dumps({"raw": ref, "cold_b": cold1, "cold_c": cold2, "warm_b": w, "local": loc,
                                         "random_p50_ms": p50, "random_p99_ms": p99, "dashboard": args.dashboard,
                                         "dashboard_requests": polled[0]}))
    print(f"\nblixfs lazy fetch, 4 nodes on loopback, {os.cpu_count()} CPUs (load average {load_at_start} at the "
          f"start, {Path('/proc/loadavg').read_text().split()[0]} at the end); files of {args.size_mib} MiB "
          f"(seq) and {args.random_mib} MiB (random), chunks {chunk_size // 1024} KiB, workdir {work.parent}")
    print(f"\n{'':50}{'figure':>11}{'ratio':>7}  {'goal':<22}{'met':>4}")
    def row(label: str, value: str, ratio: str = "", goal: str = "", met: bool | None = None) -> None:
        print(f"{label:50}{value:>11}{ratio:>7}  {goal:<22}{'' if met is None else 'yes' if met else 'NO':>4}")

    def more(text: str) -> None:
        print(f"{'':52}{text}")

    for streams in RAW_STREAMS:
        best = streams == best_streams
        row(f"(a) raw iroh, daemon endpoints a->b, {streams} stream(s)", f"{raw[streams]:.0f} {mb}",
            "1.00" if best else "", "= (a), the best" if best else "")
    more("CPU ms per 256 KiB moved, best run: " + ", ".join(f"{k} {v:.2f}" for k, v in raw_cpu[best_streams].items()))
    more(cpu_text(*raw_used[best_streams]))
    for streams, v in fresh.items():
        row(f"(a') raw iroh, 2 fresh processes, {streams} stream(s)", f"{v:.0f} {mb}", f"{v / ref:.2f}",
            "same transport code")
    secs1, secs2 = size / cold1 / 1e6, size / cold2 / 1e6
    row("(b) cold seq read on b, from a", f"{cold1:.0f} {mb}", f"{cold1 / ref:.2f}", ">= 0.8x (a)", cold1 >= 0.8 * ref)
    more(f"b fetched {b_fetched / MiB:.0f} MiB in {b_chunks} chunks to read {size // MiB} MiB "
         f"({b_chunks - size // chunk_size:+d} chunks); CPU ms per chunk fetched: "
         f"a {cpu1['a'] * 1e3 / b_chunks:.2f}, b {cpu1['b'] * 1e3 / b_chunks:.2f}")
    spied = f"; {args.profile_node} sampled by py-spy meanwhile (slower)" if args.profile else ""
    more(cpu_text(cpu1, secs1) + spied)
    row("(c) cold seq read on c, from a and b", f"{cold2:.0f} {mb}", f"{cold2 / ref:.2f}",
        f"(vs (b): {cold2 / cold1:.2f}x)")
    shares = ", ".join(f"{k} {per_peer.get(k, 0) / MiB:.0f} MiB" for k in sorted({"a", "b", *per_peer}))
    more(f"received per peer: {shares}; c fetched {c_fetched['chunks']} chunks, {c_failures} failed attempts")
    more(cpu_text(cpu2, secs2))
    row("(d) warm seq read on b", f"{w:.0f} {mb}", f"{w / loc:.2f}", ">= 0.5x local disk", w >= 0.5 * loc)
    row("    local disk, same filesystem", f"{loc:.0f} {mb}", "", f"(medians of {args.rounds} rounds)")
    row(f"(e) cold 4 KiB O_DIRECT read on d, p50 ({len(lat)})", f"{p50:.2f} ms", "", "p50 <= 3 ms", p50 <= 3)
    row("    p99", f"{p99:.2f} ms")
    print("\n(a) is measured on the running daemons' own iroh endpoints (a bench ALPN registered by this "
          "script's node wrapper, a connection of its own); (a') with the same transport code in fresh "
          "processes. sha256 of (b) and (c) verified; warm reads fetched nothing.")
    if args.dashboard:
        print(f"Dashboards served on every node; {polled[0]} /api/ pages fetched from b, c and d during the run.")
    if args.profile is not None:
        print()
        print(profile_summary(args.profile, args.profile_node, args.profile_rate, spy_seconds, b_chunks))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark blixfs's iroh transport between two processes on loopback.

    .venv/bin/python scripts/bench_iroh.py [--mib 256] [--requests 2000]

Starts a server process (this script with --serve), then measures from the client:
upload and download throughput over 1, 2 and 4 concurrent streams on one connection
(256 KiB writes and reads), and request/response latency on the open connection
(16-byte request, 64 KiB or 1 byte response; either a new stream per request, or many
requests in turn on one stream), each with the uniffi `bytes` lowering fix on and off
(on both sides), and prints them side by side.
Without the fix every run moves 10 MB/s, so those runs use less data (--slow-mib).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blixfs.net import iroh_transport
from blixfs.net.iroh_transport import open_iroh_transport
from blixfs.net.transport import NodeAddr, Stream, Transport

SINK = b"blixfs/bench-sink/1"  # client uploads; server answers the byte count
SOURCE = b"blixfs/bench-source/1"  # request: u64 n; server sends n bytes
CONTROL = b"blixfs/bench-control/1"  # request: b"1"/b"0" switches the server's fix
REPEAT = b"blixfs/bench-repeat/1"  # like SOURCE, many requests on one stream
BLOCK = 256 * 1024
MiB = 1 << 20


# --- server --------------------------------------------------------------------------------


async def sink(stream: Stream, peer_id: str) -> None:
    total = 0
    while chunk := await stream.receive_some(BLOCK):
        total += len(chunk)
    await stream.send_all(struct.pack(">Q", total))


async def source(stream: Stream, peer_id: str) -> None:
    (n,) = struct.unpack(">Q", await stream.receive_exactly(8))
    await stream.receive_exactly(8)  # padding: requests are 16 bytes
    block = bytes(min(n, BLOCK))
    while n > 0:
        await stream.send_all(block if n >= len(block) else block[:n])
        n -= len(block)
    await stream.send_eof()


async def repeat(stream: Stream, peer_id: str) -> None:
    blocks: dict[int, bytes] = {}
    while True:
        (n,) = struct.unpack(">Q", (await stream.receive_exactly(16))[:8])
        if n == 0:
            return
        await stream.send_all(blocks.setdefault(n, bytes(n)))


async def control(stream: Stream, peer_id: str) -> None:
    iroh_transport.set_lowering_fix(await stream.receive_exactly(1) == b"1")
    await stream.send_all(b"k")


async def serve() -> None:
    handlers = {SINK: sink, SOURCE: source, REPEAT: repeat, CONTROL: control}
    async with open_iroh_transport(handlers=handlers) as transport:
        print(transport.addr(), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some():
            pass


# --- client --------------------------------------------------------------------------------


async def upload(client: Transport, peer: NodeAddr, total: int, streams: int) -> float:
    per_stream = total // streams
    block = bytes(BLOCK)

    async def one() -> None:
        async with await client.open_stream(peer, SINK) as stream:
            left = per_stream
            while left > 0:
                await stream.send_all(block if left >= BLOCK else block[:left])
                left -= BLOCK
            await stream.send_eof()
            (got,) = struct.unpack(">Q", await stream.receive_exactly(8))
            assert got == per_stream, (got, per_stream)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)
    return per_stream * streams / (time.perf_counter() - start) / 1e6


async def fetch(client: Transport, peer: NodeAddr, n: int) -> int:
    async with await client.open_stream(peer, SOURCE) as stream:
        await stream.send_all(struct.pack(">QQ", n, 0))
        await stream.send_eof()
        got = 0
        while chunk := await stream.receive_some(BLOCK):
            got += len(chunk)
        return got


async def download(client: Transport, peer: NodeAddr, total: int, streams: int) -> float:
    per_stream = total // streams

    async def one() -> None:
        assert await fetch(client, peer, per_stream) == per_stream

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)
    return per_stream * streams / (time.perf_counter() - start) / 1e6


async def latency(client: Transport, peer: NodeAddr, size: int, count: int) -> tuple[float, float]:
    for _ in range(min(20, count)):  # warm-up
        await fetch(client, peer, size)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        assert await fetch(client, peer, size) == size
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


async def latency_one_stream(
    client: Transport, peer: NodeAddr, size: int, count: int
) -> tuple[float, float]:
    samples = []
    async with await client.open_stream(peer, REPEAT) as stream:
        for i in range(count + min(20, count)):
            start = time.perf_counter()
            await stream.send_all(struct.pack(">QQ", size, 0))
            assert len(await stream.receive_exactly(size)) == size
            if i >= min(20, count):  # after warm-up
                samples.append((time.perf_counter() - start) * 1000)
        await stream.send_all(bytes(16))
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


async def set_fix(client: Transport, peer: NodeAddr, enabled: bool) -> None:
    iroh_transport.set_lowering_fix(enabled)
    async with await client.open_stream(peer, CONTROL) as stream:
        await stream.send_all(b"1" if enabled else b"0")
        assert await stream.receive_exactly(1) == b"k"


Direction = Callable[[Transport, NodeAddr, int, int], Awaitable[float]]
SCRIPT = os.path.abspath(__file__)


async def client_main(args: argparse.Namespace) -> None:
    proc = subprocess.Popen(  # noqa: ASYNC220 - once, before any measurement
        [sys.executable, SCRIPT, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        peer = NodeAddr.parse(line.decode())
        rows: dict[str, dict[bool, float]] = {}
        async with open_iroh_transport() as client:
            for fix in (True, False):
                await set_fix(client, peer, fix)
                total = (args.mib if fix else args.slow_mib) * MiB
                count = args.requests if fix else args.slow_requests
                runs: list[tuple[str, Direction, int]] = [
                    (f"{fn.__name__}, {n} stream(s) [MB/s]", fn, n)
                    for fn in (upload, download)
                    for n in (1, 2, 4)
                ]
                for name, fn, streams in runs:
                    rows.setdefault(name, {})[fix] = await fn(client, peer, total, streams)
                    note = f"{'fix' if fix else 'no fix'}: {name}: {rows[name][fix]:.1f}"
                    print("  " + note, file=sys.stderr)
                for size, label in ((64 * 1024, "64 KiB"), (1, "1 B")):
                    for how, measure in (
                        ("new stream", latency),
                        ("same stream", latency_one_stream),
                    ):
                        p50, p99 = await measure(client, peer, size, count)
                        name = f"{label} req/resp, {how}"
                        rows.setdefault(f"{name}, p50 [ms]", {})[fix] = p50
                        rows.setdefault(f"{name}, p99 [ms]", {})[fix] = p99
                        note = f"{'fix' if fix else 'no fix'}: {name}: p50 {p50:.3f} p99 {p99:.3f}"
                        print("  " + note, file=sys.stderr)
            await set_fix(client, peer, True)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)

    print()
    print(
        f"iroh {importlib.metadata.version('iroh')} transport, two processes on loopback, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"fix on: {args.mib} MiB per throughput run, {args.requests} requests per latency run")
    print(f"fix off: {args.slow_mib} MiB, {args.slow_requests} requests")
    print(f"{'':40} {'fix on':>10} {'fix off':>10} {'on/off':>8}")
    for name, values in rows.items():
        on, off = values[True], values[False]
        better = on / off if "MB/s" in name else off / on
        print(f"{name:40} {on:10.3f} {off:10.3f} {better:7.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mib", type=int, default=256, help="MiB per throughput run, fix on")
    parser.add_argument("--slow-mib", type=int, default=16, help="MiB per run, fix off")
    parser.add_argument("--requests", type=int, default=2000, help="requests per latency run")
    parser.add_argument("--slow-requests", type=int, default=200, help="requests, fix off")
    args = parser.parse_args()
    trio.run(serve if args.serve else (lambda: client_main(args)))


if __name__ == "__main__":
    main()

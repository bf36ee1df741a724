"""Resident memory of a node flooded with HOLDINGS by one hostile member (issue item 6).

In one process over the in-memory network: a victim (a replica with its sync service and
holdings table), a hostile peer that sends HOLDINGS frames of ~1 MiB, each for a new
invented node id, as fast as it can for ``--seconds``, and a slow peer that opened a
session and never reads (so every relayed frame is queued for it). Prints the victim's
RSS (VmRSS) before, at peak and at the end, and what its tables hold. Stops early if
RSS passes ``--cap-mib`` (the code before the fix grows without bound).

    .venv/bin/python scripts/flood_rss.py --seconds 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import trio

from blixfs.crypto import generate_secret
from blixfs.frames import Hello, HoldingsFrame, encode, read_frame
from blixfs.holdings import Holdings
from blixfs.namespace import MemoryNamespaceStore
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import NodeAddr, TransportError
from blixfs.replica import NamespaceKeys, Replica
from blixfs.sync import ALPN, SyncService


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main(seconds: float, cap_mib: float) -> None:
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    secret = generate_secret()
    replica = Replica(MemoryNamespaceStore(), keys, secret)
    ids = [os.urandom(32) for _ in range(31_000)]  # 992,000 bytes of manifest ids per frame
    before = rss_mib()
    peak = before
    sent = 0
    async with net.open_transport(replica.author.hex()) as vt, net.open_transport() as hostile, \
            net.open_transport() as slow, trio.open_nursery() as nursery:
        holdings = Holdings(vt.node_id)
        sync = SyncService(replica, vt, holdings)
        vt.register(ALPN, sync.handle)
        addr = NodeAddr(vt.node_id)
        quiet = await slow.open_stream(addr, ALPN)
        await quiet.send_all(encode(Hello(keys.id, {})))  # then never reads
        stream = await hostile.open_stream(addr, ALPN)
        await stream.send_all(encode(Hello(keys.id, {})))

        async def drain() -> None:
            with contextlib.suppress(TransportError, ValueError):
                while await read_frame(stream) is not None:
                    pass

        nursery.start_soon(drain)
        started = time.monotonic()
        deadline = started + seconds
        try:
            while time.monotonic() < deadline and peak < cap_mib:
                frame = HoldingsFrame(os.urandom(32), time.time_ns(), ids, [], b"", 0)
                await stream.send_all(encode(frame))
                sent += 1
                peak = max(peak, rss_mib())
        except TransportError as exc:
            print(f"the victim closed the hostile session: {exc}")
        elapsed = time.monotonic() - started
        await trio.sleep(1)
        peak = max(peak, rss_mib())
        queued = getattr(sync, "queued_bytes", None)
        print(f"frames sent: {sent} ({sent * 992_000 / 2**20:.0f} MiB) in {elapsed:.1f} s")
        print(f"victim RSS: before {before:.0f} MiB, peak {peak:.0f} MiB, end {rss_mib():.0f} MiB"
              f"{' (stopped at the cap)' if peak >= cap_mib else ''}")
        print(f"holdings records: {len(holdings.nodes)}; sessions: {len(sync.sessions())}"
              + (f"; queued bytes: {queued()}" if queued is not None else ""))
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cap-mib", type=float, default=4096.0)
    args = parser.parse_args()
    trio.run(main, args.seconds, args.cap_mib)

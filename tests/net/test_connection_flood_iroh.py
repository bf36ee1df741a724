"""The bound on incoming connections over real iroh: a few hundred fresh endpoints (one
process) connect to a node in another process and hold a stream each. The node keeps at
most its bound, refuses the rest with CODE_TOO_MANY_CONNECTIONS, keeps serving a kept
peer, and its memory stays bounded (tests/hostile/test_connection_flood.py does the same
with whole nodes over the in-memory network)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from blixfs.net.iroh_transport import node_id_from_secret_key, open_iroh_transport
from blixfs.net.transport import CODE_TOO_MANY_CONNECTIONS, NodeAddr, TransportError

ECHO = b"blixfs/test-echo/1"
FLOOD = 300
BOUND = 100

NODE_SCRIPT = r"""
import sys, trio
from blixfs.net.iroh_transport import open_iroh_transport

async def echo(stream, peer_id):
    while data := await stream.receive_some():
        await stream.send_all(data)

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

async def main():
    async with open_iroh_transport(handlers={ALPN: echo}) as t:
        t.max_incoming = int(sys.argv[1])
        t.kept_peers = lambda: {sys.argv[2]}
        print(t.addr(), flush=True)
        stdin = trio.lowlevel.FdStream(0)
        while await stdin.receive_some():  # each line: report
            print(rss_kib(), t.incoming_connections(), t.stats().live_connections, flush=True)

trio.run(main)
""".replace("ALPN", repr(ECHO))


@asynccontextmanager
async def node_process(bound: int, kept: str) -> AsyncIterator[tuple[NodeAddr, trio.Process]]:
    proc = await trio.lowlevel.open_process([sys.executable, "-c", NODE_SCRIPT, str(bound), kept],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield NodeAddr.parse((await _line(proc)).decode()), proc
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                if proc.stdin is not None:
                    await proc.stdin.aclose()
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _line(proc: trio.Process) -> bytes:
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(60):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            assert chunk, "node process died"
            line += chunk
    return line.strip()


async def _report(proc: trio.Process) -> tuple[int, int, int]:
    assert proc.stdin is not None
    await proc.stdin.send_all(b"\n")
    rss, incoming, live = (int(x) for x in (await _line(proc)).split())
    return rss, incoming, live


async def test_a_few_hundred_iroh_connections_are_bounded_and_a_kept_peer_still_gets_in() -> None:
    kept_key = os.urandom(32)
    async with node_process(BOUND, node_id_from_secret_key(kept_key)) as (addr, proc):
        rss_before, _, _ = await _report(proc)
        held = refused = 0
        done = trio.Event()

        async def fresh() -> None:
            nonlocal held, refused
            async with open_iroh_transport(connect_timeout=30) as t:
                try:
                    with trio.fail_after(60):
                        stream = await t.open_stream(addr, ECHO)
                        await stream.send_all(b"x")
                        assert await stream.receive_exactly(1) == b"x"
                    held += 1
                except TransportError as exc:
                    assert exc.code in (CODE_TOO_MANY_CONNECTIONS, None), exc
                    refused += 1
                    await done.wait()
                    return
                try:
                    await done.wait()
                finally:
                    await stream.reset()

        async with trio.open_nursery() as nursery:
            for _ in range(FLOOD):
                nursery.start_soon(fresh)
            with trio.fail_after(120):
                while held + refused < FLOOD:  # noqa: ASYNC110 - counters of many tasks
                    await trio.sleep(0.05)
            rss_flood, incoming, live = await _report(proc)
            # A kept peer (a member this node syncs with) still gets in and is served.
            async with open_iroh_transport(kept_key) as kept:
                with trio.fail_after(30):
                    async with await kept.open_stream(addr, ECHO) as stream:
                        await stream.send_all(b"member")
                        await stream.send_eof()
                        assert await stream.receive_to_eof(100) == b"member"
            done.set()
        print(f"\niroh connection flood: {FLOOD} fresh endpoints, {held} held a stream, {refused} refused; "
              f"node kept {incoming} incoming ({live} live) connections (bound {BOUND}); node RSS "
              f"{rss_before / 1024:.0f} MiB before, {rss_flood / 1024:.0f} MiB during")
        assert incoming <= BOUND and live <= BOUND
        assert held <= BOUND and refused >= FLOOD - BOUND

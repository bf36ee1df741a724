"""A flood of connections from fresh endpoint keys (issue item 10: keys are free, so one
member can connect as thousands of nodes). The node keeps a bounded number of incoming
connections, keeps those of the members it syncs with, and goes on serving them. In
process, over the in-memory network; tests/net has the iroh side of the bound."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
from prometheus_client.core import REGISTRY

from blixfs.chunkproto import ALPN as CHUNKS_ALPN
from blixfs.frames import Hello, encode
from blixfs.net.memory import MemoryNetwork, MemoryTransport
from blixfs.net.transport import CONNECTIONS_IN, NodeAddr, TransportError
from blixfs.sync import ALPN as SYNC_ALPN
from tests.cluster import InNode, cluster, wait_until

FLOOD = 2000


def rss_mib() -> float:
    """This process's resident set, in MiB (from /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _written(node: InNode, path: str) -> bool:
    entry = node.entry(path)
    return entry is not None and entry.size == 200_000


async def test_a_flood_of_fresh_keys_neither_stops_the_node_nor_starves_its_members(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """2,000 fresh endpoints each connect to the victim and open a stream (half a sync
    session that never says HELLO, half a chunk stream that never sends a request), and
    keep their connections. Meanwhile the victim and an honest member keep syncing and
    fetching from each other. The victim keeps at most `CONNECTIONS_IN` incoming
    connections, refuses or drops the rest with a few log lines, and the honest member's
    connection is never the one dropped."""
    caplog.set_level(logging.WARNING, logger="blixfs.net.transport")
    async with cluster(tmp_path, ["victim", "honest"]) as nodes:
        victim, honest = nodes["victim"], nodes["honest"]
        transport = victim.runtime.transport
        assert isinstance(transport, MemoryTransport)
        net: MemoryNetwork = transport._network
        rss_before = rss_mib()
        labels = {"protocol": "transport", "reason": "connection_limit"}
        counted_before = REGISTRY.get_sample_value("blixfs_refused_total", labels) or 0.0
        opened = refused = 0
        done = trio.Event()

        async def attacker(i: int) -> None:
            nonlocal opened, refused
            async with net.open_transport() as hostile:
                try:
                    stream = await hostile.open_stream(NodeAddr(victim.id), SYNC_ALPN if i % 2 else CHUNKS_ALPN)
                    # A HELLO header with no body: the session waits for the rest (HELLO_TIMEOUT).
                    await stream.send_all(encode(Hello(os.urandom(32), {}))[:3])
                    opened += 1
                except TransportError:
                    refused += 1
                await done.wait()

        async with trio.open_nursery() as flood:
            for i in range(FLOOD):
                flood.start_soon(attacker, i)
            # The honest pair keeps working during the flood, both ways.
            for round_ in range(5):
                await victim.write(f"v{round_}", 0, os.urandom(200_000), create=True)
                await honest.write(f"h{round_}", 0, os.urandom(200_000), create=True)
                await wait_until(lambda r=round_: _written(honest, f"v{r}") and _written(victim, f"h{r}"),  # type: ignore[misc]
                                 f"round {round_} synced")
                assert len(await honest.read(f"v{round_}")) == 200_000
                assert len(await victim.read(f"h{round_}")) == 200_000
                assert transport.incoming_connections() <= CONNECTIONS_IN
            await wait_until(lambda: opened + refused == FLOOD, "every attacker connected or refused")
            rss_flood = rss_mib()
            incoming = transport.incoming_connections()
            live = transport.stats().live_connections
            closed = transport._conns_refused
            synced = [s for s in honest.runtime.sync.sessions() if s.peer == victim.id and s.synced.is_set()]
            done.set()
        rss_after = rss_mib()
        print(f"\nconnection flood: {FLOOD} fresh keys, {opened} got a stream, {refused} refused at once, "
              f"{closed} refused or dropped by the victim; victim kept {incoming} incoming ({live} live) "
              f"connections; RSS {rss_before:.0f} MiB before, {rss_flood:.0f} during "
              f"(victim, honest peer and all {FLOOD} attackers in this process), {rss_after:.0f} after")
        assert incoming <= CONNECTIONS_IN and live <= CONNECTIONS_IN + 1
        assert synced, "the honest member's session survived the flood"
        # Every connection past the bound was refused, or pushed out an idle one of the flood.
        assert closed >= FLOOD - CONNECTIONS_IN
        assert (REGISTRY.get_sample_value("blixfs_refused_total", labels) or 0.0) - counted_before >= closed
        lines = [r for r in caplog.records if "incoming connection" in r.getMessage()]
        assert 0 < len(lines) <= FLOOD // 100 + 1, f"{len(lines)} log lines for the flood"
        # And the pair still syncs once the flood is over.
        await honest.write("after", 0, b"after", create=True)
        await wait_until(lambda: victim.entry("after") is not None, "sync after the flood")

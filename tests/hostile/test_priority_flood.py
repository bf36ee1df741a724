"""A peer's transfer class is its word: one that marks every request DEMAND gets a fair
share, never the whole server; a bad ``limits`` control request changes nothing and gets
a clear error. In process, over the in-memory network."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import trio

from blixfs.chunkproto import ALPN, ChunkClient, ChunkServer
from blixfs.chunkstore import MemoryChunkStore
from blixfs.daemon import serve_control
from blixfs.hashing import ChunkId
from blixfs.limits import Limits
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import STREAMS_PER_PEER
from blixfs.priority import Priority
from blixfs.scheduling import FairQueue

LOAD_SECONDS = 0.05


class SlowStore(MemoryChunkStore):
    async def load(self, cid: ChunkId) -> bytes | None:
        await trio.sleep(LOAD_SECONDS)
        return await super().load(cid)


async def test_a_peer_flooding_demand_requests_does_not_starve_another_peers_demand_reads(
        autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork()
    store = SlowStore()
    chunks = [store.put(os.urandom(4096)) for _ in range(16)]
    server = ChunkServer(store)
    server.demand_queue = FairQueue(2, "serve")  # few slots: the flood fills them and queues
    async with net.open_transport(handlers={ALPN: server.handle}) as srv, net.open_transport() as flooder, \
            net.open_transport() as victim:
        addr = srv.addr()
        flood = ChunkClient(flooder)
        stop = trio.Event()
        flooded = 0

        async def flood_one(i: int) -> None:
            nonlocal flooded
            while not stop.is_set():
                await flood.fetch(addr, chunks[i % len(chunks)], Priority.DEMAND)
                flooded += 1

        latencies: list[float] = []
        async with trio.open_nursery() as nursery:
            for i in range(STREAMS_PER_PEER - 4):  # as many as the transport lets one peer have
                nursery.start_soon(flood_one, i)
            await trio.sleep(1)
            assert server.demand_queue.waiting() >= STREAMS_PER_PEER - 8  # the flood is queued
            reader = ChunkClient(victim)
            for cid in chunks:
                start = trio.current_time()
                assert await reader.fetch(addr, cid, Priority.DEMAND) is not None
                latencies.append(trio.current_time() - start)
            stop.set()
        # In turn with the flooder: at most a slot's current load plus its own (2 loads), not
        # the 60-deep queue of the flood (60 x 0.05 / 2 = 1.5 s).
        assert max(latencies) <= 3 * LOAD_SECONDS + 0.01, latencies
        assert flooded > 0


async def _ask(path: str, request: dict[str, object] | bytes) -> dict[str, object]:
    raw = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
    stream = await trio.open_unix_socket(path)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_all(raw)
            await stream.send_eof()
        data = b""
        with trio.fail_after(30):
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                assert chunk, f"no reply to {raw[:60]!r}"
                data += chunk
    reply: dict[str, object] = json.loads(data.splitlines()[-1])
    return reply


async def test_bad_limits_requests_get_a_clear_error_and_change_nothing() -> None:
    limits = Limits.create(20_000_000, None)
    runtime = SimpleNamespace(transport=SimpleNamespace(addr=lambda: "node@127.0.0.1:1"), vfs=None, limits=limits,
                              status=dict, peers_report=list, replicator=None)
    with tempfile.TemporaryDirectory(dir="/tmp") as home:
        sock = os.path.join(home, "control.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, Path(sock), runtime)
            bad: list[tuple[dict[str, object] | bytes, str]] = [
                ({"op": "limits", "max_upload": "fast"}, "max-upload: 'fast' is not a rate"),
                ({"op": "limits", "max_upload": "5M", "max_background": "-1"}, "max-background"),
                ({"op": "limits", "max_upload": 12}, "between"),
                ({"op": "limits", "max_upload": True}, "max_upload must be str or int"),
                ({"op": "limits", "max_upload": 1.5}, "max_upload must be str or int"),
                ({"op": "limits", "max_upload": [1]}, "max_upload must be str or int"),
                ({"op": "limits", "max_upload": "9" * 400}, "rate"),
                ({"op": "pull", "path": "x", "priority": "urgent"}, "priority must be one of"),
                ({"op": "pull", "path": "x", "priority": 0}, "priority must be str"),
            ]
            for request, wanted in bad:
                reply = await _ask(sock, request)
                assert reply["ok"] is False and wanted in str(reply["error"]), (request, reply)
                assert limits.report() == {"max_upload": 20_000_000, "max_background": None}
            assert await _ask(sock, {"op": "limits"}) == {"ok": True, "max_upload": 20_000_000,
                                                          "max_background": None}
            changed = await _ask(sock, {"op": "limits", "max_upload": "off", "max_background": "40M"})
            assert changed == {"ok": True, "max_upload": None, "max_background": 40_000_000}
            assert limits.upload.rate is None and limits.background.rate == 40_000_000
            nursery.cancel_scope.cancel()

"""The node daemon's network services and its control socket.

`run_services` is started with ``nursery.start`` by the mount (mount/runner.py): it
binds the iroh endpoint, serves the sync protocol, keeps a session with every known
peer, and answers the CLI on ``<home>/control.sock``. Everything it starts lives in
its own nursery and ends when that is cancelled.

Control protocol: one JSON object per line each way, one request per connection::

    {"op": "addr"}               -> {"ok": true, "addr": "<node id>@ip:port"}
    {"op": "status"}             -> {"ok": true, "addr": ..., "sessions": [...]}
    {"op": "join", "ticket": T}  -> {"ok": true, "message": "..."} | {"ok": false, "error": "..."}

Only the socket file's permissions (0600, in the home) guard it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from blixfs.chunkproto import ALPN as CHUNKS_ALPN
from blixfs.chunkproto import ChunkServer
from blixfs.fetcher import Fetcher, Holdings, PeerBook
from blixfs.hashing import HOLE, ChunkId
from blixfs.manifest import Manifest, ManifestError
from blixfs.net.iroh_transport import IrohTransport, open_iroh_transport
from blixfs.net.transport import TransportError
from blixfs.node import JoinError, Node
from blixfs.sync import ALPN as SYNC_ALPN
from blixfs.sync import SyncService
from blixfs.ticket import Ticket, TicketError
from blixfs.vfs import Vfs

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 10.0
MAX_REQUEST = 64 * 1024


@dataclass
class Runtime:
    """What the running daemon offers the mount and the control socket."""

    node: Node
    transport: IrohTransport
    sync: SyncService
    nursery: trio.Nursery
    peers: PeerBook
    holdings: Holdings
    fetcher: Fetcher
    server: ChunkServer

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "addr": str(self.transport.addr()),
            "sessions": [{"peer": s.peer, "synced": s.synced.is_set(), "seconds": round(now - s.started, 1),
                          "received": s.entries_received, "sent": s.entries_sent, "refused": s.refused}
                         for s in self.sync.sessions()],
        }

    def join(self, ticket: Ticket) -> str:
        if ticket.keys.id != self.node.replica.keys.id:
            raise JoinError(f"the running daemon serves namespace {self.node.replica.keys.id.hex()[:16]}; "
                            "stop it (Ctrl-C or SIGTERM), run blixfs join again, then mount")
        message = self.node.join(ticket)
        self.peers.learn(ticket.peer)
        self.nursery.start_soon(self.sync.maintain, ticket.peer)
        return message


async def _load_own_holdings(node: Node, holdings: Holdings) -> None:
    """Which files' content this node holds whole, from its store (in a worker thread: it
    stats every chunk file of every file)."""
    files = [e for e in node.namespace.entries() if not e.deleted and e.manifest is not None]

    def scan() -> list[bytes]:
        complete = []
        for e in files:
            assert e.manifest is not None
            raw = node.chunks.get(ChunkId(e.manifest))
            if raw is None:
                continue
            try:
                ids = Manifest.decode(raw).ids
            except ManifestError:
                continue
            if all(node.chunks.has(c) for c in set(ids) if c != HOLE):
                complete.append(e.manifest)
        return complete

    for mid in await trio.to_thread.run_sync(scan):
        holdings.note_complete(mid)


async def run_services(node: Node, *, vfs: Vfs | None = None, listen: str | None = None,
                       task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the node's network services until cancelled; reports the `Runtime` when up."""
    bind = listen or node.listen_addr()
    async with contextlib.AsyncExitStack() as stack:
        try:
            transport = await stack.enter_async_context(open_iroh_transport(node.secret, bind_addr=bind))
        except TransportError as exc:
            # The kept port was taken while we were down: take any, and keep that one.
            log.warning("cannot listen on %s (%s); listening on a new port: tickets given out before "
                        "must be given out again", bind, exc)
            host = bind.rsplit(":", 1)[0]
            transport = await stack.enter_async_context(open_iroh_transport(node.secret, bind_addr=f"{host}:0"))
            node.set_listen_addr(transport.addr().addrs[0])
        self_id = node.node_id.hex()
        peers = PeerBook(self_id)
        for known in node.peers():
            peers.learn(known)
        holdings = Holdings(self_id)
        holdings.own.addr = transport.addr()
        await _load_own_holdings(node, holdings)
        server = ChunkServer(node.chunks)
        transport.register(CHUNKS_ALPN, server.handle)
        fetcher = Fetcher(node.chunks, transport, peers)
        sync = SyncService(node.replica, transport, holdings)
        sync.on_address = peers.learn
        transport.register(SYNC_ALPN, sync.handle)
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.serve)
            runtime = Runtime(node, transport, sync, nursery, peers, holdings, fetcher, server)
            if vfs is not None:
                vfs.reader.fetcher = fetcher
                vfs.holdings = holdings
            nursery.start_soon(sync.announce_holdings)
            for peer in node.peers():
                nursery.start_soon(sync.maintain, peer)
            await nursery.start(serve_control, node.home / "control.sock", runtime)
            log.info("node %s listening on %s", node.node_id.hex()[:16], transport.addr())
            task_status.started(runtime)


async def serve_control(path: Path, runtime: Runtime,
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    _remove_socket(path)  # left by a daemon that was killed
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_answer, conn, runtime)
    finally:
        listener.close()
        _remove_socket(path)


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _answer(conn: trio.socket.SocketType, runtime: Runtime) -> None:
    async with trio.SocketStream(conn) as stream:
        try:
            with trio.fail_after(CONTROL_TIMEOUT):
                raw = b""
                while not raw.endswith(b"\n") and len(raw) < MAX_REQUEST:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    raw += chunk
                reply = _dispatch(raw, runtime)
                await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            log.debug("control connection dropped: %s", exc)


def _dispatch(raw: bytes, runtime: Runtime) -> dict[str, Any]:
    try:
        request = json.loads(raw)
        op = request["op"]
    except (ValueError, KeyError, TypeError):
        return {"ok": False, "error": "malformed request"}
    handlers: dict[str, Callable[[], dict[str, Any]]] = {
        "addr": lambda: {"addr": str(runtime.transport.addr())},
        "status": runtime.status,
        "join": lambda: {"message": runtime.join(Ticket.decode(str(request.get("ticket", ""))))},
    }
    handler = handlers.get(op)
    if handler is None:
        return {"ok": False, "error": f"unknown op {op!r}"}
    try:
        return {"ok": True, **handler()}
    except (TicketError, JoinError) as exc:
        return {"ok": False, "error": str(exc)}


def ask_daemon(home: Path, request: dict[str, Any], *, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any] | None:
    """Send one request to the daemon of ``home``; None if no daemon is running there."""
    path = home / "control.sock"
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a socket file left by a daemon that was killed
        s.sendall(json.dumps(request).encode() + b"\n")
        raw = b""
        while not raw.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    reply: dict[str, Any] = json.loads(raw)
    return reply

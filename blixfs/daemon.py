"""The node daemon's network services and its control socket.

`run_services` is started with ``nursery.start`` by the mount (mount/runner.py): it
binds the iroh endpoint, serves the sync protocol, keeps a session with every known
peer, and answers the CLI on ``<home>/control.sock``. Everything it starts lives in
its own nursery and ends when that is cancelled.

Control protocol: one JSON object per line each way, one request per connection::

    {"op": "addr"}               -> {"ok": true, "addr": "<node id>@ip:port"}
    {"op": "status"}             -> {"ok": true, "addr": ..., "sessions": [...]}
    {"op": "join", "ticket": T}  -> {"ok": true, "message": "..."} | {"ok": false, "error": "..."}
    {"op": "peers"}              -> {"ok": true, "peers": [{id, addrs, session, latency_ms, ...}]}
    {"op": "gc", "dry_run": b, "grace": s} -> {"ok": true, "freed_chunks", "freed_bytes", ...}
    {"op": "pull", "path": P, "priority": "background", "trace": b}
                                 -> {"progress": {"done": n, "total": n}} lines, then
                                    {"ok": true, "bytes", "total", "seconds", "peers": {id: bytes}}
                                    (priority: demand, trace, ahead or background, the default;
                                    with "trace": only the chunks of the file's access trace, in
                                    its order, and "chunks": how many the trace holds)
    {"op": "trace", "path": P}   -> {"ok": true, "path", "records": n, "chunks": [index, ...]}: the file's
                                    merged access trace, mapped onto its current version
    {"op": "limits"}             -> {"ok": true, "max_upload": r, "max_background": r}
    {"op": "limits", "max_upload": R, "max_background": R} -> the same, after the change
                                    (R: bytes/s as an integer or a string like "20M"; "off",
                                    0 or null: no limit; a field left out keeps its limit;
                                    r: bytes/s or null)
    {"op": "allow", "node": HEX, "role": "read"|"write"|"admin"} -> {"ok": true, "member": {...}}
    {"op": "revoke", "node": HEX} -> {"ok": true, "member": {...}} (both: {"ok": false, "error"} when refused)
    {"op": "commit", "path": P}  -> {"ok": true, "path": P, "published": b} | {"ok": false, "error": "..."}
    {"op": "dashboard"}          -> {"ok": true, "url": "http://127.0.0.1:PORT" | null}
    {"op": "api", "page": P}     -> {"ok": true, "page": {...}}: the dashboard's JSON of page P
                                    (overview, transfers, topology, images; "all": every page)

Only the socket file's permissions (0600, in the home) guard it. Every request is
validated (`_invalid`: an object, a known string ``op``, fields of the right type, at
most `MAX_REQUEST` bytes); a bad one, or one whose handler fails, gets ``{"ok": false,
"error": ...}`` and a log line: nothing from the socket reaches the services nursery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blixfs import collector, lowprio
from blixfs.analytics import Analytics
from blixfs.chunkproto import ALPN as CHUNKS_ALPN
from blixfs.chunkproto import OP_HOLD, ChunkServer
from blixfs.chunkstore import StoreHooks
from blixfs.content import Content, Network
from blixfs.dashboard.api import PAGES, DashboardApi
from blixfs.dashboard.server import serve_dashboard
from blixfs.discovery import LanDiscovery, interfaces_for_listen
from blixfs.entry import Kind
from blixfs.errors import FsError
from blixfs.fetcher import ATTEMPT_TIMEOUT, FETCH_TIMEOUT, Fetcher
from blixfs.gc import DEFAULT_GRACE_SECONDS, collect, live_versions
from blixfs.health import DEFAULT_EXPIRY, HealthMonitor
from blixfs.holdings import Holdings
from blixfs.limits import Limits, RateError, parse_rate
from blixfs.members import Role, member_report, parse_node_id
from blixfs.namespace import LOOP_PAGE_ENTRIES
from blixfs.net.iroh_transport import open_iroh_transport
from blixfs.net.transport import NodeAddr, Transport, TransportError
from blixfs.node import JoinError, Node
from blixfs.peers import PeerBook
from blixfs.priority import Priority
from blixfs.replication import DEFAULT_COPIES, Replicator
from blixfs.sync import ALPN as SYNC_ALPN
from blixfs.sync import SESSIONS_PER_PEER, SESSIONS_TOTAL, SyncService
from blixfs.ticket import Ticket, TicketError
from blixfs.traces import Tracer
from blixfs.vfs import Vfs

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 10.0
RECENCY_SAVE_SECONDS = 10.0
GC_INTERVAL = 600.0
# A dial started while a link was down lives this long (later callers share it); QUIC backs
# off its handshake retransmits meanwhile. Short, so a peer is reconnected soon after it returns.
CONNECT_TIMEOUT = 4.0
MAX_REQUEST = 64 * 1024
# How long a file's writes may stay unpublished (fsync'd into the journal, not visible to
# peers) while it stays open: a running VM's image reaches peers this often.
PUBLISH_INTERVAL = 30.0

Counter = Callable[[int, int], None]  # told bytes done and bytes in all, as a pull goes
PullOutcome = tuple[int, int, dict[str, Any], list[str]]  # bytes fetched, total, extra answer fields, failures
PullRun = Callable[[Counter], Awaitable[PullOutcome]]


@dataclass

class Runtime:
    """What the running daemon offers the mount and the control socket."""

    node: Node
    transport: Transport
    sync: SyncService
    nursery: trio.Nursery
    peers: PeerBook
    holdings: Holdings
    fetcher: Fetcher
    server: ChunkServer
    content: Content
    vfs: Vfs | None = None
    replicator: Replicator | None = None
    maintained: set[str] = field(default_factory=set)  # peers a sync session is kept with
    analytics: Analytics | None = None
    dashboard: str | None = None  # the dashboard's URL when it is served
    api: DashboardApi | None = None  # the dashboard's JSON (also `blixfs status --json`)
    limits: Limits = field(default_factory=Limits.create)  # bandwidth limits (`blixfs limit`)
    tracer: Tracer | None = None  # access traces: recorded, published, prefetched (blixfs.traces)

    def peers_report(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        sessions = {s.peer: s for s in self.sync.sessions()}
        ids = set(self.peers.stats) | set(sessions) | set(self.peers.addrs) | (set(self.holdings.nodes) - {
            self.holdings.self_id})
        out = []
        for node_id in sorted(ids):
            st = self.peers.of(node_id)
            held = self.holdings.nodes.get(node_id)
            out.append({
                "id": node_id, "addrs": list(self.peers.addr(node_id).addrs),
                "state": st.state, "reason": st.reason, "found_by": st.found_by or "incoming",
                "rtt_ms": round(st.rtt_ms, 2) if st.rtt_ms is not None else None, "loss": round(st.loss, 4),
                "last_seen_s": round(time.time() - st.last_seen, 1) if st.last_seen else None,
                "session": "synced" if node_id in sessions and sessions[node_id].synced.is_set()
                else "syncing" if node_id in sessions else "none",
                "latency_ms": round(st.latency * 1000, 2) if st.chunks_received else None,
                "throughput_mbs": round(st.throughput / 1e6, 1) if st.chunks_received else None,
                "inflight": st.inflight, "bytes_received": st.bytes_received, "failures": st.failures,
                "bad_data": st.bad_data, "penalised_s": max(0.0, round(st.penalised_until - now, 1)),
                "holds_complete": len(held.complete) if held else 0, "holds_partial": len(held.partial) if held else 0,
            })
        return out

    async def pull(self, path: str, progress: Callable[[dict[str, Any]], Awaitable[None]],
                   priority: Priority = Priority.BACKGROUND, *, trace: bool = False) -> dict[str, Any]:
        """Fetch every chunk of the file at ``path`` this node lacks at class ``priority``,
        reporting progress; with ``trace``, only the chunks of its access trace, in trace
        order (`Tracer.pull`)."""
        e = self.node.namespace.get(path.strip("/"))
        if e is None or e.kind is not Kind.FILE:
            raise PullError(f"no file {path!r} in the namespace")
        if e.manifest is None:
            return {"path": e.path, "bytes": 0, "total": 0, "seconds": 0.0, "peers": {}}
        mid, author = e.manifest, e.author
        if trace:
            tracer = self.tracer
            if tracer is None:
                raise PullError("this daemon does not keep access traces")

            async def fetch_traced(count: Counter) -> PullOutcome:
                got = await tracer.pull(e.path, mid, author, progress=count, priority=priority)
                return got.fetched_bytes, got.missing_bytes, {"chunks": got.chunks}, got.failed
            return await self._fetch_reporting(e.path, fetch_traced, progress)

        async def fetch_whole(count: Counter) -> PullOutcome:
            got = await self.content.fetch_version(mid, author=author, label=e.path, progress=count,
                                                   priority=priority)
            return got.fetched_bytes, got.manifest.size, {}, got.failed
        return await self._fetch_reporting(e.path, fetch_whole, progress)

    async def _fetch_reporting(self, path: str, fetch: PullRun,
                               progress: Callable[[dict[str, Any]], Awaitable[None]]) -> dict[str, Any]:
        """Run one pull's ``fetch`` (given a counter of done/total bytes; it returns bytes
        fetched, total, extra fields and failures), sending its figures to ``progress``
        every 0.25 s, and answer what `pull` answers: bytes per peer that served it."""
        started, before = time.monotonic(), {p: s.bytes_received for p, s in self.peers.stats.items()}
        figures = {"done": 0, "total": 0}

        def count(done: int, total: int) -> None:
            figures.update(done=done, total=total)

        async def report() -> None:
            while True:
                await trio.sleep(0.25)
                await progress(dict(figures))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            try:
                fetched, total, extra, failed = await fetch(count)
            except FsError as exc:
                raise PullError(str(exc)) from None
            finally:
                nursery.cancel_scope.cancel()
        if failed:
            raise PullError(f"{len(failed)} chunks could not be fetched: {failed[0]}")
        used = {p[:16]: s.bytes_received - before.get(p, 0) for p, s in self.peers.stats.items()
                if s.bytes_received > before.get(p, 0)}
        return {"path": path, "bytes": fetched, "total": total, **extra,
                "seconds": round(time.monotonic() - started, 3), "peers": used}

    async def trace(self, path: str) -> dict[str, Any]:
        """The merged access trace of the file at ``path`` (`blixfs trace`): how many records
        count, and the chunk indices of its current version in prefetch order."""
        e = self.node.namespace.get(path.strip("/"))
        if e is None or e.kind is not Kind.FILE:
            raise PullError(f"no file {path!r} in the namespace")
        if self.tracer is None or e.manifest is None:
            return {"path": e.path, "records": 0, "chunks": []}
        root = await self.content.load(e.manifest, e.author)
        order = await self.tracer.plan(e.path, e.manifest, root, e.author)
        return {"path": e.path, "records": len(self.tracer.records(e.path)), "chunks": [i for i, _ in order],
                "chunk_size": root.chunk_size}

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "fetched": {"bytes": self.fetcher.bytes_fetched, "chunks": self.fetcher.chunks_fetched,
                        "in_flight": sum(st.inflight for st in self.peers.stats.values())},
            "served": {"bytes": self.server.bytes_served, "requests": self.server.requests},
            "limits": {**self.limits.report(), "fetch_queue": self.fetcher.queue.waiting(),
                       "serve_queue": self.server.queue.waiting() + self.server.demand_queue.waiting()},
            "replication": self.replicator.report() if self.replicator is not None else [],
            "files": [{"path": path, "bytes": t.bytes, "chunks": t.chunks, "rate_mbs": round(t.rate() / 1e6, 1),
                       "idle_s": round(time.monotonic() - t.updated, 1)}
                      for path, t in sorted(self.fetcher.recent_transfers().items())],
            "peer_rates": [r for r in self.peers_report() if r["throughput_mbs"] is not None],
            "addr": str(self.transport.addr()),
            "sessions": [{"peer": s.peer, "synced": s.synced.is_set(), "seconds": round(now - s.started, 1),
                          "received": s.entries_received, "sent": s.entries_sent, "refused": s.refused}
                         for s in self.sync.sessions()],
        }

    def keep_session(self, peer: NodeAddr) -> None:
        """Keep a sync session with ``peer`` (one per peer, however it was found)."""
        self.peers.learn(peer)
        if peer.node_id not in self.maintained and peer.node_id != self.node.node_id.hex():
            self.maintained.add(peer.node_id)
            self.nursery.start_soon(self.sync.maintain, peer, self.peers.addr)

    def join(self, ticket: Ticket) -> str:
        if ticket.keys.id != self.node.replica.keys.id:
            raise JoinError(f"the running daemon serves namespace {self.node.replica.keys.id.hex()[:16]}; "
                            "stop it (Ctrl-C or SIGTERM), run blixfs join again, then mount")
        message = self.node.join(ticket)
        self.peers.learn(ticket.peer, "ticket")
        self.keep_session(ticket.peer)
        return message


def _may(node: Node, peer: str, need: Role) -> bool:
    """Whether ``peer`` (hex id) has ``need`` in the namespace's member list (open: anyone)."""
    try:
        return node.replica.members.allows(bytes.fromhex(peer), need)
    except ValueError:
        return False


async def _load_own_holdings(node: Node, content: Content) -> None:
    """What this node holds of each live version, from its store: whole, or which chunks
    (a version written here over content it did not hold is partial). On the trio thread
    (the store's index is in memory; worker threads touch files only), one version at a time."""
    # a page at a time: bounded memory, and the event loop free between pages
    with contextlib.closing(node.namespace.pages_since({}, LOOP_PAGE_ENTRIES)) as pages:
        for page in pages:
            for e in page:
                if e.deleted or e.manifest is None:
                    continue
                with contextlib.suppress(FsError):
                    m = content.manifest(e.manifest)
                    if m is not None:
                        content.note_held(e.manifest, m)
                await trio.lowlevel.checkpoint()


async def run_services(node: Node, *, vfs: Vfs | None = None, listen: str | None = None,
                       fetch_timeout: float = FETCH_TIMEOUT, copies: int = DEFAULT_COPIES,
                       gc_interval: float = GC_INTERVAL, gc_grace: float = DEFAULT_GRACE_SECONDS,
                       internet: bool = False, peer_expiry: float = DEFAULT_EXPIRY, mdns: bool = True,
                       mdns_interfaces: list[str] | None = None, publish_interval: float = PUBLISH_INTERVAL,
                       dashboard: tuple[str, int] | None = None, max_upload: int | None = None,
                       max_background: int | None = None,
                       task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the node's network services until cancelled; reports the `Runtime` when up.
    ``dashboard``: (host, port) to serve the dashboard on (`blixfs.dashboard.server.parse_listen`);
    ``max_upload``, ``max_background``: bandwidth limits in bytes/s (`blixfs.limits`; None: none)."""
    bind = listen or node.listen_addr()
    async with contextlib.AsyncExitStack() as stack:
        try:
            transport = await stack.enter_async_context(
                open_iroh_transport(node.secret, bind_addr=bind, internet=internet, connect_timeout=CONNECT_TIMEOUT))
        except TransportError as exc:
            # The kept port was taken while we were down: take any, and keep that one.
            log.warning("cannot listen on %s (%s); listening on a new port: tickets given out before "
                        "must be given out again", bind, exc)
            host = bind.rsplit(":", 1)[0]
            transport = await stack.enter_async_context(
                open_iroh_transport(node.secret, bind_addr=f"{host}:0", internet=internet,
                                    connect_timeout=CONNECT_TIMEOUT))
            node.set_listen_addr(transport.addr().addrs[0])
        await serve_node(node, transport, vfs=vfs, fetch_timeout=fetch_timeout, copies=copies,
                         gc_interval=gc_interval, gc_grace=gc_grace, peer_expiry=peer_expiry,
                         mdns_interfaces=(mdns_interfaces or interfaces_for_listen(bind.rsplit(":", 1)[0]))
                         if mdns else None, publish_interval=publish_interval, dashboard=dashboard,
                         limits=Limits.create(max_upload, max_background), task_status=task_status)


async def serve_node(node: Node, transport: Transport, *, vfs: Vfs | None = None,
                     fetch_timeout: float = FETCH_TIMEOUT, copies: int = DEFAULT_COPIES,
                     gc_interval: float = GC_INTERVAL, gc_grace: float = DEFAULT_GRACE_SECONDS,
                     peer_expiry: float = DEFAULT_EXPIRY, mdns_interfaces: list[str] | None = None,
                     control: bool = True, publish_interval: float = PUBLISH_INTERVAL,
                     dashboard: tuple[str, int] | None = None, limits: Limits | None = None,
                     task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED) -> None:
    """The node's services on ``transport`` (iroh for a daemon, the in-memory network for
    in-process tests): sync, chunk server, fetcher, replication, health, GC, LAN discovery
    on ``mdns_interfaces`` (None: off), transfer analytics (`blixfs.analytics`, saved in
    ``<home>/analytics.db``), with ``control`` the control socket and with ``dashboard``
    (host, port) the dashboard, under the bandwidth ``limits`` (None: none; changeable
    through the control socket). Runs until cancelled; reports the `Runtime` when up."""
    # Each service gets its collaborators and hooks at construction, in dependency order;
    # the one later step is the content layer's `connect` (the VFS built it before the network).
    self_id = node.node_id.hex()
    peers = PeerBook(self_id)
    for known in node.peers():
        peers.learn(known, "ticket")
    holdings = Holdings(self_id, node.secret, transport.addr())
    cache = node.open_cache()
    if vfs is not None:
        cache.follow_open_files(vfs.open_chunk_ids, lambda: vfs.patch_generation)
    content = vfs.content if vfs is not None else Content(node.chunks)
    analytics = Analytics(node.home / "analytics.db")
    limits = limits or Limits.create()
    fetcher = Fetcher(node.chunks, transport, peers, fetch_timeout=fetch_timeout,
                      attempt_timeout=min(ATTEMPT_TIMEOUT, fetch_timeout),
                      allowed=lambda peer: _may(node, peer, Role.READ), on_stored=cache.enforce,
                      on_fetched=content.reader.remember, on_dont_have=content.forget_holder,
                      on_chunk=analytics.on_chunk, limits=limits)
    sync = SyncService(node.replica, transport, holdings, on_address=lambda addr: peers.learn(addr, "exchange"),
                       vouched=peers.reached)
    content.connect(Network(fetcher, holdings, peers,
                            lambda: [s.peer for s in sync.sessions() if s.synced.is_set()]))
    # At the bound on incoming connections, those of members we sync with are kept (a flood
    # of fresh keys churns among itself). The caller made the transport before the node's
    # services existed: this is the one thing it learns from them.
    transport.kept_peers = lambda: {s.peer for s in sync.sessions() if s.synced.is_set()}
    replicator = Replicator(node, transport, sync, holdings, peers, content, default_copies=copies)
    server = ChunkServer(node.chunks, on_hold=replicator.on_hold,
                         allowed=lambda peer, op: _may(node, peer, Role.WRITE if op == OP_HOLD else Role.READ),
                         on_served=analytics.on_served, limits=limits)
    tracer = Tracer(node.replica, content)
    if vfs is not None:
        vfs.on_read = analytics.on_read
        vfs.tracer = tracer
    transport.register(CHUNKS_ALPN, server.handle)
    transport.register(SYNC_ALPN, sync.handle, per_peer=SESSIONS_PER_PEER, total=SESSIONS_TOTAL)
    await _load_own_holdings(node, content)
    # From now on a write is refused (ENOSPC) when the cache budget is full of data that may
    # be the only copy, and whatever removes chunks (eviction, GC, a corrupt file) makes this
    # node stop claiming them.
    hooks = StoreHooks(admit=cache.admit, removed=lambda ids: holdings.evicted(set(ids), content.held_chunks))
    node.chunks.hook(hooks)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.serve)
        await nursery.start(tracer.serve)
        await nursery.start(replicator.run)
        runtime = Runtime(node, transport, sync, nursery, peers, holdings, fetcher, server, content, vfs,
                          replicator, analytics=analytics, limits=limits, tracer=tracer)
        runtime.api = DashboardApi(runtime)
        await nursery.start(analytics.run, lambda: {"fetched": fetcher.bytes_fetched, "served": server.bytes_served,
                                                    "read": analytics.totals["read"]})
        await nursery.start(HealthMonitor(transport, peers, holdings, sync, expiry=peer_expiry).run)
        await nursery.start(collector.watch, runtime)  # state gauges, read at scrape time
        nursery.start_soon(_save_recency_every, node, RECENCY_SAVE_SECONDS)
        nursery.start_soon(_collect_every, runtime, gc_interval, gc_grace)
        nursery.start_soon(sync.announce_holdings)
        # Before any session: a session start's checks run in them (blixfs.lowprio).
        nursery.start_soon(lowprio.processes_started)
        for peer in node.peers():
            runtime.keep_session(peer)
        if mdns_interfaces is not None:
            port = int(transport.addr().addrs[0].rsplit(":", 1)[1])
            interfaces = mdns_interfaces

            def on_lan_peer(addr: NodeAddr) -> None:
                peers.learn(addr, "mdns")
                runtime.keep_session(addr)

            discovery = LanDiscovery(self_id, port, node.replica.keys.id, on_lan_peer, interfaces)
            await nursery.start(discovery.run)
        if vfs is not None:
            # Writes a crash left in journals are replayed before the mount serves (on the
            # network: a write-anywhere node may need its base's chunks from peers).
            await vfs.recover_journals()
            nursery.start_soon(_publish_every, vfs, publish_interval)
        if dashboard is not None:
            try:
                runtime.dashboard = await nursery.start(serve_dashboard, runtime.api, *dashboard)
            except OSError as exc:  # the node serves its files all the same
                log.error("the dashboard cannot listen on %s:%d: %s; running without it", *dashboard, exc)
        if control:
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
                try:
                    conn, _ = await listener.accept()
                except OSError as exc:  # out of file descriptors, say: the daemon stays up
                    log.warning("control socket: accept failed: %s", exc)
                    await trio.sleep(0.5)
                    continue
                nursery.start_soon(_answer, conn, runtime)
    finally:
        listener.close()
        _remove_socket(path)


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _answer(conn: trio.socket.SocketType, runtime: Runtime) -> None:
    """Answer one control connection. Never raises (but Cancelled): it runs in the services
    nursery, so a malformed request, a failing handler or a bug gets ``{"ok": false,
    "error": ...}`` and a log line, never the daemon's end."""
    async with trio.SocketStream(conn) as stream:
        try:
            with trio.fail_after(CONTROL_TIMEOUT):
                raw = b""
                while not raw.endswith(b"\n") and len(raw) < MAX_REQUEST:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    raw += chunk
            try:
                reply = await _reply(raw, runtime, stream)
            except Exception as exc:  # a handler's bug: this request fails, the daemon stays
                log.exception("control request %r failed", raw[:80])
                reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
            with trio.fail_after(CONTROL_TIMEOUT):
                await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            log.debug("control connection dropped: %s", exc)


async def _reply(raw: bytes, runtime: Runtime, stream: trio.SocketStream) -> dict[str, Any]:
    if len(raw) >= MAX_REQUEST and not raw.endswith(b"\n"):
        log.warning("control request of more than %d bytes: refused", MAX_REQUEST)
        return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
    request = _parse(raw)
    problem = _invalid(request)
    if problem is not None:
        log.warning("malformed control request %r: %s", raw[:80], problem)
        return {"ok": False, "error": f"malformed request: {problem}"}
    assert request is not None
    if request["op"] == "gc":
        return {"ok": True, **await _gc(runtime, request)}
    if request["op"] == "commit":
        return await _commit(runtime, str(request.get("path") or ""))
    if request["op"] == "trace":
        try:
            return {"ok": True, **await runtime.trace(str(request.get("path") or ""))}
        except (PullError, FsError) as exc:
            return {"ok": False, "error": str(exc)}
    if request["op"] == "pull":
        # Streams progress lines, then the final reply; no deadline (a big image takes a while).
        async def progress(update: dict[str, Any]) -> None:
            await stream.send_all(json.dumps({"progress": update}).encode() + b"\n")

        try:
            return {"ok": True, **await runtime.pull(request.get("path") or "", progress,
                                                     Priority[str(request.get("priority") or "background").upper()],
                                                     trace=bool(request.get("trace", False)))}
        except PullError as exc:
            return {"ok": False, "error": str(exc)}
    return _dispatch(raw, runtime)


# The type of each optional field of a control request, by op (bool is not a number here).
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "addr": {}, "status": {}, "peers": {},
    "join": {"ticket": (str,)},
    "gc": {"dry_run": (bool,), "grace": (int, float)},
    "pull": {"path": (str,), "priority": (str,), "trace": (bool,)},
    "limits": {"max_upload": (str, int), "max_background": (str, int)},
    "commit": {"path": (str,)},
    "trace": {"path": (str,)},
    "allow": {"node": (str,), "role": (str,)},
    "revoke": {"node": (str,)},
    "dashboard": {}, "api": {"page": (str,)},
}


def _invalid(request: dict[str, Any] | None) -> str | None:
    """Why ``request`` is not a well-formed control request (None when it is): an object with
    a known string ``op`` and, for the fields that op reads, values of the right type."""
    if request is None:
        return "not a JSON object"
    op = request.get("op")
    if not isinstance(op, str):
        return "op must be a string"
    fields = _FIELDS.get(op)
    if fields is None:
        return f"unknown op {op[:64]!r}"
    for name, types in fields.items():
        value = request.get(name)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            return f"{name} must be {' or '.join(t.__name__ for t in types)}"
    grace = request.get("grace")
    if grace is not None and not 0 <= grace < 1e12:
        return "grace must be a number of seconds >= 0"
    priority = request.get("priority")
    if priority is not None and priority.upper() not in Priority.__members__:
        return f"priority must be one of {', '.join(p.name.lower() for p in Priority)}"
    return None


async def _gc(runtime: Runtime, request: dict[str, Any]) -> dict[str, Any]:
    """Collect garbage, first fetching the manifest roots and pages of live files this node
    lacks (they say which chunks are referenced; without them nothing can be freed safely).
    A node that read part of an image holds only the pages on the paths it read: the rest
    are fetched here (16 KiB per 512 chunks: 13 MiB for a 100 GiB image)."""
    vfs, node = runtime.vfs, runtime.node
    if vfs is not None:
        versions: dict[bytes, bytes | None] = {e.manifest: e.author for e in live_versions(node.namespace)
                                               if e.manifest is not None}
        for mid in vfs.open_versions():  # open files keep the version they read whole too
            versions.setdefault(mid, None)
        for mid, author in versions.items():
            with contextlib.suppress(FsError):
                await runtime.content.fetch_pages(mid, author)
    grace = request.get("grace")
    report = collect(node.namespace, node.chunks,
                     grace_seconds=float(DEFAULT_GRACE_SECONDS if grace is None else grace),
                     also_live=vfs.open_chunk_ids() if vfs is not None else (),
                     also_versions=vfs.open_versions() if vfs is not None else (),
                     dry_run=bool(request.get("dry_run", False)))
    return report.as_dict()


class PullError(Exception):
    """A pull that cannot complete, with the reason."""


async def _commit(runtime: Runtime, path: str) -> dict[str, Any]:
    """``blixfs commit PATH``: publish the file's unpublished (journaled) writes now."""
    if runtime.vfs is None:
        return {"ok": False, "error": "this daemon serves no mount"}
    try:
        published = await runtime.vfs.commit_path(path)
    except FsError as exc:
        return {"ok": False, "error": exc.message if path in exc.message else f"{path or '/'}: {exc.message}"}
    return {"ok": True, "path": path, "published": published}


async def _publish_every(vfs: Vfs, interval: float) -> None:
    """Publish files with writes older than ``interval`` (checked a few times per interval,
    so a file waits at most about 1.25 intervals), and retry journals whose replay failed."""
    while True:
        await trio.sleep(max(0.05, interval / 4))
        if vfs.unrecovered:
            await vfs.recover_journals()
        vfs.publish_due(interval)


async def _collect_every(runtime: Runtime, interval: float, grace: float) -> None:
    """Periodic GC on every node: versions nothing references any more (overwritten, deleted)
    lose their replica records, then their chunks, once older than the grace period."""
    while True:
        await trio.sleep(interval)
        try:
            if runtime.replicator is not None:
                await runtime.replicator.drop_unreferenced_replicas()
            await _gc(runtime, {"grace": grace})
        except Exception:
            log.exception("periodic gc failed")


async def _save_recency_every(node: Node, seconds: float) -> None:
    while True:
        await trio.sleep(seconds)
        try:
            node.chunks.save_recency()
        except (sqlite3.Error, OSError) as exc:  # e.g. a full disk: try again next time
            log.warning("could not save chunk recency: %s", exc)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        request = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        return None
    return request if isinstance(request, dict) else None


def _dispatch(raw: bytes, runtime: Runtime) -> dict[str, Any]:
    request = _parse(raw)
    problem = _invalid(request)
    if request is None or problem is not None:
        return {"ok": False, "error": f"malformed request: {problem}"}
    op = request["op"]
    handlers: dict[str, Callable[[], dict[str, Any]]] = {
        "addr": lambda: {"addr": str(runtime.transport.addr())},
        "status": runtime.status,
        "peers": lambda: {"peers": runtime.peers_report()},
        "join": lambda: {"message": runtime.join(Ticket.decode(str(request.get("ticket", ""))))},
        "allow": lambda: {"member": member_report(runtime.node.replica.set_member(
            parse_node_id(str(request.get("node", ""))), Role.parse(str(request.get("role", "")))))},
        "revoke": lambda: {"member": member_report(runtime.node.replica.set_member(
            parse_node_id(str(request.get("node", ""))), None))},
        "dashboard": lambda: {"url": runtime.dashboard},
        "limits": lambda: _limits(runtime, request),
        "api": lambda: {"page": _api_page(runtime, str(request.get("page") or "all"))},
    }
    handler = handlers.get(op)
    if handler is None:
        return {"ok": False, "error": f"unknown op {op!r}"}
    try:
        return {"ok": True, **handler()}
    except (TicketError, JoinError, FsError, ValueError) as exc:  # ValueError: a bad node id, role or rate
        return {"ok": False, "error": str(exc)}


def _limits(runtime: Runtime, request: dict[str, Any]) -> dict[str, Any]:
    """The ``limits`` op: change the limits the request names (all or none: a bad rate
    changes nothing), then report them. RateError (a ValueError) for a bad rate."""
    changes: dict[str, int | None] = {}
    for name in ("max_upload", "max_background"):
        if name in request:
            try:
                changes[name] = parse_rate(request[name])
            except RateError as exc:
                raise RateError(f"{name.replace('_', '-')}: {exc}") from None
    runtime.limits.set(changes)
    return runtime.limits.report()


def _api_page(runtime: Runtime, page: str) -> dict[str, Any]:
    if runtime.api is None:
        raise ValueError("the daemon is starting")
    if page == "all":
        return runtime.api.all()
    if page not in PAGES:
        raise ValueError(f"no page {page[:32]!r}: one of {', '.join(PAGES)}, all")
    return runtime.api.page(page)


def ask_daemon(home: Path, request: dict[str, Any], *, timeout: float | None = CONTROL_TIMEOUT,
               on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Send one request to the daemon of ``home``; None if no daemon is running there.

    Progress lines (``pull``) go to ``on_progress``; the last line is the reply.
    """
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
        with s.makefile("rb") as lines:
            for line in lines:
                message = json.loads(line)
                if "progress" in message:
                    if on_progress is not None:
                        on_progress(message["progress"])
                    continue
                reply: dict[str, Any] = message
                return reply
    raise ConnectionError("the daemon closed the control connection without a reply")

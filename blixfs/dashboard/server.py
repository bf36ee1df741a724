"""The dashboard's HTTP server: hypercorn's trio worker serving a small ASGI app.

Routes (GET and HEAD only; anything else 405):

    /                 the single page (static/index.html); its script shows one of four
                      pages (#overview, #transfers, #topology, #images) and polls the API
    /static/<name>    the page's CSS and JavaScript, shipped in the package (no CDN)
    /api/<page>       JSON of one page (`blixfs.dashboard.api`); /api/all: all four

`serve_dashboard` is started with ``nursery.start`` by the daemon (`blixfs.daemon.serve_node`)
and reports the URL it listens on. The address is loopback unless the operator said
otherwise (`parse_listen`). Requests whose Host header names neither that address nor
localhost are refused (421): a web page elsewhere cannot read the API through DNS
rebinding. Every answer carries a Content-Security-Policy that allows this origin only.
Request bodies are never read; hypercorn bounds request lines and headers
(``h11_max_incomplete_size``) and idle connections (``keep_alive_timeout``).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from blixfs.dashboard.api import PAGES, DashboardApi

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_HOST = "127.0.0.1"
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class DashboardError(ValueError):
    """A dashboard address that cannot be used, with the reason."""


def parse_listen(text: str, *, public: bool = False) -> tuple[str, int]:
    """``[ADDR:]PORT`` as (host, port). ADDR defaults to 127.0.0.1; ``localhost`` is
    127.0.0.1; IPv6 as ``[::1]:PORT``. An address that is not loopback is refused unless
    ``public`` (the operator's explicit ``--dashboard-public``)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    host = host.strip("[]") or DEFAULT_HOST
    if host == "localhost":
        host = DEFAULT_HOST
    try:
        port = int(port_text)
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise DashboardError(f"{text!r} is not [ADDR:]PORT with ADDR an IP address (e.g. 8080 or "
                             f"127.0.0.1:8080)") from None
    if not 0 <= port <= 65535:
        raise DashboardError(f"port {port} is out of range")
    if not addr.is_loopback and not public:
        raise DashboardError(f"{host} is not a loopback address: the dashboard shows this node's peers, "
                             f"files and traffic to whoever reaches it; add --dashboard-public to serve it there")
    return str(addr), port


def _static(name: str) -> bytes:
    return (resources.files("blixfs.dashboard") / "static" / name).read_bytes()


class DashboardApp:
    """The ASGI application (see the module docstring)."""

    def __init__(self, api: DashboardApi, host: str) -> None:
        self.api = api
        self.files = {name: _static(name) for name in STATIC}  # read once: the package may be replaced meanwhile
        self.hosts = {host, "localhost", DEFAULT_HOST, "::1"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, ctype, body = self.answer(scope)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                                *HEADERS]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    def _host_ok(self, scope: Scope) -> bool:
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
        return name in self.hosts

    def answer(self, scope: Scope) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        if scope["method"] not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if not self._host_ok(scope):
            return 421, "text/plain", b"this dashboard answers to its own address only\n"
        path: str = scope["path"]
        if path in ("/", "/index.html"):
            return 200, STATIC["index.html"], self.files["index.html"]
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if name in STATIC:
                return 200, STATIC[name], self.files[name]
        if path.startswith("/api/"):
            page = path.removeprefix("/api/")
            if page in PAGES or page == "all":
                try:
                    data = self.api.all() if page == "all" else self.api.page(page)
                except Exception as exc:  # a bug in one page: that request fails, the daemon stays
                    log.exception("dashboard page %s failed", page)
                    return 500, "application/json", json.dumps({"error": type(exc).__name__}).encode()
                return 200, "application/json", json.dumps(data).encode()
        return 404, "text/plain", b"not found\n"


async def serve_dashboard(api: DashboardApi, host: str, port: int,
                          *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the dashboard on ``host:port`` until cancelled; reports its URL when listening.
    OSError, before anything starts, if the address cannot be bound (taken, not this
    machine's): the socket is bound here, then handed to hypercorn's trio worker
    (`hypercorn.trio.serve` would bind it inside its nurseries, and its OSError would come
    out wrapped in exception groups)."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1
    sockets = config.create_sockets()
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
    # hypercorn types scopes and events as TypedDicts; the app reads them as plain mappings.
    app = wrap_app(cast(Any, DashboardApp(api, host)), config.wsgi_max_body_size, "asgi")
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(functools.partial(worker_serve, app, config, sockets=sockets))
        url = binds[0] if binds else f"http://{host}:{port}"
        log.info("dashboard at %s", url)
        task_status.started(url)

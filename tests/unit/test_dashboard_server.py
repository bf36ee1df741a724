"""The dashboard's HTTP side: where it may listen, what it answers, and hypercorn serving it on trio."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from blixfs.dashboard.server import HEADERS, DashboardApp, DashboardError, parse_listen, serve_dashboard


class FakeApi:
    def page(self, name: str) -> dict[str, Any]:
        if name == "images":
            raise RuntimeError("a bug in one page")
        return {"page": name}

    def all(self) -> dict[str, Any]:
        return {"all": True}


def scope(path: str, method: str = "GET", host: str = "127.0.0.1:8080") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": [(b"host", host.encode())]}


@pytest.mark.parametrize(("text", "public", "expected"), [
    ("8080", False, ("127.0.0.1", 8080)),
    ("127.0.0.1:9000", False, ("127.0.0.1", 9000)),
    ("localhost:9000", False, ("127.0.0.1", 9000)),
    ("[::1]:9000", False, ("::1", 9000)),
    ("0", False, ("127.0.0.1", 0)),
    ("0.0.0.0:8080", True, ("0.0.0.0", 8080)),
])
def test_listen_addresses(text: str, public: bool, expected: tuple[str, int]) -> None:
    assert parse_listen(text, public=public) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:8080", "10.1.2.3:80", "[::]:80", "example.com:80", "port", "70000"])
def test_refused_addresses(text: str) -> None:
    with pytest.raises(DashboardError):
        parse_listen(text)


def test_answers() -> None:
    app = DashboardApp(FakeApi(), "127.0.0.1")  # type: ignore[arg-type]
    status, ctype, body = app.answer(scope("/"))
    assert status == 200 and ctype.startswith("text/html") and b"/static/app.js" in body
    assert app.answer(scope("/static/app.js"))[0] == 200
    assert app.answer(scope("/static/../api.py"))[0] == 404
    assert app.answer(scope("/api/overview"))[2] == b'{"page": "overview"}'
    assert json.loads(app.answer(scope("/api/all"))[2]) == {"all": True}
    assert app.answer(scope("/api/images"))[0] == 500  # the bug answers 500; the server stays
    assert app.answer(scope("/api/secret"))[0] == 404
    assert app.answer(scope("/api/overview", method="POST"))[0] == 405
    # DNS rebinding: a page of another origin resolving its name to 127.0.0.1 gets nothing.
    assert app.answer(scope("/api/overview", host="evil.example:8080"))[0] == 421
    assert app.answer(scope("/api/overview", host="localhost:8080"))[0] == 200
    assert app.answer(scope("/api/overview", host="[::1]:8080"))[0] == 200


async def test_served_by_hypercorn_on_trio() -> None:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_dashboard, FakeApi(), "127.0.0.1", 0)
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /api/topology HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := await stream.receive_some(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        for name, value in HEADERS:
            assert name + b": " + value in head.lower() or name + b": " + value in head
        assert json.loads(body) == {"page": "topology"}
        nursery.cancel_scope.cancel()


async def test_an_address_in_use_is_an_oserror_before_anything_starts() -> None:
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError):  # not wrapped in a group: serve_node catches it and goes on
                await nursery.start(serve_dashboard, FakeApi(), "127.0.0.1", port)
    finally:
        taken.close()


def test_mount_refuses_a_public_dashboard_without_the_flag(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from blixfs.cli import main

    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "mount", str(tmp_path / "mnt"),
                                       "--dashboard", "0.0.0.0:8080"])
    assert result.exit_code == 2 and "--dashboard-public" in result.output
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_dashboard_command_without_a_daemon(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from blixfs.cli import main

    result = CliRunner().invoke(main, ["--home", str(tmp_path), "dashboard"])
    assert result.exit_code == 1 and "no daemon is running" in result.output

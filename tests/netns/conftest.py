"""Fixtures for tests between network namespaces (see harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns.harness import Lan, netns_unavailable, sweep_stale
from tests.netns.nodes import LanNode


@pytest.fixture
def lan() -> Iterator[Lan]:
    """An empty test LAN (a bridge in its own namespace); add hosts with ``lan.add_host()``.

    Skips when namespaces can't be created here. Everything is removed afterwards, also
    when the test fails.
    """
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    sweep_stale()
    net = Lan()
    try:
        net.create()
        yield net
    finally:
        net.destroy()


@pytest.fixture
def lan_nodes(lan: Lan, tmp_path: Path) -> Iterator[Callable[..., list[LanNode]]]:
    """``make(count, *mount_options)``: that many more hosts on the LAN, each with a (not yet
    started) blixfs node; returns every node made so far. All are stopped afterwards."""
    made: list[LanNode] = []

    def make(count: int, *extra: str) -> list[LanNode]:
        for _ in range(count):
            host = lan.add_host()
            made.append(LanNode(host, tmp_path / f"home-{host.index}", tmp_path / f"mnt-{host.index}", list(extra)))
        return made

    yield make
    for node in made:
        node.stop()

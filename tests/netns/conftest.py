"""Fixtures for tests between network namespaces (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns.harness import Lan, netns_unavailable, sweep_stale


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

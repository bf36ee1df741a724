"""Real blixfs nodes on test hosts in network namespaces: LAN discovery, link failures, moves.

Each node is a ``blixfs mount`` daemon joined to its host's network namespace only
(`nodes.LanNode`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from tests.conftest import wait_for
from tests.netns.nodes import LanNode

pytestmark = pytest.mark.mounted


def test_three_hosts_find_each_other_and_sync_survive_a_cable_pull_and_a_move(
    lan_nodes: Callable[[int], list[LanNode]],
) -> None:
    a, b, c = lan_nodes(3)
    a.cli("status")  # creates a's namespace
    ticket = a.cli("share", "--write", "--id-only").strip().splitlines()[-1]
    for n in (b, c):
        n.cli("join", ticket)  # the namespace and a's id: no address at all
    ids = {}
    for n in (a, b, c):
        n.start()
        ids[n.host.ip] = n.node_id()
    started = time.monotonic()

    def everyone_connected() -> bool:
        for n in (a, b, c):
            peers = n.peers()
            others = [ids[m.host.ip] for m in (a, b, c) if m is not n]
            if not all(o in peers and peers[o]["state"] == "connected" for o in others):
                return False
        return True

    wait_for(everyone_connected, 60, "all three to find each other by mDNS and connect")
    found_in = time.monotonic() - started
    # Within 5 s of the last start plus dials: 15 s bound (doubled for a slower machine).
    assert found_in < 30, found_in
    assert b.peers()[ids[c.host.ip]]["found_by"] == "mdns"
    (a.mnt / "hello.txt").write_text("from a")
    wait_for(lambda: (b.mnt / "hello.txt").exists() and (c.mnt / "hello.txt").exists(), 60, "the file everywhere")

    # c writes an image; with 2 copies it ends up on another node too
    data = os.urandom(4 << 20)
    (c.mnt / "c.img").write_bytes(data)
    wait_for(lambda: any(r["state"] == "durable" for r in c.status()["replication"]), 60,  # type: ignore[index]
             "c's image to be durable")
    # pull c's cable: the others mark it unreachable within seconds (probes every 2 s, 3 s deadline;
    # 20 s leaves room for a slow machine), and reads go to the other holder
    c.host.set_link(False)
    wait_for(lambda: a.peers()[ids[c.host.ip]]["state"] == "unreachable"
             and b.peers()[ids[c.host.ip]]["state"] == "unreachable", 20, "c unreachable on a and b")
    reader = b if "c.img" not in [r["path"] for r in b.status()["replication"]] else a  # type: ignore[index]
    assert (reader.mnt / "c.img").read_bytes() == data
    c.host.set_link(True)
    wait_for(lambda: a.peers()[ids[c.host.ip]]["state"] == "connected", 20, "c reconnected within 20 s")

    # b moves to a new address and restarts: found again without a new ticket
    b_id = ids[b.host.ip]
    b.stop()
    b.host.set_address("198.51.100.200")
    b.start()
    wait_for(lambda: "198.51.100.200:7400" in a.peers()[b_id]["addrs"]  # type: ignore[operator]
             and a.peers()[b_id]["state"] == "connected", 60, "b found at its new address")
    (a.mnt / "after-move.txt").write_text("x")
    wait_for(lambda: (b.mnt / "after-move.txt").exists(), 60, "sync with b after its move")

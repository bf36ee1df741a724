"""Fan-out: hosts pulling one image at once serve each other the chunks they already hold.

A seed and three hosts, real ``blixfs mount`` processes on test hosts (`nodes.LanNode`);
the seed's link is shaped slow (tc), so it is the bottleneck. All three hosts pull the
seed's image at once. Every host must end with the right bytes, and a real share of them
must have come from the other hosts (the pull's ``peers`` answer: bytes per peer). No
timing is asserted; scripts/bench_fanout.py measures the times at full size.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.netns.nodes import LanNode, start_all

pytestmark = [pytest.mark.mounted, pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 16 << 20
SEED_MBIT = 32  # 16 MiB take ~4 s on this link: three copies through it alone would take ~12 s


def test_hosts_pulling_at_once_serve_each_other(lan_nodes: Callable[..., list[LanNode]]) -> None:
    (seed,) = lan_nodes(1, "--copies", "1")  # its replicator asks nobody to pull early
    seed.host.shape(SEED_MBIT)
    seed.cli("status")
    seed.start()
    seed_id = seed.node_id()
    data = os.urandom(SIZE)
    (seed.mnt / "img").write_bytes(data)
    ticket = seed.cli("share").strip().splitlines()[-1]
    hosts = lan_nodes(3)[1:]
    for h in hosts:
        h.cli("join", ticket)
    start_all(hosts)
    ids = {h.host.ip: h.node_id() for h in hosts}

    def ready() -> bool:
        for h in hosts:
            if not (h.mnt / "img").exists():
                return False
            synced = {p for p, r in h.peers().items() if r["session"] == "synced"}
            if not {seed_id, *ids.values()} - {ids[h.host.ip]} <= synced:
                return False
        return True

    # The hosts find each other by mDNS on the bridge (and learn addresses from holdings).
    wait_for(ready, 90, "every host to see the image and hold a session with every other node", interval=0.2)

    replies: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(hosts))

    def pull(h: LanNode) -> None:
        start.wait()
        try:
            replies[h.host.ip] = h.pull("img")
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    assert len(replies) == len(hosts)

    want = hashlib.sha256(data).hexdigest()
    for h in hosts:
        assert hashlib.sha256((h.mnt / "img").read_bytes()).hexdigest() == want, h.host.ip
    from_seed = sum(b for r in replies.values() for p, b in r["peers"].items() if seed_id.startswith(p))
    from_hosts = sum(b for r in replies.values() for p, b in r["peers"].items() if not seed_id.startswith(p))
    print(f"3 hosts pulled {SIZE >> 20} MiB each: {from_seed >> 20} MiB from the seed, {from_hosts >> 20} MiB "
          f"from each other; seconds: {[r['seconds'] for r in replies.values()]}")
    assert from_seed + from_hosts >= len(hosts) * SIZE  # every chunk came over the network
    # With the seed the bottleneck, hosts that fetched in the same order would get next to
    # nothing from each other; here about half of it comes from them. A generous bound:
    assert from_hosts >= SIZE // 4, (from_seed, from_hosts)

"""Items of protocol.md 15.1 that let a member stop sync or a session, fixed (now in 15.2):
an entry larger than any peer accepts, times past 64 bits, HOLDINGS larger than a frame,
a peer that stops mid-frame. Each test failed before its fix."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from blixfs import crypto, sync
from blixfs.errors import FsError
from blixfs.frames import MAX_ENTRY_BYTES, MAX_FRAME, Hello, encode
from blixfs.holdings import NodeHoldings
from blixfs.net.memory import MemoryNetwork
from blixfs.replica import NamespaceKeys, check_entry
from blixfs.sync import ALPN, holdings_frame
from blixfs.vfs import ROOT_INO
from tests.cluster import cluster, wait_until
from tests.ops.test_sync import peer


async def test_an_entry_larger_than_peers_accept_is_refused_locally_and_sync_goes_on(tmp_path: Path) -> None:
    """15.1 item 3: xattr names of control characters (6 bytes each once JSON-escaped)
    within every field bound made an entry of 766,922 bytes; every receiver refused the
    frame, and as the entry was in every later diff, sync with that node stopped for good."""
    async with cluster(tmp_path, ["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        await a.write("img", 0, b"data", create=True)
        ino = (await a.vfs.lookup(ROOT_INO, "img")).ino
        refused_at = None
        for i in range(514):
            name = f"user.{i:04x}" + "\x01" * 246
            try:
                await a.vfs.setxattr(ino, name, b"")
            except FsError as exc:
                assert exc.errno == errno.ENOSPC
                refused_at = i
                break
        assert refused_at is not None, "an entry larger than MAX_ENTRY_BYTES was committed"
        e = a.entry("img")
        assert e is not None and len(e.serialize()) <= MAX_ENTRY_BYTES
        await wait_until(lambda: (f := b.entry("img")) is not None and len(f.xattrs) == refused_at,
                         "the largest acceptable entry synced")
        await a.write("after", 0, b"after", create=True)
        await wait_until(lambda: b.entry("after") is not None, "sync goes on")
        # An oversized entry stored before the fix is not sent (it would end every session).
        huge = replace(e, xattrs={f"user.{i:04x}" + "\x01" * 246: b"" for i in range(514)})
        assert len(huge.serialize()) > MAX_ENTRY_BYTES
        assert sync._batches([huge, e]) == [[e.serialize()]]


async def test_times_past_64_bits_are_refused(tmp_path: Path) -> None:
    """15.1 item 4: mtime and ctime had no upper bound; another implementation (and the
    kernel, through the VFS) holds 64 bits."""
    async with cluster(tmp_path, ["a"]) as nodes:
        a = nodes["a"]
        await a.write("f", 0, b"x", create=True)
        e = a.entry("f")
        assert e is not None
        ns = a.node.replica.keys.id
        now = time.time_ns()
        assert check_entry(e, ns, now) is None
        assert check_entry(replace(e, mtime_ns=2**63), ns, now) == "mtime or ctime out of bounds"
        assert check_entry(replace(e, ctime_ns=10**4000), ns, now) == "mtime or ctime out of bounds"


@pytest.mark.parametrize("complete,partial", [(20_000, 11), (0, 19)])
def test_own_holdings_always_fit_a_frame(complete: int, partial: int) -> None:
    """15.1 item 6: 20,000 whole manifests and 11 of 114 GiB in part (bitmaps of 58,000
    bytes), or 19 such alone, made `encode` raise ValueError in the session's sender."""
    secret = crypto.generate_secret()
    record = NodeHoldings(time.time_ns(), {os.urandom(32) for _ in range(complete)},
                          {os.urandom(32): bytearray(os.urandom(58_000)) for _ in range(partial)})
    frame = holdings_frame(crypto.public_key(secret).hex(), record, secret)
    assert len(encode(frame)) <= MAX_FRAME
    assert sync.holdings_verified(frame)


async def test_a_peer_that_stops_mid_frame_loses_its_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """15.1 item 13: after HELLO, a frame whose first bytes had arrived was read without a
    deadline: a peer that stopped mid-frame held the session (and its slot) for good."""
    monkeypatch.setattr(sync, "FRAME_TIMEOUT", 0.5)
    net, keys = MemoryNetwork(), NamespaceKeys.generate()
    async with peer(net, keys) as victim, net.open_transport() as hostile:
        stream = await hostile.open_stream(victim.addr, ALPN)
        async with stream:
            await stream.send_all(encode(Hello(keys.id, {})))
            await stream.send_all(encode(Hello(keys.id, {}))[:3])  # a frame that never ends
            await wait_until(lambda: any(s.peer == hostile.node_id for s in victim.sync.sessions()),
                             "the session started")
            await wait_until(lambda: not any(s.peer == hostile.node_id for s in victim.sync.sessions()),
                             "the stalled session ended")
            await wait_until(lambda: victim.transport.serving(ALPN) == 0, "the session's slot freed")

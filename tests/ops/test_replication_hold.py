"""The replica target's side of HOLD: what it accepts to keep."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from blixfs.chunkproto import hold_signed_bytes
from blixfs.content import Network
from blixfs.crypto import sign
from blixfs.fetcher import Fetcher
from blixfs.hashing import ChunkId
from blixfs.holdings import Holdings
from blixfs.net.memory import MemoryNetwork
from blixfs.node import Node
from blixfs.peers import PeerBook
from blixfs.replication import Replicator
from blixfs.sync import SyncService
from tests.helpers import write_file


async def test_hold_is_accepted_only_for_a_version_the_namespace_holds(tmp_path: Path) -> None:
    node = Node.open(tmp_path / "home", lock=False)
    try:
        vfs = node.vfs()
        await write_file(vfs, "img", os.urandom(100_000))
        e = node.namespace.get("img")
        assert e is not None and e.manifest is not None
        async with MemoryNetwork().open_transport(node.node_id.hex()) as transport:
            holdings = Holdings(node.node_id.hex())
            peers = PeerBook(node.node_id.hex())
            sync = SyncService(node.replica, transport, holdings)
            vfs.content.connect(Network(Fetcher(node.chunks, transport, peers), holdings, peers, list))
            replicator = Replicator(node, transport, sync, holdings, peers, vfs.content)
            async with trio.open_nursery() as nursery:
                await nursery.start(replicator.run)
                stranger = "ab" * 32
                me = bytes.fromhex(holdings.self_id)
                secret = node.replica.keys.secret
                assert secret is not None

                def signed(mid: bytes, path: str) -> bytes:  # a writer's HOLD to this node
                    return sign(secret, hold_signed_bytes(me, mid, path))

                bogus = ChunkId(os.urandom(32))
                assert not await replicator.on_hold(bogus, "img", stranger, signed(bogus, "img"))  # not of img
                mid = ChunkId(e.manifest)
                assert not await replicator.on_hold(mid, "other", stranger, signed(mid, "other"))  # not at that path
                assert node.replicas() == {}
                assert await replicator.on_hold(mid, "img", stranger, signed(mid, "img"))
                assert node.replicas() == {e.manifest: "img"}
                nursery.cancel_scope.cancel()
    finally:
        node.close()

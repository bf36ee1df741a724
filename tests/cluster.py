"""Whole nodes in one process: each a real `Node` (its home on disk), its `Vfs`, and every
daemon service (`blixfs.daemon.serve_node`), talking over the in-memory network.

For what needs several nodes but not iroh or FUSE: fast, deterministic, and the nodes'
state can be inspected directly. The real-iroh multi-process tests stay in
tests/multinode for what only they can show.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from blixfs.daemon import Runtime, serve_node
from blixfs.entry import Entry
from blixfs.errors import FsError
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import NodeAddr
from blixfs.node import Node
from blixfs.vfs import ROOT_INO, Vfs

CHUNK = 64 * 1024  # small chunks: many of them in little data


@dataclass
class InNode:
    name: str
    node: Node
    vfs: Vfs
    runtime: Runtime

    @property
    def id(self) -> str:
        return self.node.node_id.hex()

    def entry(self, path: str) -> Entry | None:
        return self.node.namespace.get(path)

    async def read(self, path: str) -> bytes:
        """The whole file, read through the VFS in 128 KiB requests like the kernel would."""
        ino = (await self.vfs.lookup(ROOT_INO, path)).ino
        fh = await self.vfs.open(ino, os.O_RDONLY)
        try:
            out = bytearray()
            while chunk := await self.vfs.read(fh, len(out), 128 * 1024):
                out += chunk
            return bytes(out)
        finally:
            await self.vfs.release(fh)

    async def write(self, path: str, offset: int, data: bytes, *, create: bool = False) -> None:
        """``data`` at ``offset`` of ``path`` (no truncation), then close: one commit."""
        fh = await self.open_for_write(path, create=create)
        await self.vfs.write(fh, offset, data)
        await self.vfs.release(fh)

    async def open_for_write(self, path: str, *, create: bool = False) -> int:
        if create:
            try:
                fh, _ = await self.vfs.create(ROOT_INO, path, 0o644, os.O_RDWR, 0, 0)
                return fh
            except FsError as exc:
                if exc.errno != errno.EEXIST:
                    raise
        ino = (await self.vfs.lookup(ROOT_INO, path)).ino
        return await self.vfs.open(ino, os.O_RDWR)


async def wait_until(condition: Callable[[], bool], what: str, within: float = 60.0) -> None:
    """Poll until ``condition`` holds (nothing signals these states); fail naming ``what``."""
    with trio.move_on_after(within):
        while not condition():  # noqa: ASYNC110 - no event exists for these cross-node states
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {within}s waiting for {what}")


@asynccontextmanager
async def cluster(tmp_path: Path, names: list[str], *, copies: int = 1,
                  fetch_timeout: float = 20.0) -> AsyncIterator[dict[str, InNode]]:
    """Nodes ``names`` in one namespace (the first creates it), every pair keeping a session."""
    net = MemoryNetwork()
    nodes: dict[str, InNode] = {}
    opened: list[Node] = []
    try:
        async with trio.open_nursery() as nursery:
            for name in names:
                home = tmp_path / name
                if opened:
                    opened[0].replica.keys.save(home / "namespace")
                node = Node.open(home, lock=False)
                opened.append(node)
                vfs = node.vfs(chunk_size=CHUNK)
                transport = await nursery.start(_transport, net, node.node_id.hex())
                runtime = await nursery.start(partial(serve_node, node, transport, vfs=vfs, copies=copies,
                                                      fetch_timeout=fetch_timeout, control=False))
                nodes[name] = InNode(name, node, vfs, runtime)
            for a in nodes.values():
                for b in nodes.values():
                    if a is not b:
                        a.runtime.keep_session(NodeAddr(b.id))
            await wait_until(lambda: all(len([s for s in n.runtime.sync.sessions() if s.synced.is_set()])
                                         >= len(nodes) - 1 for n in nodes.values()), "every session synced")
            yield nodes
            nursery.cancel_scope.cancel()
    finally:
        for node in opened:
            node.close()


async def _transport(net: MemoryNetwork, node_id: str, *, task_status: trio.TaskStatus[object]) -> None:
    async with net.open_transport(node_id) as transport:
        task_status.started(transport)
        await trio.sleep_forever()

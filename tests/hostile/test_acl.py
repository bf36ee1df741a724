"""Access control per node (blixfs.members): closed namespaces, roles, revokes.

Whole nodes in one process over the in-memory network (tests/cluster.py). Nodes share the
namespace secret (every node of `cluster` can sign), so these are the cases the member
list must handle by author id: a read member that holds the secret, a revoked writer.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from blixfs.chunkproto import FetchFailed, request_hold
from blixfs.entry import Entry, Kind
from blixfs.errors import FsError
from blixfs.hashing import ChunkId
from blixfs.members import Role
from blixfs.net.transport import NodeAddr, TransportError
from tests.cluster import CHUNK, InNode, cluster, wait_until


def forged(author: InNode, path: str) -> Entry:
    """An entry of ``path`` signed by ``author`` with the namespace secret (which it holds),
    made behind its own replica's checks: what a hostile or buggy node can send."""
    ts = author.node.replica.stamp(None)
    e = Entry(path=path, kind=Kind.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
              author=author.node.node_id, timestamp_ns=ts)
    return author.node.replica._sign(e)


def sessions_with(n: InNode, peer: InNode) -> int:
    """Synced sessions ``n`` has with ``peer`` (a refused node keeps redialling: its attempts
    come and go, but none gets past HELLO)."""
    return sum(1 for s in n.runtime.sync.sessions() if s.peer == peer.id and s.synced.is_set())


def synced(n: InNode) -> bool:
    return any(s.synced.is_set() for s in n.runtime.sync.sessions())


async def close_namespace(admin: InNode, roles: list[tuple[InNode, Role]]) -> None:
    replica = admin.node.replica
    replica.set_member(admin.node.node_id, Role.ADMIN)
    for n, role in roles:
        replica.set_member(n.node.node_id, role)
    listed = [admin, *(n for n, _ in roles)]
    await wait_until(lambda: all(m.node.replica.members.role(n.node.node_id) == r
                                 for m in listed for n, r in [(admin, Role.ADMIN), *roles]),
                     "the member list on every member")


async def test_roles_and_revoke_in_a_closed_namespace(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "b", "c"], copies=1, fetch_timeout=5.0) as nodes:
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        await close_namespace(a, [(b, Role.WRITE), (c, Role.READ)])

        # c, a read member, cannot write through its mount...
        with pytest.raises(FsError) as raised:
            await c.write("from-c", 0, b"x", create=True)
        assert raised.value.errno == errno.EROFS
        # ... and what it signs anyway (it holds the secret) is refused by a and b.
        refused_before = a.node.replica.members.role(c.node.node_id)
        assert refused_before is Role.READ
        bad = forged(c, "forged-by-c")
        c.node.replica.store.apply([bad])
        c.node.replica._notify([bad], None)  # pushed live to a and b
        await wait_until(lambda: any(s.refused for s in a.runtime.sync.sessions() if s.peer == c.id)
                         and any(s.refused for s in b.runtime.sync.sessions() if s.peer == c.id),
                         "a and b to refuse c's entry")
        assert a.entry("forged-by-c") is None and b.entry("forged-by-c") is None

        # b, a writer, writes; everyone gets it. bimg is held by b only (copies=1).
        data = os.urandom(4 * CHUNK)
        await b.write("bimg", 0, data, create=True)
        await wait_until(lambda: a.entry("bimg") == b.entry("bimg") == c.entry("bimg"), "b's file everywhere")
        mid = b.entry("bimg").manifest  # type: ignore[union-attr]
        assert mid is not None

        # Revoke b.
        a.node.replica.set_member(b.node.node_id, None)
        await wait_until(lambda: c.node.replica.members.role(b.node.node_id) is None, "the revoke on c")
        await wait_until(lambda: sessions_with(a, b) == 0 and sessions_with(c, b) == 0
                         and not synced(b), "b's sessions to end everywhere")
        assert a.node.replica.members.closed and not a.node.replica.members.allows(b.node.node_id)

        # b can no longer fetch from a or c, nor ask them to HOLD.
        for other in (a, c):
            with pytest.raises((FetchFailed, TransportError)):
                with trio.fail_after(30):
                    await b.runtime.fetcher.client.fetch(NodeAddr(other.id), ChunkId(mid))
        with trio.fail_after(30):
            try:
                accepted = await request_hold(b.runtime.transport, NodeAddr(a.id), ChunkId(mid), "bimg",
                                              b.node.replica.keys.secret)  # a revoked writer still has it
            except TransportError:  # refused with a reset (CODE_NOT_MEMBER)
                accepted = False
        assert not accepted

        # b's later entries are refused by a and c, directly or relayed.
        late = forged(b, "late-from-b")
        _, refused = await a.node.replica.merge_remote([late], c.id)
        assert refused == 1 and a.entry("late-from-b") is None
        _, refused = await c.node.replica.merge_remote([late], a.id)
        assert refused == 1 and c.entry("late-from-b") is None

        # a never asks b for content (b alone holds bimg: a's read fails) and never HOLDs to it.
        served = b.runtime.server.requests
        with pytest.raises(FsError) as raised:
            await a.read("bimg")
        assert raised.value.errno == errno.EIO
        assert b.runtime.server.requests == served
        replicator = a.runtime.replicator
        assert replicator is not None
        replicator.default_copies = 2
        await a.write("after", 0, os.urandom(2 * CHUNK), create=True)
        after = a.entry("after")
        assert after is not None

        def durable() -> bool:
            return any(r["path"] == "after" and r["state"] == "durable" for r in replicator.report())

        await wait_until(durable, "a's new file held by a and c")
        assert after.manifest in c.runtime.holdings.own.complete
        assert after.manifest not in b.runtime.holdings.own.complete and not b.node.replicas()
        assert b.entry("after") is None  # b no longer syncs


async def test_a_node_not_in_the_list_cannot_sync(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "b", "d"], fetch_timeout=5.0) as nodes:
        a, b, d = nodes["a"], nodes["b"], nodes["d"]
        await close_namespace(a, [(b, Role.WRITE)])
        await wait_until(lambda: sessions_with(a, d) == 0 and sessions_with(b, d) == 0
                         and not synced(d), "d's sessions to end")
        await a.write("secret-img", 0, os.urandom(CHUNK), create=True)
        await wait_until(lambda: b.entry("secret-img") is not None, "a's file on b")
        e = a.entry("secret-img")
        assert e is not None and e.manifest is not None
        with pytest.raises((FetchFailed, TransportError)):
            with trio.fail_after(30):
                await d.runtime.fetcher.client.fetch(NodeAddr(a.id), ChunkId(e.manifest))
        # d keeps redialing (backoff) and is refused each time: it never gets the file.
        await trio.sleep(1.0)
        assert d.entry("secret-img") is None and not synced(d)


async def test_an_open_namespace_behaves_as_before(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        assert not a.node.replica.members.closed
        await b.write("f", 0, b"hello", create=True)
        await wait_until(lambda: a.entry("f") == b.entry("f"), "b's file on a")
        assert await a.read("f") == b"hello"


async def test_the_daemon_changes_the_list_over_its_control_socket(tmp_path: Path) -> None:
    import json

    from blixfs.daemon import _dispatch

    async with cluster(tmp_path, ["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]

        def ask(request: dict[str, str]) -> dict[str, object]:
            return _dispatch(json.dumps(request).encode(), a.runtime)

        assert ask({"op": "allow", "node": b.id, "role": "write"})["ok"] is False  # open: a must found it
        assert ask({"op": "allow", "node": a.id, "role": "admin"})["ok"] is True
        reply = ask({"op": "allow", "node": b.id, "role": "write"})
        member = reply["member"]
        assert reply["ok"] is True and isinstance(member, dict)
        assert (member["node"], member["role"], member["set_by"]) == (b.id, "write", a.id)
        await wait_until(lambda: b.node.replica.members.role(b.node.node_id) is Role.WRITE, "the grant on b")
        assert ask({"op": "allow", "node": "xyz", "role": "write"})["ok"] is False
        assert ask({"op": "revoke", "node": b.id})["ok"] is True
        await wait_until(lambda: not synced(b) and sessions_with(a, b) == 0, "b's session to end")

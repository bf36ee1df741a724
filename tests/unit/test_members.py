"""The member list (blixfs.members): record format, who may change it, who may write."""

from __future__ import annotations

import errno
import time
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixfs.crypto import generate_secret
from blixfs.entry import Entry, Kind
from blixfs.errors import FsError
from blixfs.members import MEMBERS_DIR, MemberList, Role, check_reserved, member_path, parse_node_id
from blixfs.replica import Replica, check_entry
from tests.helpers import make_replica


def trio_of_replicas() -> tuple[Replica, Replica, Replica]:
    """Three nodes of one namespace, each holding its secret."""
    a = make_replica()
    return a, make_replica(keys=a.keys), make_replica(keys=a.keys)


def file_entry(r: Replica, path: str) -> Entry:
    ts = r.stamp(None)
    e = Entry(path=path, kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
              author=r.author, timestamp_ns=ts)
    return r._sign(e)


async def sync_all(src: Replica, dst: Replica) -> int:
    _, refused = await dst.merge_remote(list(src.store.entries_since({})), "peer")
    return refused


def test_record_format() -> None:
    r = make_replica()
    record = r.set_member(r.author, Role.ADMIN)
    assert record.path == f"{MEMBERS_DIR}/{r.author.hex()}" == member_path(r.author)
    assert record.kind is Kind.DIR and record.target == "admin" and not record.deleted
    assert record.manifest is None and record.size == 0 and record.mode == 0
    assert check_entry(record, r.keys.id, time.time_ns()) is None
    assert r.members.closed and r.members.role(r.author) is Role.ADMIN


@pytest.mark.parametrize("change", [
    {"target": "owner"}, {"kind": Kind.FILE}, {"mode": 0o755}, {"size": 1}, {"manifest": bytes(32)},
    {"meta": {"name": "x"}}, {"path": MEMBERS_DIR}, {"path": MEMBERS_DIR + "/zz"},
    {"path": MEMBERS_DIR + "/" + "AB" * 32}, {"deleted": True},  # a revoke has target ""
])
def test_malformed_records_are_refused(change: dict[str, object]) -> None:
    r = make_replica()
    ts = time.time_ns()
    e = Entry(path=member_path(r.author), kind=Kind.DIR, mode=0, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
              author=r.author, timestamp_ns=ts, target="admin")
    bad = r._sign(replace(e, **change))  # type: ignore[arg-type]
    assert check_reserved(bad) is not None
    assert check_entry(bad, r.keys.id, time.time_ns()) is not None


@given(st.text(max_size=80))
def test_reserved_check_never_raises(name: str) -> None:
    e = Entry(path=f"{MEMBERS_DIR}/{name}", kind=Kind.DIR, mode=0, uid=0, gid=0, size=0, mtime_ns=1, ctime_ns=1,
              author=bytes(32), timestamp_ns=1, target=name)
    check_reserved(e)


def test_the_vfs_cannot_write_the_reserved_tree() -> None:
    r = make_replica()
    with pytest.raises(FsError) as raised:
        r.commit_local([file_entry(r, MEMBERS_DIR)])
    assert raised.value.errno == errno.EPERM


async def test_roles_govern_who_writes_and_who_changes_the_list() -> None:
    a, b, c = trio_of_replicas()
    a.set_member(a.author, Role.ADMIN)
    a.set_member(b.author, Role.WRITE)
    a.set_member(c.author, Role.READ)
    for r in (b, c):
        assert await sync_all(a, r) == 0
        assert r.members.role(b.author) is Role.WRITE
    assert b.writable and not c.writable
    with pytest.raises(FsError) as raised:  # c holds the secret, but is a read member
        c.commit_local([file_entry(c, "x")])
    assert raised.value.errno == errno.EROFS
    # What c signs anyway is refused by author id.
    _, refused = await a.merge_remote([file_entry(c, "x")], "c")
    assert refused == 1 and a.store.get("x") is None
    _, refused = await a.merge_remote([file_entry(b, "y")], "b")
    assert refused == 0 and a.store.get("y") is not None
    # b, a writer, may not change the list, locally or remotely.
    with pytest.raises(FsError) as raised:
        b.set_member(c.author, Role.ADMIN)
    assert raised.value.errno == errno.EPERM
    ts = b.stamp(None)
    grant = b._sign(Entry(path=member_path(b.author), kind=Kind.DIR, mode=0, uid=0, gid=0, size=0, mtime_ns=ts,
                          ctime_ns=ts, author=b.author, timestamp_ns=ts, target="admin"))
    _, refused = await a.merge_remote([grant], "b")
    assert refused == 1 and a.members.role(b.author) is Role.WRITE


async def test_revoked_writer_is_refused_everywhere_the_revoke_arrived() -> None:
    a, b, c = trio_of_replicas()
    a.set_member(a.author, Role.ADMIN)
    a.set_member(b.author, Role.WRITE)
    await sync_all(a, b)
    before = file_entry(b, "before")
    await a.merge_remote([before], "b")
    a.set_member(b.author, None)
    await sync_all(a, c)
    assert c.members.closed and c.members.role(b.author) is None and not c.members.allows(b.author)
    _, refused = await c.merge_remote([file_entry(b, "later")], "b")
    assert refused == 1 and c.store.get("later") is None
    # A revoke list stays closed even if every node is revoked: the last admin cannot leave.
    with pytest.raises(FsError):
        a.set_member(a.author, None)


async def test_the_first_list_must_be_founded_by_its_author() -> None:
    a, b, _ = trio_of_replicas()
    with pytest.raises(FsError):
        a.set_member(b.author, Role.ADMIN)  # open namespace: only "me, admin" closes it
    assert not a.members.closed
    a.set_member(a.author, Role.ADMIN)
    b.set_member(b.author, Role.ADMIN)  # a concurrent founding on b
    refused = await sync_all(b, a)
    assert refused == 1 and a.members.role(b.author) is None  # a keeps the list it had


async def test_a_batch_is_admitted_in_any_order() -> None:
    """The grant of an admin and the records it authored, in one batch, reversed."""
    a, b, c = trio_of_replicas()
    a.set_member(a.author, Role.ADMIN)
    a.set_member(b.author, Role.ADMIN)
    await sync_all(a, b)
    b.set_member(c.author, Role.WRITE)
    b.commit_local([file_entry(b, "by-b")])
    batch = sorted(b.store.entries_since({}), key=lambda e: e.timestamp_ns, reverse=True)
    _, refused = await c.merge_remote(batch, "b")
    assert refused == 0 and c.members.role(c.author) is Role.WRITE and c.store.get("by-b") is not None


async def test_open_namespace_admits_every_writer() -> None:
    a, b, _ = trio_of_replicas()
    _, refused = await a.merge_remote([file_entry(b, "f")], "b")
    assert refused == 0 and not a.members.closed and a.members.allows(b.author, Role.ADMIN)


def test_member_list_is_read_back_from_the_store() -> None:
    a = make_replica()
    a.set_member(a.author, Role.ADMIN)
    other = generate_secret()
    reopened = Replica(a.store, a.keys, other)
    assert reopened.members.closed and reopened.members.role(a.author) is Role.ADMIN
    assert not reopened.writable  # it holds the secret but is not listed
    assert MemberList().allows(bytes(32))


def test_parse_node_id() -> None:
    nid = bytes(range(32))
    assert parse_node_id(nid.hex().upper()) == nid
    assert parse_node_id(nid.hex() + "@127.0.0.1:4433") == nid
    with pytest.raises(ValueError):
        parse_node_id("abc")

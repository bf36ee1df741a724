"""Replica: signing local versions, refusing bad remote ones (each with a reason)."""

from __future__ import annotations

import errno
import pickle
import time
from dataclasses import replace

import pytest

from blixfs.crypto import generate_secret, sign
from blixfs.entry import Entry, Kind
from blixfs.errors import FsError
from blixfs.frames import FrameError
from blixfs.namespace import MemoryNamespaceStore, Outcome
from blixfs.replica import MAX_FUTURE_NS, NamespaceKeys, Replica, check_entry
from tests.helpers import make_replica


def local_entry(r: Replica, path: str = "f", **kw: object) -> Entry:
    ts = r.stamp(None)
    base = dict(path=path, kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
                author=r.author, timestamp_ns=ts)
    base.update(kw)
    return Entry(**base)  # type: ignore[arg-type]


def signed_by(keys: NamespaceKeys, node_secret: bytes, e: Entry) -> Entry:
    assert keys.secret is not None
    m = e.canonical()
    return replace(e, namespace_sig=sign(keys.secret, m), author_sig=sign(node_secret, m))


async def test_local_commits_are_signed_and_verify_elsewhere() -> None:
    writer = make_replica()
    writer.commit_local([local_entry(writer)])
    (stored,) = list(writer.store.entries())
    assert check_entry(stored, writer.keys.id, time.time_ns()) is None
    reader = make_replica(keys=NamespaceKeys(writer.keys.id))
    outcomes, refused = await reader.merge_remote([stored], "peer")
    assert outcomes == [Outcome.NEW] and refused == 0


async def test_read_capability_cannot_write() -> None:
    reader = make_replica(keys=NamespaceKeys(NamespaceKeys.generate().id))
    with pytest.raises(FsError) as info:
        reader.commit_local([local_entry(reader)])
    assert info.value.errno == errno.EROFS


async def test_bad_entries_are_refused_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    keys = NamespaceKeys.generate()
    node = generate_secret()
    r = make_replica(keys=keys, node_secret=node)
    good = signed_by(keys, node, local_entry(r, "good"))
    other_ns = signed_by(NamespaceKeys.generate(), node, local_entry(r, "forged"))
    wrong_author = signed_by(keys, generate_secret(), local_entry(r, "impostor"))
    future = signed_by(keys, node, local_entry(r, "future", timestamp_ns=time.time_ns() + MAX_FUTURE_NS + 10**12))
    bad_path = signed_by(keys, node, local_entry(r, "../etc/passwd"))
    huge = signed_by(keys, node, local_entry(r, "huge", size=1 << 62))
    tampered = replace(good, path="tampered")  # signatures no longer match the content
    batch = [other_ns, wrong_author, future, bad_path, huge, tampered, good]
    target = make_replica(store=MemoryNamespaceStore(), keys=NamespaceKeys(keys.id))
    outcomes, refused = await target.merge_remote(batch * 10, "hostile-peer-id")  # big enough for threads
    assert refused == 60 and set(outcomes) == {Outcome.NEW, Outcome.DUPLICATE}
    assert [e.path for e in target.store.entries()] == ["good"]
    for why in ("writer lacks write capability", "author signature", "in the future", "bad path component",
                "out of bounds"):
        assert why in caplog.text
    assert "hostile-peer-id"[:16] in caplog.text


def test_stamps_are_monotonic_and_beat_what_they_replace() -> None:
    r = make_replica()
    ahead = local_entry(r, timestamp_ns=time.time_ns() + 5 * 10**9)  # a peer whose clock runs ahead
    first = r.stamp(ahead)
    assert first > ahead.timestamp_ns and r.stamp(None) > first


async def test_hostile_contexts_and_text_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    keys = NamespaceKeys.generate()
    node = generate_secret()
    r = make_replica(keys=keys, node_secret=node)
    e = local_entry(r, "f")
    inflated = signed_by(keys, node, replace(e, seen={bytes(32): 10**30}))
    self_future = signed_by(keys, node, replace(e, seen={r.author: e.timestamp_ns}))
    target = make_replica(keys=NamespaceKeys(keys.id))
    _, refused = await target.merge_remote([inflated, self_future], "peer")
    assert refused == 2 and "causal context" in caplog.text
    surrogate = replace(e, path="bad\udc80name", namespace_sig=bytes(64), author_sig=bytes(64))
    assert check_entry(surrogate, keys.id, time.time_ns()) == "text that is not valid UTF-8"


def test_atime_is_optional_in_the_canonical_form_and_checked_when_present() -> None:
    keys = NamespaceKeys.generate()
    node = generate_secret()
    r = make_replica(keys=keys, node_secret=node)
    plain = local_entry(r, "f")
    # Unset: the canonical form is what it was before the field existed, and decodes back to None.
    assert b"atime_ns" not in plain.canonical()
    assert Entry.deserialize(plain.serialize()).atime_ns is None
    assert plain.effective_atime_ns == plain.mtime_ns
    set_ = signed_by(keys, node, replace(plain, atime_ns=-1 + 2**63))
    assert set_.canonical().startswith(b'{"atime_ns":9223372036854775807,"author":')
    back = Entry.deserialize(set_.serialize())
    assert back == set_ and back.entry_hash() == set_.entry_hash()
    assert check_entry(back, keys.id, time.time_ns()) is None
    for bad in (-1, 2**63):
        e = signed_by(keys, node, replace(plain, atime_ns=bad))
        assert check_entry(e, keys.id, time.time_ns()) == "atime out of bounds"


@pytest.mark.parametrize("kind, deleted", [(Kind.FILE, False), (Kind.SYMLINK, False), (Kind.DIR, True)])
async def test_a_root_that_is_not_a_live_directory_is_refused(
        kind: Kind, deleted: bool, caplog: pytest.LogCaptureFixture) -> None:
    keys = NamespaceKeys.generate()
    node = generate_secret()
    r = make_replica(keys=keys, node_secret=node)
    bad = signed_by(keys, node, local_entry(r, "", kind=kind, deleted=deleted, mode=0o755,
                                            target="x" if kind is Kind.SYMLINK else ""))
    chmod = signed_by(keys, node, local_entry(r, "", kind=Kind.DIR, mode=0o700))  # the root's own entry is fine
    target = make_replica(keys=NamespaceKeys(keys.id))
    outcomes, refused = await target.merge_remote([bad, chmod], "hostile-peer-id")
    assert refused == 1 and outcomes == [Outcome.NEW]
    root = target.store.get("")
    assert root is not None and root.kind is Kind.DIR and root.mode == 0o700
    assert "refused entry ''" in caplog.text and "root" in caplog.text and "hostile-peer-i" in caplog.text
    # Nor can this node make one: the commit is refused whole, nothing stored.
    with pytest.raises(FsError) as info:
        r.commit_local([local_entry(r, "f"), local_entry(r, "", kind=kind, deleted=deleted)])
    assert info.value.errno == errno.EINVAL
    assert list(r.store.entries()) == []


async def test_checks_hash_the_entries_they_verify_and_merging_uses_that_hash() -> None:
    """`check_entry` (the sync's checking threads) leaves each valid entry's hash computed, so
    the merge on the trio thread does not encode it again; the hash is the one `entry_hash`
    gives a fresh copy, and the entries merge as they would otherwise."""
    keys = NamespaceKeys.generate()
    node = generate_secret()
    writer = make_replica(keys=keys, node_secret=node)
    entries = [Entry.deserialize(signed_by(keys, node, local_entry(writer, f"f{i}")).serialize()) for i in range(70)]
    tampered = replace(entries[0], path="tampered")  # the signatures no longer match: refused, not hashed
    reader = make_replica(keys=NamespaceKeys(keys.id))
    problems = await reader.check([*entries, tampered])  # 71 entries: worker processes (THREADED_CHECK_MIN)
    assert problems[:-1] == [None] * 70 and problems[-1] is not None
    assert tampered._hash is None
    for e in entries:
        assert e._hash is not None and e._hash == Entry.deserialize(e.serialize()).entry_hash()
    outcomes, refused = reader.merge_checked([*entries, tampered], problems, "peer")
    assert outcomes == [Outcome.NEW] * 70 and refused == 1
    assert sorted(e.path for e in reader.store.entries()) == sorted(e.path for e in entries)


async def test_a_frame_checked_in_worker_processes_gets_the_verdicts_check_entry_gives() -> None:
    """A sync frame's entries are decoded and checked from their received bytes in worker
    processes (`Replica.check_received`, `lowprio.run_in_process`): the same entries, the
    same verdicts in the same order as `check_entry` on this thread, each valid entry's
    hash computed; an entry that does not decode refuses the whole frame."""
    keys = NamespaceKeys.generate()
    node = generate_secret()
    writer = make_replica(keys=keys, node_secret=node)
    good = [signed_by(keys, node, local_entry(writer, f"d/f{i}")) for i in range(70)]
    stranger = NamespaceKeys.generate()
    bad = [
        replace(good[0], path="d/tampered"),  # signatures over other bytes
        replace(good[1], author_sig=bytes(64)),
        signed_by(stranger, node, local_entry(writer, "d/other-namespace")),
        signed_by(keys, node, local_entry(writer, "d/../escape")),
        signed_by(keys, node, local_entry(writer, "d/negative", mtime_ns=-1)),
    ]
    mixed = [*good[:30], *bad, *good[30:]]
    raw = [e.serialize() for e in mixed]
    reader = make_replica(keys=NamespaceKeys(keys.id))
    received, problems = await reader.check_received(raw)
    assert received == mixed
    expected = [check_entry(Entry.deserialize(data), keys.id, time.time_ns()) for data in raw]
    assert problems == expected
    assert [p is None for p in problems] == [e in good for e in mixed]
    for e, p in zip(received, problems, strict=True):
        assert (e._hash is not None) == (p is None)
        if p is None:
            assert e._hash == Entry.deserialize(e.serialize()).entry_hash()
    with pytest.raises(FrameError, match="undecodable"):
        await reader.check_received([*raw, b'{"path": 1}'])
    with pytest.raises(FrameError, match="undecodable"):  # and the same for a small frame, on this thread
        await reader.check_received([raw[0], b"[]"])


def test_an_entry_pickles_with_every_field_and_its_hash() -> None:
    """Worker processes hand decoded entries back pickled (`Entry.__reduce__`)."""
    e = Entry(path="a/b", kind=Kind.SYMLINK, mode=0o644, uid=1, gid=2, size=3, mtime_ns=4, ctime_ns=5,
              author=bytes([1]) * 32, timestamp_ns=6, manifest=bytes([2]) * 32, target="t", meta={"os": "x"},
              xattrs={"user.k": b"v"}, deleted=True, seen={bytes([3]) * 32: 5}, atime_ns=8,
              namespace_sig=bytes([4]) * 64, author_sig=bytes([5]) * 64)
    again = pickle.loads(pickle.dumps(e))
    assert again == e and again.serialize() == e.serialize() and again._hash is None
    e.entry_hash()
    again = pickle.loads(pickle.dumps(e))
    assert again._hash == e._hash == again.entry_hash()

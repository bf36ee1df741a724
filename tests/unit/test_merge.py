"""The merge rule: siblings, conflicts, and convergence whatever the delivery order."""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blixfs.entry import Entry, Kind, shown_as_conflict, write_context, write_timestamp
from blixfs.namespace import MemoryNamespaceStore, NamespaceStore, Outcome, SqliteNamespaceStore

A, B, C = (bytes([i]) * 32 for i in (1, 2, 3))


def version(path: str, author: bytes, ts: int, on_top_of: Entry | None = None, *, size: int = 1,
            deleted: bool = False, kind: Kind = Kind.FILE) -> Entry:
    return Entry(path=path, kind=kind, mode=0o644, uid=0, gid=0, size=size, mtime_ns=ts, ctime_ns=ts,
                 author=author, timestamp_ns=ts, manifest=bytes([size % 256]) * 32 if size else None,
                 deleted=deleted, seen=on_top_of.successor_context() if on_top_of else {})


@pytest.fixture(params=["memory", "sqlite"])
def ns(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NamespaceStore]:
    s: NamespaceStore = MemoryNamespaceStore() if request.param == "memory" else SqliteNamespaceStore(tmp_path / "n.db")
    yield s
    s.close()


def state(ns: NamespaceStore) -> tuple[set[bytes], set[bytes]]:
    return ({e.entry_hash() for e in ns.entries()},
            {e.entry_hash() for e in ns.entries_since({})} - {e.entry_hash() for e in ns.entries()})


def test_concurrent_writes_keep_the_loser_either_order(ns: NamespaceStore) -> None:
    base = version("img", C, 1)
    a = version("img", A, 10, base, size=2)
    b = version("img", B, 11, base, size=3)
    other = MemoryNamespaceStore()
    assert ns.apply([base, a, b]) == [Outcome.NEW, Outcome.NEW, Outcome.NEW]
    assert other.apply([base, b, a]) == [Outcome.NEW, Outcome.NEW, Outcome.CONFLICT]
    for s in (ns, other):
        assert s.get("img") == b  # the later timestamp wins everywhere
        assert s.conflicts_under("") == [a]
        assert shown_as_conflict(b, a) and a.conflict_name() == f"img.conflict-{A.hex()[:8]}-10"


def test_a_version_that_saw_the_other_is_no_conflict(ns: NamespaceStore) -> None:
    a = version("f", A, 10)
    b = version("f", B, 11, a)
    ns.apply([b, a])
    assert ns.get("f") == b and ns.conflicts_under("") == []


def test_loser_stays_a_conflict_after_history_moves_on(ns: NamespaceStore) -> None:
    """L races W; C overwrites W without ever seeing L: L must still be kept, in any order."""
    base = version("f", C, 1)
    loser = version("f", A, 10, base, size=2)
    w = version("f", B, 11, base, size=3)
    later = version("f", C, 20, w, size=4)
    for order in ([base, loser, w, later], [base, later, loser, w], [later, w, loser, base]):
        s = MemoryNamespaceStore()
        s.apply(order)
        assert s.get("f") == later and s.conflicts_under("") == [loser], order
    ns.apply([base, w, later, loser])
    assert ns.conflicts_under("") == [loser]


def test_resolving_a_conflict_is_a_write_that_saw_it(ns: NamespaceStore) -> None:
    a, b = version("f", A, 10, size=2), version("f", B, 11, size=3)
    ns.apply([a, b])
    resolved = b.evolve(timestamp_ns=12, seen={**b.successor_context(), A: 10})
    assert ns.apply([resolved]) == [Outcome.NEW]
    assert ns.conflicts_under("") == []


def test_delete_racing_a_write_keeps_the_write(ns: NamespaceStore) -> None:
    base = version("f", C, 1)
    tomb = version("f", B, 12, base, deleted=True)
    write = version("f", A, 11, base, size=9)
    ns.apply([base, write, tomb])
    assert ns.get("f") is None
    (kept,) = ns.conflicts_under("")
    assert kept == write and shown_as_conflict(tomb, write)


def test_concurrent_chmod_and_mkdir_are_not_shown_as_conflicts() -> None:
    a = version("f", A, 10, size=5)
    b = a.evolve(author=B, timestamp_ns=11, mode=0o600)
    assert not shown_as_conflict(b, a)
    d1, d2 = version("d", A, 10, kind=Kind.DIR, size=0), version("d", B, 11, kind=Kind.DIR, size=0)
    assert not shown_as_conflict(d2, d1)


def test_entries_since_and_vector(ns: NamespaceStore) -> None:
    a1, b1, a2 = version("x", A, 5), version("y", B, 6), version("z", A, 9)
    ns.apply([a1, b1, a2])
    assert {e.path for e in ns.entries_since({A: 5})} == {"y", "z"}
    assert {e.path for e in ns.entries_since({A: 9, B: 6})} == set()
    ns.advance_vector({A: 5})
    ns.advance_vector({A: 3, B: 6})
    assert ns.vector() == {A: 5, B: 6}


class Replica:
    """A simulated node: writes on top of its own current state, like the VFS does."""

    def __init__(self, author: bytes) -> None:
        self.author = author
        self.store = MemoryNamespaceStore()
        self.clock = 0

    def write(self, path: str, rng: random.Random) -> Entry:
        cur = self.store.get_any(path)
        self.clock = max(self.clock + 1, (cur.timestamp_ns + 1) if cur else 0)
        e = version(path, self.author, self.clock, cur, size=rng.randrange(1, 4), deleted=rng.random() < 0.15)
        e = e.evolve(seen=write_context(cur, self.store.versions(path), self.author))  # as the VFS writes
        assert self.store.apply([e]) == [Outcome.NEW]
        return e


def assert_converge(replicas: list[Replica], rng: random.Random, steps: int) -> None:
    """Random writes and partial syncs, then every version to every replica in any order,
    twice: all replicas and a fresh store that got them newest first hold the same state."""
    written: list[Entry] = []
    for _ in range(steps):
        r = rng.choice(replicas)
        if rng.random() < 0.7:
            written.append(r.write(rng.choice(["a", "b", "c"]), rng))
        else:  # partial sync: r receives a random sample, duplicates included
            r.store.apply(rng.choices(written, k=min(len(written), rng.randrange(0, 6))) if written else [])
    finals = []
    for r in replicas:
        late = written * 2
        rng.shuffle(late)
        r.store.apply(late)
        finals.append(state(r.store))
    fresh = MemoryNamespaceStore()
    fresh.apply(list(reversed(written)))
    assert finals[0] == finals[1] == finals[2] == state(fresh)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**32), st.integers(5, 60))
@example(seed=185, steps=52)  # found non-transitive domination (fixed by entry.write_context)
@example(seed=771, steps=37)  # an author's own conflict copy covered through its clock (write_context rule 2)
def test_three_replicas_converge_in_any_order_with_duplicates(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    replicas = [Replica(a) for a in (A, B, C)]
    assert_converge(replicas, rng, steps)


class SkewedReplica(Replica):
    """A simulated node whose clock is ``skew`` ahead or behind, stamping as `Replica.stamp`
    does: the clock, not the replaced version's timestamp + 1 (protocol.md 5.5)."""

    def __init__(self, author: bytes, skew: int, ticks: list[int]) -> None:
        super().__init__(author)
        self.skew, self.ticks, self.last = skew, ticks, 0

    def write(self, path: str, rng: random.Random) -> Entry:
        self.ticks[0] += 10
        cur = self.store.get_any(path)
        versions = self.store.versions(path)
        seen = write_context(cur, versions, self.author, self.last)
        self.last = write_timestamp(max(0, self.ticks[0] + self.skew), self.last, self.author, seen, versions)
        e = version(path, self.author, self.last, cur, size=rng.randrange(1, 4), deleted=rng.random() < 0.15)
        e = e.evolve(seen=seen)
        assert all(t < e.timestamp_ns if a == e.author else t <= e.timestamp_ns + 600 * 10**9
                   for a, t in e.seen.items())  # valid (protocol.md 12, step 11)
        assert self.store.apply([e]) == [Outcome.NEW]  # a local write always becomes current
        return e


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.integers(5, 60), st.lists(st.integers(-300, 300), min_size=3, max_size=3))
def test_replicas_with_skewed_clocks_converge_and_writes_win_through_seen(seed: int, steps: int,
                                                                          skews: list[int]) -> None:
    """As above, with clocks tens of writes apart: a write over a version stamped ahead keeps
    its own clock's timestamp and still replaces it (through ``seen``), on every node."""
    rng = random.Random(seed)
    ticks = [1000]
    replicas = [SkewedReplica(a, skew, ticks) for a, skew in zip((A, B, C), skews, strict=True)]
    assert_converge(replicas, rng, steps)


def test_an_authors_own_old_sibling_is_not_lost_through_its_later_versions() -> None:
    """The history hypothesis found (seed 185): author A's tombstone T lost to X and stayed a
    sibling; A wrote again over X; a version written over that must cover what T had seen,
    or T's own sibling S is dropped on some nodes and kept on others."""
    base = version("b", A, 1)
    s_b = version("b", B, 2, base, deleted=True)  # B's delete
    t_a = version("b", A, 4, base, deleted=True).evolve(seen={A: 1, B: 2})  # A's delete, over B's
    x = version("b", C, 5, base)  # concurrent with both
    orders = []
    for order in ([base, s_b, t_a, x], [x, t_a, s_b, base], [base, x, s_b, t_a]):
        st = MemoryNamespaceStore()
        st.apply(order)
        a_next = version("b", A, 12, st.get_any("b")).evolve(seen=write_context(st.get_any("b"), st.versions("b"), A))
        st.apply([a_next])
        orders.append((st, a_next))
    finals = []
    for st, _ in orders:
        for _, other_next in orders:
            st.apply([other_next])
        finals.append(state(st))
    assert finals[0] == finals[1] == finals[2]


def test_empty_mappings_of_an_entry_add_nothing_the_cyclic_gc_walks() -> None:
    """A node caches tens of thousands of decoded entries and every full GC pass walks what
    it tracks on the event loop: an entry without metadata, xattrs or causal context is one
    tracked object of its own, not four; its mappings stay read-only and equal to empty ones."""
    def decoded(path: str, **kw: object) -> Entry:
        e = Entry(path=path, kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=0, mtime_ns=1, ctime_ns=1,
                  author=bytes(32), timestamp_ns=1, **kw)  # type: ignore[arg-type]
        return Entry.deserialize(e.serialize())

    def tracked(e: Entry) -> set[int]:
        return {id(o) for o in gc.get_referents(e) if gc.is_tracked(o)}

    a, b = decoded("a"), decoded("b")
    assert tracked(a) == tracked(b)  # nothing of their own: what they refer to is shared
    assert a.meta == a.xattrs == a.seen == {}
    with pytest.raises(TypeError):
        a.meta["os"] = "linux"  # type: ignore[index]
    c = decoded("c", meta={"os": "linux"})
    assert c.meta == {"os": "linux"} and a.meta == {} and len(tracked(c) - tracked(a)) == 1

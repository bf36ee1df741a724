"""Transfer analytics: what the hooks count, what the database keeps across a restart, and the bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from blixfs import analytics as an
from blixfs.analytics import AHEAD, PULL, READ, Analytics
from blixfs.hashing import ChunkId

K = 1024


def cid(n: int) -> ChunkId:
    return ChunkId(n.to_bytes(32, "big"))


def chunk_plan(*ids: int) -> list[object]:
    """A VFS read plan touching chunks ``ids`` (tuples as `Vfs.read` builds them)."""
    return [(i, cid(i), 64 * K, 0, 64 * K) for i in ids]


def test_reads_misses_and_read_ahead_are_counted_per_image() -> None:
    a = Analytics(None)
    a.on_chunk("img", "peer1", 64 * K, READ, cid(0))  # a read that missed
    a.on_chunk("img", "peer1", 64 * K, AHEAD, cid(1))
    a.on_chunk("img", "peer2", 64 * K, AHEAD, cid(2))
    a.on_read("img", 128 * K, chunk_plan(0, 1))  # chunk 1 was fetched ahead: used
    a.on_read("img", 64 * K, [b"dirty bytes", *chunk_plan(3)])  # chunk 3 was held already
    img = a.images["img"].as_dict()
    assert img["reads"] == 2 and img["bytes_read"] == 192 * K and img["chunk_reads"] == 3
    assert img["misses"] == 1 and img["hit_ratio"] == round(1 - 1 / 3, 4)
    assert img["fetched"] == 192 * K and img["ahead"] == 128 * K and img["ahead_used"] == 64 * K
    assert img["ahead_efficiency"] == 0.5
    assert a.live["img"].peers == {"peer1": 128 * K, "peer2": 64 * K}
    assert a.peers["peer1"].fetched == 128 * K and a.totals == {"fetched": 192 * K, "served": 0, "read": 192 * K}


def test_read_ahead_pushed_out_unread_counts_as_wasted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(an, "AHEAD_TRACKED", 2)
    a = Analytics(None)
    for i in range(3):
        a.on_chunk("img", "p", 10, AHEAD, cid(i))
    assert a.images["img"].ahead_wasted == 10  # chunk 0 was forgotten unread
    a.on_read("img", 10, chunk_plan(0))
    assert a.images["img"].ahead_used == 0


def test_a_pull_is_a_transfer_but_not_a_miss() -> None:
    a = Analytics(None)
    a.on_chunk("img", "p", 100, PULL, cid(0))
    a.on_chunk(None, "p", 50, READ, cid(1))  # a manifest: no image
    assert a.images["img"].misses == 0 and a.images["img"].fetched == 100
    assert a.totals["fetched"] == 150 and list(a.live) == ["img"]


async def test_history_and_counts_outlive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "analytics.db"
    a = Analytics(db)
    a.on_chunk("img", "p", 1000, READ, cid(0))
    a.on_read("img", 1000, chunk_plan(0))
    a.on_served("q", 500)
    a.end_idle(force=True)
    await a.flush()
    a.close()
    b = Analytics(db)
    assert [(t["path"], t["bytes"], t["peers"]) for t in b.history] == [("img", 1000, {"p": 1000})]
    assert b.images["img"] == a.images["img"]
    assert b.peers["q"].served == 500 and b.peers["p"].fetched == 1000
    assert b.totals == {"fetched": 1000, "served": 500, "read": 1000}
    b.close()


async def test_the_database_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(an, "MAX_TRANSFERS", 5)
    monkeypatch.setattr(an, "MAX_IMAGES", 3)
    monkeypatch.setattr(an, "MAX_PEERS", 4)
    a = Analytics(tmp_path / "analytics.db")
    for round_ in range(4):
        for i in range(5):
            a.on_chunk(f"img{round_}-{i}", f"peer{round_}-{i}", 10, READ, cid(i))
        a.end_idle(force=True)
        await a.flush()
    # In memory too: the most recently active stay (a peer can invent ids).
    assert list(a.images) == ["img3-2", "img3-3", "img3-4"] and len(a.peers) == 4
    assert a.stored_transfers() == 5
    assert a._db is not None
    assert a._db.execute("SELECT COUNT(*) FROM image_access").fetchone()[0] <= 3
    assert a._db.execute("SELECT COUNT(*) FROM peer_bytes").fetchone()[0] <= 4
    a.close()


def test_an_unusable_database_only_costs_the_history(tmp_path: Path) -> None:
    bad = tmp_path / "analytics.db"
    bad.write_bytes(b"this is not a database" * 100)
    a = Analytics(bad)  # logged, not raised: the node mounts all the same
    a.on_chunk("img", "p", 10, READ, cid(0))
    assert a.images["img"].fetched == 10 and a.stored_transfers() == 0


def test_rates_between_samples() -> None:
    a = Analytics(None)
    a.samples.append({"t": 100.0, "fetched": 0, "served": 0, "read": 0})
    a.samples.append({"t": 102.0, "fetched": 2000, "served": 100, "read": 4000})
    assert a.rates() == [{"t": 102.0, "fetched": 1000.0, "served": 50.0, "read": 2000.0}]

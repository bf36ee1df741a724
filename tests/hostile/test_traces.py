"""Hostile trace records (blixfs.traces): a member that holds the namespace secret publishes
garbage, oversized or forged records. Receivers refuse them with a log line, ignore any
that reached their store, and keep serving; a cold open still prefetches by the honest
records. Whole nodes in one process over the in-memory network (tests/cluster.py)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest

from blixfs.entry import Entry
from blixfs.traces import MAX_TRACE_CHUNKS, TRACE_XATTR, TRACES_DIR, Trace, record_entry, record_path
from blixfs.vfs import ROOT_INO
from tests.cluster import CHUNK, InNode, cluster, wait_until


def _forge(author: InNode, e: Entry) -> Entry:
    """``e`` signed by ``author`` behind its replica's checks, and pushed live to its peers."""
    signed = author.node.replica._sign(e)
    author.node.replica.store.apply([signed])
    author.node.replica._notify([signed], None)
    return signed


async def test_garbage_and_oversized_trace_records_are_refused_and_the_node_keeps_serving(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with cluster(tmp_path, ["a", "b", "c"]) as nodes:
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        data = os.urandom(32 * CHUNK)
        await a.write("img", 0, data, create=True)
        await wait_until(lambda: b.entry("img") == a.entry("img") == c.entry("img"), "the image everywhere")
        # a reads in a known order: its record is the honest one.
        ino = (await a.vfs.lookup(ROOT_INO, "img")).ino
        fh = await a.vfs.open(ino, os.O_RDONLY)
        for i in (20, 4, 11, 30):
            await a.vfs.read(fh, i * CHUNK, 512)
        await a.vfs.release(fh)
        await wait_until(lambda: c.node.namespace.get(record_path("img", a.node.node_id)) is not None,
                         "a's trace on c")

        mid = a.entry("img").manifest  # type: ignore[union-attr]
        assert mid is not None
        honest = Trace(mid, CHUNK, ((1, b"\0" * 8), (2, b"\0" * 8)))
        def base(name: str) -> Entry:
            return record_entry(b.node.replica, name, honest)
        forged = [
            replace(base("img"), xattrs={TRACE_XATTR: b"XXXX" + os.urandom(300)}),  # garbage
            replace(base("img2"), xattrs={TRACE_XATTR: b"BXT1" + mid + CHUNK.to_bytes(4, "big") + bytes(4)
                                          + (MAX_TRACE_CHUNKS + 1).to_bytes(4, "big")
                                          + bytes(12 * (MAX_TRACE_CHUNKS + 1))}),  # oversized
            replace(base("img"), path=record_path("img", a.node.node_id)),  # b overwriting a's record
            replace(base("img"), path=TRACES_DIR, xattrs={}),  # would show the tree in the mount
        ]
        for e in forged:
            _forge(b, e)
        reasons = ["bad magic", "at most 4096", "of another node than its author",
                   "(access traces) that is not a trace record"]
        await wait_until(lambda: all(caplog.text.count(r) >= 2 for r in reasons), "a and c to refuse b's records")
        for n in (a, c):
            held = n.node.namespace.get(record_path("img", b.node.node_id))
            assert held is None  # nothing of b's reached the store
            assert n.node.namespace.get(TRACES_DIR) is None
            assert TRACES_DIR not in [name for name, _ in await n.vfs.readdir(ROOT_INO)]

        # One that reached a store anyway (written there behind every check): ignored, logged.
        junk = c.node.replica._sign(replace(record_entry(c.node.replica, "img", honest),
                                            xattrs={TRACE_XATTR: b"junk"}))
        c.node.replica.store.apply([junk])
        caplog.clear()
        assert c.runtime.tracer is not None
        traces = c.runtime.tracer.records("img")
        assert [[i for i, _ in t.items] for t in traces] == [[20, 4, 11, 30]]
        assert "ignored trace record" in caplog.text

        # c opens the image cold and still prefetches by a's record; every node keeps serving.
        e = c.entry("img")
        assert e is not None and e.manifest is not None
        ino = (await c.vfs.lookup(ROOT_INO, "img")).ino
        fh = await c.vfs.open(ino, os.O_RDONLY)
        m = c.vfs.content.manifest(e.manifest)
        assert m is not None
        await wait_until(lambda: all(c.vfs.content.store.has(m.entries[i]) for i in (20, 4, 11, 30)),
                         "the traced chunks on c")
        assert not all(c.vfs.content.store.has(cid) for cid in m.entries)  # only the traced ones
        assert await c.read("img") == data
        await c.vfs.release(fh)
        assert await b.read("img") == data

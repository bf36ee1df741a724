"""Trace prefetch between whole nodes in one process (tests/cluster.py): a cold open fetches
the traced chunks in the background and tells the metrics what the reader then used; the
last close stops it; a node holding the version whole does not prefetch."""

from __future__ import annotations

import os
from pathlib import Path

from blixfs import metrics
from blixfs.traces import record_path
from blixfs.vfs import ROOT_INO
from tests.cluster import CHUNK, InNode, cluster, wait_until

ORDER = (40, 7, 22, 61, 3, 50)


def _used() -> float:
    return metrics.trace_prefetch_bytes.labels("used")._value.get()


async def _read_order(n: InNode, order: tuple[int, ...]) -> None:
    ino = (await n.vfs.lookup(ROOT_INO, "img")).ino
    fh = await n.vfs.open(ino, os.O_RDONLY)
    for i in order:
        await n.vfs.read(fh, i * CHUNK + 100, 100)
    await n.vfs.release(fh)


async def test_cold_open_prefetches_the_trace_and_the_last_close_stops_it(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "b", "c"]) as nodes:
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        data = os.urandom(64 * CHUNK)
        await a.write("img", 0, data, create=True)
        assert a.runtime.tracer is not None and b.runtime.tracer is not None and c.runtime.tracer is not None
        await _read_order(a, ORDER)  # a holds it whole: recorded and published, nothing prefetched
        assert a.runtime.tracer.published == 1
        await wait_until(lambda: all(n.node.namespace.get(record_path("img", a.node.node_id)) is not None
                                     for n in (b, c)), "a's trace on b and c")
        e = b.entry("img")
        assert e is not None and e.manifest is not None
        m = b.vfs.content.manifest(e.manifest) or await b.vfs.content.load(e.manifest, e.author)
        traced = [m.entries[i] for i in ORDER]

        # b opens cold and reads nothing: the traced chunks arrive, and only they.
        used = _used()
        ino = (await b.vfs.lookup(ROOT_INO, "img")).ino
        fh = await b.vfs.open(ino, os.O_RDONLY)
        store = b.vfs.content.store
        await wait_until(lambda: all(store.has(cid) for cid in traced), "the traced chunks on b")
        assert sum(store.has(cid) for cid in m.entries) == len(ORDER)
        for i in ORDER:
            assert await b.vfs.read(fh, i * CHUNK, 10) == data[i * CHUNK:i * CHUNK + 10]
        assert _used() - used == len(ORDER) * CHUNK
        await b.vfs.release(fh)

        # c opens and closes at once: its prefetch starts no fetch after the close.
        ino = (await c.vfs.lookup(ROOT_INO, "img")).ino
        fh = await c.vfs.open(ino, os.O_RDONLY)
        state = c.runtime.tracer._open[ino]
        await c.vfs.release(fh)
        assert state.stopped and ino not in c.runtime.tracer._open
        store = c.vfs.content.store
        await wait_until(lambda: not c.runtime.fetcher._loading, "c's fetches under way to end")
        assert sum(store.has(cid) for cid in m.entries) <= c.runtime.tracer.parallel

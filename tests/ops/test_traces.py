"""Trace prefetch between whole nodes in one process (tests/cluster.py): a cold open fetches
the traced chunks in the background and tells the metrics what the reader then used; the
last close stops it; a node holding the version whole does not prefetch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blixfs import metrics
from blixfs.hashing import ChunkId
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


async def test_records_of_a_deleted_file_are_removed_by_each_node(tmp_path: Path) -> None:
    """Each node removes its own record of a file deleted anywhere (it alone may sign it);
    a trace recorded while its file is deleted is not published; other files keep theirs."""
    async with cluster(tmp_path, ["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        data = os.urandom(64 * CHUNK)
        await a.write("img", 0, data, create=True)
        await a.write("keep", 0, data[: 8 * CHUNK], create=True)
        await wait_until(lambda: b.entry("img") is not None and b.entry("img") == a.entry("img"), "img on b")
        await wait_until(lambda: b.entry("keep") is not None and b.entry("keep") == a.entry("keep"), "keep on b")
        await _read_order(a, ORDER)
        await _read_order(b, ORDER)
        keep = (await a.vfs.lookup(ROOT_INO, "keep")).ino
        fh = await a.vfs.open(keep, os.O_RDONLY)
        for i in (5, 1, 3):
            await a.vfs.read(fh, i * CHUNK, 10)
        await a.vfs.release(fh)
        records = [record_path("img", n.node.node_id) for n in (a, b)] + [record_path("keep", a.node.node_id)]
        await wait_until(lambda: all(n.node.namespace.get(r) is not None for n in (a, b) for r in records),
                         "every record on both nodes")

        # b has the file open and reading when a deletes it: b's recording is dropped at close.
        ino = (await b.vfs.lookup(ROOT_INO, "img")).ino
        fh = await b.vfs.open(ino, os.O_RDONLY)
        await a.vfs.unlink(ROOT_INO, "img")
        await wait_until(lambda: b.entry("img") is None, "the deletion on b")
        published = b.runtime.tracer.published if b.runtime.tracer is not None else -1
        for i in (9, 2, 30):
            await b.vfs.read(fh, i * CHUNK, 10)
        await b.vfs.release(fh)

        img_records = records[:2]
        await wait_until(lambda: all(n.node.namespace.get(r) is None for n in (a, b) for r in img_records),
                         "both records of the deleted file removed on both nodes")
        for n in (a, b):
            for r in img_records:
                tomb = n.node.namespace.get_any(r)
                assert tomb is not None and tomb.deleted and not tomb.xattrs
            assert n.node.namespace.get(records[2]) is not None  # the other file's record stays
        assert b.runtime.tracer is not None and b.runtime.tracer.published == published
        assert a.runtime.tracer is not None and a.runtime.tracer.collected == 1 and b.runtime.tracer.collected == 1


async def test_a_pull_fetches_the_versions_root_and_pages_at_its_class(tmp_path: Path) -> None:
    """A background pull (or replica) does not fetch the manifest's root and pages as demand
    reads: 13 MiB of pages for a 100 GiB image would otherwise compete with guests' reads."""
    from blixfs.fetcher import Fetcher
    from blixfs.manifest import FANOUT
    from blixfs.priority import Priority

    async with cluster(tmp_path, ["a", "b"]) as nodes:
        a, b = nodes["a"], nodes["b"]
        for i in (0, FANOUT + 3, 2 * FANOUT + 1):  # three pages, mostly holes
            await a.write("big", i * CHUNK, os.urandom(CHUNK), create=True)
        await wait_until(lambda: b.entry("big") is not None and b.entry("big") == a.entry("big"), "big on b")
        e = b.entry("big")
        assert e is not None and e.manifest is not None
        fetcher = b.vfs.content.fetcher
        assert isinstance(fetcher, Fetcher)
        classes: dict[bytes, Priority | None] = {}
        real = fetcher.get

        async def recorded(cid: ChunkId, holders: Sequence[str], label: str | None = None, **kw: Any) -> bytes:
            classes[cid] = kw.get("priority")
            return await real(cid, holders, label, **kw)
        fetcher.get = recorded  # type: ignore[method-assign]
        report = await b.vfs.content.fetch_version(e.manifest, author=e.author, label="big",
                                                   priority=Priority.BACKGROUND)
        assert not report.failed
        assert classes[e.manifest] == Priority.BACKGROUND  # the root
        assert len(classes) >= 1 + 3 + 3  # root, pages, chunks
        assert set(classes.values()) == {Priority.BACKGROUND}

"""fsync through the journal, publishing, and replay after a crash (Vfs over a real home).

A "crash" here is a node dropped without any flush or close: what was in memory is gone,
what was on disk stays; the next `Node.open` of the same home is the restart.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from blixfs import journal as jmod
from blixfs.content import Network
from blixfs.errors import FsError
from blixfs.node import Node
from blixfs.vfs import ROOT_INO, Vfs
from tests.cluster import CHUNK, cluster, wait_until

SIZE = 16 * CHUNK


def start(home: Path) -> tuple[Node, Vfs]:
    node = Node.open(home, lock=False)
    return node, node.vfs(chunk_size=CHUNK)


async def open_rw(vfs: Vfs, name: str, flags: int = os.O_RDWR) -> int:
    ino = (await vfs.lookup(ROOT_INO, name)).ino
    return await vfs.open(ino, flags)


async def read_all(vfs: Vfs, name: str) -> bytes:
    fh = await open_rw(vfs, name, os.O_RDONLY)
    try:
        return await vfs.read(fh, 0, 1 << 30)
    finally:
        await vfs.release(fh)


async def make_image(vfs: Vfs, name: str, data: bytes) -> None:
    fh, _ = await vfs.create(ROOT_INO, name, 0o644, os.O_RDWR, 0, 0)
    await vfs.write(fh, 0, data)
    await vfs.release(fh)


def journals(home: Path) -> list[Path]:
    return sorted((home / "journal").glob("*.jnl"))


async def test_fsync_publishes_nothing_and_a_restart_replays_exactly_what_was_fsynced(tmp_path: Path) -> None:
    node, vfs = start(tmp_path / "a")
    data = bytearray(os.urandom(SIZE))
    await make_image(vfs, "img", bytes(data))
    v1 = node.namespace.get("img")
    fh = await open_rw(vfs, "img")
    for offset in (5, 3 * CHUNK + 100, SIZE - 4096, SIZE + 2 * CHUNK):  # the last one grows the file
        block = os.urandom(4096)
        await vfs.write(fh, offset, block)
        data[len(data):] = bytes(max(0, offset + 4096 - len(data)))
        data[offset : offset + 4096] = block
        await vfs.fsync(fh, True)
    assert node.namespace.get("img") == v1  # no version published by any fsync
    assert len(journals(node.home)) == 1
    await vfs.write(fh, 0, b"never fsynced")  # in memory only: gone with the crash
    node.close()  # crash: no flush, no release

    node, vfs = start(tmp_path / "a")
    assert await vfs.recover_journals() == []
    v2 = node.namespace.get("img")
    assert v2 is not None and v2 != v1 and v2.size == len(data)
    assert await read_all(vfs, "img") == bytes(data)
    assert journals(node.home) == []
    node.close()


async def test_a_file_is_replayed_before_it_is_read_even_without_recovery(tmp_path: Path) -> None:
    node, vfs = start(tmp_path / "a")
    await make_image(vfs, "img", b"x" * SIZE)
    fh = await open_rw(vfs, "img")
    await vfs.setattr((await vfs.lookup(ROOT_INO, "img")).ino, size=100)
    await vfs.write(fh, 50, b"y" * 100)
    await vfs.fsync(fh, False)
    node.close()
    node, vfs = start(tmp_path / "a")
    assert vfs.unrecovered == ["img"]
    assert await read_all(vfs, "img") == b"x" * 50 + b"y" * 100
    assert vfs.unrecovered == [] and journals(node.home) == []
    node.close()


async def test_open_with_o_trunc_is_journaled_too(tmp_path: Path) -> None:
    node, vfs = start(tmp_path / "a")
    await make_image(vfs, "img", b"x" * SIZE)
    fh = await open_rw(vfs, "img", os.O_RDWR | os.O_TRUNC)
    await vfs.write(fh, 10, b"new")
    await vfs.fsync(fh, True)
    node.close()
    node, vfs = start(tmp_path / "a")
    await vfs.recover_journals()
    assert await read_all(vfs, "img") == bytes(10) + b"new"
    node.close()


async def test_close_commit_and_the_timer_publish_durably_and_drop_the_journal(tmp_path: Path) -> None:
    node, vfs = start(tmp_path / "a")
    await make_image(vfs, "img", os.urandom(SIZE))
    v1 = node.namespace.get("img")
    fh = await open_rw(vfs, "img")
    await vfs.write(fh, 0, b"a" * 4096)
    await vfs.fsync(fh, True)
    assert node.namespace.get("img") == v1 and journals(node.home)
    assert await vfs.commit_path("img") is True  # blixfs commit
    v2 = node.namespace.get("img")
    assert v2 != v1 and journals(node.home) == []
    assert await vfs.commit_path("img") is False  # nothing new
    await vfs.write(fh, 4096, b"b" * 4096)
    await vfs.fsync(fh, True)
    assert vfs.publish_due(3600) == 0
    assert vfs.publish_due(0) == 1  # the daemon's timer
    v3 = node.namespace.get("img")
    assert v3 != v2 and journals(node.home) == []
    await vfs.write(fh, 8192, b"c" * 4096)
    await vfs.fsync(fh, True)
    await vfs.flush(fh)  # close(2)
    assert node.namespace.get("img") != v3 and journals(node.home) == []
    await vfs.release(fh)
    with pytest.raises(FsError) as missing:
        await vfs.commit_path("nope")
    assert missing.value.errno == errno.ENOENT
    node.close()


async def test_a_journal_that_outlived_its_publish_is_dropped_not_applied_twice(tmp_path: Path) -> None:
    node, vfs = start(tmp_path / "a")
    await make_image(vfs, "img", b"x" * SIZE)
    fh = await open_rw(vfs, "img")
    await vfs.write(fh, 0, b"y" * 10)
    await vfs.fsync(fh, True)
    [kept] = journals(node.home)
    shutil.copy(kept, tmp_path / "saved")
    await vfs.release(fh)  # publishes, removes the journal...
    published = node.namespace.get("img")
    fh = await open_rw(vfs, "img")
    await vfs.setattr((await vfs.lookup(ROOT_INO, "img")).ino, mode=0o600)  # and a later metadata change
    await vfs.release(fh)
    node.close()
    shutil.copy(tmp_path / "saved", kept)  # ...but the crash came before the removal reached the disk
    node, vfs = start(tmp_path / "a")
    assert await vfs.recover_journals() == []
    current = node.namespace.get("img")
    assert current is not None and published is not None and current.manifest == published.manifest
    assert journals(node.home) == []
    node.close()


async def test_a_full_disk_fails_the_fsync_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node, vfs = start(tmp_path / "a")
    await make_image(vfs, "img", b"x" * SIZE)
    fh = await open_rw(vfs, "img")
    await vfs.write(fh, 0, b"1" * 4096)
    await vfs.fsync(fh, True)

    def full(fd: int, data: bytes | memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    await vfs.write(fh, 4096, b"2" * 4096)
    with monkeypatch.context() as m:
        m.setattr(jmod.os, "pwrite", full)
        with pytest.raises(FsError) as failed:
            await vfs.fsync(fh, True)
        assert failed.value.errno == errno.ENOSPC
    await vfs.fsync(fh, True)  # space again: the same writes are journaled
    node.close()
    node, vfs = start(tmp_path / "a")
    await vfs.recover_journals()
    assert await read_all(vfs, "img") == b"1" * 4096 + b"2" * 4096 + b"x" * (SIZE - 8192)
    node.close()


async def test_rename_of_a_journaled_file_publishes_it_first(tmp_path: Path) -> None:
    node, vfs = start(tmp_path / "a")
    await make_image(vfs, "img", b"x" * SIZE)
    fh = await open_rw(vfs, "img")
    await vfs.write(fh, 0, b"z" * 7)
    await vfs.fsync(fh, True)
    await vfs.rename(ROOT_INO, "img", ROOT_INO, "moved")
    assert journals(node.home) == []
    node.close()
    node, vfs = start(tmp_path / "a")
    await vfs.recover_journals()
    assert await read_all(vfs, "moved") == b"z" * 7 + b"x" * (SIZE - 7)
    node.close()


async def test_a_copy_that_is_never_fsynced_writes_no_journal(tmp_path: Path) -> None:
    node = Node.open(tmp_path / "a", lock=False)
    vfs = node.vfs(chunk_size=CHUNK, journal_bytes=1 << 20)
    fh, _ = await vfs.create(ROOT_INO, "big", 0o644, os.O_RDWR, 0, 0)
    for i in range(40):
        await vfs.write(fh, i * CHUNK, os.urandom(CHUNK))
    await vfs.fsync(fh, True)  # past the bound: published instead
    assert journals(node.home) == []
    e = node.namespace.get("big")
    assert e is not None and e.size == 40 * CHUNK
    await vfs.release(fh)
    node.close()


async def test_a_replay_over_a_peers_newer_version_keeps_both(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "c"]) as nodes:
        a, c = nodes["a"], nodes["c"]
        data = bytearray(os.urandom(SIZE))
        await a.write("img", 0, bytes(data), create=True)
        first = a.entry("img")
        await wait_until(lambda: c.entry("img") == first, "the image on c")
        fh = await a.open_for_write("img")
        await a.vfs.write(fh, 100, b"A" * 4096)
        data[100 : 100 + 4096] = b"A" * 4096
        await a.vfs.fsync(fh, True)
        # a crashes here (its Vfs is dropped); meanwhile c writes a version of its own
        theirs = os.urandom(SIZE)
        await c.write("img", 0, theirs)
        await wait_until(lambda: a.entry("img") == c.entry("img"), "c's version on a")
        restarted = a.node.vfs(chunk_size=CHUNK)
        assert await restarted.recover_journals() == []
        names = [name for name, _ in await restarted.readdir(ROOT_INO)]
        assert len(names) == 2 and "img" in names  # the file and a conflict copy
        await wait_until(lambda: c.node.namespace.versions("img") == a.node.namespace.versions("img"),
                         "the replayed version on c")
        assert sorted(name for name, _ in await c.vfs.readdir(ROOT_INO)) == sorted(names)
        contents = {await c.read(name) for name in names}
        assert contents == {bytes(data), theirs}  # neither overwritten, neither lost


async def test_a_node_holding_nothing_replays_its_journal_fetching_the_base_from_peers(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["a", "c"]) as nodes:
        a, c = nodes["a"], nodes["c"]
        data = bytearray(os.urandom(SIZE))
        await a.write("img", 0, bytes(data), create=True)
        await wait_until(lambda: c.entry("img") == a.entry("img"), "the image on c")
        fh = await c.open_for_write("img")
        for offset in (CHUNK + 7, 9 * CHUNK - 3):  # partial chunks: their other bytes are on a only
            await c.vfs.write(fh, offset, b"C" * 4096)
            data[offset : offset + 4096] = b"C" * 4096
            await c.vfs.fsync(fh, True)
        # c crashes, and what it had fetched (cache) is gone too; it restarts on the network
        c.node.chunks.delete_many(list(c.node.chunks.ids()))
        restarted = c.node.vfs(chunk_size=CHUNK)
        rt = c.runtime
        restarted.content.connect(Network(rt.fetcher, rt.holdings, rt.peers,
                                          lambda: [s.peer for s in rt.sync.sessions() if s.synced.is_set()]))
        assert await restarted.recover_journals() == []
        assert await read_all(restarted, "img") == bytes(data)
        await wait_until(lambda: a.entry("img") == c.node.namespace.get("img"), "the replayed version on a")
        assert await a.read("img") == bytes(data)

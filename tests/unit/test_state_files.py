"""A node's state files (peers.json, pins.json, replicas.json, node.json): written atomically
and durably; a torn one neither stops the node nor silently forgets what it records."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blixfs.hashing import ChunkId
from blixfs.net.transport import NodeAddr
from blixfs.node import DEFAULT_CACHE_SIZE, Node
from blixfs.statefile import StateFileError


@dataclass(frozen=True)
class StateFile:
    name: str
    write: Callable[[Node, int], None]  # record version ``i`` through the node's own API
    read: Callable[[Node], Any]
    value: Callable[[int], Any]  # what read returns after write(i)
    guarded: bool  # it protects data: unreadable means refuse to change it, not "empty"


def _peer(i: int) -> NodeAddr:
    return NodeAddr(f"{i:064x}", (f"127.0.0.1:{1000 + i}",))


def _add_peers(node: Node, i: int) -> None:
    for n in range(1, i + 1):
        node.add_peer(_peer(n))


def _set_pins(node: Node, i: int) -> None:
    for n in range(1, i + 1):
        node.set_pinned(f"img{n}", True)


FILES = [
    StateFile("peers.json", _add_peers,
              lambda node: node.peers(), lambda i: [_peer(n) for n in range(1, i + 1)], guarded=False),
    StateFile("pins.json", _set_pins, lambda node: node.pins(), lambda i: [f"img{n}" for n in range(1, i + 1)],
              guarded=True),
    StateFile("replicas.json", lambda node, i: node.set_replicas({bytes([n]) * 32: f"img{n}" for n in range(1, i + 1)}),
              lambda node: node.replicas(), lambda i: {bytes([n]) * 32: f"img{n}" for n in range(1, i + 1)},
              guarded=True),
    StateFile("node.json", lambda node, i: node.set_cache_size(i << 30),
              lambda node: node.cache_size(), lambda i: i << 30, guarded=False),
]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node.open(tmp_path / "home", lock=False)
    yield n
    n.close()


def _tear(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # a torn write: valid JSON no more


@pytest.mark.parametrize("f", FILES, ids=lambda f: f.name)
def test_writes_leave_no_temp_file_and_keep_the_previous_version(node: Node, f: StateFile) -> None:
    f.write(node, 1)
    f.write(node, 2)
    assert f.read(node) == f.value(2)
    assert not [p for p in node.home.iterdir() if ".tmp" in p.name]
    assert (node.home / f"{f.name}.bak").exists()


@pytest.mark.parametrize("f", FILES, ids=lambda f: f.name)
def test_a_torn_file_falls_back_to_its_previous_version_with_an_error(
        node: Node, f: StateFile, caplog: pytest.LogCaptureFixture) -> None:
    f.write(node, 1)
    f.write(node, 2)
    _tear(node.home / f.name)
    with caplog.at_level(logging.ERROR):
        assert f.read(node) == f.value(1)
    assert f.name in caplog.text and "unreadable" in caplog.text
    f.write(node, 3)  # the next write repairs it
    assert f.read(node) == f.value(3)


@pytest.mark.parametrize("f", FILES, ids=lambda f: f.name)
def test_a_torn_file_without_a_backup_never_reads_as_silently_empty(
        node: Node, f: StateFile, caplog: pytest.LogCaptureFixture) -> None:
    f.write(node, 2)
    (node.home / f"{f.name}.bak").unlink(missing_ok=True)
    _tear(node.home / f.name)
    torn = (node.home / f.name).read_bytes()
    if f.guarded:  # forgetting pins or replicas would let the cache evict what it promised to keep
        with pytest.raises(StateFileError):
            f.read(node)
        with pytest.raises(StateFileError):
            f.write(node, 3)
        assert (node.home / f.name).read_bytes() == torn  # nothing dropped while it is unreadable
    else:  # the node runs on defaults, and a write keeps the damaged file for whoever repairs it
        f.read(node)
        f.write(node, 3)
        assert (node.home / f"{f.name}.corrupt").read_bytes() == torn
    assert f.name in caplog.text and "unreadable" in caplog.text


def test_unreadable_replicas_or_pins_protect_every_chunk_from_eviction(node: Node) -> None:
    node.set_replicas({bytes(32): "img"})
    cache = node.open_cache()
    assert not cache.keep(ChunkId(bytes([7]) * 32))
    _tear(node.home / "replicas.json")
    cache.invalidate()  # keep() recomputes at most once a second
    assert cache.keep(ChunkId(bytes([7]) * 32))


def test_an_unreadable_node_json_does_not_stop_the_node(node: Node) -> None:
    node.set_cache_size(5 << 30)
    _tear(node.home / "node.json")
    assert node.cache_size() == DEFAULT_CACHE_SIZE
    assert node.listen_addr().startswith("127.0.0.1:")


@pytest.mark.parametrize("f", FILES, ids=lambda f: f.name)
def test_a_kill_between_write_and_rename_keeps_the_old_version(node: Node, f: StateFile) -> None:
    f.write(node, 1)
    # A real kill -9 in the middle of a write: after the temp file is written, before the rename.
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from blixfs import statefile
        real = os.replace
        def die(src, dst):
            if ".tmp-" in str(src) and not str(src).endswith(".bak"):
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        os.replace = die
        statefile.write_json(Path({str(node.home / f.name)!r}), {{"half": "written"}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == -9, proc.stderr
    (node.home / f"{f.name}.tmp").write_text('{"half"')  # and one left by blixfs before atomic writes
    assert len([p for p in node.home.iterdir() if ".tmp" in p.name]) == 2
    assert f.read(node) == f.value(1)
    f.write(node, 2)
    assert f.read(node) == f.value(2)
    assert not [p for p in node.home.iterdir() if ".tmp" in p.name]  # leftovers of dead writers removed


def test_namespace_id_is_written_atomically(tmp_path: Path) -> None:
    node = Node.open(tmp_path / "home", lock=False)
    node.close()
    assert not [p for p in (tmp_path / "home" / "namespace").iterdir() if ".tmp" in p.name]
    assert os.stat(tmp_path / "home" / "namespace" / "namespace.id").st_size == 65

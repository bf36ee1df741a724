"""Several blixfs nodes as separate processes, each with its own home and mount, syncing over iroh."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, MountedNode, wait_for

pytestmark = pytest.mark.mounted
Factory = Callable[..., MountedNode]


def ticket(node: MountedNode, *, write: bool = True) -> str:
    out = node.cli("share", *(["--write"] if write else [])).stdout
    return out.strip().splitlines()[-1]


def joined(make_node: Factory, name: str, source: MountedNode, *, write: bool = True) -> MountedNode:
    node = make_node(name, start=False)
    node.cli("join", ticket(source, write=write))
    node.start()
    return node


def status(node: MountedNode) -> dict[str, object]:
    result: dict[str, object] = json.loads(node.cli("status", "--json").stdout)
    return result


def xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in sorted(os.listxattr(path))}


def same_view(nodes: list[MountedNode], rel: str) -> bool:
    """Whether every node shows ``rel`` alike: present or not, same size, mode, mtime, xattrs."""
    def view(n: MountedNode) -> tuple[object, ...] | None:
        p = n.mnt / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return None
        return (st.st_size, st.st_mode, st.st_mtime_ns, xattrs(p) if not os.path.islink(p) else {})
    views = [view(n) for n in nodes]
    return all(v == views[0] for v in views)


def test_two_nodes_see_each_others_changes(make_node: Factory) -> None:
    a = make_node("a")
    b = joined(make_node, "b", a)
    (a.mnt / "images").mkdir()
    content = os.urandom(300_000)
    (a.mnt / "images/ubuntu.qcow2").write_bytes(content)
    os.setxattr(a.mnt / "images/ubuntu.qcow2", "user.blixfs.os", b"linux")
    os.setxattr(a.mnt / "images/ubuntu.qcow2", "user.blixfs.version", b"24.04")
    wait_for(lambda: os.path.exists(b.mnt / "images/ubuntu.qcow2") and same_view([a, b], "images/ubuntu.qcow2"),
             60, "the image to appear on b with the same metadata")
    assert xattrs(b.mnt / "images/ubuntu.qcow2")["user.blixfs.os"] == b"linux"
    assert (b.mnt / "images/ubuntu.qcow2").read_bytes() == content  # fetched from a, verified
    # changes made on b flow back: rename, chmod, overwrite, delete
    os.rename(b.mnt / "images/ubuntu.qcow2", b.mnt / "images/ubuntu-24.04.qcow2")
    wait_for(lambda: os.listdir(a.mnt / "images") == ["ubuntu-24.04.qcow2"], 60, "the rename to reach a")
    (b.mnt / "notes.txt").write_text("from b")
    wait_for(lambda: (a.mnt / "notes.txt").exists(), 60, "b's file on a")
    (a.mnt / "notes.txt").write_text("rewritten on a, longer")
    os.chmod(a.mnt / "notes.txt", 0o600)
    wait_for(lambda: same_view([a, b], "notes.txt") and (b.mnt / "notes.txt").stat().st_size == 22, 60,
             "the overwrite and chmod to reach b")
    os.unlink(b.mnt / "notes.txt")
    (b.mnt / "link").symlink_to("images/ubuntu-24.04.qcow2")
    wait_for(lambda: not (a.mnt / "notes.txt").exists() and os.path.islink(a.mnt / "link"), 60, "delete + symlink")
    assert os.readlink(a.mnt / "link") == "images/ubuntu-24.04.qcow2"
    sa, sb = status(a), status(b)
    assert sa["namespace"] == sb["namespace"]  # same id, capability, counts


def test_a_new_file_is_visible_on_the_other_node_within_seconds(make_node: Factory) -> None:
    """Live push, not reconciliation (which only runs when a session starts): milliseconds
    here; the bound leaves room for a machine three times slower."""
    a = make_node("a")
    b = joined(make_node, "b", a)
    wait_for(lambda: any(s["synced"] for s in status(a)["daemon"]["sessions"]), 60,  # type: ignore[index]
             "a and b to finish their first reconciliation")
    for i in range(5):
        name = f"probe-{i}"
        start = time.monotonic()
        (a.mnt / name).write_bytes(b"x")
        wait_for(lambda name=name: os.path.exists(b.mnt / name), 3.0, f"{name} on b within 3 s")  # type: ignore[misc]
        assert time.monotonic() - start < 3.0


def test_three_nodes_relay_through_the_one_they_joined(make_node: Factory) -> None:
    a = make_node("a")
    b = joined(make_node, "b", a)
    c = joined(make_node, "c", a)  # b and c only know a
    (c.mnt / "from-c").mkdir()
    (b.mnt / "from-b").write_text("b")
    wait_for(lambda: all((n.mnt / "from-c").is_dir() and (n.mnt / "from-b").exists() for n in (a, b, c)), 60,
             "every node to see both")
    os.setxattr(b.mnt / "from-b", "user.blixfs.arch", b"x86_64")
    wait_for(lambda: same_view([a, b, c], "from-b"), 60, "the xattr everywhere")
    os.rmdir(a.mnt / "from-c")
    wait_for(lambda: not any((n.mnt / "from-c").exists() for n in (a, b, c)), 60, "the rmdir everywhere")


def test_partition_then_restart_converges_and_keeps_the_losing_version(make_node: Factory) -> None:
    a = make_node("a")
    b = joined(make_node, "b", a)
    (a.mnt / "shared.img").write_bytes(b"base")
    wait_for(lambda: (b.mnt / "shared.img").exists(), 60, "the base version on b")
    assert a.stop() == 0  # partition: a is away while b writes
    (b.mnt / "shared.img").write_bytes(b"b's version, concurrent")
    (b.mnt / "only-b").write_text("b")
    assert b.stop() == 0
    a.start()  # b is away while a writes the same path, not having seen b's write
    (a.mnt / "shared.img").write_bytes(b"a's version, later")
    (a.mnt / "only-a").write_text("a")
    b.start()
    names = {"shared.img", "only-a", "only-b"}
    wait_for(lambda: names <= set(os.listdir(a.mnt)) and names <= set(os.listdir(b.mnt))
             and len(os.listdir(a.mnt)) == len(os.listdir(b.mnt)) == 4, 60, "both sides to converge")
    listing = sorted(os.listdir(a.mnt))
    assert listing == sorted(os.listdir(b.mnt))
    (conflict,) = [n for n in listing if ".conflict-" in n]
    assert conflict.startswith("shared.img.conflict-")
    assert (a.mnt / "shared.img").stat().st_size == len(b"a's version, later")  # the later write wins
    assert (a.mnt / conflict).stat().st_size == len(b"b's version, concurrent")  # the other is kept
    assert (b.mnt / conflict).read_bytes() == b"b's version, concurrent"  # b holds that content
    with pytest.raises(OSError) as info:
        (a.mnt / conflict).write_bytes(b"no")
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    os.rename(b.mnt / conflict, b.mnt / "kept-b.img")  # keeping it resolves the conflict everywhere
    wait_for(lambda: sorted(os.listdir(a.mnt)) == ["kept-b.img", "only-a", "only-b", "shared.img"], 60,
             "the resolution to reach a")


def test_read_only_ticket_gives_a_mount_that_refuses_writes(make_node: Factory) -> None:
    a = make_node("a")
    (a.mnt / "golden.img").write_bytes(b"x" * 1000)
    b = joined(make_node, "b", a, write=False)
    wait_for(lambda: (b.mnt / "golden.img").exists(), 60, "the image on the read-only node")
    for attempt in (lambda: (b.mnt / "new").write_bytes(b"x"), lambda: (b.mnt / "d").mkdir(),
                    lambda: os.unlink(b.mnt / "golden.img"), lambda: os.chmod(b.mnt / "golden.img", 0o600),
                    lambda: os.setxattr(b.mnt / "golden.img", "user.blixfs.os", b"x")):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert status(b)["namespace"]["capability"] == "read"  # type: ignore[index]
    share = b.cli("share", "--write", check=False)
    assert share.returncode == 1 and "read-only" in share.stderr


def test_hostile_peer_process_changes_nothing_and_the_node_keeps_serving(make_node: Factory) -> None:
    a = make_node("a")
    (a.mnt / "precious").write_bytes(b"keep")
    before = status(a)
    live = a.cli("status", "--json")
    addr = json.loads(live.stdout)["daemon"]["addr"]
    nsid = before["namespace"]["id"]  # type: ignore[index]
    attack = subprocess.run([sys.executable, "-m", "tests.multinode.hostile_peer", addr, nsid], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert attack.returncode == 0, attack.stderr
    assert status(a)["namespace"] == before["namespace"]
    assert os.listdir(a.mnt) == ["precious"]
    # Each refusal is logged as a handles it; the attacker gives up waiting after 3 s per attack,
    # which a slow machine can outlast: wait for the lines rather than expect them at once.
    reasons = ("bad frame", "does not hold", "writer lacks write capability", "in the future")
    wait_for(lambda: all(why in a.log() for why in reasons), 60, f"a log line for each of {reasons}")
    b = joined(make_node, "b", a)  # still serving
    wait_for(lambda: (b.mnt / "precious").exists(), 60, "an honest peer to sync after the attacks")


def test_bad_tickets_are_refused_with_a_clear_error(make_node: Factory) -> None:
    a = make_node("a")
    good = ticket(a)
    b = make_node("b", start=False)
    for bad, why in ((good[:30], "truncated"), ("hello", "not a blixfs ticket"), (good + "x", "damaged")):
        result = b.cli("join", bad, check=False)
        assert result.returncode == 1 and why in result.stderr, (bad, result.stderr)
    other = ticket(make_node("c"))
    refused = a.cli("join", other, check=False)  # through a's running daemon
    assert refused.returncode == 1 and "daemon serves namespace" in refused.stderr, refused.stderr
    (a.mnt / "data").write_text("a holds entries")
    assert a.stop() == 0
    refused = a.cli("join", other, check=False)  # no daemon: a's home holds another namespace's entries
    assert refused.returncode == 1 and "another --home" in refused.stderr, refused.stderr

"""Shared fixtures. Mounted tests run a real ``blixfs mount`` process per test."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mount.runner import find_mount

REPO = Path(__file__).resolve().parent.parent
BLIXFS = [sys.executable, "-m", "blixfs.cli"]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``condition`` until true; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie, not yet reaped by its parent, counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_unmount_helpers(pids: list[int]) -> None:
    """Wait for a killed daemon's auto_unmount helpers (`MountedNode.unmount_helpers`) to
    exit. One unmounts the dead mount, but under load it can take about a minute; a remount
    before it is done could be unmounted by it. Whether it unmounted or left a stale mount,
    `MountedNode.start` copes."""
    wait_for(lambda: all(process_gone(pid) for pid in pids), 120, "the auto_unmount helper to exit")


def fuse_available() -> str | None:
    """None if real mounts can be made here, else why not."""
    if os.geteuid() != 0:
        return "mounted tests need root (FUSE allow_other/auto_unmount)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 missing: run scripts/install.sh"
    return None


def is_mounted(path: Path) -> bool:
    return find_mount(path) is not None


def visible(node: MountedNode, name: str, size: int) -> bool:
    """Whether ``name`` shows in ``node``'s mount with ``size`` bytes (a peer's file arrived)."""
    try:
        return (node.mnt / name).stat().st_size == size
    except FileNotFoundError:
        return False


def fetched_bytes(node: MountedNode) -> int:
    """Bytes ``node``'s daemon fetched from peers so far (``blixfs status``)."""
    fetched: int = json.loads(node.cli("status", "--json").stdout)["daemon"]["fetched"]["bytes"]
    return fetched


@dataclass
class MountedNode:
    """A ``blixfs mount`` daemon in its own process with its own home."""

    home: Path
    mnt: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileExistsError):  # a stale mount point exists but cannot be stat'ed
            self.mnt.mkdir(parents=True)
        # Readiness the way systemd sees it: the daemon sends READY=1 to $NOTIFY_SOCKET once mounted.
        name = f"blixfs-test-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(self.log_path, "ab") as log:
            notify.bind("\0" + name)
            self.proc = subprocess.Popen(
                [*BLIXFS, "--home", str(self.home), "-v", "mount", str(self.mnt), *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": "@" + name},
            )
            deadline = time.monotonic() + 60  # start-up takes a second or two here; 60 leaves room for slow CI
            while time.monotonic() < deadline and self.proc.poll() is None:
                ready, _, _ = select.select([notify], [], [], 0.1)
                if ready and b"READY=1" in notify.recv(4096):
                    return
        rc = self.proc.poll()
        self.cleanup()
        pytest.fail(f"blixfs mount did not become ready (exit status {rc}):\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait for a clean unmount; returns the exit status."""
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def unmount_helpers(self) -> list[int]:
        """The pids of the running daemon's auto_unmount helpers (fusermount3, its children):
        taken before a `kill9`, for `wait_gone`."""
        assert self.proc is not None
        found = subprocess.run(["pgrep", "-P", str(self.proc.pid), "fusermount3"], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def cleanup(self) -> None:
        """Always leaves no mount and no process behind, whatever state the test left."""
        try:
            self.stop(timeout=15)
        finally:
            if is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*BLIXFS, "--home", str(self.home), *args], capture_output=True, text=True,
                              check=check, cwd=REPO, timeout=60)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., MountedNode]]:
    """Factory for mounted nodes; every node made is stopped and unmounted at teardown."""
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    nodes: list[MountedNode] = []

    def make(name: str = "a", *extra: str, start: bool = True, home: Path | None = None) -> MountedNode:
        node = MountedNode(home=home or tmp_path / f"home-{name}", mnt=tmp_path / f"mnt-{name}",
                           log_path=tmp_path / f"{name}.log", extra_args=list(extra))
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    errors = []
    for node in nodes:
        try:
            node.cleanup()
        except Exception as exc:  # keep unmounting the others
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def mounted(make_node: Callable[..., MountedNode]) -> MountedNode:
    """One mounted node."""
    return make_node("a")

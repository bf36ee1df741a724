"""Real blixfs nodes on test hosts in network namespaces (`harness`).

Each node is a ``blixfs mount`` daemon joined to its host's network namespace only
(``nsenter --net``), so its FUSE mount is visible to the caller as usual. The hosts' only
network is the bridge the caller built (198.51.100.0/24). Used by the netns tests and by
scripts/bench_fanout.py; whoever makes a node stops it (`LanNode.stop`, which also
unmounts), and `Lan.destroy` removes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blixfs.daemon import ask_daemon
from tests.conftest import REPO, is_mounted, wait_for
from tests.netns.harness import Host

PORT = 7400


@dataclass
class LanNode:
    """A ``blixfs mount`` daemon on ``host``; ``extra`` are more ``mount`` options."""

    host: Host
    home: Path
    mnt: Path
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "blixfs.cli", "--home", str(self.home), *args], cwd=REPO,
                              check=True, capture_output=True, text=True, timeout=60).stdout

    def start(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.home.parent / f"{self.home.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{self.host.netns}", sys.executable, "-m", "blixfs.cli",
                 "--home", str(self.home), "-v", "mount", str(self.mnt), "--listen", f"{self.host.ip}:{PORT}",
                 *self.extra],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.status() is not None and is_mounted(self.mnt), 60, f"node on {self.host.ip}")

    def log(self) -> str:
        path = self.home.parent / f"{self.home.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            return ask_daemon(self.home, {"op": "status"}, timeout=10)
        return None

    def peers(self) -> dict[str, dict[str, Any]]:
        reply = ask_daemon(self.home, {"op": "peers"}, timeout=10)
        assert reply is not None
        return {p["id"]: p for p in reply["peers"]}

    def node_id(self) -> str:
        return str(json.loads(self.cli("status", "--json"))["node_id"])

    def pull(self, path: str) -> dict[str, Any]:
        """``blixfs pull PATH`` through the control socket: the daemon's reply (``bytes``,
        ``seconds``, ``peers``: bytes received from each peer, by 16 hex digits of its id).
        Raises RuntimeError when the pull fails."""
        reply = ask_daemon(self.home, {"op": "pull", "path": path}, timeout=None)
        if reply is None or not reply.get("ok"):
            raise RuntimeError(f"pull of {path} on {self.host.ip} failed: {reply}")
        return reply

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True)


def start_all(nodes: list[LanNode]) -> None:
    """Start the nodes at once (each start waits for its mount); raises if any did not start."""
    errors: list[BaseException] = []

    def one(node: LanNode) -> None:
        try:
            node.start()
        except BaseException as exc:  # wait_for fails with pytest's Failed, a BaseException
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(nodes)} nodes did not start: {errors[0]}")

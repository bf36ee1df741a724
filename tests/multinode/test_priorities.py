"""Priorities and limits between real daemons: a guest's reads on B go ahead of B's big
background pull from A, A's --max-upload holds and follows `blixfs limit` at run time."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

from blixfs.daemon import ask_daemon
from tests.conftest import BLIXFS, REPO, MountedNode, visible, wait_for
from tests.helpers import MiB
from tests.multinode.test_fetch import write_random
from tests.multinode.test_replication import joined

pytestmark = pytest.mark.mounted
Factory = Callable[..., MountedNode]
SLACK_BYTES = 8 * MiB  # what may go past a limit at once: its burst, and answers sent or counted late


def served(node: MountedNode) -> tuple[float, int]:
    """(when, bytes served so far) from the daemon's control socket: no CLI start-up in between."""
    reply = ask_daemon(node.home, {"op": "status"})
    assert reply is not None and reply["ok"], reply
    return time.monotonic(), int(reply["served"]["bytes"])


def rate_over(node: MountedNode, seconds: float) -> tuple[float, int]:
    t0, b0 = served(node)
    time.sleep(seconds)  # a measurement window, not a wait for something to happen
    t1, b1 = served(node)
    return t1 - t0, b1 - b0


def test_demand_reads_go_ahead_of_a_background_pull_under_an_upload_limit_changed_at_run_time(
        make_node: Factory) -> None:
    a = make_node("a", "--copies", "1", "--max-upload", "20M")
    b = joined(make_node, "b", a)
    write_random(a.mnt / "big", 128 * MiB)
    write_random(a.mnt / "small", 8 * MiB)
    wait_for(lambda: visible(b, "big", 128 * MiB) and visible(b, "small", 8 * MiB), 60, "the files on b")
    assert "max-upload      20M/s" in a.cli("limit").stdout

    pull = subprocess.Popen([*BLIXFS, "--home", str(b.home), "pull", "--priority", "background", "big"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: served(a)[1] > 4 * MiB, 60, "the pull under way")
        # A guest on B reads 4 KiB here and there of a file B never read: each is a demand
        # fetch from A, whose upload is full of the pull's background requests.
        latencies = []
        with open(a.mnt / "small", "rb") as src, open(b.mnt / "small", "rb") as dst:
            for i in range(8):
                offset = i * MiB + 12345
                start = time.monotonic()
                got = os.pread(dst.fileno(), 4096, offset)
                latencies.append(time.monotonic() - start)
                assert got == os.pread(src.fileno(), 4096, offset)
        assert pull.poll() is None, "the reads should be done well before the 128 MiB pull at 20 MB/s"
        assert max(latencies) < 5.0, latencies  # generous: a shared machine; a queue would be ~8 s

        seconds, sent = rate_over(a, 2.0)
        assert 0 < sent <= 20e6 * seconds * 1.5 + SLACK_BYTES, (sent, seconds)

        out = a.cli("limit", "--max-upload", "5M").stdout
        assert "max-upload      5M/s" in out and "max-background  off" in out
        time.sleep(0.5)  # the answers under way at the old rate are counted
        seconds, sent = rate_over(a, 2.0)
        assert 0 < sent <= 5e6 * seconds * 1.5 + SLACK_BYTES, (sent, seconds)
        status = a.cli("status").stdout
        assert "limits     upload 5M, background off" in status

        a.cli("limit", "--max-upload", "off")
        out, err = pull.communicate(timeout=120)
        assert pull.returncode == 0, err
        assert "pulled big" in out
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait(10)
    bad = a.cli("limit", "--max-upload", "fast", check=False)
    assert bad.returncode != 0 and "not a rate" in bad.stderr

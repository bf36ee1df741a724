"""Test hosts in network namespaces: a private LAN the test builds and always removes.

A `Lan` is one "switch" namespace holding a bridge, plus host namespaces joined to it by
veth pairs. Each host has ``lo`` and one interface ``bx0`` with an address in
198.51.100.0/24 (TEST-NET-2, RFC 5737: documentation only, never a real network; the
machine's own outside interface may use TEST-NET-1, so that one is avoided). Nothing is
routed out: a host's only routes are its /24 and multicast on ``bx0``, so traffic a test
sends (mDNS included) stays between the namespaces the test created.

Names are unique per test process: ``bx-<pid>-<n>-sw`` and ``bx-<pid>-<n>-h<i>``. Every veth
is created inside the switch namespace with its peer directly in the host namespace, so no
interface ever appears in the machine's own namespace. `Lan.destroy` kills the processes the
test started inside the hosts and deletes every namespace (which removes the veths and the
bridge); leftovers of test processes that died without cleaning up (their pid is gone) are
removed by `sweep_stale`.

A host's link can be shaped (`Host.shape`): a token bucket (tc tbf) on each end of its
veth, so its uploads and its downloads each get the rate, as a host behind a slow port.

Needs iproute2 and CAP_NET_ADMIN (root); `netns_unavailable` says why not when it can't.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUBNET = ipaddress.IPv4Network("198.51.100.0/24")
IFACE = "bx0"
PREFIX = "bx-"
REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count(1)
_NAME = re.compile(r"^bx-(\d+)-\d+-(sw|h\d+)$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@functools.cache
def netns_unavailable() -> str | None:
    """None if namespaces, bridges and veth pairs can be made here, else why not (for pytest.skip)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed: apt-get install iproute2"
    probe = f"{PREFIX}{os.getpid()}-0-sw"
    try:
        done = _ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"cannot create network namespaces (needs root / CAP_NET_ADMIN): {done.stderr.strip()}"
        try:
            for what, args in [
                ("a bridge", ["link", "add", "br0", "type", "bridge"]),
                ("a veth pair", ["link", "add", "v0", "type", "veth", "peer", "name", "v1"]),
            ]:
                done = _ip("-n", probe, *args, check=False)
                if done.returncode != 0:
                    return f"cannot create {what} in a network namespace: {done.stderr.strip()}"
        finally:
            _ip("netns", "del", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run `ip netns`: {exc}"
    return None


def sweep_stale() -> None:
    """Delete namespaces of this harness whose creating process no longer exists."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _ip("netns", "del", name, check=False)


@dataclass
class Host:
    """One test host: a network namespace with ``lo`` and ``bx0`` on the `Lan`."""

    lan: Lan
    index: int
    netns: str
    ip: str
    port: str
    """The bridge port (in the switch namespace) this host is plugged into."""

    def argv(self, *command: str) -> list[str]:
        """``command`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *command]

    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the host and wait for it."""
        return subprocess.run(self.argv(*command), capture_output=True, text=True, check=check, timeout=timeout)

    def popen(self, *command: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``command`` inside the host; `Lan.destroy` kills it if it is still running."""
        proc: subprocess.Popen[str] = subprocess.Popen(
            self.argv(*command),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
            **kwargs,
        )
        self.lan.procs.append(proc)
        return proc

    def python(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start this interpreter (the venv's) inside the host."""
        return self.popen(sys.executable, *args, **kwargs)

    def set_link(self, up: bool) -> None:
        """Cable pulled / plugged in at the switch: the host keeps its address, loses carrier."""
        _ip("-n", self.lan.switch, "link", "set", self.port, "up" if up else "down")

    def shape(self, mbit: float, latency_ms: float = 50.0) -> None:
        """Limit the host's link to ``mbit`` Mbit/s each way: a token bucket (tc tbf) on the
        host's ``bx0`` (what it sends) and on its switch port (what it receives). Packets
        queue up to ``latency_ms`` behind the bucket, then drop, as at a real bottleneck."""
        rate = int(mbit * 1e6)
        # The bucket holds at least 4 ms of the rate (a timer tick at HZ=250) and a 64 KiB
        # GSO packet, which tbf would otherwise split or drop.
        burst = max(64 << 10, rate // 8 // 250)
        for netns, dev in ((self.netns, IFACE), (self.lan.switch, self.port)):
            subprocess.run(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}bit",
                            "burst", str(burst), "latency", f"{latency_ms}ms"],
                           capture_output=True, text=True, check=True, timeout=20)

    def set_address(self, ip: str) -> None:
        """Replace the host's address on ``bx0`` (stays in `SUBNET`)."""
        if ipaddress.ip_address(ip) not in SUBNET:
            raise ValueError(f"{ip} is not in {SUBNET}")
        # Delete first: deleting a primary address also deletes the secondaries of its subnet.
        _ip("-n", self.netns, "addr", "del", f"{self.ip}/{SUBNET.prefixlen}", "dev", IFACE)
        _ip("-n", self.netns, "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", IFACE)
        self.ip = ip


@dataclass
class Lan:
    """A bridge in a switch namespace and the hosts plugged into it."""

    base: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{next(_counter)}")
    hosts: list[Host] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.base}-sw"

    def create(self) -> None:
        """Make the switch namespace and its bridge (multicast snooping off: mDNS floods)."""
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self) -> Host:
        """Plug a new host into the switch; returns once its interface is up."""
        index = len(self.hosts) + 1
        if index > 250:
            raise ValueError("at most 250 hosts")
        netns = f"{self.base}-h{index}"
        port = f"p{index}"
        ip = str(SUBNET.network_address + index)
        self._add_netns(netns)
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", netns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "link", "set", IFACE, "multicast", "on")
        _ip("-n", netns, "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", IFACE)
        _ip("-n", netns, "link", "set", IFACE, "up")
        _ip("-n", netns, "route", "add", "224.0.0.0/4", "dev", IFACE)
        host = Host(self, index, netns, ip, port)
        self.hosts.append(host)
        deadline = time.monotonic() + 30
        while "state UP" not in _ip("-n", netns, "link", "show", IFACE).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{netns}: {IFACE} did not come up")
            time.sleep(0.02)
        return host

    def destroy(self) -> None:
        """Kill what the test started in the hosts, delete every namespace. Never raises."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)
        for name in reversed(self.namespaces):
            with contextlib.suppress(Exception):
                _ip("netns", "del", name, check=False)
        self.namespaces.clear()

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)

"""blixfs/discovery.py without a network: the namespace tag, the checks on announcements, and
`LanDiscovery.run` starting, failing and stopping (nothing is sent: no interface matches, or
zeroconf is replaced). The mDNS tests proper are in tests/netns."""

from __future__ import annotations

import ipaddress
import logging
import os

import pytest
import trio

from blixfs.discovery import (
    TAG_BYTES,
    LanDiscovery,
    Rejected,
    _tag_key,
    check_announcement,
    interfaces_for_listen,
    namespace_tag,
)
from blixfs.net.transport import NodeAddr

NS = bytes(range(32))
OTHER_NS = bytes(range(1, 33))
NODE_A = "a1" * 32
NODE_B = "b2" * 32
NETS = [ipaddress.IPv4Network("198.51.100.0/24")]


def test_tag_is_recognisable_with_the_namespace_id() -> None:
    tag = namespace_tag(NS, NODE_A)
    assert tag == namespace_tag(NS, NODE_A)
    assert tag == namespace_tag(bytearray(NS), NODE_A.upper())  # the id's case does not matter
    assert len(tag) == 2 * TAG_BYTES
    assert tag == tag.lower() and bytes.fromhex(tag)


def test_tag_differs_per_node_and_per_namespace() -> None:
    tags = {namespace_tag(NS, f"{n:02x}" * 32) for n in range(64)}
    assert len(tags) == 64
    assert namespace_tag(NS, NODE_A) != namespace_tag(OTHER_NS, NODE_A)


def test_tag_reveals_nothing_of_the_ids() -> None:
    for _ in range(32):
        ns = os.urandom(32)
        node = os.urandom(32).hex()
        tag = namespace_tag(ns, node)
        assert tag not in (ns.hex(), node)
        for i in range(0, 32 - 4):  # not even a 4-byte piece of either id
            assert ns[i : i + 4].hex() not in tag
            assert node[2 * i : 2 * i + 8] not in tag


def test_tag_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        namespace_tag(NS[:31], NODE_A)
    with pytest.raises(ValueError):
        namespace_tag(NS + b"\0", NODE_A)
    with pytest.raises(ValueError):
        namespace_tag(NS, "zz" * 32)
    with pytest.raises(ValueError):
        namespace_tag(NS, NODE_A[:-2])


def txt(node: str, *, ns: bytes = NS, version: bytes = b"1") -> dict[bytes, bytes | None]:
    return {b"v": version, b"id": node.encode(), b"ns": namespace_tag(ns, node).encode()}


def check(
    props: dict[bytes, bytes | None], port: int | None = 4000, addrs: tuple[str, ...] = ("198.51.100.7",)
) -> NodeAddr:
    return check_announcement(props, port, addrs, tag_key=_tag_key(NS), networks=NETS)


def test_valid_announcement_gives_the_peer() -> None:
    peer = check(txt(NODE_A), addrs=("198.51.100.7", "203.0.113.9", "198.51.100.8", "198.51.100.7"))
    assert peer == NodeAddr(NODE_A, ("198.51.100.7:4000", "198.51.100.8:4000"))


@pytest.mark.parametrize(
    ("props", "port", "addrs", "reason"),
    [
        ({b"id": NODE_A.encode(), b"ns": namespace_tag(NS, NODE_A).encode()}, 4000, ("198.51.100.7",), "version"),
        (txt(NODE_A, version=b"2"), 4000, ("198.51.100.7",), "version"),
        ({**txt(NODE_A), b"v": None}, 4000, ("198.51.100.7",), "version"),
        ({b"v": b"1", b"ns": b"00" * 16}, 4000, ("198.51.100.7",), "endpoint id"),
        ({**txt(NODE_A), b"id": b"zz" * 32}, 4000, ("198.51.100.7",), "endpoint id"),
        ({**txt(NODE_A), b"id": NODE_A.upper().encode()}, 4000, ("198.51.100.7",), "endpoint id"),
        ({**txt(NODE_A), b"id": b"\xff" * 64}, 4000, ("198.51.100.7",), "endpoint id"),
        ({**txt(NODE_A), b"id": None}, 4000, ("198.51.100.7",), "endpoint id"),
        (txt(NODE_A, ns=OTHER_NS), 4000, ("198.51.100.7",), "another namespace"),
        ({**txt(NODE_A), b"ns": namespace_tag(NS, NODE_B).encode()}, 4000, ("198.51.100.7",), "another namespace"),
        ({**txt(NODE_A), b"ns": None}, 4000, ("198.51.100.7",), "another namespace"),
        ({**txt(NODE_A), b"ns": NS.hex().encode()}, 4000, ("198.51.100.7",), "another namespace"),
        (txt(NODE_A), 0, ("198.51.100.7",), "bad port"),
        (txt(NODE_A), None, ("198.51.100.7",), "bad port"),
        (txt(NODE_A), 70000, ("198.51.100.7",), "bad port"),
        (txt(NODE_A), 4000, (), "no address"),
        (txt(NODE_A), 4000, ("203.0.113.9", "fe80::1", "garbage"), "no address"),
    ],
)
def test_bad_announcements_are_rejected(
    props: dict[bytes, bytes | None], port: int | None, addrs: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(Rejected, match=reason):
        check(props, port, addrs)


def test_interfaces_for_listen() -> None:
    assert interfaces_for_listen("0.0.0.0:4433") is None
    assert interfaces_for_listen("[::]:4433") is None
    assert interfaces_for_listen("127.0.0.1:4433") == []
    assert interfaces_for_listen("[::1]:4433") == []
    assert interfaces_for_listen("198.51.100.4:4433") == ["198.51.100.4"]
    assert interfaces_for_listen("198.51.100.4") == ["198.51.100.4"]
    with pytest.raises(ValueError):
        interfaces_for_listen("not-an-ip:1")


# --- LanDiscovery.run without a network: it never raises, starts at once, stops at once ---------


async def test_run_with_no_matching_interface_idles_and_cancels(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="blixfs.discovery")
    disco = LanDiscovery(NODE_A, 4000, NS, lambda peer: None, ["no-such-interface0"], poll_seconds=0.05)
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert "no interface to announce on" in caplog.text
    assert disco.peers == []


async def test_zeroconf_failure_is_logged_and_retried(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import blixfs.discovery as discovery

    attempts: list[object] = []

    def broken_zeroconf(**kwargs: object) -> None:
        attempts.append(kwargs)
        raise OSError(19, "No such device")

    fake = [discovery.LanAddress("bx9", ipaddress.IPv4Interface("198.51.100.9/24"))]
    monkeypatch.setattr(discovery, "lan_addresses", lambda selection: fake)
    monkeypatch.setattr(discovery, "Zeroconf", broken_zeroconf)
    monkeypatch.setattr(discovery, "RETRY_SECONDS", (0.05,))
    caplog.set_level(logging.WARNING, logger="blixfs.discovery")
    disco = LanDiscovery(NODE_A, 4000, NS, lambda peer: None)
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    assert len(attempts) >= 2
    assert attempts[0] == {"interfaces": ["198.51.100.9"], "ip_version": discovery.IPVersion.V4Only}
    assert "mdns: discovery failed (OSError" in caplog.text


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        LanDiscovery("xyz", 4000, NS, lambda peer: None)
    with pytest.raises(ValueError):
        LanDiscovery(NODE_A, 0, NS, lambda peer: None)
    with pytest.raises(ValueError):
        LanDiscovery(NODE_A, 4000, NS[:16], lambda peer: None)
    disco = LanDiscovery(NODE_A.upper(), 4000, NS, lambda peer: None)
    assert disco.node_id == NODE_A and disco.instance_name == "blixfs-" + NODE_A[:16]
    assert disco.tag == namespace_tag(NS, NODE_A)


async def test_run_with_no_interfaces_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="blixfs.discovery")
    disco = LanDiscovery(NODE_A, 4000, NS, lambda peer: None, interfaces_for_listen("127.0.0.1:4000"))
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            nursery.cancel_scope.cancel()
    assert "LAN discovery is off" in caplog.text

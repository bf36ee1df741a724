"""Run LAN discovery (or a misbehaving announcer) inside a test host; one JSON line per event.

Started by tests/netns/test_discovery.py inside a network namespace of its own making
(``ip netns exec``); it refuses to run where any interface other than ``lo`` and ``bx0``
exists, so it can never send mDNS on a real network.

    discover_node.py --node-id HEX --port N --namespace HEX [--interface X ...] [--seconds S]
                     [--poll S] [--garbage]

stdout, one JSON object per line, ``t`` being CLOCK_MONOTONIC (shared by all namespaces):
``{"event": "ready", "t": ...}`` once announced, ``{"event": "peer", "id": ..., "addrs": [...],
"t": ...}`` per ``on_peer`` call, and ``{"event": "stopped", "took": seconds}`` after the
cancellation of `LanDiscovery.run` returned. Logs go to stderr at DEBUG level.

``--garbage`` announces, with zeroconf directly, services a peer must ignore: bad or missing
TXT keys, another version, port 0, addresses off the link, a wrong tag, raw binary TXT. It is
given the real namespace id so that some of them carry a valid tag and reach the later checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import time

import trio
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from blixfs.discovery import SERVICE_TYPE, LanDiscovery, lan_addresses, namespace_tag
from blixfs.net.transport import NodeAddr

ALLOWED_INTERFACES = {"lo", "bx0"}


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def discover(args: argparse.Namespace) -> None:
    def on_peer(peer: NodeAddr) -> None:
        emit(event="peer", id=peer.node_id, addrs=list(peer.addrs), t=time.monotonic())

    disco = LanDiscovery(
        args.node_id,
        args.port,
        bytes.fromhex(args.namespace),
        on_peer,
        args.interface or None,
        poll_seconds=args.poll,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(disco.run)
        emit(event="ready", t=time.monotonic())
        await trio.sleep(args.seconds)
        begin = time.monotonic()
        nursery.cancel_scope.cancel()
    emit(event="stopped", took=time.monotonic() - begin)


def garbage_services(namespace_id: bytes, ip: str, port: int) -> list[ServiceInfo]:
    def service(label: str, properties: dict[str, str] | bytes, *, port: int = port, addr: str = ip) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=port,
            properties=properties,
            server=f"{label}.local.",
            parsed_addresses=[addr],
        )

    def node(n: int) -> str:
        return f"{n:02x}" * 32

    def tag(n: int) -> str:
        return namespace_tag(namespace_id, node(n))

    return [
        service("garbage-noid", {"v": "1", "ns": "00" * 16}),
        service("garbage-badid", {"v": "1", "id": "zz" * 32, "ns": "00" * 16}),
        service("garbage-shortid", {"v": "1", "id": "abcd", "ns": "00" * 16}),
        service("garbage-version", {"v": "2", "id": node(0xA1), "ns": tag(0xA1)}),
        service("garbage-noversion", {"id": node(0xA2), "ns": tag(0xA2)}),
        service("garbage-tag", {"v": "1", "id": node(0xA3), "ns": "ab" * 16}),
        service("garbage-port", {"v": "1", "id": node(0xA4), "ns": tag(0xA4)}, port=0),
        service("garbage-offlink", {"v": "1", "id": node(0xA5), "ns": tag(0xA5)}, addr="203.0.113.7"),
        service("garbage-binary", b"\x05\xff\xfe\x00\x01\x02\x20" + bytes(range(200, 232))),
    ]


async def announce_garbage(args: argparse.Namespace) -> None:
    lan = lan_addresses(args.interface or None)
    if not lan:
        raise SystemExit("no address to announce garbage on")
    ip = str(lan[0].address.ip)
    azc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    infos = garbage_services(bytes.fromhex(args.namespace), ip, args.port)
    tasks = await asyncio.gather(*(azc.async_register_service(info, allow_name_change=True) for info in infos))
    await asyncio.gather(*tasks)
    emit(event="ready", t=time.monotonic())
    await asyncio.sleep(args.seconds)
    begin = time.monotonic()
    await azc.async_close()
    emit(event="stopped", took=time.monotonic() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--namespace", required=True, help="namespace id, 64 hex")
    parser.add_argument("--interface", action="append", default=[], help="interface name or IPv4 (repeatable)")
    parser.add_argument("--seconds", type=float, default=6.0, help="run this long, then stop")
    parser.add_argument("--poll", type=float, default=5.0, help="interface re-read period")
    parser.add_argument("--garbage", action="store_true", help="announce malformed services instead")
    args = parser.parse_args()

    present = {name for _, name in socket.if_nameindex()}
    if not present <= ALLOWED_INTERFACES:
        raise SystemExit(f"refusing to run outside a test namespace (interfaces here: {sorted(present)})")

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("zeroconf").setLevel(logging.INFO)
    if args.garbage:
        asyncio.run(announce_garbage(args))
    else:
        trio.run(discover, args)


if __name__ == "__main__":
    main()

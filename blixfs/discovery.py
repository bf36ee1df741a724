"""LAN discovery: nodes of one namespace find each other with mDNS / DNS-SD.

Each node announces a ``_blixfs._udp.local.`` service (python-zeroconf) and browses the same
type. The service's SRV record carries the node's listen port, its A records the node's IPv4
addresses on the announcing interfaces, and its TXT record three keys (``docs/discovery.md``):

    v=1                     the format version; anything else is ignored
    id=<64 hex>             the node's endpoint id (lowercase)
    ns=<32 hex>             namespace_tag(namespace id, id)

A peer that knows the namespace id recomputes the tag for the announced id and compares;
a stranger sees 16 pseudo-random bytes that differ for every node, so it can't tell which
namespace a node serves, nor that two nodes serve the same one. What it does learn: that
blixfs nodes are on the link, their endpoint ids, addresses and ports.

`LanDiscovery.run` calls ``on_peer(NodeAddr)`` on the trio thread for every announcement of
another node whose tag matches; everything else (our own service, a foreign namespace, a
malformed TXT record, a bad port, addresses off our links) is dropped with a debug log line.
Discovery is best effort: no zeroconf or socket error ever leaves `run` other than as a log
line and a retry; only cancellation ends it.

This module imports neither pyfuse3 nor iroh.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import ifaddr
import trio
from blake3 import blake3
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from blixfs.net.transport import MAX_ADDRS, NodeAddr, validate_node_id

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_blixfs._udp.local."
"""The DNS-SD service type every blixfs node announces and browses."""
TXT_VERSION = b"1"
"""The value of the ``v`` TXT key this code writes and the only one it accepts."""
TAG_BYTES = 16
"""Length of the namespace tag (hex in TXT: twice this many characters)."""
_TAG_CONTEXT = "blixfs 2025-06 mdns namespace tag v1"
"""BLAKE3 derive_key context: the tag key is never the namespace id itself."""

DEFAULT_POLL_SECONDS = 5.0
"""How often the interface addresses are re-read to notice a change."""
RESOLVE_TIMEOUT_MS = 2000
"""How long one service resolution (SRV/TXT/A) may take before the service is dropped."""
SETTLE_SECONDS = 1.2
"""A peer is resolved again this long after a change: RFC 6762 keeps flushed records 1 s."""
CLOSE_SECONDS = 1.0
"""Budget for goodbye packets and closing zeroconf when discovery is cancelled."""
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Back-off after a zeroconf failure (the last value repeats)."""
MAX_TRACKED_SERVICES = 1024
"""At most this many other services are remembered; more are ignored (a flooding stranger)."""
_RESOLVE_THREADS = 4

_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000
_IP_MULTICAST_ALL = 49  # Linux <linux/in.h>; not exported by the socket module


def namespace_tag(namespace_id: bytes, node_id: str) -> str:
    """The value of the ``ns`` TXT key a node with ``node_id`` announces for ``namespace_id``.

    ``blake3_keyed(key, node id bytes)`` truncated to `TAG_BYTES`, as lowercase hex, where
    ``key = blake3_derive_key(_TAG_CONTEXT, namespace_id)``. Contract:

    * anyone who knows the namespace id can recompute it for an announced node id;
    * without the namespace id it is indistinguishable from random (BLAKE3 keyed mode is a
      PRF and the 32-byte namespace id is not guessable), and contains nothing of the id;
    * it differs per node, so equal tags never link two nodes to one namespace.

    Raises ValueError unless ``namespace_id`` is 32 bytes and ``node_id`` is 64 hex digits.
    """
    if len(namespace_id) != 32:
        raise ValueError(f"namespace id must be 32 bytes, got {len(namespace_id)}")
    node = bytes.fromhex(validate_node_id(node_id))
    return _tag_with_key(_tag_key(namespace_id), node)


def _tag_key(namespace_id: bytes) -> bytes:
    key: bytes = blake3(bytes(namespace_id), derive_key_context=_TAG_CONTEXT).digest()
    return key


def _tag_with_key(key: bytes, node: bytes) -> str:
    tag: str = blake3(node, key=key).hexdigest(length=TAG_BYTES)
    return tag


# --- interfaces ----------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class LanAddress:
    """One IPv4 address of a local interface that discovery announces on."""

    interface: str
    address: ipaddress.IPv4Interface
    """The address with its network (prefix length), e.g. ``198.51.100.1/24``."""


def _interface_flags(name: str) -> int | None:
    """The kernel's IFF_* flags of interface ``name`` (Linux /sys), None if unknown."""
    try:
        with open(os.path.join("/sys/class/net", name.split(":")[0], "flags")) as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return None


def lan_addresses(selection: Sequence[str] | None) -> list[LanAddress]:
    """The IPv4 addresses discovery uses, per the ``interfaces`` rule of `LanDiscovery`.

    ``selection`` None: every address of an interface that is up, multicast-capable and not
    loopback, if the address is not globally routable (RFC 1918, link-local, CGNAT and the
    like). Otherwise: the addresses of the named interfaces and the listed IPv4 addresses
    that are configured here, whatever their range; an entry that matches nothing is skipped
    (it may appear later). Sorted, without duplicates. Blocking (reads the kernel's tables).
    """
    found: set[LanAddress] = set()
    wanted = {s.strip() for s in selection} if selection is not None else None
    for adapter in ifaddr.get_adapters():
        name = str(adapter.nice_name or adapter.name)
        flags = _interface_flags(name)
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6: not announced (docs/discovery.md)
            try:
                addr = ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}")
            except ValueError:
                continue
            if _selected(name, flags, addr, wanted):
                found.add(LanAddress(name, addr))
    return sorted(found)


def _selected(name: str, flags: int | None, addr: ipaddress.IPv4Interface, wanted: set[str] | None) -> bool:
    if flags is not None and not flags & _IFF_UP:
        return False
    if wanted is not None:
        return name in wanted or str(addr.ip) in wanted
    if flags is not None and (flags & _IFF_LOOPBACK or not flags & _IFF_MULTICAST):
        return False
    return not (addr.ip.is_loopback or addr.ip.is_global or addr.ip.is_unspecified)


def interfaces_for_listen(host: str) -> list[str] | None:
    """The ``interfaces`` argument that matches a node listening on ``host`` (an IP, or "ip:port").

    A wildcard (``0.0.0.0``, ``::``) gives None (the default LAN interfaces); a loopback
    address gives ``[]`` (nobody on the LAN could reach the node, so nothing is announced);
    any other IPv4 address gives ``[host]``. Raises ValueError for a malformed host.
    """
    text = host.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    ip = ipaddress.ip_address(text)
    if ip.is_unspecified:
        return None
    if ip.is_loopback or ip.version != 4:
        return []
    return [str(ip)]


# --- announcements ---------------------------------------------------------------------------


class Rejected(ValueError):
    """An announcement that is not a peer of ours; the message says why (for the debug log)."""


def check_announcement(
    properties: Mapping[bytes, bytes | None],
    port: int | None,
    addresses: Iterable[str],
    *,
    tag_key: bytes,
    networks: Sequence[ipaddress.IPv4Network],
) -> NodeAddr:
    """The peer an announcement names, if it is a valid announcement of our namespace.

    ``properties`` are the service's TXT pairs, ``port`` its SRV port, ``addresses`` its
    IPv4 addresses, ``tag_key`` is ``_tag_key(our namespace id)``, ``networks`` the networks
    of our announcing interfaces: only addresses inside them are kept (mDNS is link-local, and
    this stops a forged announcement from steering dials elsewhere). Raises `Rejected`
    naming the first thing wrong: version, id, tag, port, addresses.
    """
    version = properties.get(b"v")
    if version != TXT_VERSION:
        raise Rejected(f"TXT version {version!r} is not {TXT_VERSION!r}")
    raw_id = properties.get(b"id")
    try:
        node_id = raw_id.decode("ascii") if raw_id is not None else ""
        if node_id != node_id.lower():
            raise ValueError("upper case")
        node_id = validate_node_id(node_id)
    except (UnicodeDecodeError, ValueError):
        raise Rejected(f"TXT id {raw_id!r:.80} is not a 64-hex endpoint id") from None
    tag = properties.get(b"ns")
    expected = _tag_with_key(tag_key, bytes.fromhex(node_id)).encode("ascii")
    if tag is None or not hmac.compare_digest(tag, expected):
        raise Rejected(f"node {node_id[:16]} announces another namespace (or a bad tag)")
    if port is None or not 0 < port < 65536:
        raise Rejected(f"node {node_id[:16]} announces bad port {port!r}")
    addresses = list(addresses)
    kept: list[str] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.version == 4 and any(ip in net for net in networks) and f"{ip}:{port}" not in kept:
            kept.append(f"{ip}:{port}")
    if not kept:
        raise Rejected(f"node {node_id[:16]} announces no address on our links ({addresses!r:.120})")
    return NodeAddr(node_id, tuple(kept[:MAX_ADDRS]))


# --- the service -----------------------------------------------------------------------------

_Event = tuple[str, ServiceStateChange]


class LanDiscovery:
    """Announce this node on the LAN and report peers of the same namespace.

    ``node_id``: our endpoint id (64 hex). ``port``: the UDP port iroh listens on.
    ``namespace_id``: the 32-byte id of the namespace we serve. ``on_peer``: called on the
    trio thread with ``NodeAddr(id, ("ip:port", ...))`` when a peer of our namespace is found
    and again whenever its announced addresses change; an exception from it is logged and
    otherwise ignored.

    ``interfaces``: IPv4 addresses and/or interface names to bind to and announce on. The
    default (None) is every interface that is up, multicast-capable, not loopback, and only
    its addresses that are not globally routable: mDNS is link-local, and a node whose
    interface has a public address is usually on a provider's network rather than a LAN, so
    it stays silent there unless named explicitly. An empty list announces nothing (use
    `interfaces_for_listen` to derive it from the listen address: a node listening on
    127.0.0.1 has nothing to announce). IPv6 is not used. Announced addresses are the IPv4
    addresses of the chosen interfaces, with ``port``.

    The service instance is ``blixfs-<first 16 hex of node_id>`` (renamed by zeroconf on a
    conflict), on host name ``blixfs-<same>.local.``.
    """

    def __init__(
        self,
        node_id: str,
        port: int,
        namespace_id: bytes,
        on_peer: Callable[[NodeAddr], None],
        interfaces: list[str] | None = None,
        *,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
    ) -> None:
        self.node_id = validate_node_id(node_id)
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        self.port = port
        self.tag = namespace_tag(namespace_id, self.node_id)
        self._tag_key = _tag_key(namespace_id)
        self._on_peer = on_peer
        self.interfaces = None if interfaces is None else list(interfaces)
        if not math.isfinite(poll_seconds) or poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, got {poll_seconds}")
        self._poll_seconds = poll_seconds
        self.instance_name = f"blixfs-{self.node_id[:16]}"
        self._peers: dict[str, NodeAddr] = {}  # service name -> what on_peer was last told
        self._rejected: dict[str, str] = {}  # service name -> reason last logged
        self._limiter = trio.CapacityLimiter(_RESOLVE_THREADS)

    @property
    def peers(self) -> list[NodeAddr]:
        """The peers currently announced on the LAN (one entry per announcing service)."""
        return list(self._peers.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce and browse until cancelled; never returns otherwise, never raises.

        ``task_status.started()`` is called once the service is registered and the browser
        runs, or after the first attempt failed or found no interface (logged): the caller
        is never held up by discovery. Every ``poll_seconds`` the interface addresses are
        re-read; when they changed, the service is withdrawn and announced anew on the new
        set. On cancellation the goodbye packets are sent and zeroconf is closed within
        about `CLOSE_SECONDS`.
        """
        started = False
        failures = 0
        idle_logged = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        if self.interfaces == []:
            logger.info("mdns: no interfaces configured; LAN discovery is off")
            mark_started()
            await trio.sleep_forever()
        while True:
            try:
                lan = await trio.to_thread.run_sync(lan_addresses, self.interfaces)
            except Exception as exc:
                logger.warning("mdns: cannot list network interfaces: %s", exc)
                lan = []
            if not lan:
                if not idle_logged:
                    logger.info("mdns: no interface to announce on (interfaces=%s); waiting", self.interfaces)
                    idle_logged = True
                mark_started()
                await trio.sleep(self._poll_seconds)
                continue
            idle_logged = False
            try:
                await self._session(lan, mark_started)
                failures = 0
            except Exception as exc:
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                logger.warning("mdns: discovery failed (%s: %s); retrying in %.0f s", type(exc).__name__, exc, delay)
                mark_started()
                await trio.sleep(delay)

    async def _session(self, lan: list[LanAddress], mark_started: Callable[[], None]) -> None:
        """One zeroconf instance on ``lan``: returns when the addresses changed."""
        bind_ips: list[str] = []
        seen_ifaces: set[str] = set()
        for entry in lan:
            if entry.interface not in seen_ifaces:  # one multicast membership per interface
                seen_ifaces.add(entry.interface)
                bind_ips.append(str(entry.address.ip))
        networks = [entry.address.network for entry in lan]
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{self.instance_name}.{SERVICE_TYPE}",
            port=self.port,
            properties={b"v": TXT_VERSION, b"id": self.node_id.encode(), b"ns": self.tag.encode()},
            server=f"{self.instance_name}.local.",
            parsed_addresses=[str(entry.address.ip) for entry in lan][:MAX_ADDRS],
        )
        zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=bind_ips, ip_version=IPVersion.V4Only))
        browser: ServiceBrowser | None = None
        send, receive = trio.open_memory_channel[_Event](MAX_TRACKED_SERVICES)
        try:
            _restrict_multicast(zc)
            await trio.to_thread.run_sync(
                lambda: zc.register_service(info, allow_name_change=True), abandon_on_cancel=True
            )
            handler = self._handler(trio.lowlevel.current_trio_token(), send)
            browser = await trio.to_thread.run_sync(lambda: ServiceBrowser(zc, SERVICE_TYPE, handlers=[handler]))
            logger.info(
                "mdns: announcing %s on %s (port %d)",
                info.name,
                ", ".join(f"{e.interface}={e.address.ip}" for e in lan),
                self.port,
            )
            mark_started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._consume, zc, info.name, networks, receive)
                while True:
                    await trio.sleep(self._poll_seconds)
                    try:
                        now = await trio.to_thread.run_sync(lan_addresses, self.interfaces)
                    except Exception as exc:
                        logger.warning("mdns: cannot list network interfaces: %s", exc)
                        continue
                    if now != lan:
                        logger.info(
                            "mdns: addresses changed (%s -> %s); announcing anew",
                            [str(e.address) for e in lan],
                            [str(e.address) for e in now],
                        )
                        nursery.cancel_scope.cancel()
                        break
        finally:
            send.close()
            self._peers.clear()
            with trio.move_on_after(CLOSE_SECONDS) as scope:
                scope.shield = True
                await trio.to_thread.run_sync(_close, zc, browser, abandon_on_cancel=True)
            if scope.cancelled_caught:
                logger.warning("mdns: zeroconf did not close within %.1f s; left to finish on its own", CLOSE_SECONDS)

    def _handler(self, token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[_Event]) -> Callable[..., None]:
        """A ServiceBrowser handler (runs on zeroconf's browser thread): hand the event to trio."""

        def deliver(name: str, change: ServiceStateChange) -> None:
            # Runs on the trio thread as a run_sync_soon callback: raising here would crash trio.
            try:
                send.send_nowait((name, change))
            except trio.WouldBlock:
                logger.debug("mdns: event queue full; dropping %s of %r", change.name, name)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            except Exception:
                logger.exception("mdns: browser event lost")

        def handler(**kwargs: object) -> None:
            # Must never raise: an exception would end the browser thread.
            try:
                name, change = kwargs.get("name"), kwargs.get("state_change")
                if isinstance(name, str) and isinstance(change, ServiceStateChange):
                    token.run_sync_soon(deliver, name, change)
            except trio.RunFinishedError:
                pass
            except Exception:
                logger.exception("mdns: browser event lost")

        return handler

    async def _consume(
        self,
        zc: Zeroconf,
        own_name: str,
        networks: list[ipaddress.IPv4Network],
        receive: trio.MemoryReceiveChannel[_Event],
    ) -> None:
        """Resolve added/updated services (concurrently, one at a time per name) and report peers."""
        busy: set[str] = set()
        again: set[str] = set()

        async def resolve(name: str) -> None:
            try:
                while True:
                    again.discard(name)
                    await self._resolve(zc, name, networks)
                    # Records replaced by a cache-flush announcement (a peer's new address)
                    # stay in the cache for one more second; look again once they are gone.
                    await trio.sleep(SETTLE_SECONDS)
                    if name not in again:
                        if name in self._peers:
                            await self._resolve(zc, name, networks)
                        return
            finally:
                busy.discard(name)

        async with trio.open_nursery() as nursery:
            async for name, change in receive:
                if name.lower() == own_name.lower():
                    continue
                if change is ServiceStateChange.Removed:
                    gone = self._peers.pop(name, None)
                    self._rejected.pop(name, None)
                    if gone is not None:
                        logger.debug("mdns: peer %s withdrew %r", gone.node_id[:16], name)
                    continue
                if name in busy:
                    again.add(name)
                    continue
                if name not in self._peers and len(self._peers) + len(busy) >= MAX_TRACKED_SERVICES:
                    logger.debug("mdns: ignoring %r: already tracking %d services", name, MAX_TRACKED_SERVICES)
                    continue
                busy.add(name)
                nursery.start_soon(resolve, name)

    async def _resolve(self, zc: Zeroconf, name: str, networks: list[ipaddress.IPv4Network]) -> None:
        try:
            info = await trio.to_thread.run_sync(
                lambda: zc.get_service_info(SERVICE_TYPE, name, RESOLVE_TIMEOUT_MS),
                abandon_on_cancel=True,
                limiter=self._limiter,
            )
        except Exception as exc:
            self._reject(name, f"resolution failed ({type(exc).__name__}: {exc})")
            return
        if info is None:
            self._reject(name, f"did not resolve within {RESOLVE_TIMEOUT_MS} ms")
            return
        try:
            properties = info.properties
            if properties.get(b"id") == self.node_id.encode():
                return  # ourselves, e.g. after a rename by zeroconf
            peer = check_announcement(
                properties,
                info.port,
                info.parsed_addresses(IPVersion.V4Only),
                tag_key=self._tag_key,
                networks=networks,
            )
        except Rejected as exc:
            self._reject(name, str(exc))
            return
        except Exception as exc:  # zeroconf failing to parse what a stranger sent
            self._reject(name, f"unreadable records ({type(exc).__name__}: {exc})")
            return
        self._rejected.pop(name, None)
        if self._peers.get(name) == peer:
            return
        self._peers[name] = peer
        logger.debug("mdns: found peer %s", peer)
        try:
            self._on_peer(peer)
        except Exception:
            logger.exception("mdns: on_peer failed for %s", peer)

    def _reject(self, name: str, reason: str) -> None:
        """Debug-log why ``name`` is ignored, once per distinct reason."""
        self._peers.pop(name, None)
        if self._rejected.get(name) == reason:
            return
        if name not in self._rejected and len(self._rejected) >= MAX_TRACKED_SERVICES:
            self._rejected.pop(next(iter(self._rejected)))
        self._rejected[name] = reason
        logger.debug("mdns: ignoring service %r: %s", name, reason)


def _restrict_multicast(zc: Zeroconf) -> None:
    """Make zeroconf's wildcard listen socket receive only the groups it joined itself.

    Linux delivers to a socket bound to 0.0.0.0:5353 the mDNS traffic of every interface on
    which *any* socket of the host joined 224.0.0.251 (IP_MULTICAST_ALL, on by default), e.g.
    avahi on an interface we were told to stay off; zeroconf would answer unicast queries
    arriving that way. Best effort (zeroconf does not expose its sockets): logged at debug
    level when not possible. Call right after the constructor, which returns with the sockets
    in place.
    """
    restricted = 0
    for reader in list(getattr(zc.engine, "readers", ())):
        try:
            sock = reader.transport.get_extra_info("socket")
            host = sock.getsockname()[0] if sock is not None else None
            if sock is not None and sock.family == socket.AF_INET and host == "0.0.0.0":
                sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
                restricted += 1
        except (AttributeError, OSError) as exc:
            logger.debug("mdns: cannot clear IP_MULTICAST_ALL: %s", exc)
    if not restricted:
        logger.debug("mdns: found no wildcard listen socket to restrict")


def _close(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
    """Stop the browser, send goodbyes for our service and close zeroconf (blocking)."""
    if browser is not None:
        with contextlib.suppress(Exception):
            browser.cancel()
    try:
        zc.close()  # unregisters every service first: three goodbye packets, 125 ms apart
    except Exception as exc:
        logger.warning("mdns: error while closing zeroconf: %s", exc)

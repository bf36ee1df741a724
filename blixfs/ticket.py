"""Tickets: what `blixfs share` prints and `blixfs join` takes.

A ticket names a namespace, the capability it grants, and a node to sync from::

    "blixfs" | base32-lowercase-unpadded(
        version: u8 = 1 | flags: u8 (bit 0: write, bit 1: bound) | namespace id: 32 bytes
        | namespace secret: 32 bytes (only with write) | node id: 32 bytes (only when bound)
        | node address (NodeAddr.to_bytes) )

A bound ticket is for one node only (`blixfs allow NODE` prints one): `Node.join` on any
other node refuses it. Binding is a guard against a ticket handed to the wrong host, not
a secret: the member list (blixfs.members) is what admits the node.

Decoding checks every length and says what is wrong in words a person can act on
(`TicketError`). A write ticket is a secret: whoever holds it can change the namespace.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from blixfs.net.transport import NodeAddr
from blixfs.replica import NamespaceKeys

PREFIX = "blixfs"
VERSION = 1
_WRITE = 0x01
_BOUND = 0x02
MAX_TICKET_CHARS = 4096


class TicketError(ValueError):
    """A ticket that cannot be used; the message says why."""


@dataclass(frozen=True)
class Ticket:
    keys: NamespaceKeys
    peer: NodeAddr
    bound: bytes | None = None  # the one node id that may join with it

    def encode(self) -> str:
        flags = (_WRITE if self.keys.secret is not None else 0) | (_BOUND if self.bound is not None else 0)
        if self.bound is not None and len(self.bound) != 32:
            raise ValueError("a ticket is bound to a 32-byte node id")
        body = bytes([VERSION, flags]) + self.keys.id + (self.keys.secret or b"") + (self.bound or b"") \
            + self.peer.to_bytes()
        return PREFIX + base64.b32encode(body).decode().rstrip("=").lower()

    @classmethod
    def decode(cls, text: str) -> Ticket:
        text = text.strip()
        if not text.startswith(PREFIX):
            raise TicketError(f"not a blixfs ticket (it should start with {PREFIX!r})")
        if len(text) > MAX_TICKET_CHARS:
            raise TicketError("ticket too long")
        b32 = text[len(PREFIX) :].upper()
        try:
            body = base64.b32decode(b32 + "=" * (-len(b32) % 8))
        except ValueError:
            raise TicketError("ticket is damaged or truncated (not base32): was it copied whole?") from None
        if len(body) < 2 + 32:
            raise TicketError("ticket is truncated: was it copied whole?")
        if body[0] != VERSION:
            raise TicketError(f"ticket version {body[0]} is not supported (this blixfs reads version {VERSION})")
        flags, nsid = body[1], body[2:34]
        if flags & ~(_WRITE | _BOUND):
            raise TicketError("ticket has unknown flags")
        rest = body[34:]
        secret = None
        if flags & _WRITE:
            if len(rest) < 32:
                raise TicketError("ticket is truncated: was it copied whole?")
            secret, rest = rest[:32], rest[32:]
        bound = None
        if flags & _BOUND:
            if len(rest) < 32:
                raise TicketError("ticket is truncated: was it copied whole?")
            bound, rest = rest[:32], rest[32:]
        try:
            peer = NodeAddr.from_bytes(rest)
        except ValueError as exc:
            raise TicketError(f"ticket's node address is damaged: {exc}") from None
        keys = NamespaceKeys(nsid, secret)
        if secret is not None and NamespaceKeys.from_secret(secret).id != nsid:
            raise TicketError("ticket's write key does not belong to its namespace")
        return cls(keys, peer, bound)

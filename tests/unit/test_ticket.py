"""Tickets: round trip, and every way a pasted ticket can be broken."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixfs.net.transport import NodeAddr
from blixfs.replica import NamespaceKeys
from blixfs.ticket import Ticket, TicketError

PEER = NodeAddr("ab" * 32, ("127.0.0.1:4433", "[::1]:4433"))


@pytest.mark.parametrize("write", [True, False])
def test_round_trip(write: bool) -> None:
    keys = NamespaceKeys.generate()
    t = Ticket(keys if write else NamespaceKeys(keys.id), PEER)
    text = t.encode()
    assert text.startswith("blixfs") and text == text.strip()
    back = Ticket.decode("  " + text + "\n")
    assert back == t and back.keys.writable is write


def test_broken_tickets_say_what_is_wrong() -> None:
    good = Ticket(NamespaceKeys.generate(), PEER).encode()
    cases = {
        "hello": "not a blixfs ticket",
        good[:20]: "truncated",
        good[:-7]: "damaged|truncated",
        "blixfs!!!!": "damaged",
        good[:6] + "z" + good[7:]: "version|flags|damaged|truncated|belong",
    }
    for text, why in cases.items():
        with pytest.raises(TicketError, match=why):
            Ticket.decode(text)


def test_a_write_key_of_another_namespace_is_refused() -> None:
    a, b = NamespaceKeys.generate(), NamespaceKeys.generate()
    forged = Ticket(NamespaceKeys(a.id, b.secret), PEER).encode()
    with pytest.raises(TicketError, match="does not belong"):
        Ticket.decode(forged)


@given(st.text(max_size=300))
def test_decode_only_raises_ticket_error(text: str) -> None:
    with contextlib.suppress(TicketError):
        Ticket.decode("blixfs" + text)


@pytest.mark.parametrize("write", [True, False])
def test_bound_ticket_round_trip(write: bool) -> None:
    keys = NamespaceKeys.generate()
    t = Ticket(keys if write else NamespaceKeys(keys.id), PEER, bound=bytes(range(32)))
    back = Ticket.decode(t.encode())
    assert back == t and back.bound == bytes(range(32))
    assert Ticket.decode(Ticket(keys, PEER).encode()).bound is None


def test_bound_ticket_truncated_is_refused() -> None:
    import base64

    keys = NamespaceKeys(NamespaceKeys.generate().id)
    body = bytes([1, 0x02]) + keys.id + bytes(10)  # bound flag, but no room for the node id
    with pytest.raises(TicketError, match="truncated"):
        Ticket.decode("blixfs" + base64.b32encode(body).decode().rstrip("=").lower())


@given(st.integers(0, 3), st.binary(max_size=200))
def test_decode_of_any_body_with_any_known_flags_only_raises_ticket_error(flags: int, rest: bytes) -> None:
    import base64

    body = bytes([1, flags]) + NamespaceKeys.generate().id + rest
    with contextlib.suppress(TicketError):
        t = Ticket.decode("blixfs" + base64.b32encode(body).decode().rstrip("=").lower())
        assert (t.bound is not None) == bool(flags & 2)

"""How iroh's error messages map to the transport's errors (`iroh_transport._translate`).

iroh 1.2.0 reports a failed `read_exact` as quinn's ReadExactError: ``FinishedEarly(n)``
or ``ReadError(<what read reports>)``. A reset or a lost connection must be the same
error whichever of the two reads met it (the transport contract), and an early end an
`UnexpectedEOF` that says how many bytes came. The messages are the ones the binding
gave in tests/net/test_transport_contract.py's midway cases.
"""

from __future__ import annotations

from typing import Any

import pytest

from blixfs.net import iroh_transport
from blixfs.net.transport import (
    ConnectionLost,
    StreamClosed,
    StreamReset,
    TransportError,
    UnexpectedEOF,
)

ffi: Any = getattr(iroh_transport, "_ffi")  # noqa: B009 - private on purpose
translate = getattr(iroh_transport, "_translate_message")  # noqa: B009
STREAM = ffi.IrohErrorKind.STREAM

SHUTDOWN = 'ConnectionLost(ApplicationClosed(ApplicationClose { error_code: 4, reason: b"shutdown" }))'


@pytest.mark.parametrize(
    ("message", "kind", "code"),
    [
        ("Reset(4660)", StreamReset, 4660),
        ("Stopped(7)", StreamReset, 7),
        (SHUTDOWN, ConnectionLost, 4),
        ("ConnectionLost(TimedOut)", ConnectionLost, None),
        ("ConnectionLost(LocallyClosed)", ConnectionLost, None),
        ("ClosedStream", StreamClosed, None),
    ],
)
def test_read_exact_errors_are_those_of_read(message: str, kind: type[TransportError], code: int | None) -> None:
    plain = translate(STREAM, message)
    wrapped = translate(STREAM, f"ReadError({message})")
    for exc in (plain, wrapped):
        assert type(exc) is kind, (message, exc)
        assert exc.code == code
    assert str(plain) == str(wrapped)


def test_finished_early_is_unexpected_eof_with_the_count() -> None:
    exc = translate(STREAM, "FinishedEarly(5)")
    assert isinstance(exc, UnexpectedEOF)
    assert exc.received == 5


@pytest.mark.parametrize("message", ["ReadError(IllegalOrderedRead)", "ReadError(", "FinishedEarly(x)", "odd"])
def test_unknown_messages_stay_generic_transport_errors(message: str) -> None:
    exc = translate(STREAM, message)
    assert type(exc) is TransportError
    assert not isinstance(exc, UnexpectedEOF)

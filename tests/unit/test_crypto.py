"""Ed25519 as blixfs uses it: signed with OpenSSL, verified with libsodium, never raising."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blixfs import crypto


def test_a_signature_verifies_and_nothing_else_does() -> None:
    secret = crypto.generate_secret()
    public = crypto.public_key(secret)
    sig = crypto.sign(secret, b"message")
    assert crypto.verify(public, b"message", sig)
    assert not crypto.verify(public, b"messagf", sig)
    assert not crypto.verify(public, b"message", bytes([sig[0] ^ 1]) + sig[1:])
    assert not crypto.verify(crypto.public_key(crypto.generate_secret()), b"message", sig)
    assert not crypto.verify(public[:31], b"message", sig)  # wrong lengths: refused, not raised
    assert not crypto.verify(public, b"message", sig[:63])
    assert not crypto.verify(bytes(32), b"message", sig)  # a small-order key


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=40), st.binary(max_size=100), st.binary(min_size=0, max_size=70))
def test_verifying_any_bytes_never_raises(public: bytes, message: bytes, signature: bytes) -> None:
    assert crypto.verify(public, message, signature) in (True, False)


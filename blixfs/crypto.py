"""Ed25519 signatures of namespace entries, with the `cryptography` package (OpenSSL).

Keys are the same 32-byte ed25519 seeds iroh uses (a node's identity key signs its
entries; its endpoint id is the public key), and signatures are interchangeable with
iroh's. Measured here (docs/crdt-evaluation.md): verify 63 us with OpenSSL against
112 us through the iroh binding, and OpenSSL's runs in parallel in worker threads,
which is what keeps a 10,000-entry sync (20,000 verifications) under its budget.

Key objects are cached: building one costs as much as a verification.
"""

from __future__ import annotations

import secrets
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_LEN = 32
SIGNATURE_LEN = 64


def generate_secret() -> bytes:
    """A new 32-byte ed25519 secret (every 32-byte value is a valid seed)."""
    return secrets.token_bytes(KEY_LEN)


@lru_cache(maxsize=64)
def _private(secret: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(secret)


@lru_cache(maxsize=4096)
def _public(key: bytes) -> Ed25519PublicKey | None:
    try:
        return Ed25519PublicKey.from_public_bytes(key)
    except ValueError:
        return None


def public_key(secret: bytes) -> bytes:
    """The 32-byte public key (for a node: its endpoint id) of ``secret``."""
    return _private(bytes(secret)).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(secret: bytes, message: bytes) -> bytes:
    """The 64-byte ed25519 signature of ``message``."""
    return _private(bytes(secret)).sign(message)


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s signature of ``message``; never raises."""
    key = _public(bytes(public)) if len(public) == KEY_LEN else None
    if key is None or len(signature) != SIGNATURE_LEN:
        return False
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True

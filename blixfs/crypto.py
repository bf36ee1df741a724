"""Ed25519 signatures of namespace entries: signed with the `cryptography` package
(OpenSSL), verified with PyNaCl (libsodium).

Keys are the same 32-byte ed25519 seeds iroh uses (a node's identity key signs its
entries; its endpoint id is the public key), and signatures are interchangeable with
iroh's. Verification is what a sync does 20,000 times for 10,000 entries, in worker
threads (`blixfs.replica`): `cryptography`'s verify holds the GIL (measured: two
threads verified no faster than one, and the event loop, waiting for the GIL, answered
FUSE requests tens of ms late during a sync), while PyNaCl's cffi call releases it, so
the checks run on both cores beside the event loop; libsodium's verify is also about
as fast as OpenSSL's or faster (docs/design.md, "Replication"). libsodium is at
least as strict (it refuses small-order keys and non-canonical signatures OpenSSL may
take): a signature one node accepts, every node running this code accepts.

Signing stays with `cryptography` (a node signs only its own changes); its key objects
are cached: building one costs as much as a signature.
"""

from __future__ import annotations

import secrets
from functools import lru_cache

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

KEY_LEN = 32
SIGNATURE_LEN = 64


def generate_secret() -> bytes:
    """A new 32-byte ed25519 secret (every 32-byte value is a valid seed)."""
    return secrets.token_bytes(KEY_LEN)


@lru_cache(maxsize=64)
def _private(secret: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(secret)


def public_key(secret: bytes) -> bytes:
    """The 32-byte public key (for a node: its endpoint id) of ``secret``."""
    return _private(bytes(secret)).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(secret: bytes, message: bytes) -> bytes:
    """The 64-byte ed25519 signature of ``message``."""
    return _private(bytes(secret)).sign(message)


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s signature of ``message``; never raises. Releases
    the GIL while libsodium checks (call it from worker threads to use other cores)."""
    if len(public) != KEY_LEN or len(signature) != SIGNATURE_LEN:
        return False
    try:
        crypto_sign_open(bytes(signature) + bytes(message), bytes(public))
    except CryptoError:  # BadSignatureError, or a key libsodium refuses (small order, not a point)
        return False
    return True

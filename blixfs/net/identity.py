"""The node's identity: an iroh ed25519 secret key, kept on disk with mode 0600.

The endpoint id (the public key) is the node's name everywhere: author of its
namespace entries, the peer id others dial.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import iroh

log = logging.getLogger(__name__)
SECRET_KEY_LEN = 32


def load_or_create_secret_key(path: Path) -> bytes:
    """The 32-byte secret key stored at ``path``, created on first use.

    The file is created with mode 0600 by open(2) itself (no window in which the
    umask could leave it readable) and written to a temporary name first, so a
    crash never leaves a truncated key. Raises ValueError for a file of the wrong size.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = bytes(iroh.SecretKey.generate().to_bytes())
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        log.info("created node identity %s in %s", public_key(data).hex(), path)
        return data
    if len(data) != SECRET_KEY_LEN:
        raise ValueError(f"{path} holds {len(data)} bytes, not a {SECRET_KEY_LEN}-byte secret key")
    if os.stat(path).st_mode & 0o077:
        log.warning("%s is readable by others; fixing its mode to 0600", path)
        os.chmod(path, 0o600)
    return data


def public_key(secret: bytes) -> bytes:
    """The 32-byte endpoint id (ed25519 public key) of ``secret``."""
    return bytes(iroh.SecretKey.from_bytes(secret).public().to_bytes())

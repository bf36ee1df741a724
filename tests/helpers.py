"""Builders shared by the test layers."""

from __future__ import annotations

from typing import Any

from blixfs.chunkstore import MemoryChunkStore
from blixfs.crypto import generate_secret
from blixfs.namespace import MemoryNamespaceStore, NamespaceStore
from blixfs.replica import NamespaceKeys, Replica
from blixfs.vfs import Vfs


def make_replica(store: NamespaceStore | None = None, keys: NamespaceKeys | None = None,
                 node_secret: bytes | None = None) -> Replica:
    return Replica(store or MemoryNamespaceStore(), keys or NamespaceKeys.generate(),
                   node_secret or generate_secret())


def make_vfs(**kwargs: Any) -> Vfs:
    """A Vfs over in-memory stores with its own namespace (write capability)."""
    return Vfs(make_replica(), MemoryChunkStore(), **kwargs)

"""Namespace entries: what one path holds, shaped to be signed and replicated.

An entry is immutable. Every change to a path (a write, chmod, rename, delete)
produces a new entry for that path with a later `timestamp_ns`; a delete is a
tombstone (``deleted=True``) so that it can replicate. Which of two entries for
the same path wins is decided by `Entry.lww_key`: (timestamp, author, entry hash),
compared as a tuple, so every node that sees both picks the same winner.

``seen`` is the path's causal context: for each author, the latest timestamp of
that author's versions of this path the writer had seen (a dotted version vector).
Versions of a path that no other known version has seen are *siblings*: the
last-writer-wins maximum among them is the current entry, the others are kept (see
`blixfs.namespace`) and shown as ``NAME.conflict-<author>-<time>`` when they hold
other data (`shown_as_conflict`).

`Entry.canonical` is the byte string that is hashed and signed: UTF-8 JSON with
sorted keys and no insignificant whitespace, bytes as lowercase hex, signatures
left out. It is deterministic for equal entries. `Entry.serialize` adds the two
signatures (namespace, author) for storage and the wire.

``atime_ns`` is optional: None (the default) means "the same as ``mtime_ns``" and is
left out of the canonical form, so entries written before the field existed keep
their hashes and signatures. Only an explicitly set access time (utimensat, ``touch
-a``) is stored; reads never change it (the mount behaves like ``noatime``).
"""

from __future__ import annotations

import enum
import json
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import blake3

LwwKey = tuple[int, bytes, bytes]  # (timestamp_ns, author, entry hash)

# Image metadata readable and settable as user.blixfs.<key> (Blixard's VmImageMetadata), and
# "copies": the file's replication factor (1..MAX_COPIES; absent: the namespace default).
IMAGE_META_KEYS = frozenset({"name", "version", "os", "arch", "tags", "uploaded_by"})
COPIES_KEY = "copies"
META_KEYS = IMAGE_META_KEYS | {COPIES_KEY}
MAX_COPIES = 16
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_XATTR_VALUE = 64 * 1024
MAX_XATTR_TOTAL = 128 * 1024  # hex-encoded on the wire: the largest entry still fits one frame
# How far ahead of an entry's own timestamp its ``seen`` may name another author's versions
# (protocol.md section 12, step 11): the future bound receivers apply to timestamps
# (replica.MAX_FUTURE_NS), since a writer may have accepted a version that far ahead.
MAX_SEEN_AHEAD_NS = 10 * 60 * 10**9
MAX_TIME_NS = 2**63 - 1  # times are signed 64-bit nanoseconds elsewhere (year 2262); atime_ns is checked against it


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"

    @property
    def type_bits(self) -> int:
        return {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}[self]


_EMPTY: Mapping[Any, Any] = MappingProxyType({})


def _frozen(m: Mapping[Any, Any]) -> Mapping[Any, Any]:
    # Empty ones (most xattrs and causal contexts) share one proxy: each proxy is an object
    # the cyclic GC tracks, and a node caches 65,536 entries (`SqliteNamespaceStore`) whose
    # every full GC pass walks them on the event loop.
    return MappingProxyType(dict(m)) if m else _EMPTY


@dataclass(frozen=True, slots=True)
class Entry:
    """One version of one path. ``path`` is relative, '/'-separated, no leading slash."""

    path: str
    kind: Kind
    mode: int  # permission bits (0o7777), the type comes from `kind`
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    author: bytes  # the writing node's 32-byte endpoint id (ed25519 public key)
    timestamp_ns: int  # last-writer-wins clock
    manifest: bytes | None = None  # manifest id of a file's content; None for empty files
    target: str = ""  # a symlink's target
    meta: Mapping[str, str] = field(default_factory=dict)  # image metadata, IMAGE_META_KEYS
    xattrs: Mapping[str, bytes] = field(default_factory=dict)  # other user.* attributes
    deleted: bool = False
    seen: Mapping[bytes, int] = field(default_factory=dict)  # author -> latest timestamp seen for this path
    atime_ns: int | None = None  # an explicitly set access time; None: the same as mtime_ns (not in canonical())
    namespace_sig: bytes = b""  # ed25519 by the namespace key over canonical(); not part of it
    author_sig: bytes = b""  # ed25519 by the author over canonical(); not part of it
    # entry_hash() is asked for several times per merge and re-encodes JSON each time:
    # computed once. init=False: dataclasses.replace() never copies it to a changed entry.
    _hash: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", _frozen(self.meta))
        object.__setattr__(self, "xattrs", _frozen(self.xattrs))
        object.__setattr__(self, "seen", _frozen(self.seen))

    @property
    def st_mode(self) -> int:
        return self.kind.type_bits | self.mode

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def evolve(self, **changes: Any) -> Entry:
        """A copy with ``changes`` applied, unsigned (the caller sets a new timestamp)."""
        return replace(self, namespace_sig=b"", author_sig=b"", **changes)

    @property
    def effective_atime_ns(self) -> int:
        return self.mtime_ns if self.atime_ns is None else self.atime_ns

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path,
            "kind": self.kind.value,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
            "author": self.author.hex(),
            "timestamp_ns": self.timestamp_ns,
            "manifest": self.manifest.hex() if self.manifest is not None else None,
            "target": self.target,
            "meta": dict(self.meta),
            "xattrs": {k: v.hex() for k, v in self.xattrs.items()},
            "deleted": self.deleted,
            "seen": {a.hex(): t for a, t in self.seen.items()},
        }
        # Only when set: an entry without it encodes exactly as before the field existed.
        if self.atime_ns is not None:
            d["atime_ns"] = self.atime_ns
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Entry:
        """Inverse of `to_json`; raises KeyError/ValueError/TypeError on malformed input."""
        manifest = d["manifest"]
        atime = d.get("atime_ns")
        return cls(
            path=str(d["path"]),
            kind=Kind(d["kind"]),
            mode=int(d["mode"]),
            uid=int(d["uid"]),
            gid=int(d["gid"]),
            size=int(d["size"]),
            mtime_ns=int(d["mtime_ns"]),
            ctime_ns=int(d["ctime_ns"]),
            author=bytes.fromhex(d["author"]),
            timestamp_ns=int(d["timestamp_ns"]),
            manifest=bytes.fromhex(manifest) if manifest is not None else None,
            target=str(d["target"]),
            meta={str(k): str(v) for k, v in d["meta"].items()},
            xattrs={str(k): bytes.fromhex(v) for k, v in d["xattrs"].items()},
            deleted=bool(d["deleted"]),
            seen={bytes.fromhex(a): int(t) for a, t in d.get("seen", {}).items()},
            atime_ns=int(atime) if atime is not None else None,
            namespace_sig=bytes.fromhex(d.get("namespace_sig", "")),
            author_sig=bytes.fromhex(d.get("author_sig", "")),
        )

    def canonical(self) -> bytes:
        """The signed bytes: everything but the signatures."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def serialize(self) -> bytes:
        """Canonical fields plus both signatures: what is stored and sent."""
        d = self.to_json()
        d["namespace_sig"] = self.namespace_sig.hex()
        d["author_sig"] = self.author_sig.hex()
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def deserialize(cls, data: bytes) -> Entry:
        """Inverse of `serialize`; raises ValueError/KeyError/TypeError on malformed input."""
        d = json.loads(data)
        if not isinstance(d, dict):
            raise ValueError("an entry is a JSON object")
        return cls.from_json(d)

    def entry_hash(self) -> bytes:
        if self._hash is None:
            self.remember_hash(self.canonical())
        assert self._hash is not None
        return self._hash

    def remember_hash(self, canonical: bytes) -> None:
        """Compute `entry_hash` now from ``canonical``, which must be `canonical()` (the caller
        just built it). `replica.check_entry` calls it (in the sync's worker processes, which
        hand the hash back: `adopt_hash`), so the merge does not encode each entry's JSON
        again to hash it."""
        object.__setattr__(self, "_hash", blake3.blake3(canonical).digest())

    def __reduce__(self) -> tuple[Any, ...]:
        # For the sync's worker processes, which decode and check received entries and hand
        # them back (`replica.check_received`): the mapping proxies do not pickle, and the
        # hash computed there comes along.
        return (_restore, (self.path, self.kind.value, self.mode, self.uid, self.gid, self.size, self.mtime_ns,
                           self.ctime_ns, self.author, self.timestamp_ns, self.manifest, self.target, dict(self.meta),
                           dict(self.xattrs), self.deleted, dict(self.seen), self.atime_ns, self.namespace_sig,
                           self.author_sig, self._hash))

    def adopt_hash(self, entry_hash: bytes) -> None:
        """Take `entry_hash` as computed by a worker process that checked this entry
        (`replica.check_received`), so the merge does not encode it again."""
        object.__setattr__(self, "_hash", entry_hash)

    def lww_key(self) -> LwwKey:
        """Total order for last-writer-wins: the larger key wins, identically on every node."""
        return (self.timestamp_ns, self.author, self.entry_hash())

    def successor_context(self) -> dict[bytes, int]:
        """The ``seen`` of a version written on top of this one: its own context plus itself."""
        seen = dict(self.seen)
        seen[self.author] = max(seen.get(self.author, 0), self.timestamp_ns)
        return seen

    def conflict_name(self) -> str:
        """How a kept conflict version of this entry is shown: ``NAME.conflict-<author>-<time>``."""
        return f"{self.name}.conflict-{self.author.hex()[:8]}-{self.timestamp_ns}"


def _restore(path: str, kind: str, mode: int, uid: int, gid: int, size: int, mtime_ns: int, ctime_ns: int,
             author: bytes, timestamp_ns: int, manifest: bytes | None, target: str, meta: dict[str, str],
             xattrs: dict[str, bytes], deleted: bool, seen: dict[bytes, int], atime_ns: int | None,
             namespace_sig: bytes, author_sig: bytes, entry_hash: bytes | None) -> Entry:
    """`Entry.__reduce__`'s inverse (unpickling)."""
    e = Entry(path, Kind(kind), mode, uid, gid, size, mtime_ns, ctime_ns, author, timestamp_ns, manifest, target,
              meta, xattrs, deleted, seen, atime_ns, namespace_sig, author_sig)
    if entry_hash is not None:
        e.adopt_hash(entry_hash)
    return e


def dominates(a: Entry, b: Entry) -> bool:
    """Whether ``a``'s writer had seen ``b`` (so ``b`` is history, not a concurrent version)."""
    return a.seen.get(b.author, -1) >= b.timestamp_ns


def write_context(base: Entry | None, versions: Iterable[Entry], author: bytes,
                  own_last: int | None = None) -> dict[bytes, int]:
    """The ``seen`` of a new version by ``author`` written over ``base``, given every
    version of the path this node holds (the current one and the kept siblings).

    Domination must be transitive for the kept siblings to be the same on every node
    whatever the order versions arrive in: a version that covers another must cover all
    that one had seen. Two rules keep it so:

    * starting from ``base``'s successor context, the contexts of all held versions it
      covers are merged in until nothing changes (the closure);
    * the author's own held versions are always covered. The new version's successor
      context claims every version of its author up to its timestamp (one number per
      author cannot say "A up to 13 except A5"), so it must have seen them: else a later
      version that saw this one would cover the author's old conflict copy without the
      versions that copy had replaced, and nodes would keep different siblings (the
      history hypothesis found: seed 771). A node's new write therefore supersedes its
      own earlier conflict copies of the path; renaming a conflict file keeps it.

    With ``own_last`` (the writer's last timestamp), ``seen[author]`` is cut to it: no
    honest version claims more of its author than that author wrote, and a larger value
    (a hostile version's ``seen``) would push the new version's timestamp past it
    (`write_timestamp`), out of other nodes' window.
    """
    seen = base.successor_context() if base is not None else {}
    pending = [v for v in versions if v is not base]
    changed = True
    while changed:
        changed = False
        for v in list(pending):
            if seen.get(v.author, -1) >= v.timestamp_ns or v.author == author:
                pending.remove(v)
                for who, ts in v.successor_context().items():
                    if seen.get(who, -1) < ts:
                        seen[who] = ts
                        changed = True
    if own_last is not None and seen.get(author, -1) > own_last:
        seen[author] = own_last
    return seen


def write_timestamp(now: int, last: int, author: bytes, seen: Mapping[bytes, int], versions: Iterable[Entry]) -> int:
    """The timestamp of a new version by ``author`` with causal context ``seen``, written
    when the writer's clock reads ``now`` and its last timestamp was ``last``, over a path
    whose held versions are ``versions`` (protocol.md section 5.5).

    ``max(now, last + 1)``, raised only as far as validity and winning need: above
    ``seen[author]`` (section 12, step 11), above every held version ``seen`` does not
    cover (those stay siblings: the new version must win them by LWW), and to at least
    ``max(seen of other authors) - MAX_SEEN_AHEAD_NS``. Versions ``seen`` covers are
    replaced through the causal context, whatever their timestamp: a version stamped
    minutes ahead no longer ratchets every later overwrite into the future, where nodes
    whose clocks lag refuse it.
    """
    ts = max(now, last + 1, seen.get(author, -1) + 1)
    for v in versions:
        if seen.get(v.author, -1) < v.timestamp_ns:
            ts = max(ts, v.timestamp_ns + 1)
    others = max((t for a, t in seen.items() if a != author), default=-1)
    return max(ts, others - MAX_SEEN_AHEAD_NS)


def shown_as_conflict(winner: Entry, sibling: Entry) -> bool:
    """Whether a concurrent ``sibling`` of the ``winner`` is shown as a conflict file.

    Only versions holding data are (not tombstones; directories merge by name), and
    only when their content differs: two concurrent chmods lose nothing worth keeping.
    """
    if sibling.deleted or sibling.kind is Kind.DIR:
        return False
    return winner.deleted or (winner.kind, winner.manifest, winner.target, winner.size) != (
        sibling.kind, sibling.manifest, sibling.target, sibling.size)


def parent_of(path: str) -> str:
    """'a/b/c' -> 'a/b'; 'a' -> '' (the root)."""
    return path.rpartition("/")[0]


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name

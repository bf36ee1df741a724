"""A node's replica of one namespace: signed local versions, validated remote ones.

A namespace is an ed25519 keypair (the iroh-docs model): its public key is the
namespace id, and knowing it is read capability; holding its secret is write
capability. Every entry carries two signatures over `Entry.canonical`: the
namespace key's (proof of write capability) and its author's (the node that wrote
it; ``author`` is that node's endpoint id).

`Replica` is the only way entries enter a `NamespaceStore`:

* `commit_local` (the VFS's writes) stamps nothing itself, but signs and applies,
  and refuses with EROFS when the node holds only read capability;
* `merge_remote` (the sync protocol) validates every entry with `check_entry` and
  applies the valid ones; each rejection is logged with the peer and the reason.

Both tell the listeners (live push to peers, kernel cache invalidation) which
entries changed the store. Callers: `blixfs.vfs.Vfs`, `blixfs.sync`, on the trio thread.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import trio

from blixfs import crypto, lowprio
from blixfs.entry import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    MAX_SEEN_AHEAD_NS,
    MAX_TIME_NS,
    MAX_XATTR_TOTAL,
    MAX_XATTR_VALUE,
    META_KEYS,
    Entry,
    Kind,
    write_timestamp,
)
from blixfs.errors import FsError
from blixfs.frames import MAX_ENTRY_BYTES, FrameError, decode_entry
from blixfs.manifest import MAX_FILE_SIZE
from blixfs.members import MEMBERS_DIR, MemberList, Role, check_reserved, is_reserved, member_path
from blixfs.namespace import NamespaceStore, Outcome
from blixfs.net.iroh_transport import load_or_create_secret_key, write_secret_key
from blixfs.statefile import write_atomic
from blixfs.traces import check_record, is_trace_path

log = logging.getLogger(__name__)

MAX_FUTURE_NS = 10 * 60 * 10**9  # entries more than 10 minutes ahead of our clock are refused
MAX_SEEN_AUTHORS = 256
MAX_META_VALUE = 1024
THREADED_CHECK_MIN = 64  # below this a hop to worker processes costs more than it saves
CHECK_PARTS = lowprio.PROCESSES  # a batch is checked in this many parts at once: one per worker
_HEX64 = re.compile(r"[0-9a-f]{64}")
_R = TypeVar("_R")

# Who is told about changes: (entries that changed the store, peer id they came from or None).
Listener = Callable[[list[Entry], str | None], None]


@dataclass(frozen=True)
class NamespaceKeys:
    """A namespace's id (32-byte public key) and, with write capability, its secret."""

    id: bytes
    secret: bytes | None = None

    @property
    def writable(self) -> bool:
        return self.secret is not None

    @classmethod
    def generate(cls) -> NamespaceKeys:
        secret = crypto.generate_secret()
        return cls(crypto.public_key(secret), secret)

    @classmethod
    def from_secret(cls, secret: bytes) -> NamespaceKeys:
        return cls(crypto.public_key(secret), secret)

    def save(self, directory: Path) -> None:
        """Store as ``directory/namespace.id`` (+ ``namespace.key``, mode 0600, with write capability)."""
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "namespace.id", (self.id.hex() + "\n").encode(), keep_backup=False)
        if self.secret is not None:
            write_secret_key(directory / "namespace.key", self.secret)

    @classmethod
    def load(cls, directory: Path) -> NamespaceKeys:
        nsid = bytes.fromhex((directory / "namespace.id").read_text().strip())
        key = directory / "namespace.key"
        secret = load_or_create_secret_key(key) if key.exists() else None
        keys = cls(nsid, secret)
        if secret is not None and cls.from_secret(secret).id != nsid:
            raise ValueError(f"{key} is not the secret of namespace {nsid.hex()}")
        return keys


def _path_problem(path: str) -> str | None:
    if path == "":
        return None  # the root's own entry (chmod of the mount point)
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return "path too long"
    for part in path.split("/"):
        if part in ("", ".", "..") or "\0" in part:
            return f"bad path component {part!r}"
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            return "name too long"
    return None


def _root_problem(e: Entry) -> str | None:
    """The root's own entry (path "") may only change the root directory's attributes: as a
    file, a symlink or a tombstone it would replace or remove the whole tree on every node."""
    if e.path == "" and (e.kind is not Kind.DIR or e.deleted):
        return "the root can only be a directory" if not e.deleted else "the root cannot be deleted"
    return None


def check_entry(e: Entry, namespace_id: bytes, now_ns: int) -> str | None:
    """Why ``e`` must be refused, or None if it is valid for namespace ``namespace_id``.

    Cheap field checks first; the two signature checks (~60 us each) last.
    """
    if e.timestamp_ns > now_ns + MAX_FUTURE_NS:
        return f"timestamp {(e.timestamp_ns - now_ns) / 1e9:.0f} s in the future"
    if e.timestamp_ns < 0 or e.mtime_ns < 0 or e.ctime_ns < 0:
        return "negative time"
    # 64-bit nanoseconds: another implementation must be able to hold and re-encode them, and
    # the VFS hands them to the kernel (which takes 64 bits).
    if e.mtime_ns > MAX_TIME_NS or e.ctime_ns > MAX_TIME_NS:
        return "mtime or ctime out of bounds"
    if e.atime_ns is not None and not 0 <= e.atime_ns <= MAX_TIME_NS:
        return "atime out of bounds"
    problem = _path_problem(e.path) or _root_problem(e) or check_reserved(e) or check_record(e)
    if problem:
        return problem
    if len(e.author) != 32 or len(e.namespace_sig) != 64 or len(e.author_sig) != 64:
        return "malformed author or signatures"
    if not (0 <= e.mode <= 0o7777 and 0 <= e.uid < 2**32 and 0 <= e.gid < 2**32 and 0 <= e.size <= MAX_FILE_SIZE):
        return "mode, owner or size out of bounds"
    if e.manifest is not None and len(e.manifest) != 32:
        return "malformed manifest id"
    if len(e.target.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return "symlink target too long"
    if not set(e.meta) <= META_KEYS or any(len(v) > MAX_META_VALUE for v in e.meta.values()):
        return "unknown or oversized image metadata"
    if any(not k.startswith("user.") or len(k) > MAX_NAME_BYTES or len(v) > MAX_XATTR_VALUE
           for k, v in e.xattrs.items()) or sum(len(k) + len(v) for k, v in e.xattrs.items()) > MAX_XATTR_TOTAL:
        return "xattrs out of bounds"
    if len(e.seen) > MAX_SEEN_AUTHORS or any(len(a) != 32 for a in e.seen):
        return "malformed causal context"
    # A writer saw only versions older than its own of its own author; of other authors, at
    # most what it could have accepted (MAX_SEEN_AHEAD_NS past its timestamp: a version
    # stamped ahead is overwritten through `seen`, not a later timestamp, section 5.5). A
    # larger value would make that author's later versions of the path stale.
    if any(not 0 <= t < e.timestamp_ns if a == e.author else not 0 <= t <= e.timestamp_ns + MAX_SEEN_AHEAD_NS
           for a, t in e.seen.items()):
        return "causal context claims versions not older than the entry"
    try:
        message = e.canonical()
    except UnicodeEncodeError:
        return "text that is not valid UTF-8"
    if not crypto.verify(namespace_id, message, e.namespace_sig):
        return "namespace signature does not verify (writer lacks write capability)"
    if not crypto.verify(e.author, message, e.author_sig):
        return "author signature does not verify"
    e.remember_hash(message)  # in a worker process for a sync's frames (`_check_all`)
    return None


class Replica:
    """One namespace as this node holds it. See the module docstring."""

    def __init__(self, store: NamespaceStore, keys: NamespaceKeys, node_secret: bytes,
                 *, clock: Callable[[], int] = time.time_ns) -> None:
        self.store = store
        self.keys = keys
        self._node_secret = node_secret
        self.author = crypto.public_key(node_secret)
        self._clock = clock
        self._last_ts = store.vector().get(self.author, 0)
        self.listeners: list[Listener] = []
        self._members: MemberList | None = None

    @property
    def members(self) -> MemberList:
        """The namespace's member list (blixfs.members), read from the store on first use (one
        scan; tombstones count: a list whose every node was revoked stays closed), then kept
        up to date by every change applied through this replica."""
        if self._members is None:  # the member tree only: a range of the index, not every entry
            self._members = MemberList(e for e in self.store.entries(under=MEMBERS_DIR) if is_reserved(e.path))
        return self._members

    @property
    def writable(self) -> bool:
        """Holds the namespace secret and, in a closed namespace, is a write or admin member."""
        return self.keys.writable and self.members.allows(self.author, Role.WRITE)

    @property
    def last_stamp(self) -> int:
        """The last timestamp this node gave (for `write_context`'s ``own_last``)."""
        return self._last_ts

    def stamp(self, prev: Entry | None, seen: Mapping[bytes, int] | None = None,
              versions: Iterable[Entry] | None = None) -> int:
        """The timestamp of a new version with causal context ``seen`` over ``prev``, given
        the held ``versions`` of the path (`entry.write_timestamp`): the clock, later than
        every earlier one of this node, and later only than the versions ``seen`` does not
        cover. Without ``seen`` the context is taken to be ``prev``'s successor context.

        Per-author monotonic timestamps are what the version vectors rely on. A local
        write replaces what it has seen through ``seen`` (the merge rule), not through a
        larger timestamp: a version stamped ahead (within the accepted window) would
        otherwise carry its future stamp into every later overwrite, which nodes whose
        clocks lag refuse.
        """
        if seen is None:
            seen = prev.successor_context() if prev is not None else {}
        held = list(versions) if versions is not None else ([prev] if prev is not None else [])
        ts = write_timestamp(self._clock(), self._last_ts, self.author, seen, held)
        self._last_ts = ts
        return ts

    def _sign(self, e: Entry) -> Entry:
        assert self.keys.secret is not None
        message = e.canonical()
        return replace(e, namespace_sig=crypto.sign(self.keys.secret, message),
                       author_sig=crypto.sign(self._node_secret, message))

    def commit_local(self, entries: Sequence[Entry], *, durable: bool = False, members: bool = False,
                     traces: bool = False) -> None:
        """Sign and apply this node's new versions in one transaction.

        Raises FsError(EROFS) without write capability (no secret, or not a write member of a
        closed namespace), FsError(EINVAL) (nothing applied) for a root entry that is not a
        live directory (peers would refuse it), FsError(EPERM) for a path in the reserved
        member tree unless ``members`` (only `set_member` passes it) or for a member change
        peers would refuse, and for a path in the reserved trace tree unless ``traces`` (only
        `blixfs.traces.Tracer.publish` passes it); storage errors propagate.
        """
        if not self.keys.writable:
            raise FsError(errno.EROFS, "this node holds a read-only capability for the namespace")
        if not members and not self.members.allows(self.author, Role.WRITE):
            raise FsError(errno.EROFS, "this node is not a writer of this closed namespace")
        for e in entries:
            problem = _root_problem(e)
            if problem:
                log.error("refused a local change of the root: %s", problem)
                raise FsError(errno.EINVAL, problem)
            if is_reserved(e.path) and not members:
                raise FsError(errno.EPERM, f"{e.path} is reserved for the namespace's member list")
            if is_trace_path(e.path) != traces:
                raise FsError(errno.EPERM, f"{e.path} is reserved for access traces" if not traces
                              else f"{e.path} is not a trace record")
        if members:
            problem = next((p for p in self.members.admit(entries) if p), None)
            if problem:
                raise FsError(errno.EPERM, problem)
        signed = [self._sign(e) for e in entries]
        for e in signed:
            # The field bounds count characters, the encoding escapes control characters in 6
            # bytes: an entry within them can still be larger than any peer accepts, and would
            # be refused by every receiver (protocol.md 15.2).
            if len(e.serialize()) > MAX_ENTRY_BYTES:
                raise FsError(errno.ENOSPC, f"the entry of {e.path} would be larger than {MAX_ENTRY_BYTES} bytes")
        outcomes = self.store.apply(signed, durable=durable)
        own = max((e.timestamp_ns for e in signed if e.author == self.author), default=None)
        if own is not None:
            self.store.advance_vector({self.author: own})
        self._notify([e for e, o in zip(signed, outcomes, strict=True) if o.changed], None)

    async def merge_remote(self, entries: Sequence[Entry], peer: str) -> tuple[list[Outcome], int]:
        """Validate and apply entries from ``peer`` in one transaction.

        Returns the outcomes of the valid entries (in order) and how many were refused;
        each refusal is logged with the peer and the reason. Large batches are checked
        in worker processes (two signature checks per entry), so the trio thread keeps
        serving FUSE requests meanwhile.
        """
        return self.merge_checked(entries, await self.check(entries), peer)

    async def check(self, entries: Sequence[Entry]) -> list[str | None]:
        """The first half of `merge_remote`: why each entry must be refused (None: well formed
        and signed), in worker processes for large batches. Depends on nothing but the
        entries and the clock; access control waits for `merge_checked`."""
        return await _check_all(list(entries), self.keys.id, self._clock())

    async def check_received(self, raw: Sequence[bytes]) -> tuple[list[Entry], list[str | None]]:
        """`check` for a received frame's entries as sent (`frames.EncodedEntries`): returns
        them decoded, with their verdicts (module function `check_received`). A session
        checks its next frame this way while the one before is applied (`blixfs.sync`)."""
        return await check_received(raw, self.keys.id, self._clock())

    def merge_checked(self, entries: Sequence[Entry], checked: Sequence[str | None],
                      peer: str) -> tuple[list[Outcome], int]:
        """The second half of `merge_remote`, given ``checked = await check(entries)``: access
        control (the member list as of the batches applied before this one), then apply and
        notify. Batches must be merged in the order they arrived."""
        problems = list(checked)
        # Access control last: who may write depends on the member records of this batch too.
        well_formed = [i for i, p in enumerate(problems) if p is None]
        for i, p in zip(well_formed, self.members.admit([entries[i] for i in well_formed]), strict=True):
            problems[i] = p
        valid: list[Entry] = []
        for e, problem in zip(entries, problems, strict=True):
            if problem:
                log.warning("refused entry %r from peer %s: %s", e.path, peer[:16], problem)
            else:
                valid.append(e)
        outcomes = self.store.apply(valid) if valid else []
        self._notify([e for e, o in zip(valid, outcomes, strict=True) if o.changed], peer)
        return outcomes, len(entries) - len(valid)

    def set_member(self, node_id: bytes, role: Role | None) -> Entry:
        """Grant ``node_id`` ``role``, or revoke it (None), as this node: one signed member
        record (blixfs.members). Raises FsError(EROFS) without the namespace secret,
        FsError(EPERM) when this node may not change the list (not an admin; or the namespace
        is open and this is not this node making itself its first admin). Returns the record."""
        path = member_path(node_id)
        prev = self.store.get_any(path)
        versions = self.store.versions(path)
        seen: dict[bytes, int] = {}
        for v in versions:
            for a, t in v.successor_context().items():
                seen[a] = max(seen.get(a, 0), t)
        ts = self.stamp(prev)
        e = Entry(path=path, kind=Kind.DIR, mode=0, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
                  author=self.author, timestamp_ns=ts, target=role.label if role is not None else "",
                  deleted=role is None, seen=seen)
        self.commit_local([e], members=True)
        return self.store.get_any(path) or e

    def _notify(self, changed: list[Entry], source: str | None) -> None:
        if not changed:
            return
        if self._members is not None:
            for e in changed:
                if is_reserved(e.path):
                    current = self.store.get_any(e.path)
                    if current is not None:
                        self._members.update(current)
        for listener in list(self.listeners):
            try:
                listener(changed, source)
            except Exception:
                log.exception("namespace change listener failed")


async def _check_all(entries: list[Entry], namespace_id: bytes, now_ns: int) -> list[str | None]:
    """`check_entry` of each of ``entries``: a large batch in the worker processes; each
    valid entry keeps the hash computed there."""
    if len(entries) < THREADED_CHECK_MIN:
        return [check_entry(e, namespace_id, now_ns) for e in entries]
    verdicts = await _in_workers(check_entries, entries, namespace_id, now_ns)
    for e, (_, entry_hash) in zip(entries, verdicts, strict=True):
        if entry_hash is not None:
            e.adopt_hash(entry_hash)
    return [problem for problem, _ in verdicts]


def check_entries(entries: Sequence[Entry], namespace_id: bytes, now_ns: int) -> list[tuple[str | None, bytes | None]]:
    """`_check_all`'s work in a worker process: each entry's `check_entry` verdict and, when
    valid, its hash."""
    verdicts: list[tuple[str | None, bytes | None]] = []
    for e in entries:
        problem = check_entry(e, namespace_id, now_ns)
        verdicts.append((problem, e.entry_hash() if problem is None else None))
    return verdicts


async def check_received(raw: Sequence[bytes], namespace_id: bytes,
                         now_ns: int) -> tuple[list[Entry], list[str | None]]:
    """The entries of a received frame (`frames.EncodedEntries`) decoded, and why each must
    be refused (`check_entry`; None: valid, its hash computed). A large frame is decoded
    and checked in the worker processes, so neither JSON nor signatures run on the event
    loop. FrameError when an entry does not decode (the frame, and so the session, is
    refused whole, as `decode` would)."""
    if len(raw) < THREADED_CHECK_MIN:
        entries = [decode_entry(data) for data in raw]
        return entries, [check_entry(e, namespace_id, now_ns) for e in entries]
    checked = await _in_workers(check_serialized, raw, namespace_id, now_ns)
    return [e for e, _ in checked], [problem for _, problem in checked]


def check_serialized(raw: Sequence[bytes], namespace_id: bytes, now_ns: int) -> list[tuple[Entry, str | None]]:
    """`check_received`'s work in a worker process: each entry decoded (FrameError if one
    does not) with its `check_entry` verdict."""
    return [(e, check_entry(e, namespace_id, now_ns)) for e in map(decode_entry, raw)]


async def _in_workers(fn: Callable[..., list[_R]], items: Sequence[Any], *args: Any) -> list[_R]:
    """``fn(part, *args)`` for `CHECK_PARTS` interleaved parts of ``items`` at once, in the
    worker processes (`lowprio.run_in_process`); ``fn`` gives one result per item, and the
    results come back in the order of ``items``. A FrameError is raised as itself."""
    parts = [list(items[i::CHECK_PARTS]) for i in range(CHECK_PARTS)]
    results: list[list[_R]] = [[] for _ in parts]
    failed: list[FrameError] = []

    async def run(i: int) -> None:
        try:
            results[i] = await lowprio.run_in_process(fn, parts[i], *args)
        except FrameError as exc:  # not wrapped in the nursery's exception group
            failed.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(len(parts)):
            nursery.start_soon(run, i)
    if failed:
        raise failed[0]
    return [results[i % CHECK_PARTS][i // CHECK_PARTS] for i in range(len(items))]


def valid_namespace_id(text: str) -> bytes:
    """Parse a namespace id (64 hex digits); ValueError with a readable message otherwise."""
    text = text.strip().lower()
    if not _HEX64.fullmatch(text):
        raise ValueError("a namespace id is 64 hex digits")
    return bytes.fromhex(text)

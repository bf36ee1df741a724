"""Access control per node: a namespace's member list, as signed entries (protocol.md 12.1).

A namespace is **open** (anyone with its id syncs, anyone with its secret writes: blixfs
0.1.0's only behaviour) until a writer lists itself as its first admin. From then on it
is **closed**: only the nodes in its member list take part, each with a role:

======  ============================================================================
read    sync (receive and relay entries), GET and HAVE chunks
write   read, plus author entries and ask others to HOLD
admin   write, plus change the member list
======  ============================================================================

The list is a set of ordinary entries under the reserved path `MEMBERS_DIR`, one per
node: ``.blixfs-members/<64 hex node id>``, kind ``dir``, mode 0, uid/gid/size 0, no
manifest, ``target`` = the role's name; a tombstone at that path is a revoke. They are
signed (namespace key and author) and merged like any entry, last-writer-wins per node,
so they replicate with no new frame. The VFS never shows them: no entry exists at
``.blixfs-members`` itself, so nothing under it can be looked up, and neither the VFS nor
a peer may create one (`check_reserved`).

Every writer holds the namespace secret, so the namespace signature says nothing about
*who* may change the list; the author does. A member record is accepted only when its
author is an admin of the list as this node holds it (`admit`), or, while the
namespace is open, when it is the founding record: its author naming itself admin. An
entry of any other path is accepted in a closed namespace only when its author is a
write or admin member: a revoked node keeps the secret but its later entries are refused
by author id, everywhere the revoke has arrived.

Callers: `blixfs.replica.Replica` (checks, the cached list), `blixfs.sync` (sessions),
the daemon (chunk server, fetcher and replicator hooks), the CLI.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from blixfs.entry import Entry, Kind

log = logging.getLogger(__name__)

MEMBERS_DIR = ".blixfs-members"
_PREFIX = MEMBERS_DIR + "/"


class Role(enum.IntEnum):
    """What a member may do; each role includes the ones below it."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        """``read``, ``write`` or ``admin``; ValueError otherwise."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r} (read, write or admin)") from None


def member_path(node_id: bytes) -> str:
    return _PREFIX + node_id.hex()


def is_reserved(path: str) -> bool:
    """Whether ``path`` is in the reserved member tree (never shown, never written by the VFS)."""
    return path == MEMBERS_DIR or path.startswith(_PREFIX)


def parse_node_id(text: str) -> bytes:
    """A node id given as 64 hex digits (optionally ``<id>@addr``); ValueError otherwise."""
    text = text.strip().lower().split("@", 1)[0]
    if len(text) != 64:
        raise ValueError("a node id is 64 hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("a node id is 64 hex digits") from None


def check_reserved(e: Entry) -> str | None:
    """Why ``e`` is not a well-formed member record, for an entry under the reserved tree;
    None for a well-formed one and for every entry outside it."""
    if not is_reserved(e.path):
        return None
    name = e.path[len(_PREFIX):] if e.path.startswith(_PREFIX) else ""
    if len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
        return "reserved path (the member list) that is not a member record"
    if e.kind is not Kind.DIR or e.mode or e.uid or e.gid or e.size or e.manifest is not None or e.meta \
            or e.xattrs or e.atime_ns is not None:
        return "malformed member record"
    if e.deleted:
        return None if e.target == "" else "malformed member record"
    if e.target not in ("read", "write", "admin"):
        return f"member record with unknown role {e.target[:16]!r}"
    return None


@dataclass(frozen=True)
class Member:
    node_id: bytes
    role: Role | None  # None: revoked (a tombstone)
    record: Entry

    @property
    def set_by(self) -> bytes:
        return self.record.author


def member_report(record: Entry) -> dict[str, object]:
    """A member record as `blixfs members --json` and the control socket show it."""
    return {"node": record.path[len(_PREFIX):], "role": "revoked" if record.deleted else record.target,
            "set_by": record.author.hex(), "timestamp_ns": record.timestamp_ns}


def _subject(e: Entry) -> bytes:
    return bytes.fromhex(e.path[len(_PREFIX):])


def _role_of(e: Entry) -> Role | None:
    return None if e.deleted else Role.parse(e.target)


class MemberList:
    """The member list as this node holds it: node id -> current record (revokes included).

    Closed once any record exists (a revoke too: revoking every node does not reopen it).
    Kept by `Replica` from its store; `update` takes the current record of a path.
    """

    def __init__(self, records: Iterable[Entry] = ()) -> None:
        self._records: dict[bytes, Entry] = {}
        for e in records:
            self.update(e)

    def copy(self) -> MemberList:
        out = MemberList()
        out._records = dict(self._records)
        return out

    def update(self, current: Entry) -> None:
        """``current`` is now the current version of its member path."""
        if check_reserved(current) is None and current.path.startswith(_PREFIX):
            self._records[_subject(current)] = current

    @property
    def closed(self) -> bool:
        return bool(self._records)

    def role(self, node_id: bytes) -> Role | None:
        e = self._records.get(node_id)
        return _role_of(e) if e is not None else None

    def allows(self, node_id: bytes, need: Role = Role.READ) -> bool:
        """Whether ``node_id`` may do what needs ``need``: always in an open namespace."""
        if not self.closed:
            return True
        role = self.role(node_id)
        return role is not None and role >= need

    def members(self) -> list[Member]:
        return [Member(n, _role_of(e), e) for n, e in sorted(self._records.items())]

    def admins(self) -> int:
        return sum(1 for e in self._records.values() if _role_of(e) is Role.ADMIN)

    def _problem(self, e: Entry) -> str | None:
        """Why member record ``e`` may not change this list (assumed well-formed)."""
        subject, role = _subject(e), _role_of(e)
        if not self.closed:
            if subject == e.author and role is Role.ADMIN:
                return None  # the founding record: a writer closes the open namespace, naming itself admin
            return "the first member record must name its author admin"
        if self.role(e.author) is not Role.ADMIN:
            return f"author {e.author.hex()[:16]} is not an admin of this namespace"
        held = self._records.get(subject)
        if held is not None and held.lww_key() >= e.lww_key():
            return None  # loses to what is held (or is it): harmless, the merge keeps the winner
        if role is not Role.ADMIN and self.role(subject) is Role.ADMIN and self.admins() <= 1:
            return "it would leave the namespace without an admin"
        return None

    def _would_apply(self, e: Entry) -> None:
        held = self._records.get(_subject(e))
        if held is None or held.lww_key() < e.lww_key():
            self._records[_subject(e)] = e

    def admit(self, entries: Sequence[Entry]) -> list[str | None]:
        """Per entry (already valid by `check_entry`), why this list refuses it, or None.

        Member records are judged first, oldest first, against the list as it would be
        after the ones accepted before them, repeating while any is newly accepted (so a
        batch that holds a grant and records authored by the granted admin passes in any
        order); then every other entry against the resulting list. Does not change
        ``self``: the caller applies the admitted entries and updates the list from the
        store.
        """
        out: list[str | None] = [None] * len(entries)
        view = self.copy()
        pending = sorted((i for i, e in enumerate(entries) if is_reserved(e.path)),
                         key=lambda i: entries[i].lww_key())
        problems: dict[int, str] = {}
        progress = True
        while pending and progress:
            progress = False
            waiting = []
            for i in pending:
                problem = view._problem(entries[i])
                if problem is None:
                    view._would_apply(entries[i])
                    progress = True
                else:
                    problems[i] = problem
                    waiting.append(i)
            pending = waiting
        for i in pending:
            out[i] = problems[i]
        if view.closed:
            for i, e in enumerate(entries):
                if not is_reserved(e.path) and not view.allows(e.author, Role.WRITE):
                    role = view.role(e.author)
                    what = role.label if role is not None else "revoked" if e.author in view._records \
                        else "not a member"
                    out[i] = f"author {e.author.hex()[:16]} may not write this closed namespace ({what})"
        return out

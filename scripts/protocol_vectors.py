"""The test vectors of docs/protocol.md, computed by the real code (never written by hand).

    .venv/bin/python scripts/protocol_vectors.py

prints the "Test vectors" section of docs/protocol.md as markdown, from its heading to
the end of the document. Every fenced block labelled ``vector=NAME`` in it is checked by
tests/unit/test_protocol_vectors.py, which compares the document with `vectors()`: a
change to any encoding that is not also made in the document fails the tests. After an
intended format change, run this, paste its output over the section, and give the
protocol a new version (see docs/protocol.md, "Versioning").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

import blake3
import trio

from blixfs import crypto
from blixfs.chunkproto import ALPN as CHUNKS_ALPN
from blixfs.chunkproto import (
    OP_GETP,
    ChunkServer,
    encode_have,
    encode_hold,
    encode_prove,
    encode_request,
    hold_signed_bytes,
    prove_digest,
)
from blixfs.chunkstore import MAX_CHUNK_BYTES, MemoryChunkStore
from blixfs.entry import Entry, Kind
from blixfs.frames import Entries, ErrorFrame, Hello, Synced, encode, holdings_signed_bytes
from blixfs.hashing import HOLE, ChunkId
from blixfs.holdings import Holdings
from blixfs.manifest import FANOUT, Manifest
from blixfs.members import MemberList, member_path
from blixfs.namespace import MemoryNamespaceStore
from blixfs.net.memory import MemoryNetwork
from blixfs.net.transport import NodeAddr
from blixfs.priority import Priority
from blixfs.replica import NamespaceKeys, check_entry
from blixfs.sync import CODE_WRONG_NAMESPACE, holdings_frame, holdings_record, holdings_verified
from blixfs.ticket import Ticket
from blixfs.traces import TRACE_XATTR, Trace, check_record, record_path

SECTION = 16  # the section number of the test vectors in docs/protocol.md
MERGE_SECTION = 7  # "Merge rule and conflicts"
CHUNKS_SECTION = "14.1"  # "blixfs/chunks/1"
HEADING = f"## {SECTION}. Test vectors"

NAMESPACE_SEED = bytes([0x01]) * 32
AUTHOR_A_SEED = bytes([0x02]) * 32
AUTHOR_B_SEED = bytes([0x03]) * 32
CHUNK_SIZE = 4096
MANIFEST_CONTENT = bytes([0x61]) * 4096 + bytes(4096) + bytes([0x62]) * 1808  # 'a'*4096, zeros, 'b'*1808
TREE_CONTENT = bytes([0x61]) * 4096 + bytes(4096 * 511) + bytes([0x62]) * 4096  # a depth-1 tree of two pages
PEER_ADDRS = ("192.0.2.1:4433", "[2001:db8::1]:4433")
OTHER_MANIFEST = bytes([0xEE]) * 32  # an arbitrary manifest id, partly held in the HOLDINGS vector
HOLDINGS_START = 1_700_000_002_000_000_000  # node A's clock (ns) when it started: its first HOLDINGS seq
RANGE = (4093, 16)  # offset and length of the range request: runs past the end of the 4096-byte chunk
HEX_LINE = 64  # hex digits per line in hex blocks


def _hex(data: bytes) -> str:
    text = data.hex()
    return "\n".join(text[i : i + HEX_LINE] for i in range(0, len(text), HEX_LINE)) or "(empty)"


class _Doc:
    """Markdown being written, and the labelled blocks in it."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.vectors: dict[str, str] = {}

    def say(self, *lines: str) -> None:
        self.lines.extend(lines)
        self.lines.append("")

    def block(self, name: str, value: str, lang: str = "text") -> None:
        if name in self.vectors:
            raise ValueError(f"vector {name} defined twice")
        if "\n```" in value or not value:
            raise ValueError(f"vector {name} cannot be a fenced block")
        self.vectors[name] = value
        self.lines.extend([f"```{lang} vector={name}", value, "```", ""])

    def markdown(self) -> str:
        return "\n".join(self.lines).rstrip("\n") + "\n"


def _sign(e: Entry, author_seed: bytes) -> Entry:
    message = e.canonical()
    return replace(e, namespace_sig=crypto.sign(NAMESPACE_SEED, message), author_sig=crypto.sign(author_seed, message))


def _frame_table(raw: bytes, parts: list[tuple[int, str]]) -> list[str]:
    rows = ["| offset | bytes (hex) | field |", "| ---: | --- | --- |"]
    pos = 0
    for size, what in parts:
        chunk = raw[pos : pos + size]
        shown = chunk.hex() if size <= 8 else f"{chunk[:4].hex()}…{chunk[-2:].hex()} ({size} bytes)"
        rows.append(f"| {pos} | `{shown}` | {what} |")
        pos += size
    if pos != len(raw):
        raise ValueError("frame table does not cover the frame")
    return rows


def _served(store: MemoryChunkStore, requests: list[bytes],
            on_hold: Callable[[ChunkId, str, str, bytes], Awaitable[bool]] | None = None) -> list[bytes]:
    """What blixfs's own chunk server sends back for each request (one stream each), over
    the in-memory transport: the bytes up to its FIN."""

    async def exchange() -> list[bytes]:
        net = MemoryNetwork()
        server = ChunkServer(store, on_hold=on_hold)
        async with net.open_transport(handlers={CHUNKS_ALPN: server.handle}) as srv, net.open_transport() as cli:
            answers = []
            for request in requests:
                async with await cli.open_stream(NodeAddr(srv.node_id), CHUNKS_ALPN) as stream:
                    await stream.send_all(request)
                    await stream.send_eof()
                    answers.append(await stream.receive_to_eof(MAX_CHUNK_BYTES + 5))
            return answers

    quiet = logging.getLogger("blixfs.chunkproto")  # the refused request is logged: not part of the output
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return trio.run(exchange)
    finally:
        quiet.setLevel(level)


def build() -> _Doc:
    """The whole section, in the order of the document."""
    doc = _Doc()
    ns = NamespaceKeys.from_secret(NAMESPACE_SEED)
    a = crypto.public_key(AUTHOR_A_SEED)
    b = crypto.public_key(AUTHOR_B_SEED)

    doc.say(HEADING, "",
            "Generated by `scripts/protocol_vectors.py` from the code itself and checked by",
            "`tests/unit/test_protocol_vectors.py`: every block labelled `vector=NAME` below is",
            "compared with what the code produces, so this section cannot silently go stale. Do",
            "not edit it by hand: run the script and paste its output over this section.",
            "",
            "Conventions: hex is lowercase; **line breaks inside hex blocks are not part of the",
            "value** (lines of 64 digits for readability). JSON blocks are one line, exactly the",
            "bytes (UTF-8) that are hashed, signed or sent; non-ASCII characters in them are",
            "literal UTF-8, as `ensure_ascii=False` writes them.")

    doc.say(f"### {SECTION}.1 Keys", "",
            "Secret keys are 32-byte ed25519 seeds (RFC 8032). The namespace key and two node",
            "(author) keys used by every vector below:")
    doc.block("keys.namespace_seed", _hex(NAMESPACE_SEED))
    doc.block("keys.namespace_id", _hex(ns.id))
    doc.block("keys.author_a_seed", _hex(AUTHOR_A_SEED))
    doc.block("keys.author_a", _hex(a))
    doc.block("keys.author_b_seed", _hex(AUTHOR_B_SEED))
    doc.block("keys.author_b", _hex(b))

    # (f) first: entry 1 refers to this manifest.
    manifest, chunks = Manifest.of_bytes(MANIFEST_CONTENT, CHUNK_SIZE)
    mbytes = manifest.encode()
    mid = blake3.blake3(mbytes).digest()

    t1 = 1_700_000_000_123_456_789
    e1 = Entry(path="images/débian-12.qcow2", kind=Kind.FILE, mode=0o644, uid=1000, gid=1000,
               size=len(MANIFEST_CONTENT), mtime_ns=1_700_000_000_000_000_000, ctime_ns=1_700_000_000_100_000_000,
               author=a, timestamp_ns=t1, manifest=mid,
               meta={"name": "Débian 12", "os": "linux", "arch": "x86_64", "tags": "base,ci"},
               xattrs={"user.blixard.note": b"\x00\xffok"},
               seen={b: 1_699_999_999_000_000_000, a: 1_699_999_990_000_000_000})
    target = "../images/débian-12.qcow2"
    t2 = 1_700_000_001_000_000_000
    e2 = Entry(path='links/tab\there "quote" back\\slash \x01 €😀', kind=Kind.SYMLINK, mode=0o777, uid=0, gid=0,
               size=0, mtime_ns=t2, ctime_ns=t2, author=b, timestamp_ns=t2, target=target)
    t3 = 1_700_000_002_000_000_000
    e3 = Entry(path="images", kind=Kind.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=t3, ctime_ns=t3,
               author=a, timestamp_ns=t3, atime_ns=1_600_000_000_000_000_001)
    s1, s2, s3 = _sign(e1, AUTHOR_A_SEED), _sign(e2, AUTHOR_B_SEED), _sign(e3, AUTHOR_A_SEED)
    for e in (s1, s2, s3):
        problem = check_entry(e, ns.id, e.timestamp_ns)
        if problem:
            raise AssertionError(f"vector entry {e.path!r} is invalid: {problem}")

    doc.say(f"### {SECTION}.2 Entries: canonical encoding and entry hash (a)", "",
            "Entry 1: a file version by author A, with image metadata, an xattr holding",
            "non-UTF-8 bytes, a causal context naming both authors, and as `manifest` the id",
            f"of the manifest in {SECTION}.7. Its canonical encoding (`canonical()`, the signed bytes)",
            "and entry hash (BLAKE3-256 of those bytes):")
    doc.block("entry1.canonical", e1.canonical().decode(), "json")
    doc.block("entry1.hash", _hex(e1.entry_hash()))
    doc.say("Entry 2: a symlink by author B whose path exercises every escaping rule: a tab",
            "(`\\t`), a double quote, a backslash, the control character U+0001 (`\\u0001`, lower",
            "case hex), and literal UTF-8 for `€` (3 bytes) and `😀` (4 bytes, not a surrogate",
            "pair). `manifest` is `null`, `meta`, `xattrs` and `seen` are empty objects.")
    doc.block("entry2.canonical", e2.canonical().decode(), "json")
    doc.block("entry2.hash", _hex(e2.entry_hash()))
    doc.block("entry2.canonical_bytes", _hex(e2.canonical()))
    doc.say("Entry 3: a directory by author A with an access time of its own (`touch -a`): the",
            "optional `atime_ns` key is present, sorted first. Entries 1 and 2 have none, and",
            "their encodings have no such key.")
    doc.block("entry3.canonical", e3.canonical().decode(), "json")
    doc.block("entry3.hash", _hex(e3.entry_hash()))

    doc.say(f"### {SECTION}.3 Signed entries (b)", "",
            "ed25519 is deterministic: these signatures are the only correct ones. Each entry is",
            "signed twice over its canonical bytes: by the namespace key (`keys.namespace_seed`)",
            "and by its author's key. The serialized form (`serialize()`: what ENTRIES frames",
            "carry and stores keep) adds both signatures as hex under `namespace_sig` and",
            "`author_sig`, in sorted-key order like every other key.")
    doc.block("entry1.namespace_sig", _hex(s1.namespace_sig))
    doc.block("entry1.author_sig", _hex(s1.author_sig))
    doc.block("entry1.serialized", s1.serialize().decode(), "json")
    doc.block("entry2.namespace_sig", _hex(s2.namespace_sig))
    doc.block("entry2.author_sig", _hex(s2.author_sig))
    doc.block("entry2.serialized", s2.serialize().decode(), "json")
    doc.block("entry3.namespace_sig", _hex(s3.namespace_sig))
    doc.block("entry3.author_sig", _hex(s3.author_sig))
    doc.block("entry3.serialized", s3.serialize().decode(), "json")

    vector = {b: t2, a: t1}
    hello_min = encode(Hello(bytes(32), {bytes([0x01]) * 32: 7}))
    hello = encode(Hello(ns.id, vector))
    entries = encode(Entries([s1, s2]))
    empty = encode(Entries([]))
    synced = encode(Synced(vector))
    error = encode(ErrorFrame(CODE_WRONG_NAMESPACE, "unknown namespace"))

    doc.say(f"### {SECTION}.4 Frames (c)", "",
            "Complete frames, length prefix included. First a minimal HELLO (namespace id of 32",
            "zero bytes, one vector item: author = 32 bytes `01`, timestamp 7), byte by byte:")
    doc.block("frame.hello_minimal", _hex(hello_min))
    doc.say(*_frame_table(hello_min, [(4, "length = 78 (type + payload)"), (1, "type = 1 (HELLO)"),
                                      (1, "protocol version = 1"), (32, "namespace id"),
                                      (4, "vector count = 1"), (32, "author"), (8, "timestamp = 7")]))
    doc.say(f"HELLO for the namespace of {SECTION}.1 with the version vector of {SECTION}.5 (items sorted by",
            "author bytes):")
    doc.block("frame.hello", _hex(hello))
    l1, l2 = len(s1.serialize()), len(s2.serialize())
    doc.say(f"ENTRIES with entry 1 and entry 2 of {SECTION}.3: the header, entry count 2, then u32 length {l1}",
            f"and the {l1} bytes of `entry1.serialized`, then u32 length {l2} and `entry2.serialized`:")
    doc.block("frame.entries", _hex(entries))
    doc.say("An empty ENTRIES (valid; senders do not produce it, receivers accept it):")
    doc.block("frame.entries_empty", _hex(empty))
    doc.say(f"SYNCED with the version vector of {SECTION}.5:")
    doc.block("frame.synced", _hex(synced))
    doc.say(f"ERROR with code {CODE_WRONG_NAMESPACE} (`0x{CODE_WRONG_NAMESPACE:x}`, wrong namespace) and the text",
            "`unknown namespace`, exactly what a responder sends before resetting the stream:")
    doc.block("frame.error", _hex(error))

    peer = NodeAddr(a.hex(), PEER_ADDRS)
    holdings = Holdings(a.hex(), addr=peer)
    holdings.own.seq = HOLDINGS_START  # a running node takes its clock at start; fixed here
    holdings.note_complete(mid)
    for index in (0, 1, 9):
        holdings.note_chunk(OTHER_MANIFEST, index, 10)
    changes = holdings.own.seq - HOLDINGS_START
    frame = holdings_frame(a.hex(), holdings.own, AUTHOR_A_SEED)
    if holdings_record(frame).addr != peer:
        raise AssertionError("the HOLDINGS vector's address does not decode to node A's")
    if not holdings_verified(frame):
        raise AssertionError("the HOLDINGS vector's signature does not verify")
    held = encode(frame)
    addr_len = len(peer.to_bytes())
    doc.say(f"HOLDINGS of node A (`keys.author_a`) with its node address of {SECTION}.6. A started with",
            f"its clock at {HOLDINGS_START} ns, its first `seq`; {changes} changes since (one per manifest",
            f"or chunk it came to hold) make `seq` {holdings.own.seq}. It holds the manifest of {SECTION}.7",
            "whole, and of a manifest of 10 chunks with id 32 bytes `ee` only chunks 0, 1 and 9",
            "(bitmap `03 02`: bit i of byte i / 8, least significant bit first):")
    doc.block("frame.holdings", _hex(held))
    doc.say("It is signed by node A's key (`keys.author_a_seed`), ed25519 over these bytes: the",
            "context `blixfs/holdings/1` and a zero byte, then the payload without its signature:")
    doc.block("frame.holdings_signed", _hex(holdings_signed_bytes(frame)))
    doc.say(*_frame_table(held, [(4, "length"), (1, "type = 5 (HOLDINGS)"), (32, "node id"),
                                 (8, f"seq = {holdings.own.seq}"), (8, "free = 0 (room for replicas, bytes)"),
                                 (2, f"address length = {addr_len}"),
                                 (addr_len, "node address (as in tickets)"), (4, "complete count = 1"),
                                 (32, "manifest id"), (4, "partial count = 1"), (32, "manifest id"),
                                 (4, "bitmap length = 2"), (2, "bitmap"),
                                 (64, "signature by node A")]))

    store = MemoryNamespaceStore()
    store.apply([s1, s2])
    behind = {a: t1}
    diff = sorted(store.entries_since(behind), key=lambda e: e.entry_hash())
    doc.say(f"### {SECTION}.5 Version vector (d)", "",
            "The vector {author A: entry 1's timestamp, author B: entry 2's timestamp}, encoded",
            "as in HELLO and SYNCED (u32 count, then items sorted by author bytes: B's key sorts",
            "before A's here):")
    doc.block("vector.encoded", _hex(synced[5:]))
    doc.say("Reconciliation against it: a store holding entries 1 and 2, asked by a peer whose",
            f"vector is {{author A: {t1}}} (it has everything A wrote up to entry 1, nothing of",
            "B's), sends exactly these entries (`entries_since`), given here as entry hash and",
            "path (a JSON string):")
    doc.block("vector.diff", "\n".join(f"{e.entry_hash().hex()} {json.dumps(e.path, ensure_ascii=False)}"
                                        for e in diff))

    ro = Ticket(NamespaceKeys(ns.id), peer)
    rw = Ticket(ns, peer)
    doc.say(f"### {SECTION}.6 Node address and tickets (e)", "",
            f"The node address of node A (endpoint id = `keys.author_a`) reachable at `{PEER_ADDRS[0]}`",
            f"and `{PEER_ADDRS[1]}`, in the binary form tickets embed:")
    doc.block("nodeaddr.bytes", _hex(peer.to_bytes()))
    doc.say(f"Read-only ticket for the namespace of {SECTION}.1 with that node: the body (before",
            "base32), then the ticket text:")
    doc.block("ticket.read.body", _hex(bytes([1, 0]) + ns.id + peer.to_bytes()))
    doc.block("ticket.read", ro.encode())
    doc.say("Write ticket (flag bit 0 set, the namespace seed after the id):")
    doc.block("ticket.write.body", _hex(bytes([1, 1]) + ns.id + NAMESPACE_SEED + peer.to_bytes()))
    doc.block("ticket.write", rw.encode())
    bound = Ticket(ns, peer, bound=b)
    doc.say("Write ticket bound to node B (flags bits 0 and 1 set: the namespace seed, then",
            "`keys.author_b`, the only node that may join with it, then the node address):")
    doc.block("ticket.bound.body", _hex(bytes([1, 3]) + ns.id + NAMESPACE_SEED + b + peer.to_bytes()))
    doc.block("ticket.bound", bound.encode())

    doc.say(f"### {SECTION}.7 Manifest and chunk ids (f)", "",
            f"Content: {len(MANIFEST_CONTENT)} bytes: 4096 bytes `0x61`, then 4096 zero bytes, then",
            f"1808 bytes `0x62`, chunked at {CHUNK_SIZE} bytes. The chunk ids (BLAKE3-256 of each",
            "chunk; the all-zero chunk is the hole id, 32 zero bytes, and is not stored):")
    doc.block("manifest.chunk_ids", "\n".join(cid.hex() for cid in manifest.ids))
    doc.say(f"The encoded manifest ({len(mbytes)} bytes; little-endian, unlike the frames) and its id",
            "(BLAKE3-256 of those bytes), which is `manifest` in entry 1:")
    doc.block("manifest.encoded", _hex(mbytes))
    doc.block("manifest.id", _hex(mid))
    if sorted(chunks) != sorted(c for c in manifest.ids if c != HOLE):
        raise AssertionError("stored chunks are not the non-hole ids")
    tree, blobs = Manifest.of_bytes(TREE_CONTENT, CHUNK_SIZE)
    pages = [blobs[pid] for pid in tree.entries]
    doc.say(f"A tree (depth 1): {len(TREE_CONTENT)} bytes at {CHUNK_SIZE}-byte chunks: 4096 bytes `0x61`,",
            f"{FANOUT - 1} chunks of zeros, then 4096 bytes `0x62`: {tree.count} chunks, more than FANOUT",
            f"({FANOUT}). Its root lists two pages of level 0: the first holds chunk 0 (the",
            "`0x61` chunk of the manifest above) and 511 hole ids, the second the `0x62` chunk:")
    doc.block("manifest.tree.root", _hex(tree.encode()))
    doc.block("manifest.tree.id", _hex(blake3.blake3(tree.encode()).digest()))
    head = pages[0][: 7 + 32]
    if pages[0] != head + bytes(32 * (FANOUT - 1)):
        raise AssertionError("page 0 is not its head and 511 hole ids")
    doc.say("Page 0 (its id is the root's first entry) is these 39 bytes (magic `BXP1`, level 0,",
            f"count {FANOUT}, the id of chunk 0) followed by {FANOUT - 1} hole ids ({32 * (FANOUT - 1)} zero bytes);",
            "page 1 (the root's second entry) is given whole:")
    doc.block("manifest.tree.page0_head", _hex(head))
    doc.block("manifest.tree.page1", _hex(pages[1]))

    _chunks_example(doc, manifest, chunks, mbytes, ChunkId(mid))
    _merge_example(doc, a, b)
    _members_example(doc, ns, a, b)
    _traces_example(doc, a, manifest, mid)
    return doc


TRACES_SECTION = "12.2"  # "Access traces"
TRACE_START = 1_700_000_004_000_000_000
TRACED_PATH = "images/root.qcow2"


def _traces_example(doc: _Doc, a: bytes, manifest: Manifest, mid: bytes) -> None:
    ids = manifest.ids
    trace = Trace(mid, CHUNK_SIZE, ((2, ids[2][:8]), (0, ids[0][:8])), 1500)
    raw = trace.encode()
    if Trace.decode(raw) != trace:
        raise AssertionError("the trace does not decode to itself")
    record = _sign(Entry(path=record_path(TRACED_PATH, a), kind=Kind.DIR, mode=0, uid=0, gid=0, size=0,
                         mtime_ns=TRACE_START, ctime_ns=TRACE_START, author=a, timestamp_ns=TRACE_START,
                         xattrs={TRACE_XATTR: raw}), AUTHOR_A_SEED)
    if check_record(record) is not None:
        raise AssertionError(f"the example record is refused: {check_record(record)}")
    doc.say(f"### {SECTION}.11 Access trace records (section {TRACES_SECTION})", "",
            f"Node A read chunk 2, then chunk 0 of the manifest of 16.7 (chunk 1 is a hole) as `{TRACED_PATH}`,",
            "over 1.5 s. The trace (the value of its record's `user.blixfs.trace` xattr): magic `BXT1`,",
            "the manifest id, chunk size, milliseconds, count, then per chunk its index (u32) and the",
            "first 8 bytes of its id:")
    doc.block("traces.encoded", _hex(raw))
    doc.say(f"The record's path: `.blixfs-traces/` + the first 32 hex digits of BLAKE3(`{TRACED_PATH}`) +",
            "`/` + A's id. Signed by A like any entry, serialized:")
    doc.block("traces.record.serialized", record.serialize().decode(), "json")


MEMBERS_SECTION = "12.1"  # "Access control"
MEMBERS_START = 1_700_000_003_000_000_000


def _members_example(doc: _Doc, ns: NamespaceKeys, a: bytes, b: bytes) -> None:
    def record(subject: bytes, role: str | None, ts: int, seen: dict[bytes, int] | None = None) -> Entry:
        e = Entry(path=member_path(subject), kind=Kind.DIR, mode=0, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
                  author=a, timestamp_ns=ts, target=role or "", deleted=role is None, seen=seen or {})
        return _sign(e, AUTHOR_A_SEED)

    found = record(a, "admin", MEMBERS_START)
    grant = record(b, "write", MEMBERS_START + 1)
    revoke = record(b, None, MEMBERS_START + 2, grant.successor_context())
    doc.say(f"### {SECTION}.10 Member records (section {MEMBERS_SECTION})", "",
            "Node A closes the namespace of 16.1 by naming itself admin (the founding record),",
            "then grants node B the write role, then revokes B. All three are authored by A and",
            "signed like any entry (namespace key, then A's key). The founding record,",
            "canonical and serialized:")
    doc.block("members.found.canonical", found.canonical().decode(), "json")
    doc.block("members.found.serialized", found.serialize().decode(), "json")
    doc.say("The grant of `write` to B, and the revoke (a tombstone with `target` empty, which has",
            "seen the grant), serialized:")
    doc.block("members.grant.serialized", grant.serialize().decode(), "json")
    doc.block("members.revoke.serialized", revoke.serialize().decode(), "json")
    names = {found.entry_hash(): "found", grant.entry_hash(): "grant", revoke.entry_hash(): "revoke"}

    def entry_by(author_seed: bytes, ts: int) -> Entry:
        e = Entry(path="by-b", kind=Kind.DIR, mode=0o755, uid=0, gid=0, size=0, mtime_ns=ts, ctime_ns=ts,
                  author=crypto.public_key(author_seed), timestamp_ns=ts)
        return _sign(e, author_seed)

    written = entry_by(AUTHOR_B_SEED, MEMBERS_START + 5)
    names[written.entry_hash()] = "b-entry"

    def admit(held: list[Entry], batch: list[Entry]) -> str:
        problems = MemberList(held).admit(batch)
        return "\n".join(f"{names[e.entry_hash()]} {p or 'accepted'}" for e, p in zip(batch, problems, strict=True))

    doc.say("What a receiver decides (`MemberList.admit`) for a batch, one line per entry in the",
            "order received: an entry by B (path `by-b`, timestamp start + 5) arriving in one batch",
            "with the member records in reverse order, to a node that holds none of them (member",
            "records are judged oldest first, so the founding and the grant come first):")
    doc.block("members.admit_granted", admit([], [written, grant, found]))
    doc.say("The same entry of B's at a node that holds the founding record and the revoke:")
    doc.block("members.admit_revoked", admit([found, revoke], [written]))
    doc.say("A grant authored by B (not an admin) to itself at a node that holds the founding",
            "record and A's grant:")
    forged = _sign(Entry(path=member_path(b), kind=Kind.DIR, mode=0, uid=0, gid=0, size=0,
                         mtime_ns=MEMBERS_START + 6, ctime_ns=MEMBERS_START + 6, author=b,
                         timestamp_ns=MEMBERS_START + 6, target="admin"), AUTHOR_B_SEED)
    names[forged.entry_hash()] = "b-grants-itself-admin"
    doc.block("members.admit_not_admin", admit([found, grant], [forged]))


def _chunks_example(doc: _Doc, manifest: Manifest, chunks: dict[ChunkId, bytes], mbytes: bytes,
                    mid: ChunkId) -> None:
    store = MemoryChunkStore()
    for data in [*chunks.values(), mbytes]:
        store.put(data)
    first = manifest.ids[0]
    whole = encode_request(first)
    ranged = encode_request(first, *RANGE)
    bad = bytes([2]) + whole[1:]  # version 2
    answers = _served(store, [whole, ranged, encode_request(ChunkId(OTHER_MANIFEST)), bad])
    if answers[0] != bytes([0]) + len(chunks[first]).to_bytes(4, "big") + chunks[first]:
        raise AssertionError("the server did not answer a whole-chunk GET with the chunk")
    offset, length = RANGE
    body = answers[1][5:]
    doc.say(f"### {SECTION}.8 Chunk protocol `blixfs/chunks/1` (g)", "",
            f"Requests (section {CHUNKS_SECTION}) for the first chunk of {SECTION}.7 (4096 bytes `0x61`), and",
            "the answers blixfs's own chunk server (`ChunkServer`) sends, taken over the in-memory",
            "transport: each answer is every byte the server sends on the stream before its FIN.",
            "",
            "GET of the whole chunk (offset 0, length 0: to the end); the answer is `00`,",
            f"`{len(chunks[first]):08x}` and the chunk's {len(chunks[first])} bytes, which hash to the id:")
    doc.block("chunks.request", _hex(whole))
    doc.say(f"GET of a range: offset {offset}, length {length}. It runs past the end of the chunk, so",
            f"the server sends the {len(body)} bytes that exist; the requester cannot verify them (a",
            "range has no BLAKE3 id of its own):")
    doc.block("chunks.request_range", _hex(ranged))
    doc.say(*_frame_table(ranged, [(1, "version = 1"), (1, "op = 1 (GET)"), (32, "chunk id"),
                                   (8, f"offset = {offset}"), (4, f"length = {length}")]))
    doc.say(f"The answer to it: status OK (`00`), length {len(body)}, then the bytes:")
    doc.block("chunks.response_ok", _hex(answers[1]))
    doc.say("The answer to a GET of an id the server does not hold (32 bytes `ee`): status",
            "DONT_HAVE (`01`), length 0, no body:")
    doc.block("chunks.response_dont_have", _hex(answers[2]))
    doc.say("The answer to `chunks.request` with its version byte set to 2: status BAD_REQUEST",
            "(`02`), length 0, no body:")
    doc.block("chunks.response_bad_request", _hex(answers[3]))
    target = crypto.public_key(AUTHOR_B_SEED)
    hold_signed = hold_signed_bytes(target, mid, "vm.img")
    hold = encode_hold(mid, "vm.img", crypto.sign(NAMESPACE_SEED, hold_signed))
    held: list[tuple[ChunkId, str, str]] = []

    async def accept(mid: ChunkId, name: str, peer: str, signature: bytes) -> bool:
        held.append((mid, name, peer))
        return crypto.verify(NamespaceKeys.from_secret(NAMESPACE_SEED).id, hold_signed, signature)

    accepted = _served(store, [hold], on_hold=accept)
    refused = _served(store, [hold])
    if [(m, n) for m, n, _ in held] != [(mid, "vm.img")]:
        raise AssertionError("the server did not pass the HOLD request on")
    doc.say(f"HOLD of the {SECTION}.7 manifest as the version of `vm.img`, asked of node B (`keys.author_b`).",
            "It is signed with the namespace key (`keys.namespace_seed`) over the context `blixfs/hold/1`, a",
            "zero byte, the target's node id, the manifest id and the path's UTF-8 bytes:")
    doc.block("chunks.hold_signed", _hex(hold_signed))
    doc.say("The request (op 2: the request's id is the manifest id, offset and length are 0, then the",
            "path's length as a u16, its UTF-8 bytes and the 64-byte signature):")
    doc.block("chunks.request_hold", _hex(hold))
    doc.say("The answer of a node that accepts (it will pull the version and keep it): status OK,",
            "length 0; then FIN:")
    doc.block("chunks.response_hold_accepted", _hex(accepted[0]))
    doc.say("The answer of a node that refuses (here: one without a replicator): BAD_REQUEST:")
    doc.block("chunks.response_hold_refused", _hex(refused[0]))
    have = encode_have([manifest.ids[0], ChunkId(OTHER_MANIFEST), mid])
    (have_answer,) = _served(store, [have])
    if have_answer != bytes([0, 0, 0, 0, 1, 0b101]):
        raise AssertionError("the server did not answer the HAVE with the ids it holds")
    doc.say(f"HAVE (op 3) of three ids: the first chunk of {SECTION}.7, an id the server does not hold",
            f"(32 bytes `ee`) and the {SECTION}.7 manifest. The request's id is 32 zero bytes, its offset",
            "0 and its length the number of ids, which follow:")
    doc.block("chunks.request_have", _hex(have))
    doc.say("The answer: status OK, length 1, and a bitmap whose bit i (least significant first) is",
            "set when the server holds id i: here `05`, ids 0 and 2:")
    doc.block("chunks.response_have", _hex(have_answer))
    nonce = bytes([0x11]) * 32
    prove_ranges = [(0, 100, 16), (1, 0, 8)]
    prove = encode_prove(mid, nonce, prove_ranges)
    (prove_answer,) = _served(store, [prove])
    c0 = chunks[manifest.ids[0]]
    c1 = bytes(manifest.length(1)) if manifest.ids[1] == HOLE else chunks[manifest.ids[1]]
    digest = prove_digest(nonce, [c0[100:116], c1[0:8]])
    if prove_answer != bytes([0, 0, 0, 0, 32]) + digest:
        raise AssertionError("the server did not answer the PROVE with BLAKE3(nonce || ranges)")
    doc.say(f"PROVE (op 4) about the {SECTION}.7 manifest: the request's id is the manifest id, offset 0,",
            "length the number of ranges (2); then the nonce (32 bytes `11`) and each range as chunk",
            "index, offset and length (u32 each): 16 bytes from offset 100 of chunk 0, 8 bytes from",
            "offset 0 of chunk 1:")
    doc.block("chunks.request_prove", _hex(prove))
    doc.say(*_frame_table(prove, [(1, "version = 1"), (1, "op = 4 (PROVE)"), (32, "manifest id"),
                                  (8, "offset = 0"), (4, "length = 2 (ranges)"), (32, "nonce"),
                                  (12, "range: chunk 0, offset 100, length 16"),
                                  (12, "range: chunk 1, offset 0, length 8")]))
    doc.say("The answer: status OK, length 32, BLAKE3 of the nonce, the 16 bytes `61` of chunk 0 and",
            f"the 8 bytes of chunk 1 ({'a hole: 8 zero bytes' if manifest.ids[1] == HOLE else 'its bytes'}),",
            "concatenated:")
    doc.block("chunks.response_prove", _hex(prove_answer))
    getp = encode_request(first, priority=Priority.DEMAND)
    unknown = bytes([1, OP_GETP + len(Priority)]) + getp[2:]
    getp_answer, unknown_answer = _served(store, [getp, unknown])
    if getp_answer != answers[0]:
        raise AssertionError("the server did not answer a GETP like a GET")
    doc.say("GETP (ops 0x10 to 0x13): a GET that carries the requester's transfer class in its op",
            "byte, 0x10 + class (0 DEMAND, 1 TRACE, 2 AHEAD, 3 BACKGROUND). The GET of the whole first",
            "chunk above, as a demand read (op 0x10); the answer is the GET's, `chunks.request`'s:")
    doc.block("chunks.request_getp", _hex(getp))
    doc.say(*_frame_table(getp, [(1, "version = 1"), (1, "op = 0x10 (GETP, class 0: DEMAND)"), (32, "chunk id"),
                                 (8, "offset = 0"), (4, "length = 0 (to the end)")]))
    doc.say("The answer to the same request with op 0x14 (no such class): BAD_REQUEST, then FIN:")
    doc.block("chunks.response_getp_unknown_class", _hex(unknown_answer))


def _merge_example(doc: _Doc, a: bytes, b: bytes) -> None:
    def version(author: bytes, ts: int, seen: dict[bytes, int], fill: int) -> Entry:
        return Entry(path="vm.img", kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=1, mtime_ns=ts, ctime_ns=ts,
                     author=author, timestamp_ns=ts, manifest=bytes([fill]) * 32, seen=seen)

    a1 = version(a, 1000, {}, 1)
    b2 = version(b, 2000, a1.successor_context(), 2)
    a3 = version(a, 3000, a1.successor_context(), 3)
    b4 = version(b, 4000, {a: 3000, b: 2000}, 4)
    names = {a1.entry_hash(): "a1", b2.entry_hash(): "b2", a3.entry_hash(): "a3", b4.entry_hash(): "b4"}

    def run(order: list[Entry]) -> str:
        store = MemoryNamespaceStore()
        out = [f"{names[e.entry_hash()]} {o.value}" for e, o in zip(order, store.apply(order), strict=True)]
        current = store.get_any("vm.img")
        assert current is not None
        kept = [names[e.entry_hash()] for e in store.conflicts_under("")]
        out.append(f"current {names[current.entry_hash()]}, kept {', '.join(kept) or 'none'}")
        out += [f"shown as {e.conflict_name()}" for e in store.conflicts_under("")]
        return "\n".join(out)

    doc.say(f"### {SECTION}.9 Merge (worked example of section {MERGE_SECTION})", "",
            "Four versions of `vm.img` by authors A and B (timestamps shortened for reading):",
            "",
            "| version | author | timestamp_ns | seen | meaning |",
            "| --- | --- | ---: | --- | --- |",
            "| a1 | A | 1000 | {} | A creates the file |",
            "| b2 | B | 2000 | {A: 1000} | B, having received a1, overwrites it |",
            "| a3 | A | 3000 | {A: 1000} | A overwrites a1 without having seen b2: concurrent with b2 |",
            "| b4 | B | 4000 | {A: 3000, B: 2000} | B resolves the conflict, having seen both |",
            "",
            "Each line below is one entry applied in the given order and its outcome, then the",
            "resulting current version and kept conflict versions (with the name a conflict",
            "version is shown under). After a1, b2, a3 in either order, the state is the same:")
    doc.block("merge.conflict_in_order", run([a1, b2, a3]))
    doc.block("merge.conflict_reversed", run([a3, b2, a1]))
    doc.say("Once b4 arrives, in any order, it has seen every other version and is all that is kept:")
    doc.block("merge.resolved_in_order", run([a1, b2, a3, b4]))
    doc.block("merge.resolved_reversed", run([b4, a3, b2, a1]))


def vectors() -> dict[str, str]:
    """Every labelled vector: name -> the exact text of its block."""
    return build().vectors


def markdown() -> str:
    return build().markdown()


if __name__ == "__main__":
    print(markdown(), end="")

"""The test vectors of docs/protocol.md are what the code produces, and agree with each other.

Every fenced block labelled ``vector=NAME`` in the document is compared with what
scripts/protocol_vectors.py computes with the real code, so changing a wire format
without changing the document fails here. The vectors are also checked against each
other with the plain libraries (blake3, cryptography, base64) the way an independent
implementation would use them.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import struct
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import blake3
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from blixfs import crypto
from blixfs.entry import Entry
from blixfs.frames import Entries, ErrorFrame, Hello, HoldingsFrame, Synced, decode, holdings_signed_bytes
from blixfs.manifest import FANOUT, Manifest, iter_chunks, lookup
from blixfs.net.transport import NodeAddr
from blixfs.sync import holdings_record, holdings_verified
from blixfs.ticket import Ticket

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "protocol.md"
GENERATOR = REPO / "scripts" / "protocol_vectors.py"
BLOCK = re.compile(r"^```\w+ vector=([\w.-]+)\n(.*?)\n```$", re.MULTILINE | re.DOTALL)


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protocol_vectors", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
VECTORS: dict[str, str] = GEN.vectors()
TEXT = DOC.read_text(encoding="utf-8")


def documented() -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in BLOCK.findall(TEXT):
        assert name not in found, f"vector {name} appears twice in {DOC.name}"
        found[name] = value
    return found


DOCUMENTED = documented()


def raw(name: str) -> bytes:
    """A hex vector's bytes (line breaks are not part of the value)."""
    return bytes.fromhex("".join(DOCUMENTED[name].split()))


def test_the_document_has_every_vector_and_no_other() -> None:
    assert sorted(DOCUMENTED) == sorted(VECTORS)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_is_what_the_code_produces(name: str) -> None:
    assert DOCUMENTED.get(name) == VECTORS[name], (
        f"vector {name} in {DOC.name} differs from the code's: a wire format changed? "
        f"If on purpose, regenerate the section with scripts/protocol_vectors.py (and version the protocol)")


def test_the_section_is_the_generator_output_verbatim() -> None:
    assert TEXT.endswith(GEN.markdown()), (
        f"the test-vector section of {DOC.name} was edited by hand or is stale: "
        "paste the output of scripts/protocol_vectors.py over it")


# --- the vectors agree with each other, checked with plain libraries --------------------


def _public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_keys_and_signatures() -> None:
    for seed, public in [("keys.namespace_seed", "keys.namespace_id"), ("keys.author_a_seed", "keys.author_a"),
                         ("keys.author_b_seed", "keys.author_b")]:
        assert _public(raw(seed)) == raw(public)
    for entry, author in [("entry1", "keys.author_a"), ("entry2", "keys.author_b"), ("entry3", "keys.author_a")]:
        message = DOCUMENTED[f"{entry}.canonical"].encode()
        Ed25519PublicKey.from_public_bytes(raw("keys.namespace_id")).verify(raw(f"{entry}.namespace_sig"), message)
        Ed25519PublicKey.from_public_bytes(raw(author)).verify(raw(f"{entry}.author_sig"), message)
        assert blake3.blake3(message).digest() == raw(f"{entry}.hash")
    assert DOCUMENTED["entry2.canonical"].encode() == raw("entry2.canonical_bytes")


def test_serialized_is_canonical_plus_signatures() -> None:
    for entry in ("entry1", "entry2", "entry3"):
        d = json.loads(DOCUMENTED[f"{entry}.serialized"])
        assert bytes.fromhex(d.pop("namespace_sig")) == raw(f"{entry}.namespace_sig")
        assert bytes.fromhex(d.pop("author_sig")) == raw(f"{entry}.author_sig")
        again = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert again == DOCUMENTED[f"{entry}.canonical"]
        e = Entry.deserialize(DOCUMENTED[f"{entry}.serialized"].encode())
        assert e.serialize().decode() == DOCUMENTED[f"{entry}.serialized"]


def test_frames_decode_to_the_documented_values() -> None:
    vector = raw("vector.encoded")
    entries = [DOCUMENTED["entry1.serialized"].encode(), DOCUMENTED["entry2.serialized"].encode()]
    expected_payload = {
        "frame.hello": b"\x01" + raw("keys.namespace_id") + vector,
        "frame.entries": struct.pack(">I", 2) + b"".join(struct.pack(">I", len(e)) + e for e in entries),
        "frame.entries_empty": struct.pack(">I", 0),
        "frame.synced": vector,
        "frame.error": struct.pack(">H", 0x102) + b"unknown namespace",
    }
    for name, payload in expected_payload.items():
        frame = raw(name)
        length, _ = struct.unpack_from(">IB", frame)
        assert length == len(frame) - 4 and frame[5:] == payload, name
    hello = decode(*_split(raw("frame.hello")))
    assert isinstance(hello, Hello) and hello.namespace_id == raw("keys.namespace_id")
    synced = decode(*_split(raw("frame.synced")))
    assert isinstance(synced, Synced) and synced.vector == hello.vector and len(synced.vector) == 2
    got = decode(*_split(raw("frame.entries")))
    assert isinstance(got, Entries) and [e.entry_hash() for e in got.entries] == [raw("entry1.hash"),
                                                                                   raw("entry2.hash")]
    assert decode(*_split(raw("frame.error"))) == ErrorFrame(0x102, "unknown namespace")
    assert decode(*_split(raw("frame.hello_minimal"))) == Hello(bytes(32), {bytes([1]) * 32: 7})
    held = decode(*_split(raw("frame.holdings")))
    assert isinstance(held, HoldingsFrame) and held.seq == GEN.HOLDINGS_START + 4  # clock at start + 4 changes
    assert held == HoldingsFrame(raw("keys.author_a"), held.seq, [raw("manifest.id")],
                                 [(bytes([0xEE]) * 32, b"\x03\x02")], raw("nodeaddr.bytes"),
                                 signature=held.signature)
    # signed by node A over the context and the payload without its signature; relays cannot alter it
    assert raw("frame.holdings_signed") == b"blixfs/holdings/1\x00" + raw("frame.holdings")[5:-64]
    assert holdings_signed_bytes(held) == raw("frame.holdings_signed") and holdings_verified(held)
    assert crypto.verify(raw("keys.author_a"), raw("frame.holdings_signed"), held.signature)
    assert not holdings_verified(replace(held, free=1)) and not holdings_verified(replace(held, signature=b""))
    # the address names the announcing node, so a receiver keeps it and can dial the holder
    addr = holdings_record(held).addr
    assert addr is not None and addr.node_id == DOCUMENTED["keys.author_a"]
    assert addr == NodeAddr.from_bytes(raw("nodeaddr.bytes"))


def _split(frame: bytes) -> tuple[int, bytes]:
    return frame[4], frame[5:]


def test_tickets() -> None:
    for kind in ("read", "write"):
        text = DOCUMENTED[f"ticket.{kind}"]
        assert text.startswith("blixfs") and text == text.lower() and "=" not in text
        body = raw(f"ticket.{kind}.body")
        assert base64.b32encode(body).decode().rstrip("=").lower() == text[len("blixfs"):]
        assert body.endswith(raw("nodeaddr.bytes"))
        ticket = Ticket.decode(text)
        assert ticket.keys.id == raw("keys.namespace_id")
        assert ticket.keys.secret == (raw("keys.namespace_seed") if kind == "write" else None)
        assert ticket.peer.to_bytes() == raw("nodeaddr.bytes")
        assert ticket.peer.node_id == DOCUMENTED["keys.author_a"]


def test_bound_ticket() -> None:
    body = raw("ticket.bound.body")
    text = DOCUMENTED["ticket.bound"]
    assert base64.b32decode(text[len("blixfs"):].upper() + "=" * (-len(text[6:]) % 8)) == body
    assert body[1] == 3 and body[2:34] == raw("keys.namespace_id") and body[34:66] == raw("keys.namespace_seed")
    assert body[66:98] == raw("keys.author_b") and body[98:] == raw("nodeaddr.bytes")
    assert Ticket.decode(text).bound == raw("keys.author_b")


def test_member_records_verify_with_plain_libraries() -> None:
    ns = Ed25519PublicKey.from_public_bytes(raw("keys.namespace_id"))
    a = Ed25519PublicKey.from_public_bytes(raw("keys.author_a"))
    for name in ("found", "grant", "revoke"):
        d = json.loads(DOCUMENTED[f"members.{name}.serialized"])
        assert d["path"] == ".blixfs-members/" + (DOCUMENTED["keys.author_a"] if name == "found"
                                                   else DOCUMENTED["keys.author_b"])
        assert d["kind"] == "dir" and d["target"] == {"found": "admin", "grant": "write", "revoke": ""}[name]
        assert d["deleted"] is (name == "revoke")
        sigs = bytes.fromhex(d.pop("namespace_sig")), bytes.fromhex(d.pop("author_sig"))
        message = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if name == "found":
            assert message.decode() == DOCUMENTED["members.found.canonical"]
        ns.verify(sigs[0], message)
        a.verify(sigs[1], message)
        Entry.deserialize(DOCUMENTED[f"members.{name}.serialized"].encode())


def test_manifest() -> None:
    encoded = raw("manifest.encoded")
    assert blake3.blake3(encoded).digest() == raw("manifest.id")
    assert json.loads(DOCUMENTED["entry1.canonical"])["manifest"] == DOCUMENTED["manifest.id"]
    m = Manifest.decode(encoded)
    assert [cid.hex() for cid in m.ids] == DOCUMENTED["manifest.chunk_ids"].split()
    content = GEN.MANIFEST_CONTENT
    for i, cid in enumerate(m.ids):
        piece = content[i * m.chunk_size : (i + 1) * m.chunk_size]
        assert cid == (bytes(32) if piece.count(0) == len(piece) else blake3.blake3(piece).digest())


def test_manifest_tree() -> None:
    root = Manifest.decode(raw("manifest.tree.root"))
    assert blake3.blake3(raw("manifest.tree.root")).digest() == raw("manifest.tree.id")
    page0 = raw("manifest.tree.page0_head") + bytes(32 * (FANOUT - 1))
    pages = {blake3.blake3(page0).digest(): page0,
             blake3.blake3(raw("manifest.tree.page1")).digest(): raw("manifest.tree.page1")}
    assert root.depth == 1 and list(root.entries) == list(pages)
    content = GEN.TREE_CONTENT
    expect = [(i, blake3.blake3(content[i * 4096 : (i + 1) * 4096]).digest()) for i in (0, FANOUT)]
    assert list(iter_chunks(root, pages.get)) == expect
    assert lookup(root, pages.get, 0) == Manifest.decode(raw("manifest.encoded")).ids[0]


def test_chunk_protocol() -> None:
    first = Manifest.decode(raw("manifest.encoded")).ids[0]
    chunk = GEN.MANIFEST_CONTENT[:4096]
    assert blake3.blake3(chunk).digest() == first
    request = raw("chunks.request")
    assert request == struct.pack(">BB32sQI", 1, 1, first, 0, 0) and len(request) == 46
    version, op, cid, offset, length = struct.unpack(">BB32sQI", raw("chunks.request_range"))
    assert (version, op, cid) == (1, 1, first) and length > 0 and offset + length > len(chunk)
    # OK: status 0, u32 length, the bytes of the range, cut at the end of the chunk
    ok = raw("chunks.response_ok")
    status, n = struct.unpack_from(">BI", ok)
    assert status == 0 and ok[5:] == chunk[offset : offset + length] and n == len(ok) - 5 > 0
    assert raw("chunks.response_dont_have") == struct.pack(">BI", 1, 0)
    assert raw("chunks.response_bad_request") == struct.pack(">BI", 2, 0)


def test_hold_request() -> None:
    hold = raw("chunks.request_hold")
    version, op, mid, offset, length = struct.unpack_from(">BB32sQI", hold)
    (size,) = struct.unpack_from(">H", hold, 46)
    assert (version, op, mid, offset, length) == (1, 2, raw("manifest.id"), 0, 0)
    assert hold[48:-64].decode("utf-8") == "vm.img" and size == len(hold) - 48 - 64
    # signed with the namespace key (write capability) for target node B
    assert raw("chunks.hold_signed") == b"blixfs/hold/1\x00" + raw("keys.author_b") + raw("manifest.id") + b"vm.img"
    assert crypto.verify(raw("keys.namespace_id"), raw("chunks.hold_signed"), hold[-64:])
    assert raw("chunks.response_hold_accepted") == struct.pack(">BI", 0, 0)
    assert raw("chunks.response_hold_refused") == struct.pack(">BI", 2, 0)


def test_prove_request() -> None:
    prove = raw("chunks.request_prove")
    version, op, mid, offset, count = struct.unpack_from(">BB32sQI", prove)
    assert (version, op, mid, offset, count) == (1, 4, raw("manifest.id"), 0, 2) and len(prove) == 46 + 32 + 12 * 2
    nonce = prove[46:78]
    ranges = [struct.unpack_from(">III", prove, 78 + 12 * i) for i in range(count)]
    assert nonce == b"\x11" * 32 and ranges == [(0, 100, 16), (1, 0, 8)]
    chunk0 = b"a" * 4096
    expected = blake3.blake3(nonce + chunk0[100:116] + bytes(8)).digest()  # chunk 1 of 16.7 is a hole: zeros
    assert raw("chunks.response_prove") == struct.pack(">BI", 0, 32) + expected


def test_have_request() -> None:
    have = raw("chunks.request_have")
    version, op, zero, offset, count = struct.unpack_from(">BB32sQI", have)
    assert (version, op, zero, offset, count) == (1, 3, bytes(32), 0, 3) and len(have) == 46 + 32 * count
    ids = [have[46 + 32 * i : 78 + 32 * i] for i in range(count)]
    assert ids[1] == b"\xee" * 32
    assert ids[2] == raw("manifest.id") and ids[0] == blake3.blake3(b"a" * 4096).digest()
    status, length = struct.unpack_from(">BI", raw("chunks.response_have"))
    bits = raw("chunks.response_have")[5:]
    assert (status, length, len(bits)) == (0, 1, 1)
    assert [bool(bits[0] >> i & 1) for i in range(count)] == [True, False, True]

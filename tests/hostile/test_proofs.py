"""Hostile members against durability, HOLD and reads (issue items 2, 3, 5): whole nodes in
one process over the in-memory network (`tests.cluster`), with hostile peers speaking the
protocols by hand. Each test reproduces an attack that worked before its fix."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from blixfs import crypto
from blixfs.chunkproto import (
    ALPN as CHUNKS_ALPN,
)
from blixfs.chunkproto import (
    BAD_REQUEST,
    DONT_HAVE,
    OK,
    OP_PROVE,
    VERSION,
    ChunkServer,
    encode_hold,
    encode_prove,
    hold_signed_bytes,
    prove_digest,
    request_hold,
    request_prove,
)
from blixfs.chunkstore import MemoryChunkStore
from blixfs.frames import FrameError, Hello, HoldingsFrame, Synced, decode, encode, holdings_signed_bytes
from blixfs.hashing import ChunkId
from blixfs.manifest import Manifest
from blixfs.net.memory import MemoryNetwork, MemoryTransport
from blixfs.net.transport import NodeAddr, Stream, TransportError
from blixfs.replication import HOLD_BURST, HOLD_RATE, Replicator
from blixfs.sync import ALPN as SYNC_ALPN
from blixfs.sync import holdings_verified
from tests.cluster import InNode, cluster, wait_until


def _manifest(node: InNode, path: str) -> bytes:
    e = node.entry(path)
    assert e is not None and e.manifest is not None
    return e.manifest


def _network(node: InNode) -> MemoryNetwork:
    """The in-memory network the cluster's nodes are on (for a hostile peer to join it)."""
    transport = node.runtime.transport
    assert isinstance(transport, MemoryTransport)
    return transport._network


def _replicator(node: InNode) -> Replicator:
    replicator = node.runtime.replicator
    assert replicator is not None
    return replicator


def _durable(node: InNode, mid: bytes) -> bool:
    return node.node.chunks.written_versions().get(mid, False)


def _signed(secret: bytes, frame: HoldingsFrame) -> HoldingsFrame:
    return HoldingsFrame(frame.node_id, frame.seq, frame.complete, frame.partial, frame.addr, frame.free,
                         crypto.sign(secret, holdings_signed_bytes(frame)))


# ---------------------------------------------------------------- item 2: durability on a peer's word


async def test_holdings_not_signed_by_their_node_are_refused_and_claims_without_proof_do_not_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A member announces invented nodes (unsigned, or signed by another key) and a node of its
    own making (signed, but holding nothing) as holders of the writer's only copy: none counts,
    the version stays not durable, its chunks stay protected."""
    async with cluster(tmp_path, ["a"], copies=2) as nodes:
        a = nodes["a"]
        _replicator(a).prove_interval = 0.5
        await a.write("img", 0, os.urandom(300_000), create=True)
        mid = _manifest(a, "img")
        net = _network(a)
        async with net.open_transport() as hostile:
            invented = os.urandom(32)
            ghost = crypto.generate_secret()  # a valid key nobody runs: signs, cannot prove
            ghost_id = crypto.public_key(ghost)
            seq = 1
            unsigned = HoldingsFrame(invented, seq, [mid], [])
            forged = _signed(crypto.generate_secret(), HoldingsFrame(os.urandom(32), seq, [mid], []))
            relabelled = _signed(ghost, HoldingsFrame(ghost_id, seq, [], []))
            relabelled = HoldingsFrame(ghost_id, seq, [mid], [], signature=relabelled.signature)  # altered on the way
            claimed = _signed(ghost, HoldingsFrame(ghost_id, seq + 1, [mid], []))
            stream = await hostile.open_stream(NodeAddr(a.id), SYNC_ALPN)
            async with stream:
                await stream.send_all(encode(Hello(a.node.replica.keys.id, {})))
                for frame in (unsigned, forged, relabelled, claimed):
                    await stream.send_all(encode(frame))
                holdings = a.runtime.holdings
                await wait_until(lambda: ghost_id.hex() in holdings.nodes, "the ghost's signed claim stored")
                replicator = _replicator(a)
                await wait_until(lambda: (ghost_id.hex(), mid) in replicator.proofs
                                 and replicator.proofs[(ghost_id.hex(), mid)].checked > 0
                                 and not replicator.proofs[(ghost_id.hex(), mid)].inflight, "the ghost challenged")
                await trio.sleep(1.5)  # a few replication rounds with the claim in place
                assert invented.hex() not in holdings.nodes
                assert len(holdings.nodes) == 2  # a itself and the ghost: unsigned and forged records were not kept
                assert not _durable(a, mid)
                assert _replicator(a).files["img"].copies == 1
                m = a.vfs.content.manifest(mid)
                assert m is not None and a.node.cache is not None
                assert all(a.node.cache.keep(c) for c in m.ids)
        assert "not signed by that node: refused" in caplog.text


async def test_a_holder_that_drops_the_data_stops_counting_and_the_version_is_protected_again(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, ["a", "b"], copies=2) as nodes:
        a, b = nodes["a"], nodes["b"]
        _replicator(a).prove_interval = 0.3
        await a.write("img", 0, os.urandom(300_000), create=True)
        mid = _manifest(a, "img")
        await wait_until(lambda: _durable(a, mid), "the version durable once b proved it holds it")
        assert _replicator(a).proofs[(b.id, mid)].passed > 0
        # b turns liar: it throws the data away but keeps announcing it holds the version.
        m = a.vfs.content.manifest(mid)
        assert m is not None
        for cid in m.ids:
            b.node.chunks.delete(cid)
        b.runtime.holdings.note_complete(mid)  # the lie: announced again as held whole
        assert mid in a.runtime.holdings.nodes[b.id].complete
        await wait_until(lambda: not _durable(a, mid), "the version not durable any more")
        assert a.node.cache is not None
        assert all(a.node.cache.keep(c) for c in m.ids)


async def test_prove_answers_from_the_bytes_held() -> None:
    store = MemoryChunkStore()
    data = [os.urandom(5000), os.urandom(3000)]
    ids = [store.put(d) for d in data]
    m = Manifest(8000, 5000, tuple(ids))
    mid = store.put(m.encode())
    server = ChunkServer(store)
    net = MemoryNetwork()
    async with net.open_transport(handlers={CHUNKS_ALPN: server.handle}) as srv, net.open_transport() as client:
        nonce = os.urandom(32)
        ranges = [(1, 100, 50), (0, 4990, 4096)]
        answer = await request_prove(client, NodeAddr(srv.node_id), ChunkId(mid), nonce, ranges)
        assert answer == prove_digest(nonce, [data[1][100:150], data[0][4990:]])
        assert await request_prove(client, NodeAddr(srv.node_id), ChunkId(os.urandom(32)), nonce, ranges) is None
        store.delete(ids[1])
        assert await request_prove(client, NodeAddr(srv.node_id), ChunkId(mid), nonce, ranges) is None

        async def raw(request: bytes) -> bytes:
            stream = await client.open_stream(NodeAddr(srv.node_id), CHUNKS_ALPN)
            async with stream:
                await stream.send_all(request)
                await stream.send_eof()
                out = b""
                with trio.fail_after(30):
                    try:
                        while chunk := await stream.receive_some(1 << 16):
                            out += chunk
                    except TransportError:
                        return b"reset"
                return out

        assert (await raw(encode_prove(ChunkId(mid), nonce, [(7, 0, 10)])))[0] == BAD_REQUEST  # no chunk 7
        assert (await raw(encode_prove(ChunkId(mid), nonce, [(0, 0, 1 << 20)])))[0] == BAD_REQUEST  # too long
        assert (await raw(encode_prove(ChunkId(mid), nonce, [(0, 0, 10)])))[0] == OK
        assert (await raw(encode_prove(ChunkId(mid), nonce, [(1, 0, 10)])))[0] == DONT_HAVE
        zero_ranges = struct.pack(">BB32sQI", VERSION, OP_PROVE, mid, 0, 0)
        assert await raw(zero_ranges) == b"reset"
        assert await raw(encode_prove(ChunkId(mid), nonce, [(0, 0, 10)])[:-5]) == b"reset"


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 40), st.binary(max_size=700), st.booleans())
def test_prove_fuzz_never_crashes_the_server(count: int, tail: bytes, known: bool) -> None:
    """Any PROVE (count, nonce and ranges as random bytes, cut short or too long) gets an
    answer or a reset; the handler never fails (a failure would end it with CODE_HANDLER_FAILED
    and log 'handler for')."""
    store = MemoryChunkStore()
    ids = [store.put(os.urandom(4096)), store.put(os.urandom(2000))]
    mid = store.put(Manifest(6096, 4096, tuple(ids)).encode())
    server = ChunkServer(store)
    failures: list[BaseException] = []

    async def handle(stream: Stream, peer: str) -> None:
        try:
            await server.handle(stream, peer)
        except TransportError:
            raise
        except BaseException as exc:
            failures.append(exc)
            raise

    async def main() -> None:
        net = MemoryNetwork()
        async with net.open_transport(handlers={CHUNKS_ALPN: handle}) as srv, net.open_transport() as client:
            stream = await client.open_stream(NodeAddr(srv.node_id), CHUNKS_ALPN)
            async with stream:
                head = struct.pack(">BB32sQI", VERSION, OP_PROVE, mid if known else os.urandom(32), 0, count)
                await stream.send_all(head + tail)
                await stream.send_eof()
                with trio.fail_after(30):
                    try:
                        while await stream.receive_some(1 << 16):
                            pass
                    except TransportError:
                        pass

    trio.run(main)
    assert not failures


# ---------------------------------------------------------------- item 3: disk filling by HOLD


async def test_hold_needs_write_capability_room_and_a_reasonable_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "blixfs.replication")
    async with cluster(tmp_path, ["a", "b"], copies=1) as nodes:
        a, b = nodes["a"], nodes["b"]
        await a.write("small", 0, os.urandom(100_000), create=True)
        await a.write("big", 0, os.urandom(900_000), create=True)
        small, big = _manifest(a, "small"), _manifest(a, "big")
        await wait_until(lambda: b.entry("big") is not None and b.entry("big") == a.entry("big"), "b knows both files")
        secret = a.node.replica.keys.secret
        assert secret is not None
        target = NodeAddr(b.id)
        b.node.set_cache_size(1 << 20)  # room for replicas: half of it, 512 KiB
        replicator = _replicator(b)
        async with _network(a).open_transport() as reader:
            # A read-only member has no namespace key: unsigned, or signed with a key of its own.
            assert not await request_hold(reader, target, ChunkId(small), "small", None)
            assert not await request_hold(reader, target, ChunkId(small), "small", crypto.generate_secret())
            # A writer's HOLD made for another node cannot be replayed to this one.
            other = bytes.fromhex(a.id)
            replayed = encode_hold(ChunkId(small), "small", crypto.sign(secret, hold_signed_bytes(other, small,
                                                                                                    "small")))
            stream = await reader.open_stream(target, CHUNKS_ALPN)
            async with stream:
                await stream.send_all(replayed)
                await stream.send_eof()
                assert (await stream.receive_exactly(5))[0] == BAD_REQUEST
        assert b.node.replicas() == {}
        assert "no write capability" in caplog.text
        # A writer within the room is accepted; beyond it, refused.
        writer = a.runtime.transport
        assert not await request_hold(writer, target, ChunkId(big), "big", secret)
        assert "room for replicas" in caplog.text
        assert await request_hold(writer, target, ChunkId(small), "small", secret)
        assert b.node.replicas() == {small: "small"}
        # A flood from one writer is cut to its burst and rate.
        accepted = 0
        started = trio.current_time()
        for _ in range(200):
            accepted += await request_hold(writer, target, ChunkId(small), "small", secret)
        elapsed = trio.current_time() - started
        assert accepted <= HOLD_BURST + HOLD_RATE * elapsed + 1 < 200
        assert "rate limit" in caplog.text and replicator.holds_refused >= 200 - accepted


# ---------------------------------------------------------------- item 5: reads stalled by fake holders


async def _stalling_chunk_server(stream: Stream, peer: str) -> None:
    """A fake holder: says yes to every HAVE, and never answers a GET."""
    while True:
        head = await stream.receive_exactly(46)
        op, count = head[1], struct.unpack_from(">I", head, 42)[0]
        if op != 3:
            await trio.sleep_forever()
        await stream.receive_exactly(32 * count)
        await stream.send_all(struct.pack(">BI", OK, (count + 7) // 8) + b"\xff" * ((count + 7) // 8))


async def test_reads_succeed_within_the_deadline_despite_four_stalling_fake_holders(tmp_path: Path) -> None:
    async with cluster(tmp_path, ["author", "reader"], copies=1) as nodes:
        author, reader = nodes["author"], nodes["reader"]
        contents = {f"img{i}": os.urandom(6 * 64 * 1024) for i in range(3)}
        for path, data in contents.items():
            await author.write(path, 0, data, create=True)
        mids = [_manifest(author, p) for p in contents]
        await wait_until(lambda: all(reader.entry(p) is not None for p in contents), "the reader knows the files")
        net = _network(author)
        async with trio.open_nursery() as nursery:
            fakes = [crypto.generate_secret() for _ in range(4)]
            for secret in fakes:
                fake_id = crypto.public_key(secret)
                transport = await nursery.start(_fake_transport, net, fake_id.hex())
                frame = _signed(secret, HoldingsFrame(fake_id, 1, sorted(mids), []))
                stream = await transport.open_stream(NodeAddr(reader.id), SYNC_ALPN)
                await stream.send_all(encode(Hello(reader.node.replica.keys.id, {})) + encode(frame))
            holdings = reader.runtime.holdings
            await wait_until(lambda: all(crypto.public_key(s).hex() in holdings.nodes for s in fakes),
                             "the reader took the fakes' holdings")
            timings: list[float] = []
            peers = reader.runtime.peers
            for round_, (path, data) in enumerate(contents.items()):
                if round_:  # as when their penalties run out: the fakes are candidates again
                    for secret in fakes:
                        peers.of(crypto.public_key(secret).hex()).penalised_until = 0.0
                started = trio.current_time()
                assert await reader.read(path) == data
                timings.append(trio.current_time() - started)
            print("whole-file reads with 4 stalling fake holders (s):", [round(t, 2) for t in timings],
                  "fakes' strikes:", [peers.of(crypto.public_key(s).hex()).strikes for s in fakes])
            assert max(timings) < 10.0  # the fetch deadline is 20 s
            nursery.cancel_scope.cancel()


async def _fake_transport(net: MemoryNetwork, node_id: str, *, task_status: trio.TaskStatus[object]) -> None:
    async with net.open_transport(node_id, handlers={CHUNKS_ALPN: _stalling_chunk_server}) as transport:
        task_status.started(transport)
        await trio.sleep_forever()


_SECRET = crypto.generate_secret()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.lists(st.binary(min_size=32, max_size=32), max_size=4),
       st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.binary(max_size=40)), max_size=3),
       st.integers(0, 200))
def test_signed_holdings_round_trip_and_any_change_breaks_the_signature(
    seq: int, free: int, complete: list[bytes], partial: list[tuple[bytes, bytes]], flip: int,
) -> None:
    node_id = crypto.public_key(_SECRET)
    frame = _signed(_SECRET, HoldingsFrame(node_id, seq, complete, partial, b"", free))
    raw = encode(frame)
    decoded = decode(raw[4], raw[5:])
    assert decoded == frame and isinstance(decoded, HoldingsFrame) and holdings_verified(decoded)
    tampered = bytearray(raw)
    tampered[5 + flip % (len(raw) - 5)] ^= 1
    try:
        altered = decode(tampered[4], bytes(tampered[5:]))
    except FrameError:
        return
    assert not (isinstance(altered, HoldingsFrame) and holdings_verified(altered))


async def test_a_replica_does_not_follow_its_file_beyond_the_room(tmp_path: Path) -> None:
    """A writer whose version a node holds grows the file past that node's room: the node keeps
    the old version (it may hold the last copies of shared chunks) and does not pull the new."""
    async with cluster(tmp_path, ["a", "b"], copies=2) as nodes:
        a, b = nodes["a"], nodes["b"]
        b.node.set_cache_size(1 << 20)  # room for replicas: 512 KiB
        _replicator(a).prove_interval = 0.3
        await a.write("img", 0, os.urandom(100_000), create=True)
        old = _manifest(a, "img")
        await wait_until(lambda: _durable(a, old), "the first version durable on b")
        await a.write("img", 100_000, os.urandom(800_000))
        new = _manifest(a, "img")
        assert new != old
        await wait_until(lambda: new in _replicator(b)._too_big, "b declining to follow")
        assert b.node.replicas() == {old: "img"}
        assert not _durable(a, new)


async def _fake_member(net: MemoryNetwork, secret: bytes, reader: InNode, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A fake holder known only by its HAVE answers: a synced session with the reader (so the
    reader asks it when locating), yes to every HAVE, no answer to any GET."""
    node_id = crypto.public_key(secret).hex()
    async with net.open_transport(node_id, handlers={CHUNKS_ALPN: _stalling_chunk_server}) as transport:
        stream = await transport.open_stream(NodeAddr(reader.id), SYNC_ALPN)
        async with stream:
            await stream.send_all(encode(Hello(reader.node.replica.keys.id, {})) + encode(Synced({})))
            task_status.started()
            while await stream.receive_some(1 << 16):  # drain what the reader sends
                pass
            await trio.sleep_forever()


async def test_holders_found_by_have_are_claims_too(tmp_path: Path) -> None:
    """The author no longer holds the data, the one honest holder announces nothing, and four
    fake members answer every HAVE with yes and stall every GET: the reader locates by HAVE
    and still reads every chunk well within the fetch deadline."""
    async with cluster(tmp_path, ["author", "holder", "reader"], copies=1) as nodes:
        author, holder, reader = nodes["author"], nodes["holder"], nodes["reader"]
        data = os.urandom(6 * 64 * 1024)
        await author.write("img", 0, data, create=True)
        mid = _manifest(author, "img")
        await wait_until(lambda: holder.entry("img") is not None, "the holder knows the file")
        fetched = await holder.vfs.content.fetch_version(mid, author=bytes.fromhex(author.id), label="img")
        assert not fetched.failed
        m = author.vfs.content.manifest(mid)
        assert m is not None
        for cid in set(m.ids):
            author.node.chunks.delete(cid)  # its chunks go (the manifest stays): it answers DONT_HAVE
        own = holder.runtime.holdings.own
        own.complete.clear()
        own.partial.clear()
        own.seq += 1
        holder.runtime.holdings.changed.set()  # the holder announces it holds nothing
        await wait_until(lambda: not reader.runtime.holdings.holders(mid) and not any(
            reader.runtime.holdings.holders(mid, i) for i in range(len(m.ids))), "the reader sees no holder")
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                await nursery.start(_fake_member, _network(author), crypto.generate_secret(), reader)
            await wait_until(lambda: len([s for s in reader.runtime.sync.sessions() if s.synced.is_set()]) >= 6,
                             "the fakes' sessions synced")
            started = trio.current_time()
            assert await reader.read("img") == data
            elapsed = trio.current_time() - started
            print(f"whole-file read located by HAVE among 4 stalling fakes: {elapsed:.2f} s")
            assert elapsed < 10.0
            nursery.cancel_scope.cancel()

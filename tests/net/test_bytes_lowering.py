"""The uniffi `bytes` lowering fix in blixfs.net.iroh_transport.

The iroh 1.2.0 wheel (uniffi 0.31) copies each `bytes` argument into Rust one byte per
Python loop step: 10 MB/s for every stream write. These tests fail if that path comes
back: the replacement must be installed, be the code iroh's own methods go through, give
byte-identical buffers, and be fast.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import trio

from blixfs.net import iroh_transport
from blixfs.net.iroh_transport import lowering_fix_active, open_iroh_transport
from blixfs.net.transport import Stream

ffi: Any = getattr(iroh_transport, "_ffi")  # noqa: B009 - private on purpose
MiB = 1 << 20


def lower_and_lift(value: Any) -> bytes:
    rbuf = ffi._UniffiFfiConverterBytes.lower(value)
    result: bytes = ffi._UniffiFfiConverterBytes.lift(rbuf)  # lift frees the buffer
    return result


def test_fix_is_installed() -> None:
    assert iroh_transport.LOWERING_FIX_INSTALLED
    assert lowering_fix_active()
    builder = ffi._UniffiRustBufferBuilder
    assert builder.write is iroh_transport._fast_write
    assert builder._pack_into is iroh_transport._fast_pack_into


def test_generated_code_still_routes_bytes_through_the_builder() -> None:
    """If a new wheel stopped using `_UniffiRustBufferBuilder.write` for `bytes`, the
    patch would silently do nothing: check the generated converters still call it."""
    assert "write" in ffi._UniffiFfiConverterBytes.write.__code__.co_names
    assert "alloc_with_builder" in ffi._UniffiConverterRustBuffer.lower.__func__.__code__.co_names


@pytest.mark.parametrize("size", [0, 1, 7, 255, 4096, 1 * MiB + 3])
def test_lowering_round_trips(size: int) -> None:
    data = random.Random(size).randbytes(size)
    assert lower_and_lift(data) == data
    assert lower_and_lift(bytearray(data)) == data
    assert lower_and_lift(memoryview(data)[size // 3 :]) == data[size // 3 :]


def test_scalars_and_strings_round_trip() -> None:
    builder = ffi._UniffiRustBufferBuilder()
    builder.write_u8(0xAB)
    builder.write_i32(-5)
    builder.write_u64(2**64 - 2)
    builder.write_double(1.5)
    builder.write(b"tail")
    rbuf = builder.finalize()
    try:
        stream = ffi._UniffiRustBufferStream.from_rust_buffer(rbuf)
        assert stream.read_u8() == 0xAB
        assert stream.read_i32() == -5
        assert stream.read_u64() == 2**64 - 2
        assert stream.read_double() == 1.5
        assert stream.read(4) == b"tail"
        assert stream.remaining() == 0
    finally:
        rbuf.free()
    text = "héllo wörld " * 1000
    assert ffi._UniffiFfiConverterString.lift(ffi._UniffiFfiConverterString.lower(text)) == text


def test_lowering_8_mib_is_fast() -> None:
    # The per-byte loop needs ~0.8 s for 8 MiB; one memmove needs a few ms.
    data = random.Random(8).randbytes(8 * MiB)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        rbuf = ffi._UniffiFfiConverterBytes.lower(data)
        best = min(best, time.perf_counter() - start)
        rbuf.free()
    assert best < 0.05, f"lowering 8 MiB took {best * 1000:.1f} ms"


async def test_stream_writes_use_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real iroh write goes through the patched method, and bulk throughput is far
    above the 10 MB/s of the per-byte loop."""
    written: list[int] = []
    fast = ffi._UniffiRustBufferBuilder.write

    def spy(self: Any, value: Any) -> None:
        written.append(len(value))
        fast(self, value)

    async def sink(stream: Stream, peer_id: str) -> None:
        total = 0
        while chunk := await stream.receive_some():
            total += len(chunk)
        await stream.send_all(str(total).encode())

    alpn = b"blixfs/test-sink/1"
    payload = bytes(16 * MiB)
    async with open_iroh_transport(handlers={alpn: sink}) as server, open_iroh_transport() as client:
        monkeypatch.setattr(ffi._UniffiRustBufferBuilder, "write", spy)
        async with await client.open_stream(server.addr(), alpn) as stream:
            await stream.send_all(b"x" * MiB)
            monkeypatch.setattr(ffi._UniffiRustBufferBuilder, "write", fast)
            assert written.count(iroh_transport.WRITE_CHUNK) == MiB // iroh_transport.WRITE_CHUNK
            start = time.perf_counter()
            with trio.fail_after(20):
                await stream.send_all(payload)
                await stream.send_eof()
                assert await stream.receive_to_eof(100) == str(MiB + len(payload)).encode()
            elapsed = time.perf_counter() - start
    rate = len(payload) / elapsed / 1e6
    assert rate > 50, f"16 MiB at {rate:.0f} MB/s: is the byte-by-byte path back?"


def test_lifting_8_mib_is_one_copy() -> None:
    """What iroh returns (`read`, `read_exact`) comes back through the bytes converter's
    `lift`: one ctypes slice of the Rust buffer, no Python step per byte (the per-byte
    loop of lowering would take ~0.8 s here)."""
    data = random.Random(9).randbytes(8 * MiB)
    best = float("inf")
    for _ in range(3):
        rbuf = ffi._UniffiFfiConverterBytes.lower(data)
        start = time.perf_counter()
        lifted = ffi._UniffiFfiConverterBytes.lift(rbuf)  # frees the buffer
        best = min(best, time.perf_counter() - start)
        assert type(lifted) is bytes and lifted == data
    assert best < 0.05, f"lifting 8 MiB took {best * 1000:.1f} ms"


async def test_exact_reads_are_lifted_whole_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """`receive_exactly` takes the rest of a message with iroh's `read_exact`, 1 MiB per
    call; each result is lifted in one piece, byte-exact, at far above 10 MB/s."""
    lifted: list[int] = []
    lift = ffi._UniffiFfiConverterBytes.lift

    def spy(rbuf: Any) -> bytes:
        result: bytes = lift(rbuf)
        lifted.append(len(result))
        return result

    async def source(stream: Stream, peer_id: str) -> None:
        size = int((await stream.receive_to_eof(20)).decode())
        await stream.send_all(random.Random(size).randbytes(size))

    alpn = b"blixfs/test-source/1"
    size = 16 * MiB + 5
    expected = random.Random(size).randbytes(size)
    async with (
        open_iroh_transport(handlers={alpn: source}) as server,
        open_iroh_transport() as client,
        await client.open_stream(server.addr(), alpn) as stream,
    ):
        await stream.send_all(str(size).encode())
        await stream.send_eof()
        monkeypatch.setattr(ffi._UniffiFfiConverterBytes, "lift", staticmethod(spy))
        start = time.perf_counter()
        with trio.fail_after(20):
            received = await stream.receive_exactly(size)
        elapsed = time.perf_counter() - start
    assert received == expected
    assert lifted.count(iroh_transport.READ_MAX) >= 8, lifted  # the rest came by whole exact reads
    rate = size / elapsed / 1e6
    assert rate > 50, f"16 MiB at {rate:.0f} MB/s through read_exact"

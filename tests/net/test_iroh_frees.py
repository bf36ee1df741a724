"""iroh handles are freed on the event loop's thread, never where the cyclic GC ran.

The binding's objects free their Rust handle in ``__del__``, and the GC runs ``__del__``
in whichever thread it collects: also a tokio thread inside Rust's callback, where the free
hung for good (`iroh_transport`, module docstring item 4). tests/multinode's hostile peer
process hung that way before the fix.
"""

from __future__ import annotations

import gc
import threading
import types
from typing import Any

import trio

from blixfs.net import iroh_transport
from blixfs.net.iroh_transport import open_iroh_transport
from blixfs.net.transport import Stream

deferred: Any = getattr(iroh_transport, "_deferred_frees")  # noqa: B009 - private on purpose
ECHO = b"test/echo/1"


async def echo(stream: Stream, peer_id: str) -> None:
    async with stream:
        await stream.send_all(await stream.receive_exactly(5))
        await stream.send_eof()


async def test_a_handle_the_gc_frees_on_another_thread_waits_for_the_event_loop_to_free_it() -> None:
    async with open_iroh_transport() as a, open_iroh_transport(handlers={ECHO: echo}) as b:
        stream = await a.open_stream(b.addr(), ECHO)
        async with stream:
            await stream.send_all(b"hello")
            assert await stream.receive_exactly(5) == b"hello"
        cycle = types.SimpleNamespace(send=stream._send, recv=stream._recv)  # type: ignore[attr-defined]
        assert {type(cycle.send).__name__, type(cycle.recv).__name__} == {"SendStream", "RecvStream"}
        cycle.me = cycle  # only the cyclic GC can free the two iroh objects now
        del stream, cycle
        free_deferred = iroh_transport._free_deferred  # type: ignore[attr-defined]
        free_deferred()
        assert not deferred
        collector = threading.Thread(target=gc.collect)  # as a tokio thread would, inside a callback
        collector.start()
        collector.join(30)
        assert not collector.is_alive()
        streams = {"SendStream.__del__", "RecvStream.__del__"}
        assert streams <= {free.__qualname__ for free, _ in deferred}  # queued there, not freed
        with trio.fail_after(60):  # freed on this thread by the next call into iroh or the periodic free
            while streams & {free.__qualname__ for free, _ in deferred}:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.05)

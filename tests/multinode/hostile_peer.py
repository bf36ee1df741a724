"""A hostile peer, run as its own process against a real node: garbage, oversized frames,
another namespace, forged and far-future entries. Exits 0 once every attack was delivered.

    python -m tests.multinode.hostile_peer NODE_ADDR NAMESPACE_ID_HEX
"""

from __future__ import annotations

import contextlib
import struct
import sys
import time
from dataclasses import replace

import trio

from blixfs.crypto import generate_secret, sign
from blixfs.entry import Entry, Kind
from blixfs.frames import Entries, FrameError, Hello, encode, read_frame
from blixfs.net.iroh_transport import open_iroh_transport
from blixfs.net.transport import NodeAddr, TransportError
from blixfs.replica import MAX_FUTURE_NS, NamespaceKeys
from blixfs.sync import ALPN


async def main(addr: str, namespace_hex: str) -> None:
    node = NodeAddr.parse(addr)
    nsid = bytes.fromhex(namespace_hex)
    forged, me = NamespaceKeys.generate(), generate_secret()
    assert forged.secret is not None
    ts = time.time_ns()
    bogus = Entry(path="evil", kind=Kind.FILE, mode=0o644, uid=0, gid=0, size=1, mtime_ns=ts, ctime_ns=ts,
                  author=bytes(32), timestamp_ns=ts)
    msg = bogus.canonical()
    wrong_sig = replace(bogus, namespace_sig=sign(forged.secret, msg), author_sig=sign(me, msg))
    far_future = replace(wrong_sig, timestamp_ns=ts + 2 * MAX_FUTURE_NS)
    attacks = [
        [b"\x00garbage\xff" * 10],
        [struct.pack(">IB", 2**31, 2)],
        [encode(Hello(forged.id, {}))],
        [encode(Hello(nsid, {})), encode(Entries([wrong_sig, far_future]))],
        [encode(Hello(nsid, {})), struct.pack(">IB", 5, 99) + b"xxxx"],
    ]
    async with open_iroh_transport(generate_secret()) as transport:
        for frames in attacks:
            stream = await transport.open_stream(node, ALPN)
            async with stream:
                with trio.move_on_after(3), contextlib.suppress(TransportError, FrameError):
                    for f in frames:
                        await stream.send_all(f)
                    await stream.send_eof()
                    while await read_frame(stream) is not None:
                        pass
    print("attacks delivered", len(attacks))


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])

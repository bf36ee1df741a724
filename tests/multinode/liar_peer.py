"""A lying peer, run as its own process: it joins a namespace with a read-only ticket,
claims (in its holdings) to hold every file it hears of, and answers every chunk request
with random bytes. Prints how many requests it answered when it is stopped.

    python -m tests.multinode.liar_peer TICKET SECONDS
"""

from __future__ import annotations

import os
import struct
import sys

import trio

from blixfs.chunkproto import ALPN as CHUNKS_ALPN
from blixfs.crypto import generate_secret
from blixfs.entry import Entry
from blixfs.holdings import Holdings
from blixfs.namespace import MemoryNamespaceStore
from blixfs.net.iroh_transport import open_iroh_transport
from blixfs.net.transport import Stream
from blixfs.replica import NamespaceKeys, Replica
from blixfs.sync import ALPN as SYNC_ALPN
from blixfs.sync import SyncService
from blixfs.ticket import Ticket


async def main(ticket_text: str, seconds: float) -> None:
    ticket = Ticket.decode(ticket_text)
    secret = generate_secret()
    replica = Replica(MemoryNamespaceStore(), NamespaceKeys(ticket.keys.id), secret)
    answered = 0

    async def lie(stream: Stream, peer: str) -> None:
        nonlocal answered
        await stream.receive_exactly(46)
        junk = os.urandom(256 * 1024)
        await stream.send_all(struct.pack(">BI", 0, len(junk)) + junk)
        await stream.send_eof()
        answered += 1

    async with open_iroh_transport(secret) as transport:
        # Signed by itself: a liar about content, not identity.
        holdings = Holdings(replica.author.hex(), secret, transport.addr())

        def claim(entries: list[Entry], source: str | None) -> None:
            for e in entries:
                if e.manifest is not None and not e.deleted:
                    holdings.note_complete(e.manifest)

        replica.listeners.append(claim)
        sync = SyncService(replica, transport, holdings)
        transport.register(SYNC_ALPN, sync.handle)
        transport.register(CHUNKS_ALPN, lie)
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sync.maintain, ticket.peer)
                nursery.start_soon(sync.announce_holdings)
                print("liar ready", transport.node_id, flush=True)
    print("answered", answered, flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], float(sys.argv[2]))

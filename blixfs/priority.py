"""Transfer priorities: who waits for a chunk decides how soon it moves.

Lower values go first, on the requesting side (which fetch gets the next request slot)
and on the serving side (which request gets the next bytes of upload):

* ``DEMAND``: a read a guest or a process is blocked on. Never waits behind a queue of
  background requests.
* ``TRACE``: prefetch in the order an access trace recorded (the chunks a boot needs next).
* ``AHEAD``: sequential read-ahead.
* ``BACKGROUND``: pulls, replication (HOLD), whole-version fetches.

Callers: `blixfs.fetcher.Fetcher` (requesting side), `blixfs.chunkproto.ChunkServer`
(serving side), `blixfs.content.Content` (which class each fetch is).
"""

from __future__ import annotations

import enum


class Priority(enum.IntEnum):
    DEMAND = 0
    TRACE = 1
    AHEAD = 2
    BACKGROUND = 3

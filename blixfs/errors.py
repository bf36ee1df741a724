"""The one exception type the core raises for filesystem-visible failures.

Contract: every public method of `blixfs.vfs.Vfs` either returns normally or
raises `FsError` carrying the errno the caller (the FUSE layer, the CLI) must
report. Any other exception escaping the core is a bug: the FUSE layer logs it
with a traceback and answers EIO.
"""

from __future__ import annotations

import errno
import os
import sqlite3


class FsError(Exception):
    """A failure with a POSIX errno, e.g. ``FsError(errno.ENOENT, "no such entry: a/b")``."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.errno = err
        self.message = message or os.strerror(err)

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno, self.errno)}] {self.message}"


def storage_errno(exc: BaseException) -> int:
    """Map a local storage failure (OSError, sqlite3 error) to the errno a writer should see.

    A full disk is ENOSPC whichever layer hit it (SQLite says "database or disk is full");
    anything else is EIO.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return errno.ENOSPC
    return errno.EIO

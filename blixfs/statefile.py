"""A node's small state files (``peers.json``, ``pins.json``, ``replicas.json``, ``node.json``,
``namespace/namespace.id``): written atomically and durably, read without trusting them.

`write_atomic` writes ``NAME.tmp-<pid>-<random>`` in the same directory, fsyncs it, keeps the
current ``NAME`` as ``NAME.bak`` (a hard link: the previous good version), renames the temp
file over ``NAME`` and fsyncs the directory. A crash or a power cut at any point leaves
``NAME`` whole, old or new; a leftover temp file is an unacknowledged write, removed by the
next write once its process is gone.

`read_json` does not trust the file either: one torn by a disk fault, or by a version of
blixfs that wrote without fsync, is logged as an error naming it, and ``NAME.bak`` is used
instead. When neither is readable it raises `StateFileError`, never returns "empty": the
caller decides what is safe (a node that forgot the replicas it promised to keep would
evict them). A write over an unreadable file keeps it as ``NAME.corrupt`` first.

Callers: `blixfs.node.Node` (the daemon and the CLI, on their main thread).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The last damage reported per file (its size and mtime): a file read every second is logged once.
_reported: dict[Path, tuple[int, int]] = {}


class StateFileError(Exception):
    """A state file and its backup are both unreadable: acting as if it were empty would
    silently forget what it holds."""


def write_atomic(path: Path, data: bytes, *, keep_backup: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring).

    With ``keep_backup`` the version replaced stays as ``NAME.bak``. Raises OSError (ENOSPC,
    EACCES...) with ``path`` unchanged and no temp file left."""
    _remove_stale_temps(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_backup and path.exists():
            bak_tmp = path.with_name(f"{tmp.name}.bak")
            os.link(path, bak_tmp)
            os.replace(bak_tmp, path.with_name(path.name + ".bak"))
            # rename(2) does nothing when both names are links to one file (a write that died
            # here left NAME.bak linked to NAME): the temp name stays, so remove it.
            bak_tmp.unlink(missing_ok=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        path.with_name(f"{tmp.name}.bak").unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, data: Any) -> None:
    """`write_atomic` of ``data`` as JSON. The version it replaces becomes ``NAME.bak`` if it
    is readable; if it is not, it is kept as ``NAME.corrupt`` (logged) and the backup stays."""
    try:
        _load(path)
        readable = True
    except FileNotFoundError:
        readable = True
    except (OSError, ValueError) as exc:
        readable = False
        corrupt = path.with_name(path.name + ".corrupt")
        log.error("%s is unreadable (%s): kept as %s, replaced by a new version", path, exc, corrupt.name)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, corrupt)
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), keep_backup=readable)


def read_json(path: Path, default: Any, valid: Callable[[Any], bool] = lambda value: True) -> Any:
    """The JSON value of ``path``, ``default`` if it was never written.

    A torn or invalid file (unparsable, or ``valid`` says no) is logged as an error naming
    it and ``NAME.bak`` is read instead; StateFileError if that is no better."""
    try:
        value = _load(path)
        if valid(value):
            _reported.pop(path, None)
            return value
        problem = "unexpected content"
    except FileNotFoundError:
        if not path.with_name(path.name + ".bak").exists():
            return default
        problem = "missing"
    except (OSError, ValueError) as exc:
        problem = str(exc)
    backup = path.with_name(path.name + ".bak")
    try:
        value = _load(backup)
        ok = valid(value)
    except (OSError, ValueError):
        ok = False
    if _first_report(path):
        if ok:
            log.error("%s is unreadable (%s): using the previous version, %s", path, problem, backup.name)
        else:
            log.error("%s is unreadable (%s) and so is its backup %s: fix or restore it; until then "
                      "nothing it records is dropped", path, problem, backup.name)
    if ok:
        return value
    raise StateFileError(f"{path} is unreadable ({problem}) and has no readable backup")


def _load(path: Path) -> Any:
    return json.loads(path.read_bytes())


def _first_report(path: Path) -> bool:
    try:
        st = path.stat()
        signature = (st.st_size, st.st_mtime_ns)
    except OSError:
        signature = (-1, -1)
    if _reported.get(path) == signature:
        return False
    _reported[path] = signature
    return True


def _remove_stale_temps(path: Path) -> None:
    """Temp files of writes a crash interrupted: ``NAME.tmp`` (blixfs before atomic writes) and
    ``NAME.tmp-<pid>-...`` of processes that are gone (a live one may be mid-write)."""
    prefix = path.name + ".tmp"
    for name in os.listdir(path.parent):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        if rest:
            pid = rest[1:].split("-", 1)[0]
            if not rest.startswith("-") or not pid.isdigit() or _alive(int(pid)):
                continue
        log.info("removing %s, left by an interrupted write", name)
        (path.parent / name).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

"""Mount lifecycle: stale-mount cleanup, pyfuse3 init, the trio main loop, clean unmount.

`run_mount` is what ``blixfs mount DIR`` runs in the foreground. One trio nursery
owns the FUSE session loop and the signal watcher; SIGINT/SIGTERM end the
session, every open file is committed durably, and the mount is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import logging
import math
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from blixfs.daemon import run_services
from blixfs.node import Node
from blixfs.vfs import Vfs
from mount.ops import BlixOperations

log = logging.getLogger(__name__)

FSNAME = "blixfs"
# DESIGN.md: read-ahead of 1-4 MiB served sequential reads best here; 16 MiB was worse.
READ_AHEAD_KB = 4096
# DESIGN.md: the default of 12 async requests in flight halved IOPS against a slow backend.
MAX_BACKGROUND = 64
INVALIDATE_BATCH = 1024  # kernel invalidations written per worker-thread hop, at most


class MountError(Exception):
    """A mount that cannot go ahead, with a message that says what to do."""


@dataclass(frozen=True)
class MountInfo:
    mount_point: str
    fstype: str
    device: str  # "major:minor"


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def find_mount(path: Path) -> MountInfo | None:
    """The mount whose mount point is exactly ``path``, from /proc/self/mountinfo."""
    want = os.path.realpath(path)
    found: MountInfo | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == want:
                found = MountInfo(want, fields[sep + 1], fields[2])  # the last one stacked wins
    return found


def unmount_command(path: Path) -> list[str]:
    return ["fusermount3", "-u", "-z", str(path)]


def prepare_mount_point(path: Path) -> None:
    """Check ``path`` can be mounted on; clean up a stale blixfs mount left by a killed daemon.

    Raises MountError when it is not a directory, is mounted by a live filesystem,
    or a stale mount cannot be removed (the message gives the command to run).
    """
    info = find_mount(path)
    if info is not None and info.fstype.startswith("fuse"):
        try:
            # statfs always reaches the filesystem: stat() may be answered from the
            # kernel's attribute cache even after the daemon died.
            os.statvfs(path)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise MountError(f"cannot use mount point {path}: {exc.strerror}") from None
            log.warning("%s is a stale mount left by a daemon that died (%s): unmounting it", path, info.fstype)
            result = subprocess.run(unmount_command(path), capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise MountError(f"stale mount at {path} could not be removed ({result.stderr.strip()}); "
                                 f"run: {' '.join(unmount_command(path))}") from None
        else:
            raise MountError(f"{path} is already mounted ({info.fstype}): is another blixfs running? "
                             f"unmount it with: {' '.join(unmount_command(path))}")
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise MountError(f"mount point {path} does not exist: create it with mkdir -p {path}") from None
        raise MountError(f"cannot use mount point {path}: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise MountError(f"mount point {path} is not a directory")


def tune_malloc() -> None:
    """DESIGN.md: large bytes objects per request made glibc mmap/munmap every time;
    raising the thresholds cut the daemon's CPU about 4x."""
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except OSError:
        log.debug("mallopt unavailable; keeping glibc defaults")


def tune_gc() -> None:
    """Leave what exists at start (modules, the node's state: ~50,000 objects) out of the
    cyclic garbage collector's full passes, which otherwise walk all of it on the event
    loop (47 ms measured for the imports' objects alone, on a loaded machine) whenever
    enough new objects have lived long, as they do through a sync: a pause every FUSE
    request in flight waits through. Objects made later are collected as usual. Frozen
    ones are still freed when their last reference goes; only a cycle among them would
    stay, and what exists at start lives as long as the process."""
    gc.collect()
    gc.freeze()


def tune_kernel_side(path: Path) -> None:
    """Set read-ahead and max_background for the mount (root only; best effort).

    Runs in a worker thread: stat() of the mount point is answered by our own loop.
    """
    connections = Path("/sys/fs/fuse/connections")
    if os.getuid() == 0 and connections.is_dir() and not os.path.ismount(connections):
        # fusectl carries max_background; it is often not mounted in containers.
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], capture_output=True, check=False)
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    settings = {
        Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"): READ_AHEAD_KB,
        Path(f"/sys/fs/fuse/connections/{minor}/max_background"): MAX_BACKGROUND,
        Path(f"/sys/fs/fuse/connections/{minor}/congestion_threshold"): MAX_BACKGROUND * 3 // 4,
    }
    for knob, value in settings.items():
        try:
            knob.write_text(f"{value}\n")
            log.debug("set %s = %s", knob, value)
        except OSError as exc:
            log.info("could not set %s to %s (%s); continuing with the default", knob, value, exc.strerror)


def notify_systemd(state: str) -> None:
    """sd_notify(3) without libsystemd: lets ``Type=notify`` units know the mount is up."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
    except OSError as exc:  # a supervisor that went away must never stop the daemon
        log.debug("sd_notify %s to %s failed: %s", state, addr, exc)


def mount_options(*, allow_other: bool) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks mode bits
    # noatime: reads never change an access time (Vfs.setattr keeps only explicitly set
    # ones); saying so lets the kernel skip atime updates and tools see it in mountinfo.
    opts |= {f"fsname={FSNAME}", f"subtype={FSNAME}", "noatime"}
    if os.getuid() == 0:
        # DESIGN.md: as root, auto_unmount removes the mount ~1 ms after the daemon dies,
        # so a kill -9 leaves no ENOTCONN behind.
        opts.add("auto_unmount")
    if allow_other:
        opts.add("allow_other")
    return opts


class KernelInvalidator:
    """Tells the kernel to drop cached entries and pages of paths a peer changed.

    `Vfs` calls it (synchronously, on the trio thread) through ``vfs.invalidator``; the
    notifications are written from a worker thread, because the kernel may need a lock
    that a request this thread is serving holds.
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple[int, str, int | None]](math.inf)

    def __call__(self, parent_ino: int, name: str, ino: int | None) -> None:
        self._send.send_nowait((parent_ino, name, ino))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for first in self._receive:
            # All that queued meanwhile goes in one worker-thread hop: a sync applying 100,000
            # entries queued as many, and a hop each kept the event loop (and FUSE) busy.
            batch = [first]
            while len(batch) < INVALIDATE_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await trio.to_thread.run_sync(self._invalidate_all, batch)

    @staticmethod
    def _invalidate_all(batch: list[tuple[int, str, int | None]]) -> None:
        for parent_ino, name, ino in batch:
            # ENOENT: the kernel had nothing cached for it. Nothing else is expected here.
            with contextlib.suppress(OSError):
                if name:
                    pyfuse3.invalidate_entry(pyfuse3.InodeT(parent_ino), name.encode("utf-8", "surrogateescape"))
            if ino is not None:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(pyfuse3.InodeT(ino))


async def _serve(node: Node, vfs: Vfs, path: Path, services: dict[str, Any]) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: unmounting %s", signal.Signals(signum).name, path)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        invalidator = KernelInvalidator()
        await nursery.start(invalidator.run)
        vfs.invalidator = invalidator
        await nursery.start(functools.partial(run_services, node, vfs=vfs, **services))
        nursery.start_soon(trio.to_thread.run_sync, tune_kernel_side, path)
        log.info("blixfs mounted at %s", path)
        notify_systemd("READY=1")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    await vfs.flush_all(durable=True)
    notify_systemd("STOPPING=1")


def run_mount(node: Node, vfs: Vfs, path: Path, *, direct_io: bool = False, allow_other: bool | None = None,
              **services: Any) -> None:
    """Mount ``vfs`` at ``path``, run the node's services (``services``: options of
    `blixfs.daemon.run_services`), and serve until SIGINT/SIGTERM or an external unmount.

    Raises MountError (with an actionable message) if the mount cannot be made.
    """
    prepare_mount_point(path)
    tune_malloc()
    ops = BlixOperations(vfs, direct_io=direct_io)
    if allow_other is None:
        allow_other = os.getuid() == 0  # qemu often runs as another user than the daemon
    try:
        pyfuse3.init(ops, str(path), mount_options(allow_other=allow_other))
    except RuntimeError as exc:
        raise MountError(f"cannot mount {path}: {exc}. Is /dev/fuse there and fuse3 installed "
                         f"(scripts/install.sh)? Non-root users need 'user_allow_other' in /etc/fuse.conf "
                         f"for allow_other.") from exc
    tune_gc()
    try:
        trio.run(_serve, node, vfs, path, services)
    finally:
        pyfuse3.close(unmount=True)
    log.info("unmounted %s", path)

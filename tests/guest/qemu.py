"""Build the test guest (scripts/build_guest.sh) and boot it under qemu (TCG) from any path.

Shared by tests/guest and scripts/bench_vm.py. A boot is judged by the guest's own
report on its serial console: ``BLIXFS-GUEST-OK <sha256 of what it wrote>`` or
``BLIXFS-GUEST-FAIL <reason>`` (see scripts/build_guest.sh), then its power-off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build_guest.sh"
QEMU = "qemu-system-x86_64"
OK_RE = re.compile(r"^BLIXFS-GUEST-OK ([0-9a-f]{64})\r?$", re.M)
FAIL_RE = re.compile(r"^BLIXFS-GUEST-FAIL (.*?)\r?$", re.M)


class GuestError(RuntimeError):
    """The guest could not be built or booted (the message says why, with the serial log)."""


@dataclass(frozen=True)
class Guest:
    """A built guest: the files scripts/build_guest.sh leaves in its cache directory."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.gz"

    @property
    def image(self) -> Path:
        """The pristine root image: copy it, never boot it (the guest writes to its disk)."""
        return self.dir / "root.qcow2"

    @property
    def cmdline(self) -> str:
        return (self.dir / "cmdline").read_text().strip()

    @property
    def seed_sha256(self) -> str:
        return (self.dir / "seed.sha256").read_text().strip()


def build_guest(timeout: float = 900) -> Guest:
    """Run scripts/build_guest.sh (instant once cached) and return the guest it built.

    Raises GuestError with the script's output if it fails or prints no directory.
    """
    try:
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout,
                                check=False)
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"build_guest.sh took more than {timeout:.0f} s") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise GuestError(f"build_guest.sh failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    guest = Guest(Path(lines[-1]))
    missing = [p for p in (guest.kernel, guest.initrd, guest.image) if not p.exists()]
    if missing:
        raise GuestError(f"build_guest.sh printed {guest.dir} but it lacks {missing}")
    return guest


def qemu_missing() -> str | None:
    """None if qemu-system-x86_64 is installed, else why the guest cannot boot here."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} missing: run scripts/install.sh"
    return None


@dataclass(frozen=True)
class BootResult:
    """How a boot ended. ``written`` is the guest's sha256 of what it wrote (OK only)."""

    ok: bool
    written: str | None
    failure: str | None
    marker_s: float | None  # qemu start -> marker line on the console
    exit_s: float  # qemu start -> qemu exited (or was killed at the deadline)
    returncode: int | None
    serial: str

    def explain(self) -> str:
        return (f"guest boot {'succeeded' if self.ok else 'FAILED'}: failure={self.failure!r} "
                f"qemu exit={self.returncode} after {self.exit_s:.1f} s\n--- serial console ---\n{self.serial}")


def qemu_command(guest: Guest, image: Path, serial_log: Path, *, cache: str | None = None,
                 snapshot: bool = False) -> list[str]:
    """The qemu command line: TCG, 256 MiB, no default devices, the disk read-write unless
    ``snapshot`` (qemu -snapshot: writes go to a temp overlay, the image is only read)."""
    drive = f"file={image},if=virtio,format=qcow2" + (f",cache={cache}" if cache else "")
    return [QEMU, "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{serial_log}", "-monitor", "none",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.cmdline,
            "-drive", drive, *(["-snapshot"] if snapshot else [])]


def boot(guest: Guest, image: Path, serial_log: Path, *, timeout: float = 300, cache: str | None = None,
         snapshot: bool = False) -> BootResult:
    """Boot ``guest`` with ``image`` as its root disk; return once qemu has exited.

    Polls the serial log for the marker (never sleeps on a guess); gives qemu ``timeout``
    seconds in all, then 60 s more after the marker to power off, and kills it at either
    deadline. qemu is always gone when this returns or raises.
    """
    serial_log.unlink(missing_ok=True)
    qemu_out = serial_log.with_suffix(".qemu.txt")
    cmd = qemu_command(guest, image, serial_log, cache=cache, snapshot=snapshot)
    logger.info("booting: %s", " ".join(cmd))
    marker_s: float | None = None
    text = ""
    with open(qemu_out, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = started + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if marker_s is None:
                    with contextlib.suppress(FileNotFoundError):
                        text = serial_log.read_text(errors="replace")
                    if OK_RE.search(text) or FAIL_RE.search(text):
                        marker_s = time.monotonic() - started
                        # Power-off follows the marker at once; give it time, not forever.
                        deadline = time.monotonic() + 60
                time.sleep(0.02)
            if proc.poll() is None:
                logger.warning("qemu still running at its deadline: killing it")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        exit_s = time.monotonic() - started
    with contextlib.suppress(FileNotFoundError):
        text = serial_log.read_text(errors="replace")
    ok = OK_RE.search(text)
    fail = FAIL_RE.search(text)
    if marker_s is None and (ok or fail):
        marker_s = exit_s  # the marker arrived between the last poll and the exit
    failure = fail.group(1) if fail else None
    if not ok and failure is None:
        failure = f"no marker (qemu exit {proc.returncode}): {qemu_out.read_text(errors='replace').strip()[-2000:]}"
    return BootResult(ok=bool(ok) and fail is None, written=ok.group(1) if ok else None, failure=failure,
                      marker_s=marker_s, exit_s=exit_s, returncode=proc.returncode, serial=text)


def written_in_image(image: Path, workdir: Path) -> str:
    """The sha256 of /data/written inside ``image`` (a qcow2), read by qemu-img and debugfs.

    Independent of the guest: proves that what the guest reported writing reached the image.
    """
    raw = workdir / "written-check.raw"
    out = workdir / "written-check.bin"
    try:
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True,
                       capture_output=True, timeout=300)
        subprocess.run(["debugfs", "-R", f"dump /data/written {out}", str(raw)], check=True,
                       capture_output=True, timeout=60)
        if not out.exists():
            raise GuestError("debugfs found no /data/written in the image")
        return hashlib.sha256(out.read_bytes()).hexdigest()
    finally:
        raw.unlink(missing_ok=True)
        out.unlink(missing_ok=True)

"""Chunking-scheme benchmark for blixfs: fixed-size chunks vs content-defined (FastCDC).

What it measures, on VM-image-like data built locally (no network):

* images: ``v1.raw`` = ``mkfs.ext4 -d`` of a directory of real files copied from /usr
  (python stdlib, binaries, shared libraries, /usr/share); a "package upgrade" of that
  directory (files removed, patched, rebuilt, added) applied two ways:
  ``v2-rebuild.raw`` (a fresh ``mkfs.ext4 -d`` of the upgraded directory, as an image
  build pipeline would produce) and ``v2-inplace.raw`` (v1.raw upgraded in place with
  ``debugfs``, dpkg-style write-new/rename, as a running guest would leave it); and the
  qcow2 form of all three (``qemu-img convert``; the in-place one is a copy of v1.qcow2
  rewritten with ``qemu-img convert -n``, so unchanged clusters keep their host offsets).
* schemes: fixed 64 KiB / 256 KiB / 1 MiB, FastCDC with average 64 KiB and 256 KiB
  (min = avg/4, max = avg*8, PyPI package ``fastcdc``), plus fixed 4 KiB as a
  block-granularity reference (not a candidate).
* per scheme: chunking + zero check + BLAKE3-256 speed (MB/s, from memory, one thread),
  chunk count, all-zero chunks (holes, never stored), stored bytes after dedup for v1,
  bytes v2 adds on top of v1, manifest size, and in-place-overwrite stability: 4 KiB of
  random data written at 100 random 4 KiB-aligned offsets of v1.raw, one at a time,
  counting the manifest entries that change and the bytes that must be stored/sent.

Tables are printed as Markdown, ready to paste into docs/chunking.md.

Run::

    .venv/bin/python scripts/chunking_eval.py [--workdir DIR] [--quick] [--keep]

Needs mkfs.ext4 and debugfs (e2fsprogs); qemu-img is optional (qcow2 rows are skipped
without it); fastcdc is optional (CDC rows are skipped without it). Full run: ~320 MB of
files in 512 MiB images, a couple of minutes on 2 cores; ``--quick``: ~40 MB / 96 MiB.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3

CdcFunc = Callable[..., Iterator[object]]

try:  # the compiled Cython path; the package falls back to pure Python without it
    from fastcdc.fastcdc_cy import fastcdc_cy as _cdc_impl

    CDC_FUNC: CdcFunc | None = _cdc_impl
    CDC_IMPL = "fastcdc (compiled Cython fast path, fastcdc.fastcdc_cy)"
except ImportError:
    try:
        from fastcdc.fastcdc_py import fastcdc_py as _cdc_py

        CDC_FUNC = _cdc_py
        CDC_IMPL = "fastcdc (PURE PYTHON fallback: CDC speeds are not representative)"
    except ImportError:
        CDC_FUNC = None
        CDC_IMPL = "fastcdc not importable: CDC rows skipped (.venv/bin/pip install fastcdc)"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BLOCK = 4 * KiB  # ext4 block size and the guest write size in the overwrite test
ENTRY_BYTES = 4 + 32  # manifest entry: (u32 length, 32-byte BLAKE3 id)
SEED = 20240601
FIXED_UUID = "b1b1f5f5-0000-4000-8000-000000000001"

# (root, share of the byte budget); files are taken in sorted walk order.
SOURCE_ROOTS: list[tuple[str, float]] = [
    ("/usr/lib/python3.11", 0.15),
    ("/usr/bin", 0.30),
    ("/usr/lib/x86_64-linux-gnu", 0.35),
    ("/usr/share", 0.20),
]
SAFE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-@")
MAX_FILE = 24 * MiB  # keep a single huge library from dominating the image
TEXT_SUFFIXES = (".py", ".txt", ".html", ".xml", ".css", ".js", ".json", ".pl", ".sh", ".conf")


# ----------------------------------------------------------------------------- schemes


@dataclass(frozen=True)
class Scheme:
    name: str
    kind: str  # "fixed" or "cdc"
    size: int  # chunk size (fixed) or average size (cdc)
    reference: bool = False

    @property
    def max_size(self) -> int:
        return self.size if self.kind == "fixed" else self.size * 8


SCHEMES: list[Scheme] = [
    Scheme("fixed 4K (ref)", "fixed", 4 * KiB, reference=True),
    Scheme("fixed 64K", "fixed", 64 * KiB),
    Scheme("fixed 256K", "fixed", 256 * KiB),
    Scheme("fixed 1M", "fixed", 1 * MiB),
    Scheme("FastCDC avg 64K", "cdc", 64 * KiB),
    Scheme("FastCDC avg 256K", "cdc", 256 * KiB),
]
BASELINE = "fixed 256K"


@dataclass
class Manifest:
    """Chunk list of one image: lengths and ids (None = all-zero chunk, a hole)."""

    lengths: list[int]
    ids: list[bytes | None]
    seconds: float
    starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        pos = 0
        self.starts = []
        for n in self.lengths:
            self.starts.append(pos)
            pos += n

    def holes(self) -> tuple[int, int]:
        count = sum(1 for i in self.ids if i is None)
        size = sum(n for n, i in zip(self.lengths, self.ids, strict=True) if i is None)
        return count, size

    def unique(self) -> dict[bytes, int]:
        return {i: n for n, i in zip(self.lengths, self.ids, strict=True) if i is not None}


def boundaries(scheme: Scheme, data: bytes) -> list[int]:
    """Chunk lengths for data under scheme (no hashing)."""
    if scheme.kind == "fixed":
        full, rest = divmod(len(data), scheme.size)
        return [scheme.size] * full + ([rest] if rest else [])
    assert CDC_FUNC is not None
    avg = scheme.size
    return [c.length for c in CDC_FUNC(data, avg // 4, avg, avg * 8)]  # type: ignore[attr-defined]


def hash_chunks(data: bytes, start: int, lengths: list[int]) -> list[bytes | None]:
    """BLAKE3-256 id of each chunk, None for an all-zero one."""
    zeros = bytes(max(lengths, default=0))
    ids: list[bytes | None] = []
    pos = start
    for n in lengths:
        chunk = data[pos : pos + n]
        ids.append(None if chunk == zeros[:n] else blake3.blake3(chunk).digest())
        pos += n
    return ids


def chunk_image(scheme: Scheme, data: bytes) -> Manifest:
    t0 = time.perf_counter()
    lengths = boundaries(scheme, data)
    ids = hash_chunks(data, 0, lengths)
    return Manifest(lengths, ids, time.perf_counter() - t0)


# -------------------------------------------------------------------- overwrite test


@dataclass
class OverwriteEffect:
    changed_entries: int  # manifest entries of the new version not in the old at that place
    changed_data: int  # of those, entries that are data (not holes)
    new_bytes: int  # bytes of those data entries: what must be stored and sent


def overwrite_effect(scheme: Scheme, data: bytes, man: Manifest, off: int, patch: bytes) -> OverwriteEffect:
    """Re-chunk only the region an overwrite can affect, and diff it against man.

    Fixed: the chunks overlapping the write. CDC: a chunk's boundary depends only on
    bytes from its own start (the rolling hash restarts at every boundary), so the
    boundaries before the chunk holding `off` stay; re-chunk from that chunk's start
    until a new boundary past the write coincides with an old one (resynchronised).
    """
    end = off + len(patch)
    first = bisect.bisect_right(man.starts, off) - 1
    region_start = man.starts[first]
    old_bounds = {s + n for s, n in zip(man.starts, man.lengths, strict=True)}
    window = 16 * scheme.max_size
    while True:
        region_end = min(len(data), end + window)
        buf = bytearray(data[region_start:region_end])
        buf[off - region_start : end - region_start] = patch
        region = bytes(buf)
        if scheme.kind == "fixed":
            last = bisect.bisect_left(man.starts, end)  # first chunk starting at/after end
            lengths = man.lengths[first:last]
            resync = region_start + sum(lengths)
            break
        lengths = []
        pos = region_start
        resync = -1
        for n in boundaries(scheme, region):
            lengths.append(n)
            pos += n
            if pos >= end and pos in old_bounds and (pos < region_end or pos == len(data)):
                resync = pos
                break
        if resync >= 0:
            break
        window *= 2  # no resync inside the window: widen it and retry
    new_ids = hash_chunks(region, 0, lengths)
    old: set[tuple[int, int, bytes | None]] = set()
    i = first
    while i < len(man.starts) and man.starts[i] < resync:
        old.add((man.starts[i], man.lengths[i], man.ids[i]))
        i += 1
    entries = []
    pos = region_start
    for n, cid in zip(lengths, new_ids, strict=True):
        entries.append((pos, n, cid))
        pos += n
    return diff_entries(old, entries)


def diff_entries(old: set[tuple[int, int, bytes | None]], new: list[tuple[int, int, bytes | None]]) -> OverwriteEffect:
    fresh = [e for e in new if e not in old]
    data = [e for e in fresh if e[2] is not None]
    return OverwriteEffect(len(fresh), len(data), sum(e[1] for e in data))


def full_rechunk_effect(scheme: Scheme, data: bytes, man: Manifest, off: int, patch: bytes) -> OverwriteEffect:
    """The same diff by re-chunking the whole patched image (slow; used to validate)."""
    patched = data[:off] + patch + data[off + len(patch) :]
    new = chunk_image(scheme, patched)
    old = set(zip(man.starts, man.lengths, man.ids, strict=True))
    return diff_entries(old, list(zip(new.starts, new.lengths, new.ids, strict=True)))


# ------------------------------------------------------------------------ image build


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def safe_name(p: Path) -> bool:
    return all(c in SAFE_CHARS for c in p.name)


def walk_files(root: Path) -> Iterator[Path]:
    """Regular files under root, sorted, with names safe to script into debugfs."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if safe_name(Path(d)))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if safe_name(p) and p.is_file() and not p.is_symlink():
                yield p


@dataclass
class SourceTree:
    files: list[str]  # relative paths in v1
    extra: list[Path]  # real files not taken: candidates for "new package" files
    total: int


def copy_sources(dest: Path, budget: int) -> SourceTree:
    files: list[str] = []
    extra: list[Path] = []
    total = 0
    for root, share in SOURCE_ROOTS:
        if not Path(root).is_dir():
            continue
        root_budget = int(budget * share)
        used = 0
        for src in walk_files(Path(root)):
            try:
                size = src.stat().st_size
            except OSError:
                continue
            if size > MAX_FILE:
                continue
            if used + size > root_budget:
                if len(extra) < 20000:
                    extra.append(src)
                continue
            rel = str(src.relative_to("/"))
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, target)
            except OSError:
                continue
            os.chmod(target, 0o644)
            files.append(rel)
            used += size
        total += used
    return SourceTree(files, extra, total)


@dataclass
class Upgrade:
    removed: list[str]
    modified: list[str]
    added: list[str]
    changed_bytes: int  # bytes of modified + added files in v2


def mutate_binary(data: bytes, rng: random.Random) -> bytes:
    """A 'rebuilt' binary: ~30% of 4 KiB pieces replaced by random runs of other lengths,
    so the unchanged parts survive but shift by amounts that are not block multiples."""
    out = bytearray()
    for pos in range(0, len(data), BLOCK):
        piece = data[pos : pos + BLOCK]
        if rng.random() < 0.3:
            out += rng.randbytes(max(1, len(piece) + rng.randint(-300, 300)))
        else:
            out += piece
    return bytes(out)


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    """A patched text file: a few lines inserted or deleted at random places."""
    lines = data.split(b"\n")
    for _ in range(rng.randint(1, 5)):
        i = rng.randrange(len(lines))
        if rng.random() < 0.5 and len(lines) > 1:
            del lines[i]
        else:
            lines.insert(i, b"# upgraded %d" % rng.randrange(10**9))
    return b"\n".join(lines)


def make_upgrade(v1: Path, v2: Path, tree: SourceTree, rng: random.Random) -> Upgrade:
    """v2 = copy of v1 with 2% of files removed, 6% modified, and new files added
    (real files not in v1) worth ~3% of v1's file count."""
    shutil.copytree(v1, v2)
    files = list(tree.files)
    rng.shuffle(files)
    n = len(files)
    removed = sorted(files[: n * 2 // 100])
    modified = sorted(files[n * 2 // 100 : n * 8 // 100])
    changed = 0
    for rel in removed:
        (v2 / rel).unlink()
    for rel in modified:
        p = v2 / rel
        data = p.read_bytes()
        if not data:
            data = b"\n"
        new = mutate_text(data, rng) if rel.endswith(TEXT_SUFFIXES) else mutate_binary(data, rng)
        p.write_bytes(new)
        changed += len(new)
    added: list[str] = []
    for src in rng.sample(tree.extra, min(len(tree.extra), n * 3 // 100)):
        rel = str(src.relative_to("/"))
        target = v2 / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, target)
        except OSError:
            continue
        os.chmod(target, 0o644)
        added.append(rel)
        changed += target.stat().st_size
    return Upgrade(removed, modified, sorted(added), changed)


def mkfs(src: Path, img: Path, size: int) -> None:
    """A raw ext4 image of src, 4 KiB blocks, reproducible ids (no mount needed)."""
    run(
        [
            "mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-T", "default",
            "-U", FIXED_UUID, "-E", f"hash_seed={FIXED_UUID}", "-d", str(src),
            str(img), f"{size // KiB}K",
        ],
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )  # fmt: skip


def upgrade_in_place(img: Path, v2: Path, up: Upgrade) -> None:
    """Apply the upgrade to a copy of v1's image with debugfs, like dpkg would: write
    the new file next to the old, then rename over it (old blocks freed afterwards)."""
    cmds: list[str] = []
    made: set[str] = set()

    def ensure_dir(d: str) -> None:
        parts = d.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            if sub not in made:
                cmds.append(f"mkdir {sub}")  # harmless error if it exists
                made.add(sub)

    for rel in up.removed:
        cmds.append(f"rm /{rel}")
    for rel in up.modified:
        d, name = os.path.split("/" + rel)
        cmds += [
            f"cd {d}", f"write {v2 / rel} {name}.dpkg-new", f"rm {name}",
            f"ln {name}.dpkg-new {name}", f"unlink {name}.dpkg-new",
        ]  # fmt: skip
    for rel in up.added:
        d, name = os.path.split("/" + rel)
        ensure_dir(d)
        cmds += [f"cd {d}", f"write {v2 / rel} {name}"]
    script = img.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    run(["debugfs", "-w", "-f", str(script), str(img)])
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    if fsck.returncode != 0:
        print(f"warning: e2fsck reports problems on {img.name}:\n{fsck.stdout[-2000:]}")


@dataclass
class Images:
    paths: dict[str, Path]
    notes: list[str]


def build_images(work: Path, quick: bool) -> Images:
    budget = 40 * MiB if quick else 320 * MiB
    img_size = 96 * MiB if quick else 512 * MiB
    rng = random.Random(SEED)
    notes: list[str] = []
    t0 = time.perf_counter()
    tree = copy_sources(work / "v1", budget)
    notes.append(f"v1 dir: {len(tree.files)} files, {tree.total / MiB:.0f} MiB from /usr")
    up = make_upgrade(work / "v1", work / "v2", tree, rng)
    notes.append(
        f"upgrade: {len(up.removed)} removed, {len(up.modified)} modified, {len(up.added)} "
        f"added; {up.changed_bytes / MiB:.1f} MiB of new/changed file content"
    )
    paths = {"v1.raw": work / "v1.raw", "v2-rebuild.raw": work / "v2-rebuild.raw"}
    mkfs(work / "v1", paths["v1.raw"], img_size)
    mkfs(work / "v2", paths["v2-rebuild.raw"], img_size)
    paths["v2-inplace.raw"] = work / "v2-inplace.raw"
    shutil.copyfile(paths["v1.raw"], paths["v2-inplace.raw"])
    upgrade_in_place(paths["v2-inplace.raw"], work / "v2", up)
    if shutil.which("qemu-img"):
        for name in ("v1", "v2-rebuild"):
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                 str(work / f"{name}.raw"), str(work / f"{name}.qcow2")])  # fmt: skip
        shutil.copyfile(work / "v1.qcow2", work / "v2-inplace.qcow2")
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2",
             str(work / "v2-inplace.raw"), str(work / "v2-inplace.qcow2")])  # fmt: skip
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
             str(work / "v2-inplace.raw"), str(work / "v2-inplace.qcow2")])  # fmt: skip
        for name in ("v1", "v2-rebuild", "v2-inplace"):
            paths[f"{name}.qcow2"] = work / f"{name}.qcow2"
    else:
        notes.append("qemu-img not found: qcow2 rows skipped (scripts/install.sh installs it)")
    for p in (work / "v1", work / "v2"):
        shutil.rmtree(p)
    notes.append(f"images built in {time.perf_counter() - t0:.0f} s")
    return Images(paths, notes)


# --------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt.format(*header), sep, *(fmt.format(*r) for r in rows)])


def nonzero_blocks(data: bytes) -> int:
    zero = bytes(BLOCK)
    return sum(1 for p in range(0, len(data), BLOCK) if data[p : p + BLOCK] != zero)


Manifests = dict[tuple[str, str], Manifest]


def report_images(sizes: dict[str, tuple[int, int]]) -> None:
    print("\n## Images\n")
    print(table(
        ["image", "file size MiB", "non-zero 4K blocks MiB"],
        [[k, mib(v[0]), mib(v[1])] for k, v in sizes.items()],
    ))  # fmt: skip


def report_schemes(schemes: list[Scheme], manifests: Manifests, sizes: dict[str, tuple[int, int]]) -> None:
    print("\n## Per scheme, v1 (speed = chunk + zero check + BLAKE3, in memory, 1 thread)\n")
    rows = []
    for s in schemes:
        m = manifests[(s.name, "v1.raw")]
        hole_n, hole_b = m.holes()
        raw_size = sizes["v1.raw"][0]
        q = manifests.get((s.name, "v1.qcow2"))
        speed_q = f"{sizes['v1.qcow2'][0] / q.seconds / 1e6:.0f}" if q else "-"
        per_10g = 10 * GiB / (raw_size / len(m.lengths)) * ENTRY_BYTES
        rows.append([
            s.name, f"{raw_size / m.seconds / 1e6:.0f}", speed_q, str(len(m.lengths)),
            f"{(raw_size - hole_b) / max(1, len(m.ids) - hole_n) / KiB:.0f} K",
            f"{hole_n} / {mib(hole_b)}", mib(sum(m.unique().values())),
            f"{len(m.lengths) * ENTRY_BYTES / KiB:.0f} K", f"{per_10g / MiB:.2f} M",
        ])  # fmt: skip
    print(table(
        ["scheme", "MB/s raw", "MB/s qcow2", "chunks", "mean data chunk", "holes n / MiB",
         "v1 stored MiB", "manifest v1", "manifest 10 GiB"],
        rows,
    ))  # fmt: skip


def added_bytes(base: Manifest, other: Manifest) -> int:
    known = base.unique()
    return sum(n for i, n in other.unique().items() if i not in known)


def report_versions(schemes: list[Scheme], manifests: Manifests, images: Images) -> None:
    print("\n## What v2 adds on top of v1 (MiB stored after dedup; x = vs fixed 256K)\n")
    formats = [f for f in ("raw", "qcow2") if f"v1.{f}" in images.paths]
    header = ["scheme"]
    for fmt in formats:
        header += [f"v1.{fmt} stored", f"+rebuild {fmt}", f"+inplace {fmt}"]
    added = {
        (s.name, kind, fmt): added_bytes(manifests[(s.name, f"v1.{fmt}")], manifests[(s.name, f"v2-{kind}.{fmt}")])
        for s in schemes
        for fmt in formats
        for kind in ("rebuild", "inplace")
    }
    rows = []
    for s in schemes:
        row = [s.name]
        for fmt in formats:
            row.append(mib(sum(manifests[(s.name, f"v1.{fmt}")].unique().values())))
            for kind in ("rebuild", "inplace"):
                a = added[(s.name, kind, fmt)]
                b = added.get((BASELINE, kind, fmt), 0)
                row.append(f"{mib(a)} ({a / b:.2f}x)" if b else mib(a))
        rows.append(row)
    print(table(header, rows))

    # Hybrid: cut v1 with CDC at import, then keep its boundaries for the in-place v2
    # (what a writable mount would do if it never re-chunked).
    cdc = [s for s in schemes if s.kind == "cdc"]
    if not cdc:
        return
    print("\n## Hybrid: CDC boundaries cut on v1, then frozen for in-place v2 (MiB added)\n")
    rows = []
    for s in cdc:
        row = [f"{s.name}, frozen"]
        for fmt in formats:
            base = manifests[(s.name, f"v1.{fmt}")]
            v2 = images.paths[f"v2-inplace.{fmt}"].read_bytes()
            frozen = Manifest(base.lengths, hash_chunks(v2, 0, base.lengths), 0.0)
            del v2
            a = added_bytes(base, frozen)
            b = added[(BASELINE, "inplace", fmt)]
            row.append(f"{mib(a)} ({a / b:.2f}x)")
        rows.append(row)
    print(table(["scheme", *(f"+inplace {fmt}" for fmt in formats)], rows))


def report_overwrites(schemes: list[Scheme], manifests: Manifests, path: Path, quick: bool) -> None:
    n_writes = 100
    print(f"\n## In-place overwrite: 4 KiB random data at {n_writes} random 4K-aligned "
          "offsets of v1.raw, one at a time\n")  # fmt: skip
    data = path.read_bytes()
    rng = random.Random(SEED + 1)
    writes = [(rng.randrange(len(data) // BLOCK) * BLOCK, rng.randbytes(BLOCK)) for _ in range(n_writes)]
    rows = []
    checked = 0
    for s in schemes:
        m = manifests[(s.name, "v1.raw")]
        effects = [overwrite_effect(s, data, m, off, patch) for off, patch in writes]
        for off, patch in writes[: 1 if quick else 3]:  # cross-check the local re-chunk
            full = full_rechunk_effect(s, data, m, off, patch)
            if full != overwrite_effect(s, data, m, off, patch):
                print(f"MISMATCH {s.name} @ {off}: local re-chunk disagrees with full: {full}")
            checked += 1
        frozen = []  # bytes to store if the chunk boundaries were never moved
        for off, _ in writes:
            first = bisect.bisect_right(m.starts, off) - 1
            last = bisect.bisect_left(m.starts, off + BLOCK)
            frozen.append(sum(m.lengths[first:last]))
        n = len(effects)
        changed = [e.changed_entries for e in effects]
        data_changed = [e.changed_data for e in effects]
        nb = [e.new_bytes for e in effects]
        rows.append([
            s.name, f"{sum(changed) / n:.2f}", str(max(changed)),
            f"{sum(data_changed) / n:.2f}", str(max(data_changed)),
            f"{100 * changed.count(1) / n:.0f}%",
            f"{sum(nb) / n / KiB:.0f} K ({sum(nb) / n / BLOCK:.0f}x)",
            f"{sum(frozen) / n / KiB:.0f} K",
        ])  # fmt: skip
    print(table(
        ["scheme", "entries changed mean", "max", "data entries changed mean", "max",
         "exactly 1 entry", "new bytes per 4K write (ampl.)", "same, boundaries frozen"],
        rows,
    ))  # fmt: skip
    print(f"\n(local re-chunk cross-checked against a full re-chunk of the image: {checked} cases)")


def report_chunk_io(work: Path, sizes: list[int]) -> None:
    """Per-chunk cost of a file-per-chunk cache read + BLAKE3 verify (page cache hot)."""
    print("\n## Cache read path: open + read + BLAKE3 verify of one chunk file (page cache hot)\n")
    total = 64 * MiB
    rows = []
    rng = random.Random(SEED + 2)
    for size in sizes:
        d = work / f"cache{size}"
        d.mkdir()
        ids = []
        for _ in range(total // size):
            body = rng.randbytes(size)
            cid = blake3.blake3(body).digest()
            (d / cid.hex()).write_bytes(body)
            ids.append(cid)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for cid in ids:
                with open(d / cid.hex(), "rb") as f:
                    body = f.read()
                if blake3.blake3(body).digest() != cid:
                    raise RuntimeError("corrupt chunk")
            best = min(best, time.perf_counter() - t0)
        shutil.rmtree(d)
        rows.append([
            f"{size // KiB} K", f"{best / len(ids) * 1e6:.0f}", f"{total / best / 1e6:.0f}",
            f"{len(ids) / best:.0f}",
        ])  # fmt: skip
    print(table(["chunk", "us per chunk", "MB/s", "chunks/s"], rows))


def evaluate(images: Images, work: Path, quick: bool) -> None:
    schemes = [s for s in SCHEMES if s.kind == "fixed" or CDC_FUNC is not None]
    manifests: Manifests = {}
    sizes: dict[str, tuple[int, int]] = {}
    for img, path in images.paths.items():
        data = path.read_bytes()
        sizes[img] = (len(data), nonzero_blocks(data) * BLOCK)
        for s in schemes:
            manifests[(s.name, img)] = chunk_image(s, data)
        del data
    report_images(sizes)
    report_schemes(schemes, manifests, sizes)
    report_versions(schemes, manifests, images)
    report_overwrites(schemes, manifests, images.paths["v1.raw"], quick)
    report_chunk_io(work, [s.size for s in SCHEMES if s.kind == "fixed" and not s.reference])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="parent of the temp dir (default: /tmp)")
    ap.add_argument("--quick", action="store_true", help="~40 MB of files, 96 MiB images")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (prints it)")
    args = ap.parse_args()

    for tool in ("mkfs.ext4", "debugfs", "e2fsck"):
        if not shutil.which(tool):
            print(f"{tool} not found: apt-get install -y e2fsprogs", file=sys.stderr)
            return 2
    print(f"# chunking_eval  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, blake3 {blake3.__version__}")  # fmt: skip
    print(f"CDC: {CDC_IMPL}")
    qemu = shutil.which("qemu-img")
    print(f"qemu-img: {run([qemu, '--version']).stdout.splitlines()[0] if qemu else 'absent'}")

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="chunking_eval.", dir=args.workdir))
    t0 = time.perf_counter()
    try:
        images = build_images(work, args.quick)
        for note in images.notes:
            print(note)
        evaluate(images, work, args.quick)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

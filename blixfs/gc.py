"""Garbage collection: free chunks no live version references, after a grace period.

What is live: every current entry's manifest root, pages and chunks, and every kept
sibling's (conflict versions hold data someone may still want), plus what the caller adds
(the chunks of files open with uncommitted changes, and the versions they were opened
at). A chunk is collected only when nothing live references it *and* it was last used
before the grace period: a version that arrives from a peer, or a commit in progress,
references chunks this node stored a moment earlier.

Safety first: chunks are referenced through manifests, so a live file whose manifest root
or one of whose pages is not held here makes every other chunk unprovable. Then `collect` frees nothing and
says which files; the daemon fetches those manifests first (`blixfs gc` asks it).

Callers: `blixfs gc` (offline, or through the daemon), the daemon's periodic sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from blixfs import metrics
from blixfs.chunkstore import DiskChunkStore
from blixfs.content import read_manifest
from blixfs.entry import Entry
from blixfs.hashing import ChunkId, short
from blixfs.manifest import ManifestError, MissingPage, iter_tree
from blixfs.namespace import NamespaceStore

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 3600.0


@dataclass
class GcReport:
    freed_chunks: int = 0
    freed_bytes: int = 0
    kept_recent: int = 0  # unreferenced, but used within the grace period
    live_chunks: int = 0
    missing_manifests: list[str] = field(default_factory=list)  # live files whose manifest is not held
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def live_versions(namespace: NamespaceStore) -> list[Entry]:
    """Every version whose content is reachable: current entries and kept siblings."""
    # entries_since({}) is everything held: current entries and kept siblings alike.
    return [e for e in namespace.entries_since({}) if not e.deleted and e.manifest is not None]


def live_chunks(namespace: NamespaceStore, chunks: DiskChunkStore,
                also_versions: Iterable[bytes] = ()) -> tuple[set[ChunkId], list[str]]:
    """Ids referenced by live versions (roots, pages, chunks; streamed page by page), and the
    paths whose root or a page is not held here (or is invalid)."""
    live: set[ChunkId] = set()
    missing: list[str] = []
    versions = [(e.path, e.manifest) for e in live_versions(namespace) if e.manifest is not None]
    versions += [(f"(open file, version {short(mid)})", mid) for mid in also_versions]
    for path, mid in versions:
        live.add(ChunkId(mid))
        m = read_manifest(chunks, mid)
        if m is None:
            missing.append(path)
            continue
        try:
            live.update(cid for _, _, cid in iter_tree(m, chunks.get))
        except (MissingPage, ManifestError) as exc:
            missing.append(f"{path} ({exc})")
    return live, missing


def collect(namespace: NamespaceStore, chunks: DiskChunkStore, *, grace_seconds: float = DEFAULT_GRACE_SECONDS,
            also_live: Iterable[ChunkId] = (), also_versions: Iterable[bytes] = (),
            dry_run: bool = False) -> GcReport:
    """Free (or with ``dry_run`` only count) unreferenced chunks older than the grace period.
    ``also_live``: more ids to keep; ``also_versions``: more versions (roots) to keep whole."""
    report = GcReport(dry_run=dry_run)
    live, report.missing_manifests = live_chunks(namespace, chunks, also_versions)
    live.update(also_live)
    report.live_chunks = len(live)
    if report.missing_manifests:
        log.warning("gc freed nothing: %d live files' manifests are not held here (%s...)",
                    len(report.missing_manifests), report.missing_manifests[0])
        return report
    now = time.time_ns()
    cutoff = now - int(grace_seconds * 1e9)
    doomed: list[ChunkId] = []
    for cid, size, atime in chunks.index_rows(now):
        if cid in live:
            continue
        if atime > cutoff:
            report.kept_recent += 1
            continue
        doomed.append(cid)
        report.freed_chunks += 1
        report.freed_bytes += size
    if not dry_run:
        chunks.delete_many(doomed)  # one notice to the holdings: this node no longer holds them
        gone = [m for m in chunks.written_versions() if m not in live]
        chunks.set_written_versions(forget=gone)  # versions written here that nothing references
    if report.freed_chunks and not dry_run:
        metrics.gc_freed_chunks.inc(report.freed_chunks)
        metrics.gc_freed_bytes.inc(report.freed_bytes)
        log.info("gc freed %d chunks (%d bytes)", report.freed_chunks, report.freed_bytes)
    return report

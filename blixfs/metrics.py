"""Process-wide metrics (prometheus-client), one definition per metric.

The daemon can expose them with ``blixfs mount --metrics-port``; tests read them
through `counter_value`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

chunks_corrupt = Counter(
    "blixfs_chunks_corrupt_total", "Stored chunks whose checksum failed on read (treated as missing)"
)
chunks_stored = Counter("blixfs_chunks_stored_total", "Chunks written to the local chunk store")
chunk_bytes_stored = Counter("blixfs_chunk_bytes_stored_total", "Bytes written to the local chunk store")
chunks_evicted = Counter("blixfs_chunks_evicted_total", "Fetched chunks evicted from the cache (LRU, over budget)")
chunk_reads = Counter("blixfs_chunk_reads_total", "Chunks read from the local chunk store")
commits = Counter("blixfs_commits_total", "File versions committed to the namespace")
fuse_errors = Counter("blixfs_fuse_unexpected_errors_total", "Unexpected exceptions in FUSE handlers (answered EIO)")
open_files = Gauge("blixfs_open_files", "Files with at least one open handle")
dirty_bytes = Gauge("blixfs_dirty_bytes", "Written bytes held in memory, not yet in the chunk store")


def counter_value(counter: Counter) -> float:
    """The current value of an unlabelled counter (for tests and `status`)."""
    return float(counter._value.get())
journal_syncs = Counter("blixfs_journal_syncs_total", "fsyncs made durable through the journal (no version published)")

"""KernelInvalidator: peers' changes reach the kernel in batches, one worker-thread hop each."""

from __future__ import annotations

import pytest
import trio

from mount import runner


async def test_queued_invalidations_go_in_batches_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    entries: list[tuple[int, bytes]] = []
    inodes: list[int] = []
    hops: list[int] = []
    monkeypatch.setattr(runner.pyfuse3, "invalidate_entry", lambda parent, name: entries.append((parent, name)))
    monkeypatch.setattr(runner.pyfuse3, "invalidate_inode", inodes.append)
    real = runner.KernelInvalidator._invalidate_all
    n = 3 * runner.INVALIDATE_BATCH + 5
    done = trio.Event()

    def counted(batch: list[tuple[int, str, int | None]]) -> None:  # in the worker thread
        hops.append(len(batch))
        real(batch)
        if len(entries) == n:
            trio.from_thread.run_sync(done.set)

    monkeypatch.setattr(runner.KernelInvalidator, "_invalidate_all", staticmethod(counted))
    invalidator = runner.KernelInvalidator()
    for i in range(n):  # a sync's burst: all queued before the task runs
        invalidator(1, f"f{i}", i + 2 if i % 2 else None)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        with trio.fail_after(30):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert entries == [(1, f"f{i}".encode()) for i in range(n)]
    assert inodes == [i + 2 for i in range(n) if i % 2]
    assert sum(hops) == n and len(hops) <= 4 and max(hops) <= runner.INVALIDATE_BATCH

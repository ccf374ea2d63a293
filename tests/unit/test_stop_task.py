"""Background tasks stop even when a cancellation is lost once
(storage/tasks.py): Python 3.11's ``asyncio.wait_for``, inside the
database drivers, can return a result that came with the cancellation
and drop it (CPython gh-86296). The merge below does what that race
does: it swallows the cancellation and returns a result."""

from __future__ import annotations

import asyncio
import random

import pytest

from storage.sql import fts
from storage.tasks import stop_task


async def _merge_losing_one_cancel(state: dict[str, int]) -> int:
    """A merge that, asked to stop, swallows the first cancellation and
    returns a result anyway (the driver's race), then behaves."""
    state["started"] = state.get("started", 0) + 1
    try:
        await asyncio.sleep(random.uniform(0.01, 0.05))
    except asyncio.CancelledError:
        state["lost"] += 1
        if state["lost"] > 1:
            raise
    state["merges"] += 1
    return 0


async def test_the_merger_stops_although_its_merge_lost_a_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fts, "MERGE_SECONDS", 0.0)  # merge, merge, merge...
    state = {"lost": 0, "merges": 0}
    merger = fts.PendingListMerger(lambda: _merge_losing_one_cancel(state))
    merger.start()
    await asyncio.sleep(random.uniform(0.05, 0.2))
    # The cancel must land inside a merge (where it is lost), not on the
    # merger's own wait between merges, where a loaded machine may be.
    while state.get("started", 0) <= state["merges"]:  # noqa: ASYNC110
        await asyncio.sleep(0)
    closing = asyncio.create_task(merger.close())
    # Not wait_for: its own timeout cancels close(), a second cancellation
    # that would end the merger and hide a close that never ends.
    done, _ = await asyncio.wait([closing], timeout=10)
    assert closing in done, "close() still waiting for the merger"
    assert state["lost"] >= 1  # the first cancellation was indeed lost


async def test_a_single_cancel_would_have_waited_forever() -> None:
    """What the old stop did (cancel once, await) on the same task: still
    running after seconds. The task is then stopped for good."""
    state = {"lost": 0, "merges": 0}

    async def loop() -> None:
        # Its only suspension point is the merge's, so the cancel lands
        # there (and is lost) rather than on a yield between merges.
        while True:
            await _merge_losing_one_cancel(state)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.02)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=1.5)
    assert not done and state["merges"] > 1
    await asyncio.wait_for(stop_task(task), 10)
    assert task.done()


async def test_stop_task_consumes_the_outcome_and_lets_the_caller_be_cancelled() -> None:
    failing = asyncio.create_task(asyncio.sleep(0))
    await failing
    await stop_task(failing)  # already done: returns at once

    async def boom() -> None:
        raise RuntimeError("x")

    errored = asyncio.create_task(boom())
    await asyncio.sleep(0)
    await stop_task(errored)  # its error consumed, not raised

    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # swallows every cancellation until released

    victim = asyncio.create_task(stubborn())
    stopper = asyncio.create_task(stop_task(victim))
    await asyncio.sleep(0.1)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert not victim.done()
    release.set()
    await asyncio.wait_for(stop_task(victim), 10)
    assert victim.done()

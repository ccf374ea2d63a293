"""Stopping a background task so that it surely ends.

``task.cancel()`` asks once, and on Python 3.11 the ask can be lost:
``asyncio.wait_for`` (which database and network drivers use inside)
returns a result that arrived together with the cancellation and drops
the cancellation (CPython gh-86296, fixed in 3.12). A loop task that lost
it goes on looping, and whoever awaited it (a daemon's shutdown, a
``mailctl`` command's exit) waits forever: a cluster drill saw ``mailctl
account add`` hang after its work was done, its full-text merger task
"cancelling" yet asleep until its next merge.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# How often a cancellation is asked again while the task runs on.
RECANCEL_SECONDS = 0.5


async def stop_task(task: asyncio.Task[Any] | asyncio.Future[Any]) -> None:
    """Cancels ``task`` and returns once it has ended, asking again every
    :data:`RECANCEL_SECONDS` until it does. The task's own outcome (a
    cancellation, a result or an error) is consumed, not raised: the
    caller is stopping it. A cancellation of the caller itself propagates
    (the task is still asked to stop)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RECANCEL_SECONDS)
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()  # retrieved: no "never retrieved" warning

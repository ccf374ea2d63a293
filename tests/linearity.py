"""One check shared by the fuzz and hostile suites: work grows at most
linearly with the size of what a client sends.

Wall-clock ratios are noisy on a shared 2-core machine (the suite runs
several workers at once), so each size is timed in this process's CPU time,
not wall-clock time, with the cyclic garbage collector paused (a full
collection over a heap that grew with the input adds a cost that depends on
what else the process holds), as the best of a few runs, and the bound is
loose: a linear parser gives a ratio near ``factor`` (8 here), a quadratic
one near ``factor**2`` (64).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

GROWTH_FACTOR = 8
# Linear work over an 8x input gives ~8x time; allow noise, refuse quadratic (~64x).
MAX_RATIO = 24.0


def best_time(work: Callable[[], object], repeat: int = 3) -> float:
    """The least CPU time (seconds, every thread of this process) one call
    of ``work`` took in ``repeat`` calls, the garbage collector paused."""
    best = float("inf")
    for _ in range(repeat):
        enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.process_time()
            work()
            best = min(best, time.process_time() - start)
        finally:
            if enabled:
                gc.enable()
    return best


def assert_linear(work: Callable[[int], object], n: int, *, min_seconds: float = 0.002) -> None:
    """Time ``work(n)`` and ``work(8n)``; fail if the larger costs more than
    :data:`MAX_RATIO` times the smaller. ``min_seconds`` keeps timer noise of
    a very fast small run from inflating the ratio."""
    small = max(best_time(lambda: work(n)), min_seconds)
    large = best_time(lambda: work(n * GROWTH_FACTOR))
    ratio = large / small
    assert ratio < MAX_RATIO, f"{GROWTH_FACTOR}x the input took {ratio:.1f}x the time"

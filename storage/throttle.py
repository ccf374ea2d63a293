"""Slowing down repeated authentication failures, shared by every protocol.

Contract: before answering a failed login, a protocol awaits
``throttle.failed(key)``, which sleeps ``base * 2**(n-1)`` seconds (capped)
for the n-th recent failure of ``key`` (client IP, and login name). A
success calls ``succeeded(key)``. Failures are forgotten after
``window_seconds``. State is per process; that is enough to make online
guessing slow, and each instance throttles its own share of traffic.
"""

from __future__ import annotations

import asyncio
import time


class AuthThrottle:
    def __init__(self, base: float = 1.0, cap: float = 16.0, window_seconds: float = 900.0) -> None:
        self.base = base
        self.cap = cap
        self.window = window_seconds
        self._failures: dict[str, tuple[int, float]] = {}

    def delay_for(self, key: str) -> float:
        count, last = self._failures.get(key, (0, 0.0))
        if not count or time.monotonic() - last > self.window:
            return 0.0
        return min(self.cap, self.base * 2 ** (count - 1))

    async def failed(self, *keys: str) -> None:
        """Record a failure for each key and sleep for the largest delay."""
        now = time.monotonic()
        for key in keys:
            count, last = self._failures.get(key, (0, 0.0))
            if now - last > self.window:
                count = 0
            self._failures[key] = (count + 1, now)
        if len(self._failures) > 100_000:  # bound memory under a spray attack
            cutoff = now - self.window
            self._failures = {k: v for k, v in self._failures.items() if v[1] > cutoff}
        delay = max(self.delay_for(k) for k in keys) if keys else 0.0
        if delay:
            await asyncio.sleep(delay)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)

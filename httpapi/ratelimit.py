"""Per-user and per-IP request rate limits (token buckets, per process).

Each key has a bucket of ``per_minute`` tokens refilled continuously; a
request takes one. An empty bucket answers 429 with ``Retry-After``
(RFC 6585 section 4) saying when the next token arrives. State is per
instance, like :class:`storage.throttle.AuthThrottle`: behind a load
balancer each instance enforces the limit on its own share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

MAX_KEYS = 100_000  # bound memory when a botnet sprays addresses


class RateLimiter:
    """``check(key)`` is None when the request may proceed, else the number of
    seconds the client should wait. ``per_minute`` 0 disables the limit."""

    def __init__(self, per_minute: int, clock: Callable[[], float] | None = None) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self._clock = clock or time.monotonic
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)

    def check(self, key: str) -> int | None:
        if self.capacity <= 0:
            return None
        now = self._clock()
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._store(key, tokens - 1.0, now)
            return None
        self._store(key, tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def _store(self, key: str, tokens: float, now: float) -> None:
        if key not in self._buckets and len(self._buckets) >= MAX_KEYS:
            # Forget full buckets: they behave exactly like fresh ones.
            full = [k for k, (t, at) in self._buckets.items()
                    if t + (now - at) * self.rate >= self.capacity]
            for k in full:
                del self._buckets[k]
            if len(self._buckets) >= MAX_KEYS:
                self._buckets.clear()
        self._buckets[key] = (tokens, now)

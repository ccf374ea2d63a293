"""Per-client limits shared by all SMTP sessions of one mtad process.

State is per process (as with storage.throttle.AuthThrottle): each
instance limits its own share of the traffic, which bounds abuse without a
shared store on the hot path.
"""

from __future__ import annotations

import time
from collections import deque


class RateLimiter:
    """At most ``limit`` events per ``window`` seconds per key (a sliding log).

    ``limit == 0`` disables it. :meth:`allowed` only looks; :meth:`record`
    counts an accepted message, so refused attempts do not lock a sender
    out for longer.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._events: dict[str, deque[float]] = {}

    def _prune(self, key: str, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        cutoff = now - self.window
        while events and events[0] <= cutoff:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def allowed(self, key: str) -> bool:
        if not self.limit:
            return True
        events = self._prune(key, time.monotonic())
        return events is None or len(events) < self.limit

    def record(self, key: str) -> None:
        if not self.limit:
            return
        now = time.monotonic()
        events = self._prune(key, now)
        if events is None:
            events = self._events[key] = deque(maxlen=self.limit)
        events.append(now)
        if len(self._events) > 100_000:  # bound memory under a spray of sources
            for k in list(self._events)[:50_000]:
                self._prune(k, now)


class ConnectionCounter:
    """Concurrent connections per client IP (RFC 5321 section 4.5.3.1 allows
    refusing with 421 when resources are short)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, ip: str) -> bool:
        count = self._open.get(ip, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[ip] = count + 1
        return True

    def release(self, ip: str) -> None:
        count = self._open.get(ip, 0) - 1
        if count > 0:
            self._open[ip] = count
        else:
            self._open.pop(ip, None)

    def count(self, ip: str) -> int:
        return self._open.get(ip, 0)

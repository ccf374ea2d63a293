"""Per-client rate limits shared by all SMTP sessions of one mtad process
(the per-IP connection limit is the listener's: :mod:`runtime.listen`).

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

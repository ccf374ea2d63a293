"""Token-bucket rate limits with Retry-After."""

from __future__ import annotations

from httpapi.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(60, clock=clock)  # one per second, burst of 60
    assert all(limiter.check("k") is None for _ in range(60))
    assert limiter.check("k") == 1
    clock.now += 1.0
    assert limiter.check("k") is None
    assert limiter.check("k") == 1
    assert limiter.check("other") is None  # keys are independent


def test_retry_after_reflects_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(2, clock=clock)  # one token every 30 s
    assert limiter.check("k") is None and limiter.check("k") is None
    assert limiter.check("k") == 30
    clock.now += 29.5
    assert limiter.check("k") == 1
    clock.now += 0.5
    assert limiter.check("k") is None


def test_zero_disables() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.check("k") is None for _ in range(1000))

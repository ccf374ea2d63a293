"""The shared-state contract (storage/shared.py) on both backends: in-process
and a real redis-server. Rate limits and login-failure counts behave the same
on each; through Redis, two instances count together, and an unreachable
Redis degrades to in-process counting instead of refusing anyone."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from conf.settings import RedisSettings
from runtime.metrics import REGISTRY
from storage.shared import (
    FALLBACKS,
    LocalRateLimit,
    RedisSharedState,
    SharedState,
    wait_seconds,
)

BACKENDS = ["local", "redis"]
HOUR = 3600.0


def _redis_settings(url: str, **extra: float) -> RedisSettings:
    return RedisSettings(url=url, **extra)


@pytest.fixture(params=BACKENDS)
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[SharedState]:
    if request.param == "local":
        state = SharedState()
    else:
        state = RedisSharedState(_redis_settings(request.getfixturevalue("redis_url")))
    yield state
    await state.close()


async def test_a_limit_allows_exactly_limit_events_then_says_how_long(shared) -> None:
    limit = random.randint(2, 40)
    rate = shared.rate_limit("test", limit, HOUR)
    key = f"198.51.100.{random.randint(1, 254)}"
    assert [await rate.take(key) for _ in range(limit)] == [0.0] * limit
    wait = await rate.take(key)
    assert 0 < wait <= 2 * HOUR  # refused, with a finite time to wait
    assert await rate.wait(key) > 0  # looking changes nothing
    assert await rate.take("another key") == 0.0


async def test_refused_attempts_are_not_counted(shared) -> None:
    rate = shared.rate_limit("test", 3, HOUR)
    for _ in range(3):
        await rate.record("k")
    first = await rate.wait("k")
    for _ in range(20):
        assert await rate.take("k") > 0
    # Refusals did not push the release further away (give or take the elapsed time).
    assert await rate.wait("k") <= first


async def test_wait_then_record_as_smtp_does(shared) -> None:
    rate = shared.rate_limit("test", 2, HOUR)
    assert await rate.wait("u") == 0.0
    await rate.record("u")
    await rate.record("u")
    assert await rate.wait("u") > 0
    assert await rate.wait("other") == 0.0


async def test_names_keep_limits_apart(shared) -> None:
    ip = shared.rate_limit("smtp-ip", 1, HOUR)
    user = shared.rate_limit("smtp-user", 1, HOUR)
    assert await ip.take("k") == 0.0
    assert await user.take("k") == 0.0
    assert await ip.take("k") > 0


async def test_zero_disables(shared) -> None:
    rate = shared.rate_limit("test", 0, HOUR)
    for _ in range(200):
        await rate.record("k")
        assert await rate.take("k") == 0.0
    assert await rate.wait("k") == 0.0


async def test_failure_counts(shared) -> None:
    failures = shared.failures
    n = random.randint(1, 9)
    for _ in range(n):
        await failures.add(["ip:192.0.2.7", "login:bob@example.com"])
    assert await failures.recent("ip:192.0.2.7") == n
    assert await failures.recent("login:bob@example.com") == n
    assert await failures.recent("ip:192.0.2.8") == 0
    await failures.clear(["login:bob@example.com"])
    assert await failures.recent("login:bob@example.com") == 0
    assert await failures.recent("ip:192.0.2.7") == n


async def test_any_text_is_a_key(shared) -> None:
    """Login names reach the counters as clients typed them: JSON may carry
    lone surrogates ("\\udcff"), IMAP any UTF-8. Each is a key of its own."""
    rng = random.Random()
    names = {
        "".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xD800, 0xDFFF),
                                rng.randint(0x80, 0x10FFFF)])) for _ in range(rng.randint(1, 40)))
        for _ in range(20)
    }
    for name in names:
        await shared.failures.add([f"login:{name}"])
        assert await shared.rate_limit("test", 1, HOUR).take(name) == 0.0
    for name in names:
        assert await shared.failures.recent(f"login:{name}") == 1
        assert await shared.rate_limit("test", 1, HOUR).take(name) > 0


# --- the sliding window, with a clock -------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_the_window_slides() -> None:
    clock = Clock(6000.0)  # the start of a 60 s window
    rate = LocalRateLimit(4, 60.0, clock=clock)
    for _ in range(4):
        assert await rate.take("k") == 0.0
    assert await rate.take("k") == pytest.approx(60.0 + 60.0 * (1 - 3 / 4))
    clock.now += 60.0 + 14.9  # not yet a quarter into the next window: over 3 still count
    assert await rate.take("k") > 0
    clock.now += 0.2  # past it: 4 * (1 - 15.1/60) < 3, room for one
    assert await rate.take("k") == 0.0
    assert await rate.take("k") > 0
    clock.now += 120.0  # two idle windows forget everything
    assert [await rate.take("k") for _ in range(4)] == [0.0] * 4


@pytest.mark.parametrize("seed", range(20))
def test_the_wait_is_exactly_when_one_more_fits(seed: int) -> None:
    rng = random.Random(seed)
    limit, window = rng.randint(1, 50), rng.uniform(1, 100)
    current, previous = rng.randint(0, 2 * limit), rng.randint(1, 2 * limit)
    elapsed = rng.uniform(0, window)
    wait = wait_seconds(limit, window, elapsed, current, previous)
    if not wait:
        return
    later = elapsed + wait  # still this window, or into the next one
    if later < window:
        estimate = current + previous * (1 - later / window)
    else:
        estimate = current * (1 - (later - window) / window)
    assert estimate <= limit - 1 + 1e-6  # one more fits then
    if wait > 0.01:  # and not noticeably sooner
        sooner = later - 0.01
        if sooner < window:
            before = current + previous * (1 - sooner / window)
        else:
            before = current * (1 - (sooner - window) / window)
        assert before > limit - 1


# --- Redis: shared between instances, and its outage ------------------------


async def test_two_instances_count_together(redis_url: str) -> None:
    one = RedisSharedState(_redis_settings(redis_url))
    two = RedisSharedState(_redis_settings(redis_url))
    try:
        limit = random.randint(2, 20)
        rate_one, rate_two = (s.rate_limit("smtp-ip", limit, HOUR) for s in (one, two))
        for i in range(limit):
            assert await (rate_one if i % 2 else rate_two).take("203.0.113.9") == 0.0
        assert await rate_one.take("203.0.113.9") > 0
        assert await rate_two.take("203.0.113.9") > 0
        await one.failures.add(["login:carol@example.com"])
        await two.failures.add(["login:carol@example.com"])
        assert await one.failures.recent("login:carol@example.com") == 2
        await two.failures.clear(["login:carol@example.com"])
        assert await one.failures.recent("login:carol@example.com") == 0
    finally:
        await one.close()
        await two.close()


async def test_failure_counts_lapse_in_redis(redis_url: str) -> None:
    state = RedisSharedState(_redis_settings(redis_url))
    try:
        await state.failures.add(["ip:192.0.2.1"])
        ttl = await state.client.ttl("shardmail:fail:ip:192.0.2.1")
        assert 0 < ttl <= 900  # forgotten a window after the last failure
    finally:
        await state.close()


async def test_unreachable_redis_counts_in_process(redis_server, redis_url: str, caplog) -> None:
    state = RedisSharedState(_redis_settings(redis_url, retry_seconds=0.2))
    try:
        rate = state.rate_limit("smtp-ip", 2, HOUR)
        await rate.record("k")
        before = FALLBACKS.value(what="rate")
        redis_server.pause()
        # No exception, no refusal: the limit is counted here instead.
        assert await rate.take("k") == 0.0
        assert await rate.take("k") == 0.0
        assert await rate.take("k") > 0
        await state.failures.add(["ip:192.0.2.1"])
        assert await state.failures.recent("ip:192.0.2.1") == 1
        assert FALLBACKS.value(what="rate") >= before + 3
        assert "shardmail_shared_state_fallbacks_total" in REGISTRY.render()
        assert "Redis unreachable" in caplog.text
        redis_server.resume()  # an empty Redis again
        await asyncio.sleep(0.3)  # retry_seconds
        assert await rate.take("k") == 0.0  # back on Redis, which counts from 0
        assert await state.client.exists("shardmail:rate:smtp-ip:k") == 1
        assert "Redis reachable again" in caplog.text
        assert caplog.text.count("Redis unreachable") == 1  # once per outage
    finally:
        await state.close()

"""State every instance of a site shares: login-failure counts and rate
limits (the "shared state" role of DESIGN.md).

In-process on the embedded default; in Redis when ``[redis] url`` is set, so
that the limits hold for the site and do not multiply with its instances.
:func:`shared_state` hands each opened Storage its one :class:`SharedState`
(chosen once, from the settings, on first use); every daemon of the process
reaches it through the storage it was given, so no daemon imports another.

Redis unreachable: each call falls back to an in-process twin of the same
limit, with a warning in the log (once per outage) and the metric
``shardmail_shared_state_fallbacks_total``; Redis is tried again after
``retry_seconds``. Limits thus fail open to per-instance counting, never
closed: a login or a message is not refused because Redis is down, and
never answered "wrong password". Counts made during the outage stay in the
process and are not merged back into Redis.

POP3 maildrop locks stay on the database lease (``MailStore.lease``): it
already holds across instances, and a lock in Redis would be less safe
(lost on a Redis restart, which would let two sessions own one maildrop).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from runtime.metrics import counter
from storage.throttle import FailureCounter, LocalFailureCounter

if TYPE_CHECKING:
    from conf.settings import RedisSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_PREFIX = "shardmail:"
MAX_TRACKED_KEYS = 100_000  # in-process: bound memory under a spray of sources
FAILURE_WINDOW_SECONDS = 900.0  # a login failure counts this long after the last one

FALLBACKS = counter(
    "shardmail_shared_state_fallbacks_total",
    "Shared-state operations counted in-process because Redis was unreachable.",
    ["what"],  # failures | rate | counts
)


# --- rate limits: one sliding-window counter, in-process or in Redis -------


class RateLimit(Protocol):
    """At most ``limit`` events per ``window`` seconds for each key (an
    address, an account), counted by every session that shares the object.

    The window slides: the count is the current fixed window's events plus
    the previous window's, weighted by the share of it still inside the
    sliding one (O(1) state per key). ``limit == 0`` disables the limit.
    Every method is safe to call concurrently, and none raises when the
    shared store is unreachable (the count falls back to this process).
    """

    limit: int
    window: float

    async def wait(self, key: str) -> float:
        """Seconds until ``key`` may have one more event; 0.0 now. Counts nothing."""
        ...

    async def record(self, key: str) -> None:
        """Counts one event of ``key`` (whether or not it was within the limit)."""
        ...

    async def take(self, key: str) -> float:
        """Counts one event if ``key`` is within its limit and returns 0.0;
        otherwise counts nothing and returns the seconds to wait. Atomic."""
        ...


def wait_seconds(limit: int, window: float, elapsed: float, current: int, previous: int) -> float:
    """Seconds from now until one more event fits: the sliding estimate
    ``current + previous * (1 - elapsed / window)`` plus one must stay within
    ``limit``. ``elapsed`` is the time since the current window began. The
    Lua script in :class:`RedisRateLimit` computes the same."""
    room = limit - 1
    if current + previous * (1.0 - elapsed / window) <= room:
        return 0.0
    if current <= room:  # the previous window's weight must fall further
        return max(window * (1.0 - (room - current) / previous) - elapsed, 0.001)
    # Only the next window helps: then this window's count is the weighted one.
    return window - elapsed + window * (1.0 - room / current)


class LocalRateLimit:
    """:class:`RateLimit` in this process's memory (the embedded default)."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._counts: dict[str, tuple[int, int, int]] = {}  # key -> (window index, cur, prev)

    def _state(self, key: str) -> tuple[int, float, int, int]:
        """(window index, elapsed in it, current count, previous count) of ``key`` now."""
        now = self._clock()
        index = math.floor(now / self.window)
        at, current, previous = self._counts.get(key, (index, 0, 0))
        if index == at + 1:
            current, previous = 0, current
        elif index > at + 1:
            current, previous = 0, 0
        return index, now - index * self.window, current, previous

    async def wait(self, key: str) -> float:
        if not self.limit:
            return 0.0
        _, elapsed, current, previous = self._state(key)
        return wait_seconds(self.limit, self.window, elapsed, current, previous)

    async def record(self, key: str) -> None:
        if self.limit:
            index, _, current, previous = self._state(key)
            self._store(key, index, current + 1, previous)

    async def take(self, key: str) -> float:
        if not self.limit:
            return 0.0
        index, elapsed, current, previous = self._state(key)
        wait = wait_seconds(self.limit, self.window, elapsed, current, previous)
        if not wait:
            self._store(key, index, current + 1, previous)
        return wait

    def _store(self, key: str, index: int, current: int, previous: int) -> None:
        if key not in self._counts and len(self._counts) >= MAX_TRACKED_KEYS:
            # Keys idle for two windows count nothing: forgetting them changes no answer.
            self._counts = {k: v for k, v in self._counts.items() if v[0] >= index - 1}
            if len(self._counts) >= MAX_TRACKED_KEYS:
                self._counts.clear()
        self._counts[key] = (index, current, previous)


# One hash per key: w (window index), c (its count), p (the previous
# window's). Time is Redis's own, so every instance agrees on the windows.
# ARGV: limit, window seconds, mode (0 look, 1 record, 2 take). Returns the
# wait in seconds as a string (a Lua number would be cut to an integer).
RATE_SCRIPT = """
local limit, window, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local index = math.floor(now / window)
local s = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local at, cur, prev = tonumber(s[1]) or index, tonumber(s[2]) or 0, tonumber(s[3]) or 0
if index == at + 1 then cur, prev = 0, cur elseif index > at + 1 then cur, prev = 0, 0 end
local elapsed = now - index * window
local room = limit - 1
local wait = 0
if cur + prev * (1 - elapsed / window) > room then
  if cur <= room then
    wait = math.max(window * (1 - (room - cur) / prev) - elapsed, 0.001)
  else
    wait = window - elapsed + window * (1 - room / cur)
  end
end
if mode == 1 or (mode == 2 and wait == 0) then
  redis.call('HSET', KEYS[1], 'w', index, 'c', cur + 1, 'p', prev)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 2000))
end
return tostring(wait)
"""


class _Outage:
    """Whether Redis is to be tried: after a failure, the in-process twin
    answers for ``retry`` seconds before Redis is tried again."""

    def __init__(self, retry: float) -> None:
        self.retry = retry
        self._down_until = -math.inf

    async def run(self, what: str, remote: Callable[[], Awaitable[T]],
                  local: Callable[[], Awaitable[T]]) -> T:
        """``remote()``, or ``local()`` while Redis is (or just turned out) unreachable."""
        if time.monotonic() >= self._down_until:
            try:
                result = await remote()
            except _redis_errors() as exc:
                if self._down_until == -math.inf:  # once per outage, not per call
                    log.warning("Redis unreachable, counting %s in this process: %s", what, exc)
                self._down_until = time.monotonic() + self.retry
            else:
                if self._down_until != -math.inf:
                    log.warning("Redis reachable again: limits are shared again")
                    self._down_until = -math.inf
                return result
        FALLBACKS.inc(what=what)
        return await local()


@functools.cache
def _redis_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or failing Redis raises (imported on first use:
    a site without Redis never loads the client)."""
    import redis.exceptions

    return (redis.exceptions.RedisError, OSError, TimeoutError)


class RedisRateLimit:
    """:class:`RateLimit` in Redis (one Lua script per call, atomic), with
    an in-process twin that counts while Redis is unreachable."""

    def __init__(self, client: Any, name: str, limit: int, window: float, outage: _Outage) -> None:
        self.limit = limit
        self.window = window
        self._prefix = f"{KEY_PREFIX}rate:{name}:"
        self._script = client.register_script(RATE_SCRIPT)
        self._outage = outage
        self._local = LocalRateLimit(limit, window)

    async def _call(self, key: str, mode: int, local: Callable[[], Awaitable[Any]]) -> float:
        async def remote() -> float:
            args = [self.limit, repr(float(self.window)), mode]
            return float(await self._script(keys=[self._prefix + key], args=args))

        return float(await self._outage.run("rate", remote, local))

    async def wait(self, key: str) -> float:
        if not self.limit:
            return 0.0
        return await self._call(key, 0, lambda: self._local.wait(key))

    async def record(self, key: str) -> None:
        if self.limit:
            await self._call(key, 1, lambda: _as_zero(self._local.record(key)))

    async def take(self, key: str) -> float:
        if not self.limit:
            return 0.0
        return await self._call(key, 2, lambda: self._local.take(key))


async def _as_zero(done: Awaitable[None]) -> float:
    await done
    return 0.0


# --- login failures ---------------------------------------------------------


class RedisFailureCounter:
    """:class:`~storage.throttle.FailureCounter` in Redis: per key one
    integer, INCR then EXPIRE ``window`` in one MULTI/EXEC (atomic), so the
    count lapses ``window`` seconds after the last failure as in-process."""

    def __init__(self, client: Any, outage: _Outage, window: float) -> None:
        self._client = client
        self._outage = outage
        self._window = max(1, math.ceil(window))
        self._local = LocalFailureCounter(window)

    def _key(self, key: str) -> str:
        return f"{KEY_PREFIX}fail:{key}"

    async def add(self, keys: Sequence[str]) -> None:
        async def remote() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.incr(self._key(key))
                    pipe.expire(self._key(key), self._window)
                await pipe.execute()

        await self._outage.run("failures", remote, lambda: self._local.add(keys))

    async def recent(self, key: str) -> int:
        async def remote() -> int:
            return int(await self._client.get(self._key(key)) or 0)

        return await self._outage.run("failures", remote, lambda: self._local.recent(key))

    async def clear(self, keys: Sequence[str]) -> None:
        async def remote() -> None:
            await self._client.delete(*(self._key(k) for k in keys))

        await self._outage.run("failures", remote, lambda: self._local.clear(keys))


# --- fixed-window counts (sending limits) ------------------------------------


class LocalCounts:
    """Event counts per key and fixed window (``floor(now / window)``) in
    this process. A fixed window lets a burst of up to twice the limit
    straddle a boundary; for hourly and daily sending limits that is fine,
    and it takes one INCRBY per count in Redis."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: dict[str, tuple[int, int, float]] = {}  # key -> (index, count, window)

    async def add(self, items: Sequence[tuple[str, float, int]]) -> list[int]:
        """Adds ``amount`` to each ``(key, window seconds, amount)``; the
        counts of the current windows afterwards, in order."""
        now = self._clock()
        totals = []
        for key, window, amount in items:
            index = math.floor(now / window)
            at, count, _ = self._counts.get(key, (index, 0, window))
            count = (count if at == index else 0) + amount
            if key not in self._counts and len(self._counts) >= MAX_TRACKED_KEYS:
                # Keys of a past window count nothing: forgetting them changes no answer.
                self._counts = {
                    k: v for k, v in self._counts.items() if v[0] == math.floor(now / v[2])
                }
            self._counts[key] = (index, count, window)
            totals.append(count)
        return totals


class RedisCounts:
    """:class:`LocalCounts` in Redis: one key per key and window, INCRBY and
    EXPIRE in one MULTI/EXEC for all items (one round trip, atomic); the
    window index comes from this host's clock (NTP keeps instances within
    far less than a window). In-process twin while Redis is unreachable."""

    def __init__(self, client: Any, outage: _Outage) -> None:
        self._client = client
        self._outage = outage
        self._local = LocalCounts()

    async def add(self, items: Sequence[tuple[str, float, int]]) -> list[int]:
        async def remote() -> list[int]:
            now = time.time()
            async with self._client.pipeline(transaction=True) as pipe:
                for key, window, amount in items:
                    name = f"{KEY_PREFIX}count:{key}:{math.floor(now / window)}"
                    pipe.incrby(name, amount)
                    pipe.expire(name, math.ceil(window) + 60)
                replies = await pipe.execute()
            return [int(n) for n in replies[0::2]]

        return await self._outage.run("counts", remote, lambda: self._local.add(items))


# --- one per storage --------------------------------------------------------


class SharedState:
    """The counters one process's daemons share: ``failures`` (logins) and
    :meth:`rate_limit` (one per purpose, e.g. "smtp-ip"). Local by default."""

    def __init__(self) -> None:
        self.failures: FailureCounter = LocalFailureCounter(FAILURE_WINDOW_SECONDS)
        self._limits: dict[tuple[str, int, float], RateLimit] = {}
        self.counts: LocalCounts | RedisCounts = LocalCounts()

    def rate_limit(self, name: str, limit: int, window: float) -> RateLimit:
        """The limit ``name`` (its keys are apart from every other name's);
        asked again, the same counts."""
        key = (name, limit, float(window))
        if key not in self._limits:
            self._limits[key] = self._new_limit(name, limit, window)
        return self._limits[key]

    def _new_limit(self, name: str, limit: int, window: float) -> RateLimit:
        return LocalRateLimit(limit, window)

    async def close(self) -> None:
        """Releases connections; the counters must not be used afterwards."""


class RedisSharedState(SharedState):
    """:class:`SharedState` in the Redis at ``settings.url``."""

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__()
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.client = Redis.from_url(
            settings.url,
            socket_timeout=settings.timeout_seconds,
            socket_connect_timeout=settings.timeout_seconds,
            # No retries: an unreachable Redis is answered in-process at once.
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            # Keys carry what clients typed: a lone surrogate from JSON is a key too.
            encoding_errors="surrogatepass",
        )
        self._outage = _Outage(settings.retry_seconds)
        self.failures = RedisFailureCounter(self.client, self._outage, FAILURE_WINDOW_SECONDS)
        self.counts = RedisCounts(self.client, self._outage)

    def _new_limit(self, name: str, limit: int, window: float) -> RateLimit:
        return RedisRateLimit(self.client, name, limit, window, self._outage)

    async def close(self) -> None:
        await self.client.aclose()


_STATES: weakref.WeakKeyDictionary[Any, SharedState] = weakref.WeakKeyDictionary()


def shared_state(storage: Any, settings: RedisSettings | None = None) -> SharedState:
    """The shared state of ``storage``: made on first use, in Redis when
    ``settings.url`` is set, else in-process. Every daemon of a process
    opens one Storage (``mailctl serve`` shares it), so they count together."""
    state = _STATES.get(storage)
    if state is None:
        use_redis = settings is not None and settings.url
        state = _STATES[storage] = RedisSharedState(settings) if use_redis else SharedState()
    return state


async def close_shared_state(storage: Any) -> None:
    """Closes and forgets the shared state of ``storage``, if it has one."""
    state = _STATES.pop(storage, None)
    if state is not None:
        await state.close()

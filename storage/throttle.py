"""Login protection shared by every protocol: failure counts, the throttle
delay, and the bounded pool where passwords are verified.

Contract for a protocol's login: call :meth:`LoginGate.authenticate` (one
gate per opened :class:`~storage.api.Storage`, see :func:`login_gate`, so
IMAP, POP3, SMTP AUTH and HTTP of one process share it). It answers

* the :class:`~storage.model.Account` when the password matches, ``None``
  when it does not (the failure is already counted when it returns);
* :class:`~storage.errors.StorageError` TEMPORARY when the directory is
  unreachable or the client's address has too many checks queued: the
  client should retry later, nothing is counted against it;
* ``ConnectionResetError`` when the client went away before its check ran
  (the check is skipped: nobody would read the answer).

A successful check is remembered for ``[auth] cache_ttl_seconds``
(:mod:`storage.authcache`): the same password for the same, unchanged
account is then answered without argon2, after any throttle delay, and,
when no delay is owed, without a place among the address's ``per_ip``
(those bound what may need a check).

Once a client address or a login name has recent failures, an attempt
waits out the throttle delay first and only then has its password checked
(success and failure alike), so a client with a short timeout learns
nothing, and one that leaves during the delay costs no check. Counts
live behind :class:`FailureCounter`, the shared-state seam: in-process
here, a Redis implementation shares them between instances.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from storage.authcache import AuthCache
from storage.errors import ErrorKind, StorageError

if TYPE_CHECKING:
    from storage.api import Directory, Storage
    from storage.model import Account

T = TypeVar("T")

MAX_TRACKED_KEYS = 100_000  # bound memory under a spray attack
DEFAULT_VERIFY_SLOTS = max(2, os.cpu_count() or 2)


def _never_gone() -> bool:
    return False


@dataclass(frozen=True)
class LoginClient:
    """Who is logging in: the address failures are counted under, and
    ``gone()``, true once the connection closed (its queued check is skipped)."""

    ip: str
    gone: Callable[[], bool] = field(default=_never_gone, compare=False)


class FailureCounter(Protocol):
    """Recent login failures per key (``ip:<address>``, ``login:<name>``),
    shared by every session that uses it; the seam a shared-state backend
    (Redis: INCR + EXPIRE per key) implements to share counts between instances.

    Contract: :meth:`add` has counted one failure for each key when it
    returns; :meth:`recent` is the number of failures of a key since its last
    :meth:`clear`, 0 once ``window`` seconds passed without a new failure.
    Every method is safe to call concurrently from any session.
    """

    async def add(self, keys: Sequence[str]) -> None: ...
    async def recent(self, key: str) -> int: ...
    async def clear(self, keys: Sequence[str]) -> None: ...


class LocalFailureCounter:
    """:class:`FailureCounter` in this process's memory (the embedded default)."""

    def __init__(self, window_seconds: float = 900.0) -> None:
        self.window = window_seconds
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (count, last failure)

    async def add(self, keys: Sequence[str]) -> None:
        now = time.monotonic()
        for key in keys:
            self._failures[key] = (self._count(key, now) + 1, now)
        if len(self._failures) > MAX_TRACKED_KEYS:
            cutoff = now - self.window
            self._failures = {k: v for k, v in self._failures.items() if v[1] > cutoff}

    async def recent(self, key: str) -> int:
        return self._count(key, time.monotonic())

    async def clear(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._failures.pop(key, None)

    def _count(self, key: str, now: float) -> int:
        count, last = self._failures.get(key, (0, 0.0))
        return count if now - last <= self.window else 0


class AuthThrottle:
    """The delay owed by a login attempt: ``base * 2**(n-1)`` seconds
    (capped) when the client address or the login name has ``n`` recent
    failures, none for a clean record."""

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 16.0,
        window_seconds: float = 900.0,
        counter: FailureCounter | None = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.counter: FailureCounter = counter or LocalFailureCounter(window_seconds)

    async def delay_for(self, *keys: str) -> float:
        """The largest delay any of ``keys`` has earned so far."""
        worst = max([await self.counter.recent(k) for k in keys], default=0)
        return min(self.cap, self.base * 2 ** (worst - 1)) if worst else 0.0

    async def failed(self, *keys: str) -> None:
        """Counts a failure for each key (at once: never after a delay)."""
        await self.counter.add(keys)

    async def succeeded(self, *keys: str) -> None:
        await self.counter.clear(keys)


class VerificationPool:
    """Runs password checks (argon2: ~100 ms of CPU each) on ``slots``
    threads of their own, never on the loop's default executor.

    * A client address may have ``per_ip`` checks queued or running; one
      more is refused at once (TEMPORARY) and never runs. The login gate
      takes the address's place (:meth:`place`) before the account is even
      read and keeps it until the answer is sent, so a flood costs no
      database read beyond the bound either.
    * A check waiting for a slot whose client has gone is skipped when its
      turn comes (``ConnectionResetError``); a cancelled waiter is dropped.
    * Suspect checks (the address has recent failures or another check in
      flight) wait in a lane of their own and hold at most ``slots - 1``
      slots; clean ones go first. A flood from failing addresses thus
      cannot make an honest login wait behind it.

    A check that started runs to its end (a thread cannot be stopped); its
    slot is freed when it ends, not when its caller is cancelled. Every
    step is O(1) per check: waiters are only ever looked at from the front.
    """

    def __init__(self, slots: int = DEFAULT_VERIFY_SLOTS, per_ip: int = 8) -> None:
        self.slots = max(1, slots)
        self.suspect_slots = max(1, self.slots - 1)
        self.per_ip = max(1, per_ip)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.slots, thread_name_prefix="password-check"
        )
        self._running = 0
        self._running_suspect = 0
        # One lane per kind, first come first served within a lane.
        self._lanes: dict[bool, collections.deque[_Waiter]] = {
            False: collections.deque(),
            True: collections.deque(),
        }
        self._in_flight: collections.Counter[str] = collections.Counter()

    def in_flight(self, ip: str) -> int:
        """Checks of ``ip`` queued or running now."""
        return self._in_flight[ip]

    @contextlib.contextmanager
    def place(self, ip: str) -> Iterator[None]:
        """Holds one of ``ip``'s ``per_ip`` places while the block runs;
        TEMPORARY at once when it has none left."""
        if self._in_flight[ip] >= self.per_ip:
            raise StorageError(ErrorKind.TEMPORARY, "too many logins in progress, try later")
        self._in_flight[ip] += 1
        try:
            yield
        finally:
            self._forget(ip)

    async def run(
        self, check: Callable[[], T], client: LoginClient, suspect: bool, *, placed: bool = False
    ) -> T:
        """``check()`` in a slot's thread; see the class docstring for refusals.
        ``placed``: the caller already holds a :meth:`place` of ``client.ip``
        for this check; otherwise the check takes one until it has run."""
        if placed:
            return await self._run(check, client, suspect)
        with self.place(client.ip):
            return await self._run(check, client, suspect)

    async def _run(self, check: Callable[[], T], client: LoginClient, suspect: bool) -> T:
        await self._admit(client, suspect)
        future = asyncio.get_running_loop().run_in_executor(self._executor, check)
        future.add_done_callback(lambda _: self._free(suspect))
        # Shielded: a caller that leaves must not free the slot of a running thread.
        return await asyncio.shield(future)

    async def _admit(self, client: LoginClient, suspect: bool) -> None:
        """Returns holding a slot, or raises without one."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lanes[suspect].append(_Waiter(turn, client))
        self._grant()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._free(suspect)  # granted just as the caller was cancelled
            raise

    def _grant(self) -> None:
        """Hands free slots to the waiters at the front of each lane."""
        while self._running < self.slots:
            lane = self._lanes[False]
            suspect = not self._head_alive(lane)
            if suspect:
                lane = self._lanes[True]
                if self._running_suspect >= self.suspect_slots or not self._head_alive(lane):
                    return
            waiter = lane.popleft()
            self._running += 1
            self._running_suspect += suspect
            waiter.turn.set_result(None)

    @staticmethod
    def _head_alive(lane: collections.deque[_Waiter]) -> bool:
        """Drops dead waiters from the front; whether a live one is left."""
        while lane:
            head = lane[0]
            if head.turn.done():  # the caller was cancelled
                lane.popleft()
            elif head.client.gone():
                lane.popleft().turn.set_exception(ConnectionResetError("client went away"))
            else:
                return True
        return False

    def _free(self, suspect: bool) -> None:
        self._running -= 1
        self._running_suspect -= suspect
        self._grant()

    def _forget(self, ip: str) -> None:
        self._in_flight[ip] -= 1
        if self._in_flight[ip] <= 0:
            del self._in_flight[ip]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _CheckNeeded(Exception):
    """A login the cache cannot answer: it goes through the pool (LoginGate._returning)."""


@dataclass
class _Waiter:
    turn: asyncio.Future[None]
    client: LoginClient


class LoginGate:
    """One process's login front door; see the module docstring."""

    def __init__(
        self, throttle: AuthThrottle, pool: VerificationPool, cache: AuthCache | None = None
    ) -> None:
        self.throttle = throttle
        self.pool = pool
        self.cache = cache  # successful checks of this process (storage/authcache.py)

    @staticmethod
    def keys(login: str, client: LoginClient) -> tuple[str, str]:
        """The failure-count keys of an attempt: the same on every protocol,
        so a guesser gains nothing by switching from IMAP to POP3 or SMTP."""
        return f"ip:{client.ip}", f"login:{login.strip().lower()}"

    async def authenticate(
        self, directory: Directory, login: str, password: str, client: LoginClient
    ) -> Account | None:
        """The account, or None for a wrong password (counted); see the
        module docstring for TEMPORARY and ``ConnectionResetError``."""
        if self.cache is not None and self.cache.knows_login(login, password):
            account = await self._returning(directory, login, password, client)
            if account is not None:
                return account
        started = asyncio.get_running_loop().time()
        suspect = self.pool.in_flight(client.ip) > 0
        # Issue #18: the address's place is taken before anything else, so an
        # address over its bound costs no database read, no check and no
        # delay task; it is held through the delay, so a throttled address
        # cannot stack more than ``per_ip`` attempts by hanging up and retrying.
        with self.pool.place(client.ip):
            keys = self.keys(login, client)
            delay = await self.throttle.delay_for(*keys)

            def run_check(check: Callable[[], Any]) -> Awaitable[Any]:
                return self.pool.run(check, client, suspect or bool(delay), placed=True)

            # The delay before the check, not after: a guesser that hangs up
            # early (issue #18: 1,000 dropped after 0.5 s) costs no argon2 run.
            await self._wait_out(started + delay)
            if client.gone():
                raise ConnectionResetError("client went away")
            # The cache is asked only now, after the delay: a hit (the right
            # password, nothing else) is never answered sooner than a check.
            account = await directory.authenticate(
                login, password, run_check=run_check, cache=self.cache
            )
            if account is None:
                await self.throttle.failed(*keys)  # counted before the answer is sent
        if account is not None:
            await self.throttle.succeeded(*keys)
            if self.cache is not None:
                self.cache.remember_login(login, password)
        return account

    async def _returning(
        self, directory: Directory, login: str, password: str, client: LoginClient
    ) -> Account | None:
        """A login whose password succeeded lately (:meth:`AuthCache.knows_login`),
        answered from the cache without one of the address's places in the
        pool: the account, or None when it must go the whole way instead.

        Issue #23: the places bound the password checks (and the reads
        before them) one address may have in flight, against a guesser; a
        pool of submission sessions from one address (webmail, an
        application) logging in at once with the right password costs no
        check, and was refused past ``per_ip`` (454, RFC 4954 section 6)
        all the same. The bound still holds for everything that may need a
        check: a guess (never known), a changed hash, an unknown account, and
        any attempt owed a throttle delay all go the whole way."""
        keys = self.keys(login, client)
        if await self.throttle.delay_for(*keys):
            return None
        if client.gone():
            raise ConnectionResetError("client went away")

        async def no_check(check: Callable[[], Any]) -> Any:
            raise _CheckNeeded

        try:
            account = await directory.authenticate(
                login, password, run_check=no_check, cache=self.cache
            )
        except _CheckNeeded:
            return None
        if account is not None:
            await self.throttle.succeeded(*keys)
        return account

    async def refused(self, login: str, client: LoginClient) -> None:
        """A login refused without a password check (APOP, a proxy
        authorization): counted and delayed like a wrong password."""
        started = asyncio.get_running_loop().time()
        keys = self.keys(login, client)
        delay = await self.throttle.delay_for(*keys)
        await self.throttle.failed(*keys)
        await self._wait_out(started + delay)

    @staticmethod
    async def _wait_out(deadline: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            await asyncio.sleep(remaining)


_GATES: weakref.WeakKeyDictionary[Any, LoginGate] = weakref.WeakKeyDictionary()


def login_gate(storage: Storage, auth: Any, redis: Any = None) -> LoginGate:
    """The login gate of ``storage``, made from ``auth`` (the ``[auth]``
    settings) on first use. Every daemon of a process opens one Storage
    (``mailctl serve`` shares it between them), so they share one gate:
    failures counted on IMAP slow POP3, SMTP and HTTP too. With ``redis``
    (the ``[redis]`` settings) naming a server, the counts are shared with
    every instance of the site (:mod:`storage.shared`). ``auth.cache_ttl_seconds``
    > 0 gives the gate an :class:`~storage.authcache.AuthCache` of that TTL."""
    from storage.shared import shared_state  # it builds on this module

    gate = _GATES.get(storage)
    if gate is None:
        throttle = AuthThrottle(
            base=float(auth.failure_delay_seconds),
            cap=float(auth.failure_delay_max_seconds),
            counter=shared_state(storage, redis).failures,
        )
        pool = VerificationPool(
            slots=int(auth.verify_threads) or DEFAULT_VERIFY_SLOTS,
            per_ip=int(auth.verify_queue_per_ip),
        )
        ttl = float(auth.cache_ttl_seconds)
        cache = AuthCache(ttl) if ttl > 0 else None
        gate = _GATES[storage] = LoginGate(throttle, pool, cache)
    return gate

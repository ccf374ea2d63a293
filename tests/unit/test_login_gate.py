"""The login gate (storage/throttle.py): the bounded verification pool
(issue #18: abandoned logins must not pile up) and the throttle whose delay
does not depend on the outcome (issue #17: timing must tell nothing)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import threading
import time
from collections.abc import Callable

import pytest

from storage.errors import ErrorKind, StorageError
from storage.model import Account
from storage.throttle import AuthThrottle, LoginClient, LoginGate, VerificationPool

CHECK_SECONDS = 0.15  # about one argon2 verification at the default cost


def slow_check(ran: list[str], name: str, seconds: float = CHECK_SECONDS) -> Callable[[], str]:
    def check() -> str:
        ran.append(name)
        time.sleep(seconds)
        return name

    return check


async def test_a_client_over_its_queue_bound_is_refused_at_once() -> None:
    pool = VerificationPool(slots=1, per_ip=3)
    ran: list[str] = []
    client = LoginClient("192.0.2.1")
    queued = [
        asyncio.create_task(pool.run(slow_check(ran, f"c{i}"), client, suspect=False))
        for i in range(3)
    ]
    await asyncio.sleep(0)
    started = time.monotonic()
    with pytest.raises(StorageError) as refused:
        await pool.run(slow_check(ran, "over"), client, suspect=False)
    assert refused.value.kind is ErrorKind.TEMPORARY
    assert time.monotonic() - started < CHECK_SECONDS  # not queued behind the others
    # Another address is not limited by the first one's queue.
    other = await pool.run(slow_check(ran, "other"), LoginClient("192.0.2.2"), suspect=False)
    assert other == "other"
    assert sorted(await asyncio.gather(*queued)) == ["c0", "c1", "c2"]
    assert "over" not in ran
    assert pool.in_flight("192.0.2.1") == 0


async def test_a_queued_check_whose_client_left_never_runs() -> None:
    pool = VerificationPool(slots=1, per_ip=50)
    ran: list[str] = []
    left = threading.Event()
    leaver = LoginClient("198.51.100.7", gone=left.is_set)
    first = asyncio.create_task(pool.run(slow_check(ran, "first"), leaver, suspect=False))
    abandoned = [
        asyncio.create_task(pool.run(slow_check(ran, f"gone{i}"), leaver, suspect=True))
        for i in range(random.randint(5, 20))
    ]
    await asyncio.sleep(0.02)
    left.set()  # the connection closed while its checks waited
    assert await first == "first"  # a started check runs to its end
    for task in abandoned:
        with pytest.raises(ConnectionResetError):
            await task
    assert ran == ["first"]
    assert pool.in_flight("198.51.100.7") == 0


async def test_a_cancelled_waiter_frees_its_place_and_no_slot_leaks() -> None:
    pool = VerificationPool(slots=1, per_ip=50)
    ran: list[str] = []
    client = LoginClient("203.0.113.9")
    first = asyncio.create_task(pool.run(slow_check(ran, "first"), client, suspect=False))
    waiting = [
        asyncio.create_task(pool.run(slow_check(ran, f"w{i}"), client, suspect=False))
        for i in range(random.randint(3, 9))
    ]
    await asyncio.sleep(0.01)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert await first == "first"
    # The pool still has its one slot: a later check runs without waiting.
    started = time.monotonic()
    assert await pool.run(slow_check(ran, "later", 0.01), client, suspect=False) == "later"
    assert time.monotonic() - started < CHECK_SECONDS
    assert ran == ["first", "later"]


async def test_a_caller_that_leaves_keeps_its_running_check_in_its_slot() -> None:
    pool = VerificationPool(slots=1, per_ip=50)
    ran: list[str] = []
    running = asyncio.create_task(
        pool.run(slow_check(ran, "running", 0.3), LoginClient("192.0.2.3"), suspect=False)
    )
    await asyncio.sleep(0.05)
    running.cancel()
    started = time.monotonic()
    await pool.run(slow_check(ran, "next", 0.0), LoginClient("192.0.2.4"), suspect=False)
    # Only one thread verifies at a time: "next" waited for the running check.
    assert time.monotonic() - started >= 0.2
    assert ran == ["running", "next"]


async def test_suspects_leave_a_slot_for_clean_clients() -> None:
    slots = random.randint(2, 4)
    pool = VerificationPool(slots=slots, per_ip=1000)
    ran: list[str] = []
    flood = [
        asyncio.create_task(
            pool.run(slow_check(ran, f"s{i}"), LoginClient("192.0.2.66"), suspect=True)
        )
        for i in range(10 * slots)
    ]
    await asyncio.sleep(0.02)
    started = time.monotonic()
    assert await pool.run(slow_check(ran, "honest"), LoginClient("192.0.2.1"), suspect=False)
    # The flood holds slots - 1 threads; the honest check ran at once on the last one.
    assert time.monotonic() - started < 2 * CHECK_SECONDS
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)


class FakeDirectory:
    """A directory with one account whose checks run through ``run_check``."""

    def __init__(self, password: str) -> None:
        self.password = password
        now = dt.datetime.now(dt.UTC)
        self.account = Account(1, "alice@example.org", "hash", "default", None, now)

    async def authenticate(self, login: str, password: str, *, run_check=None, cache=None):  # type: ignore[no-untyped-def]
        ok = await run_check(lambda: password == self.password)
        return self.account if ok else None


def gate(base: float, cap: float = 10.0) -> LoginGate:
    return LoginGate(AuthThrottle(base=base, cap=cap), VerificationPool(slots=2, per_ip=8))


async def timed(coro) -> tuple[object, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = await coro
    return result, time.monotonic() - started


async def test_after_failures_success_and_failure_take_the_same_delay() -> None:
    base = 0.2
    logins = gate(base)
    directory = FakeDirectory("right")
    client = LoginClient("192.0.2.10")
    k = random.randint(2, 3)
    for _ in range(k):
        assert await logins.authenticate(directory, "alice@example.org", "wrong", client) is None
    owed = base * 2 ** (k - 1)
    # Another address, same account: the account's count delays it too.
    account, took = await timed(
        logins.authenticate(directory, "ALICE@example.org", "right", LoginClient("192.0.2.11"))
    )
    assert account is directory.account
    assert took >= owed * 0.95
    # The success cleared the account's record and that address's: no more delay there.
    elsewhere = LoginClient("192.0.2.11")
    _, took = await timed(logins.authenticate(directory, "alice@example.org", "right", elsewhere))
    assert took < base
    # The guessing address keeps its own count.
    _, took = await timed(logins.authenticate(directory, "alice@example.org", "right", client))
    assert took >= owed * 0.95


class CheckingDirectory(FakeDirectory):
    """Counts the password checks that actually ran."""

    def __init__(self, password: str) -> None:
        super().__init__(password)
        self.checks = 0

    async def authenticate(self, login: str, password: str, *, run_check=None, cache=None):  # type: ignore[no-untyped-def]
        def check() -> bool:
            self.checks += 1
            return password == self.password

        return self.account if await run_check(check) else None


async def test_a_client_that_leaves_during_the_delay_costs_no_check() -> None:
    """Issue #18: a throttled guess waits out its delay before its password
    is checked, so a guess abandoned during the delay (the client hung up,
    or its session ended) costs no argon2 check and learns nothing; issue
    #17: one that stays is answered after the delay, whatever the outcome."""
    base = 0.2
    logins = gate(base)
    directory = CheckingDirectory("right")
    ip = "192.0.2.20"
    assert await logins.authenticate(directory, "alice@example.org", "w", LoginClient(ip)) is None
    hung_up = threading.Event()
    leaver = LoginClient(ip, hung_up.is_set)
    guess = asyncio.create_task(logins.authenticate(directory, "alice@example.org", "g", leaver))
    await asyncio.sleep(base / 4)
    hung_up.set()
    with pytest.raises(ConnectionResetError):
        await guess
    ended = asyncio.create_task(
        logins.authenticate(directory, "alice@example.org", "guess", LoginClient(ip))
    )
    await asyncio.sleep(base / 4)
    ended.cancel()
    await asyncio.gather(ended, return_exceptions=True)
    assert directory.checks == 1
    # Neither abandoned guess was checked, so neither counts: the one failure owes `base`.
    account, took = await timed(
        logins.authenticate(directory, "alice@example.org", "right", LoginClient(ip))
    )
    assert account is directory.account
    assert base * 0.95 <= took < 2 * base
    assert directory.checks == 2


async def test_an_outage_is_neither_counted_nor_delayed() -> None:
    logins = gate(0.3)

    class Down:
        async def authenticate(self, login: str, password: str, *, run_check=None, cache=None):  # type: ignore[no-untyped-def]
            raise StorageError(ErrorKind.TEMPORARY, "directory unavailable")

    client = LoginClient("192.0.2.30")
    for _ in range(3):
        with pytest.raises(StorageError):
            await logins.authenticate(Down(), "alice@example.org", "pw", client)  # type: ignore[arg-type]
    _, took = await timed(
        logins.authenticate(FakeDirectory("pw"), "alice@example.org", "pw", client)  # type: ignore[arg-type]
    )
    assert took < 0.3


class SlowDirectory(FakeDirectory):
    """Reading an account takes a while (a loaded database); counts the reads."""

    def __init__(self, password: str) -> None:
        super().__init__(password)
        self.reads = 0
        self.readable = asyncio.Event()

    async def authenticate(self, login: str, password: str, *, run_check=None, cache=None):  # type: ignore[no-untyped-def]
        self.reads += 1
        await self.readable.wait()
        return await super().authenticate(login, password, run_check=run_check)


async def test_an_address_over_its_bound_is_refused_before_its_account_is_read() -> None:
    """Issue #18: 40 abandoned logins at a time queued 40 account reads before
    the bound was checked; the reads starved everyone else's logins."""
    per_ip = random.randint(2, 6)
    logins = LoginGate(AuthThrottle(base=0.2), VerificationPool(slots=2, per_ip=per_ip))
    directory = SlowDirectory("right")
    attacker = LoginClient("192.0.2.40")
    pending = [
        asyncio.create_task(logins.authenticate(directory, "alice@example.org", "w", attacker))
        for _ in range(per_ip)
    ]
    await asyncio.sleep(0.01)
    for _ in range(random.randint(1, 20)):
        with pytest.raises(StorageError) as refused:
            await asyncio.wait_for(
                logins.authenticate(directory, "alice@example.org", "w", attacker), 1.0
            )
        assert refused.value.kind is ErrorKind.TEMPORARY
    assert directory.reads == per_ip
    directory.readable.set()
    assert await asyncio.gather(*pending) == [None] * per_ip
    # Throttled now, the address keeps its places while it waits out the delay:
    # hanging up and retrying stacks no more attempts than the bound.
    waiting = [
        asyncio.create_task(logins.authenticate(directory, "alice@example.org", "w", attacker))
        for _ in range(per_ip)
    ]
    await asyncio.sleep(0.05)
    with pytest.raises(StorageError):
        await logins.authenticate(directory, "alice@example.org", "right", attacker)
    assert await asyncio.gather(*waiting) == [None] * per_ip

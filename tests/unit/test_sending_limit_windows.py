"""delivery/limits.py without a network: past a limit is refused naming it,
the first trip flags the account and holds its queued mail, the flag
outlives the counts, the windows roll over, and [limits] refuses negative
and unknown keys."""

from __future__ import annotations

import datetime as dt
import random
import time

import pydantic
import pytest

from conf.settings import Settings
from delivery.limits import LIMITS, LimitReached, hold_reason, reason_prefix, release_account
from storage.errors import ErrorKind, StorageError
from storage.model import Account
from storage.shared import LocalCounts, shared_state

LIMIT_NAMES = [name for name, _, _ in LIMITS]


class Queue:
    """Records flag calls and keeps the flags in a set (the SQL operations
    are contract-tested on both backends in tests/contract/test_queue_hold_sender.py)."""

    def __init__(self) -> None:
        self.held: list[tuple[str, str]] = []
        self.flagged: set[str] = set()

    async def flag(self, address: str, reason: str) -> int:
        self.held.append((address, reason))
        self.flagged.add(address.lower())
        return 0

    async def is_flagged(self, address: str) -> bool:
        return address.lower() in self.flagged

    async def release_account(self, address: str, prefix: str) -> dict[str, tuple[int, bool]]:
        assert prefix == f"sending limit: {address.lower()}: "
        found = address.lower() in self.flagged
        self.flagged.discard(address.lower())
        return {"default": (0, found)}


class Site:
    """A stand-in storage: shared_state keys on the object."""

    def __init__(self) -> None:
        self.queue = Queue()


def account(address: str) -> Account:
    return Account(
        id=random.randint(1, 10**6), address=address, password_hash="", shard="default",
        quota_bytes=None, created=dt.datetime.now(dt.UTC),
    )


async def test_past_a_limit_is_refused_then_held_until_released() -> None:
    limit = random.randint(2, 9)
    settings = Settings.model_validate({"limits": {
        "user_messages_per_hour": 0, "user_messages_per_day": 0,
        "user_recipients_per_hour": 0, "user_recipients_per_day": limit,
    }})
    site, alice, bob = Site(), account("Alice@Example.NET"), account("bob@example.net")
    assert await hold_reason(site, settings, alice, limit - 1) is None
    before = time.time()
    with pytest.raises(LimitReached) as refused:
        await hold_reason(site, settings, alice, 2)
    err = refused.value
    assert str(err) == (f"Sending limit reached: {limit} recipients per day for "
                        "alice@example.net; try later")
    assert (err.limit, err.allowed) == ("user_recipients_per_day", limit)
    day_end = (before // 86400 + 1) * 86400
    assert day_end - time.time() - 1 <= err.retry_after <= day_end - before + 1
    # The first trip holds what the account queued, once, under its reason.
    assert site.queue.held == [(
        "alice@example.net",
        f"sending limit: alice@example.net: over user_recipients_per_day = {limit}",
    )]
    with pytest.raises(LimitReached):
        await hold_reason(site, settings, alice, 2)
    assert len(site.queue.held) == 1
    # The refusals took their counts back: one more recipient fits, held (flagged).
    flagged = await hold_reason(site, settings, alice, 1)
    assert flagged is not None and flagged.startswith(reason_prefix("ALICE@example.net"))
    assert "held after going over a limit" in flagged
    assert await hold_reason(site, settings, bob, limit) is None
    # Limits raised by the admin: no count is over now, the flag still holds.
    settings.limits.user_recipients_per_day = 10 * limit + 10
    assert await hold_reason(site, settings, alice, 1) == flagged
    assert await release_account(site, "ALICE@example.net") == {"default": (0, True)}
    assert await release_account(site, "alice@example.net") == {"default": (0, False)}
    assert await hold_reason(site, settings, alice, 1) is None
    assert shared_state(site).counts is shared_state(site).counts


async def test_an_unreadable_flag_is_a_temporary_error_that_counts_nothing() -> None:
    """The flag's database down: StorageError TEMPORARY (SMTP 451, API 503),
    raised before counting, so the account's window is not used up."""
    limit = random.randint(1, 5)
    off = dict.fromkeys(LIMIT_NAMES, 0)
    settings = Settings.model_validate({"limits": {**off, "user_messages_per_hour": limit}})
    site, dave = Site(), account("dave@example.net")

    async def down(address: str) -> bool:
        raise StorageError(ErrorKind.TEMPORARY, "database unavailable")

    site.queue.is_flagged = down  # type: ignore[method-assign]
    for _ in range(limit + random.randint(1, 3)):
        with pytest.raises(StorageError) as failed:
            await hold_reason(site, settings, dave, 1)
        assert failed.value.kind is ErrorKind.TEMPORARY
    del site.queue.is_flagged
    for _ in range(limit):
        assert await hold_reason(site, settings, dave, 1) is None
    with pytest.raises(LimitReached):
        await hold_reason(site, settings, dave, 1)


async def test_the_refusal_names_the_limit_that_waits_longest() -> None:
    settings = Settings.model_validate({"limits": {
        "user_messages_per_hour": 1, "user_messages_per_day": 1,
        "user_recipients_per_hour": 0, "user_recipients_per_day": 0,
    }})
    site, carol = Site(), account(f"carol{random.randint(0, 999)}@example.org")
    assert await hold_reason(site, settings, carol, random.randint(1, 50)) is None
    with pytest.raises(LimitReached) as refused:
        await hold_reason(site, settings, carol, 1)
    assert refused.value.limit == "user_messages_per_day"
    assert str(refused.value).startswith("Sending limit reached: 1 messages per day for carol")


async def test_counts_start_again_in_the_next_window() -> None:
    now = [random.uniform(0, 1e9)]
    counts = LocalCounts(clock=lambda: now[0])
    window = random.choice([3600.0, 86400.0])
    start = (now[0] // window) * window
    now[0] = start + 1
    assert await counts.add([("a", window, 2), ("b", window, 1)]) == [2, 1]
    assert await counts.add([("a", window, 3)]) == [5]
    now[0] = start + window  # the next window
    assert await counts.add([("a", window, 1), ("b", window, 0)]) == [1, 0]


@pytest.mark.parametrize("values", [{"user_messages_per_hour": -1}, {"per_hour": 5}])
def test_limits_refuse_negative_and_unknown_keys(values: dict[str, int]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings.model_validate({"limits": values})

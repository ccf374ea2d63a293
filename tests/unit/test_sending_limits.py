"""delivery/limits.py without a network: the flag outlives the counts, the
windows roll over, and [limits] refuses negative and unknown keys."""

from __future__ import annotations

import datetime as dt
import random

import pydantic
import pytest

from conf.settings import Settings
from delivery.limits import hold_reason, release_account
from storage.model import Account
from storage.shared import LocalCounts, shared_state


class Site:
    """A stand-in storage: shared_state keys on the object."""


def account(address: str) -> Account:
    return Account(
        id=random.randint(1, 10**6), address=address, password_hash="", shard="default",
        quota_bytes=None, created=dt.datetime.now(dt.UTC),
    )


async def test_a_flagged_account_stays_held_until_released() -> None:
    limit = random.randint(1, 5)
    settings = Settings.model_validate({"limits": {
        "user_messages_per_hour": 0, "user_messages_per_day": 0,
        "user_recipients_per_hour": 0, "user_recipients_per_day": limit,
    }})
    site, alice, bob = Site(), account("Alice@Example.NET"), account("bob@example.net")
    assert await hold_reason(site, settings, alice, limit) is None
    over = await hold_reason(site, settings, alice, 1)
    assert over == (f"sending limit: alice@example.net: over user_recipients_per_day = {limit}"
                    f" (now {limit + 1})")
    assert await hold_reason(site, settings, bob, limit) is None
    # Limits raised by the admin: no count is over now, the flag still holds.
    settings.limits.user_recipients_per_day = 10 * limit + 10
    flagged = await hold_reason(site, settings, alice, 1)
    assert flagged is not None and "held after going over a limit" in flagged
    assert await release_account(site, settings, "ALICE@example.net")
    assert not await release_account(site, settings, "alice@example.net")
    assert await hold_reason(site, settings, alice, 1) is None
    assert shared_state(site).counts is shared_state(site).counts


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

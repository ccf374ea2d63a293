"""Folder lists are ordered by the message's Date (RFC 5322 section 3.6.1),
so imported mail sits by its date rather than by when it arrived; a Date
later than the arrival counts as the arrival (a future Date must not pin a
message to the top). Paging by cursor neither skips nor repeats."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from tests.integration.http.conftest import Api, deliver, make_mail


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _inbox(api: Api) -> str:
    _, data = await api.get("/v1/folders")
    return next(f["id"] for f in data["folders"] if f["name"] == "INBOX")


async def _all_pages(api: Api, inbox: str, limit: int, query: str = "") -> list[str]:
    subjects: list[str] = []
    cursor = None
    while True:
        more = f"&cursor={cursor}" if cursor else ""
        status, page = await api.get(f"/v1/folders/{inbox}/messages?limit={limit}{more}{query}")
        assert status == 200, page
        subjects += [m["subject"] for m in page["messages"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return subjects


async def test_imported_mail_sits_by_its_date(alice_api: Api, mailstore: Any, alice: Any) -> None:
    rng = random.Random()
    ages = rng.sample(range(1, 5000), 17)  # hours before now, delivered in random order
    for age in ages:
        when = now() - dt.timedelta(hours=age)
        await deliver(mailstore, alice, make_mail(f"aged {age}", date=when))
    inbox = await _inbox(alice_api)
    expected = [f"aged {age}" for age in sorted(ages)]
    for limit in (1, 3, 17, 50):
        assert await _all_pages(alice_api, inbox, limit) == expected, limit
    # Filters keep the order.
    unread = await _all_pages(alice_api, inbox, 4, "&unread=true")
    assert unread == expected


async def test_a_future_date_does_not_pin_a_message_to_the_top(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    await deliver(mailstore, alice, make_mail("from the future",
                                              date=now() + dt.timedelta(days=900)))
    await deliver(mailstore, alice, make_mail("last year", date=now() - dt.timedelta(days=365)))
    # A clock a little fast: counts as its arrival, after the future one's.
    await deliver(mailstore, alice, make_mail("just now", date=now() + dt.timedelta(seconds=2)))
    inbox = await _inbox(alice_api)
    assert await _all_pages(alice_api, inbox, 2) == ["just now", "from the future", "last year"]


async def test_paging_by_date_survives_deliveries_between_pages(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    for day in range(10):
        when = now() - dt.timedelta(days=day)
        await deliver(mailstore, alice, make_mail(f"day {day}", date=when))
    inbox = await _inbox(alice_api)
    _, first = await alice_api.get(f"/v1/folders/{inbox}/messages?limit=4")
    assert [m["subject"] for m in first["messages"]] == [f"day {d}" for d in range(4)]
    # An old import lands in the part not yet paged; new mail lands above.
    await deliver(mailstore, alice, make_mail("import", date=now() - dt.timedelta(days=6, hours=1)))
    await deliver(mailstore, alice, make_mail("fresh", date=now()))
    seen = [m["subject"] for m in first["messages"]]
    cursor = first["next_cursor"]
    while cursor:
        _, page = await alice_api.get(f"/v1/folders/{inbox}/messages?limit=4&cursor={cursor}")
        seen += [m["subject"] for m in page["messages"]]
        cursor = page["next_cursor"]
    assert seen == [f"day {d}" for d in range(7)] + ["import"] + [f"day {d}" for d in (7, 8, 9)]

"""EventBus contract on every bus: in-process and PostgreSQL LISTEN/NOTIFY
(which also carries changes between instances)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import make_url

from storage.events import InProcessEventBus, PgNotifyEventBus
from storage.model import Change, ChangeKind

BUS_BACKENDS = ["inprocess", "postgres"]
ARRIVAL = 2.0  # seconds a published change may take to arrive
AT = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


async def _pg_dsn(request: pytest.FixtureRequest) -> str:
    pg = request.getfixturevalue("pg_server")
    url = await pg.database()
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(params=BUS_BACKENDS)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    if request.param == "inprocess":
        b: InProcessEventBus | PgNotifyEventBus = InProcessEventBus(queue_size=8)
    else:
        b = PgNotifyEventBus(await _pg_dsn(request), queue_size=8)
        await b.start()
    yield b
    await b.close()


def change(i: int, account: int = 1, **data: object) -> Change:
    return Change(i, account, ChangeKind.NEW, 1, i, i, AT, {"n": i, **data})


async def test_publish_reaches_every_subscriber_of_the_account(bus) -> None:
    a, b, other = bus.subscribe(1), bus.subscribe(1), bus.subscribe(2)
    await bus.publish(change(1))
    got_a, got_b = await a.get(timeout=ARRIVAL), await b.get(timeout=ARRIVAL)
    assert got_a == change(1) and got_a.data == {"n": 1}
    assert got_b.id == 1
    assert await other.get(timeout=0.05) is None
    assert await a.get(timeout=0.05) is None  # exactly once
    for s in (a, b, other):
        s.close()


async def test_order_and_async_iteration(bus) -> None:
    sub = bus.subscribe(1)
    for i in range(1, 4):
        await bus.publish(change(i))
    got = []
    async for c in sub:
        got.append(c.id)
        if len(got) == 3:
            sub.close()
    assert got == [1, 2, 3]


async def test_close_wakes_a_waiting_reader(bus) -> None:
    sub = bus.subscribe(1)
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0.01)
    sub.close()
    assert await asyncio.wait_for(waiter, 1) is None
    await bus.publish(change(1))  # no error after close
    assert await sub.get(timeout=0.05) is None


async def test_slow_consumer_drops_oldest(bus) -> None:
    sub = bus.subscribe(1)
    for i in range(1, 21):
        await bus.publish(change(i))
    last = None
    for _ in range(int(ARRIVAL / 0.05)):  # wait until the newest has arrived
        await asyncio.sleep(0.05)
        if sub._queue.qsize() == 8 and sub._queue._queue[-1].id == 20:  # type: ignore[attr-defined]
            break
    got = []
    while (last := await sub.get(timeout=0.05)) is not None:
        got.append(last.id)
    assert got == list(range(13, 21))  # the newest 8 remain
    sub.close()


async def test_timeout_returns_none(bus) -> None:
    sub = bus.subscribe(1)
    assert await sub.get(timeout=0.01) is None
    sub.close()


async def test_notify_carries_changes_between_instances(request: pytest.FixtureRequest) -> None:
    dsn = await _pg_dsn(request)
    one, two = PgNotifyEventBus(dsn), PgNotifyEventBus(dsn)
    await one.start()
    await two.start()
    try:
        here, there = one.subscribe(7), two.subscribe(7)
        await one.publish(change(1, account=7))
        await one.publish(change(2, account=7, big="x" * 10_000))  # over the NOTIFY limit
        assert (await there.get(timeout=ARRIVAL)).id == 1
        big = await there.get(timeout=ARRIVAL)
        assert big.id == 2 and big.data == {"truncated": True}
        assert [(await here.get(timeout=ARRIVAL)).id for _ in range(2)] == [1, 2]
        assert await here.get(timeout=0.05) is None
    finally:
        await one.close()
        await two.close()

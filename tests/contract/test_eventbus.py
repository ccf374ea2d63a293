"""EventBus contract on every bus: in-process, PostgreSQL LISTEN/NOTIFY and
Redis pub/sub (both also carry changes between instances)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import make_url

from storage.events import InProcessEventBus, PgNotifyEventBus, RedisEventBus
from storage.model import Change, ChangeKind

BUS_BACKENDS = ["inprocess", "postgres", "redis"]
ARRIVAL = 2.0  # seconds a published change may take to arrive
AT = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


async def _pg_dsn(request: pytest.FixtureRequest) -> str:
    pg = request.getfixturevalue("pg_server")
    url = await pg.database()
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(params=BUS_BACKENDS)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    if request.param == "inprocess":
        b: InProcessEventBus | PgNotifyEventBus | RedisEventBus = InProcessEventBus(queue_size=8)
    elif request.param == "redis":
        b = RedisEventBus(request.getfixturevalue("redis_url"), queue_size=8)
        await b.start()
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
        pending = sub.pending_changes()
        if len(pending) == 8 and pending[-1] is not None and pending[-1].id == 20:
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


# --- Redis pub/sub between instances -----------------------------------------


async def test_redis_carries_changes_and_routes_between_instances(redis_url: str) -> None:
    one, two = RedisEventBus(redis_url), RedisEventBus(redis_url)
    await one.start()
    await two.start()
    routes: list[tuple[int | None, str | None]] = []
    two.watch_routes(lambda account, shard: routes.append((account, shard)))
    try:
        here, there, elsewhere = one.subscribe(7), two.subscribe(7), two.subscribe(8)
        await one.publish(change(1, account=7))
        await one.publish(change(2, account=7, big="x" * 10_000))  # data cut as on NOTIFY
        assert (await there.get(timeout=ARRIVAL)).id == 1
        big = await there.get(timeout=ARRIVAL)
        assert big.id == 2 and big.data == {"truncated": True}
        assert [(await here.get(timeout=ARRIVAL)).id for _ in range(2)] == [1, 2]
        assert await here.get(timeout=0.05) is None  # its own change once, not echoed
        assert await elsewhere.get(timeout=0.05) is None
        await one.publish_route(7, "shard-b")
        for _ in range(int(ARRIVAL / 0.05)):
            if routes:
                break
            await asyncio.sleep(0.05)
        assert routes == [(7, "shard-b")]
    finally:
        await one.close()
        await two.close()


async def test_redis_bus_reconnects_after_a_restart(redis_server, redis_url: str) -> None:
    one, two = RedisEventBus(redis_url), RedisEventBus(redis_url)
    await one.start()
    await two.start()
    routes: list[tuple[int | None, str | None]] = []
    two.watch_routes(lambda account, shard: routes.append((account, shard)))
    try:
        here, there = one.subscribe(3), two.subscribe(3)
        redis_server.pause()
        await one.publish(change(1, account=3))  # no error; this instance still hears it
        assert (await here.get(timeout=ARRIVAL)).id == 1
        redis_server.resume()
        # Route changes may have been missed meanwhile: every cached route is suspect.
        for _ in range(int(10 / 0.05)):
            if (None, None) in routes:
                break
            await asyncio.sleep(0.05)
        assert (None, None) in routes
        for _ in range(int(10 / 0.1)):  # the publisher's retry delay may still run
            await one.publish(change(2, account=3))
            got = await there.get(timeout=0.1)
            if got is not None:
                break
        assert got is not None and got.id == 2
    finally:
        await one.close()
        await two.close()


async def test_storage_events_redis_pushes_between_instances(tmp_path, redis_url: str) -> None:
    """``[storage] events = "redis"``: two instances over one database hear
    each other's commits through Redis (and only with a [redis] url)."""
    from argon2 import PasswordHasher, profiles

    from conf.settings import Settings
    from storage import ErrorKind, StorageError, open_storage
    from storage.backend import open_storage_from_url
    from tests.conftest import make_settings
    from tests.contract.mailfactory import deliver

    with pytest.raises(ValueError, match='"redis" needs \\[redis\\] url'):
        Settings.model_validate({"storage": {"events": "redis"}})
    with pytest.raises(StorageError) as refused:
        await open_storage_from_url("sqlite+aiosqlite://", tmp_path / "b", events="redis")
    assert refused.value.kind is ErrorKind.INVALID

    settings = make_settings(
        tmp_path / "data", storage={"events": "redis"}, redis={"url": redis_url}
    )
    hasher = PasswordHasher.from_parameters(profiles.CHEAPEST)
    one = await open_storage(
        settings.storage, password_hasher=hasher, redis_url=settings.redis.url
    )
    two = await open_storage(
        settings.storage, password_hasher=hasher, redis_url=settings.redis.url
    )
    try:
        assert isinstance(one.events, RedisEventBus) and isinstance(two.events, RedisEventBus)
        await one.directory.add_domain("example.org")
        account = await one.directory.add_account("dana@example.org", "pw")
        there = two.events.subscribe(account.id)
        uid = await deliver(one, account, subject="pushed")
        got = await there.get(timeout=ARRIVAL)
        while got is not None and got.kind is ChangeKind.MAILBOX:  # the account's folders
            got = await there.get(timeout=ARRIVAL)
        assert got is not None and got.kind is ChangeKind.NEW and got.uid == uid
        there.close()
    finally:
        await one.close()
        await two.close()


@pytest.mark.timeout(30)
async def test_redis_bus_never_makes_a_commit_wait_for_a_silent_server() -> None:
    """A Redis host that accepts connections and never answers (hung, or a
    black hole behind a firewall): start and publish return at once and this
    instance's subscribers still get every change."""
    silent: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)  # never answers

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = RedisEventBus(f"redis://127.0.0.1:{port}/0", timeout=0.2)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        await bus.start()
        assert loop.time() - started < 1.0
        sub = bus.subscribe(5)
        started = loop.time()
        for i in range(1, 6):
            await bus.publish(change(i, account=5))
        assert loop.time() - started < 0.1
        assert [(await sub.get(timeout=ARRIVAL)).id for _ in range(5)] == [1, 2, 3, 4, 5]
    finally:
        started = loop.time()
        await bus.close()
        assert loop.time() - started < 2.0
        for writer in silent:
            writer.close()
        server.close()


async def _fake_redis_that_stops_answering(subscribed: list[int]) -> asyncio.Server:
    """A Redis (RESP3, as redis-py speaks by default) that confirms HELLO and
    SUBSCRIBE, says OK to anything else, and never answers PING: the way a
    connection to a host that vanished (no RST) looks from here. Each
    SUBSCRIBE appends to ``subscribed``."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                words = []
                for _ in range(int(line[1:])):  # *N: one command of N words
                    size = int((await reader.readline())[1:])
                    words.append((await reader.readexactly(size + 2))[:-2])
                command = words[0].upper()
                if command == b"HELLO":
                    writer.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                elif command == b"SUBSCRIBE":
                    subscribed.append(len(subscribed))
                    for n, channel in enumerate(words[1:], 1):
                        writer.write(b">3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:%d\r\n"
                                     % (len(channel), channel, n))
                elif command != b"PING":
                    writer.write(b"+OK\r\n")
                await writer.drain()

    return await asyncio.start_server(session, "127.0.0.1", 0)


@pytest.mark.timeout(30)
async def test_redis_bus_reconnects_when_redis_stops_answering() -> None:
    subscribed: list[int] = []
    server = await _fake_redis_that_stops_answering(subscribed)
    port = server.sockets[0].getsockname()[1]
    bus = RedisEventBus(f"redis://127.0.0.1:{port}/0", timeout=0.2, ping_interval=0.2)
    routes: list[tuple[int | None, str | None]] = []
    bus.watch_routes(lambda account, shard: routes.append((account, shard)))
    try:
        await bus.start()
        for _ in range(int(10 / 0.05)):  # no PONG: a new connection, subscribed again
            if (None, None) in routes:
                break
            await asyncio.sleep(0.05)
        assert (None, None) in routes and len(subscribed) >= 2
    finally:
        await bus.close()
        server.close()


async def test_redis_bus_flushes_on_close(redis_url: str) -> None:
    """A command that moves an account and exits (``mailctl account move``)
    still tells every instance: close sends what was queued."""
    daemon, command = RedisEventBus(redis_url), RedisEventBus(redis_url)
    await daemon.start()
    await command.start()
    routes: list[tuple[int | None, str | None]] = []
    daemon.watch_routes(lambda account, shard: routes.append((account, shard)))
    try:
        account = random.randint(1, 10**9)
        await command.publish_route(account, "b")
        await command.close()
        for _ in range(int(ARRIVAL / 0.05)):
            if routes:
                break
            await asyncio.sleep(0.05)
        assert routes == [(account, "b")]
    finally:
        await daemon.close()

"""Failover of a PostgreSQL shard to its streaming replica (issue #19).

Each test runs a real primary with a synchronous streaming replica (so
whatever a commit acknowledged is on the replica), SIGKILLs the primary and
promotes the replica with ``pg_ctl promote``. The same ``Database`` or
storage object, never restarted, must then find the new primary by itself
within seconds, and every failure during the gap must be TEMPORARY (a 4xx,
NO [UNAVAILABLE], -ERR [SYS/TEMP], 503), never a bug's reply."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import make_url

from storage.backend import SqlStorage, failover_url, open_storage_from_url
from storage.errors import ErrorKind, StorageError
from storage.events import InProcessSubscription, PgNotifyEventBus, asyncpg_connect_args
from storage.model import Account, Change, ChangeKind, UidSet
from storage.sql import db as db_module
from storage.sql.db import Database
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build
from tests.pgserver import PgServer, primary_with_replica

T = TypeVar("T")

# How long after the promotion the same process may take to write again.
RECONNECT_WITHIN = 10.0
RETRY_PAUSE = 0.1
# The same with a hung old primary: a ping and a connect attempt time out first.
HUNG_RECOVER_WITHIN = 20.0


@pytest.fixture
def pair() -> Iterator[tuple[PgServer, PgServer]]:
    """A primary and its synchronous streaming replica."""
    with primary_with_replica() as servers:  # raises (the test errors) if PostgreSQL cannot run
        yield servers


async def _until_written(attempt: Callable[[], Awaitable[T]]) -> tuple[T, list[StorageError]]:
    """Retries ``attempt`` while it fails TEMPORARY, for RECONNECT_WITHIN
    seconds; returns its result and the errors seen. Any other failure (or
    none in time) fails the test."""
    errors: list[StorageError] = []
    deadline = time.monotonic() + RECONNECT_WITHIN
    while True:
        try:
            return await attempt(), errors
        except StorageError as err:
            assert err.kind is ErrorKind.TEMPORARY, err
            errors.append(err)
            if time.monotonic() > deadline:
                raise AssertionError(f"no write within {RECONNECT_WITHIN}s: {err!r}") from err
            await asyncio.sleep(RETRY_PAUSE)


async def _database(primary: PgServer, replica: PgServer) -> tuple[str, str]:
    """A new database on ``primary``, visible on ``replica`` too: its name,
    and the URL naming both servers (what ``[storage.shards.NAME] replicas``
    makes, :func:`failover_url`)."""
    url = await primary.create_database()
    name = url.rsplit("/", 1)[1]
    await asyncio.to_thread(replica.wait_replayed, primary)
    return name, failover_url(url, [replica.url(name)])


async def _fail_over(primary: PgServer, replica: PgServer) -> None:
    """SIGKILL of the primary (a crashed host), then ``pg_ctl promote``."""
    await asyncio.to_thread(primary.kill)
    await asyncio.to_thread(replica.promote)


async def _deliver(storage: SqlStorage, account: Account, subject: str) -> int:
    raw, parsed = build(subject=subject, body=random.randbytes(random.randint(1, 999)).hex())
    key = await storage.blobs.put(raw)
    results = await storage.mail(account).deliver(account.id, key, parsed, [("INBOX", (), None)])
    return results[0].uid


async def _subjects(storage: SqlStorage, account: Account) -> list[str]:
    mail = storage.mail(account)
    inbox = await mail.get_mailbox(account.id, "INBOX")
    entries = await mail.uids(account.id, inbox.id)
    fetched = await mail.fetch(account.id, inbox.id, UidSet.all())
    assert len(fetched) == len(entries)
    return [m.parsed.subject for m in fetched]


async def test_storage_delivers_again_after_promotion_without_restart(
    pair: tuple[PgServer, PgServer], tmp_path: Path
) -> None:
    """A multi-host URL (``?host=primary&host=replica&target_session_attrs=
    read-write``): deliver, kill -9 the primary, promote the replica, and
    deliver again through the same storage object within seconds; the
    message acknowledged before the crash is still there."""
    primary, replica = pair
    _name, url = await _database(primary, replica)
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        await storage.directory.add_domain("example.org")
        account = await storage.directory.add_account("bob@example.org", "pw")
        before = f"before {random.getrandbits(64):x}"
        await _deliver(storage, account, before)
        await _fail_over(primary, replica)
        started = time.monotonic()
        after = f"after {random.getrandbits(64):x}"
        await _until_written(lambda: _deliver(storage, account, after))
        assert time.monotonic() - started < RECONNECT_WITHIN
        assert sorted(await _subjects(storage, account)) == sorted([before, after])
    finally:
        await storage.close()


async def test_change_events_resume_after_promotion(
    pair: tuple[PgServer, PgServer], tmp_path: Path
) -> None:
    """An IDLE session's subscription on one instance again receives the
    changes another instance publishes (LISTEN/NOTIFY) once the replica
    is promoted: the listener reconnects to the new primary by itself."""
    primary, replica = pair
    name, url = await _database(primary, replica)
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        assert isinstance(storage.events, PgNotifyEventBus)
        subscription = storage.events.subscribe(7)
        await _fail_over(primary, replica)
        # Another instance, started after the failover, on the new primary.
        other = PgNotifyEventBus(f"postgresql://postgres@127.0.0.1:{replica.port}/{name}")
        await other.start()
        try:
            received = await _published_until_received(other, subscription)
        finally:
            await other.close()
        assert received.account_id == 7 and received.data["n"] == received.id
    finally:
        await storage.close()


async def _published_until_received(
    bus: PgNotifyEventBus, subscription: InProcessSubscription
) -> Change:
    """Publishes a new change every half second until ``subscription``
    receives one (a NOTIFY sent while nobody listens is lost: best effort)."""
    deadline = time.monotonic() + RECONNECT_WITHIN
    at = dt.datetime.now(dt.UTC)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        await bus.publish(Change(n, 7, ChangeKind.NEW, 1, n, n, at, {"n": n}))
        received = await subscription.get(timeout=0.5)
        if received is not None:
            return received
    raise AssertionError(f"no change received within {RECONNECT_WITHIN}s of the promotion")


async def test_a_database_with_replicas_writes_to_the_promoted_one(
    pair: tuple[PgServer, PgServer],
) -> None:
    """A shard database with replicas (``[storage.shards.NAME] replicas``):
    they are promotion targets, so after the failover writes go to the
    promoted replica; during the gap they fail TEMPORARY."""
    primary, replica = pair
    _name, url = await _database(primary, replica)
    db = Database(url)
    try:
        await db.migrate()
        await _insert_domain(db, "before.example")
        await _fail_over(primary, replica)
        await _until_written(lambda: _insert_domain(db, "after.example"))
        assert await _domains(db) == ["after.example", "before.example"]
    finally:
        await db.close()


async def test_a_standby_alone_is_temporary_for_a_writer(
    pair: tuple[PgServer, PgServer],
) -> None:
    """No host takes writes yet (the primary is gone, the replica not yet
    promoted, or only standbys are listed): TEMPORARY, not a bug."""
    primary, replica = pair
    name, _url = await _database(primary, replica)
    db = Database(replica.url(name) + "?target_session_attrs=read-write")
    try:
        with pytest.raises(StorageError) as err:
            await _insert_domain(db, "nowhere.example")
        assert err.value.kind is ErrorKind.TEMPORARY
    finally:
        await db.close()


async def test_a_fenced_old_primary_hands_writes_to_the_new_one(
    pair: tuple[PgServer, PgServer],
) -> None:
    """The old primary is still up but fenced read-only (what a failover
    manager does before promoting): its pooled connections still answer a
    ping, yet every write fails (SQLSTATE 25006). The pool must drop them
    and reconnect, finding the promoted replica, instead of failing forever."""
    primary, replica = pair
    name, url = await _database(primary, replica)
    db = Database(url)
    try:
        await db.migrate()
        for i in range(3):  # several pooled connections to the old primary
            await _insert_domain(db, f"old{i}.example")
        # Fence first, then promote, as a failover manager does. The other
        # order races: a pooled backend that has not yet had the reload
        # signal would commit on the old primary and wait forever for the
        # synchronous standby that has just left it.
        await asyncio.to_thread(
            primary.sql,
            "ALTER SYSTEM SET default_transaction_read_only = on",
            "SELECT pg_reload_conf()",
        )
        await asyncio.to_thread(replica.promote)
        await _until_written(lambda: _insert_domain(db, "new.example"))
        on_new = await asyncio.to_thread(
            replica.sql, "SELECT 1 FROM domains WHERE name = 'new.example'", database=name
        )
        assert on_new == "1"
    finally:
        await db.close()


async def test_a_standby_that_stops_answering_makes_deliveries_temporary_not_hung(
    pair: tuple[PgServer, PgServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The synchronous standby hangs (SIGSTOP): every COMMIT on the primary
    waits for it. A delivery fails TEMPORARY within the bounds (COMMIT_WAIT_
    SECONDS, then COMMIT_IN_DOUBT_SECONDS to learn the outcome) instead of
    waiting for ever; once the standby answers again deliveries go through,
    and every acknowledged message is on the standby too."""
    monkeypatch.setattr(db_module, "COMMIT_WAIT_SECONDS", 1.0)
    monkeypatch.setattr(db_module, "COMMIT_IN_DOUBT_SECONDS", 2.0)
    primary, replica = pair
    name, url = await _database(primary, replica)
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        await storage.directory.add_domain("example.org")
        account = await storage.directory.add_account("bob@example.org", "pw")
        acknowledged = [f"before {random.getrandbits(64):x}"]
        await _deliver(storage, account, acknowledged[0])
        replica.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(StorageError) as failed:
                await _deliver(storage, account, "while the standby hangs")
            assert failed.value.kind is ErrorKind.TEMPORARY, failed.value
            assert time.monotonic() - started < 15
        finally:
            replica.thaw()
        acknowledged.append(f"after {random.getrandbits(64):x}")
        await _until_written(lambda: _deliver(storage, account, acknowledged[-1]))
        assert set(acknowledged) <= set(await _subjects(storage, account))
        await asyncio.to_thread(replica.wait_replayed, primary)
        on_standby = await asyncio.to_thread(
            replica.sql, "SELECT string_agg(subject, '|') FROM messages", database=name
        )
        assert set(acknowledged) <= set(on_standby.split("|")), on_standby
    finally:
        await storage.close()


@contextlib.contextmanager
def _silent_host() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a host that never answers a connection, like a
    powered-off machine (its SYNs go unanswered, nothing refuses them): a
    listener whose accept queue is full, so the kernel drops further SYNs."""
    listener = socket.socket()
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(address)
        yield f"127.0.0.1:{address[1]}"
    finally:
        for sock in (*fillers, listener):
            sock.close()


async def test_a_dead_first_host_that_never_answers_does_not_hold_up_the_failover(
    pair: tuple[PgServer, PgServer],
) -> None:
    """The old primary's host is powered off: connections to it time out
    instead of being refused. Each host gets a few seconds, then the next
    one is tried (as libpq's connect_timeout does), so the shard and the
    event listener reach the promoted replica within seconds, not after
    the driver's whole connect timeout spent on the first host."""
    primary, replica = pair
    name, _url = await _database(primary, replica)
    await _fail_over(primary, replica)
    with _silent_host() as dead:
        url = f"postgresql+asyncpg://postgres@/{name}?host={dead}&host=127.0.0.1:{replica.port}"
        url += "&target_session_attrs=read-write"
        db = Database(url)
        try:
            await db.migrate()
            started = time.monotonic()
            await _until_written(lambda: _insert_domain(db, "after.example"))
            assert time.monotonic() - started < RECONNECT_WITHIN
        finally:
            await db.close()
        bus = PgNotifyEventBus(url)
        try:
            await asyncio.wait_for(bus.start(), RECONNECT_WITHIN)
        finally:
            await bus.close()


async def test_a_hung_old_primary_does_not_hold_up_requests_after_the_promotion(
    pair: tuple[PgServer, PgServer],
) -> None:
    """The old primary hangs (or its host died without a word): its pooled
    connections stay open and nothing answers on them. A request must not
    wait on such a connection forever (or for TCP's 15 minutes): the ping
    before a pooled connection is used gives up after a few seconds, and
    the next connection finds the promoted replica."""
    primary, replica = pair
    _name, url = await _database(primary, replica)
    db = Database(url)
    try:
        await db.migrate()
        for i in range(3):  # pooled connections to the primary
            await _insert_domain(db, f"old{i}.example")
        await asyncio.to_thread(primary.freeze)
        await asyncio.to_thread(replica.promote)
        started = time.monotonic()
        await asyncio.wait_for(
            _until_written(lambda: _insert_domain(db, "new.example")), HUNG_RECOVER_WITHIN
        )
        assert time.monotonic() - started < HUNG_RECOVER_WITHIN
        assert await _domains(db) == ["new.example", "old0.example", "old1.example", "old2.example"]
    finally:
        await asyncio.to_thread(primary.kill)  # SIGKILL ends a stopped process too
        await db.close()


async def _insert_domain(db: Database, domain: str) -> None:
    async with db.write() as conn:
        await conn.exec_driver_sql("INSERT INTO domains (name) VALUES ($1)", (domain,))


async def _domains(db: Database) -> list[str]:
    async with db.read() as conn:
        result = await conn.exec_driver_sql("SELECT name FROM domains ORDER BY name")
        return [row[0] for row in result]


def test_the_listener_connects_to_every_host_with_the_credentials() -> None:
    """The LISTEN bus reads a multi-host URL whole: every host in order (an
    asyncpg DSN keeps only the last ``host=``) and the password as written."""
    password = "".join(random.choice("p@ss:/?#%&= wörd") for _ in range(random.randint(1, 20)))
    ports = random.sample(range(1024, 65536), random.randint(2, 4))
    url = make_url("postgresql+asyncpg://shardmail@/mail").set(
        password=password,
        query={
            "host": tuple(f"127.0.0.1:{p}" for p in ports),
            "target_session_attrs": "read-write",
        },
    )
    args = asyncpg_connect_args(url.render_as_string(hide_password=False))
    assert list(zip(args["host"], map(int, args["port"]), strict=True)) == [
        ("127.0.0.1", p) for p in ports
    ]
    assert (args["user"], args["password"], args["database"]) == ("shardmail", password, "mail")
    assert args["target_session_attrs"] == "read-write"

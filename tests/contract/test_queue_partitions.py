"""The outbound queue partitioned over two mail shards (issue #19), on SQLite
and on PostgreSQL: every shard holds a partition, one interface sees them all,
workers lease from every partition, and a partition that is down stops no
other."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.errors import ErrorKind, StorageError
from storage.sql.db import Database
from storage.sql.queue import Outcome, QueueRef
from tests.contract.conftest import TEST_HASHER
from tests.pgserver import PgServer

NOW = 1_800_000_000.0
SHARD_B = "b"


@pytest.fixture(scope="session")
def _second_pg(pg_server) -> dict[str, str]:
    """The second shard's database on the session's server (made once)."""
    return {}


@pytest.fixture
async def second_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'shard-b.db'}"
    held: dict[str, str] = request.getfixturevalue("_second_pg")
    pg = request.getfixturevalue("pg_server")
    if "url" not in held:
        url = await pg.server.create_database()
        db = Database(url)
        await db.migrate()
        await db.close()
        held["url"] = url
    else:
        await pg.server.reset_database(held["url"])
    return held["url"]


async def _open(main_url: str, shard_url: str, blobs: Path) -> SqlStorage:
    return await open_storage_from_url(
        main_url, blobs, {SHARD_B: shard_url}, password_hasher=TEST_HASHER
    )


@pytest.fixture
async def sharded(database_url: str, second_url: str, tmp_path: Path) -> AsyncIterator[SqlStorage]:
    store = await _open(database_url, second_url, tmp_path / "blobs")
    try:
        yield store
    finally:
        await store.close()


async def _fill(storage: SqlStorage, partition: str, count: int, now: float = NOW) -> set[QueueRef]:
    """``count`` entries put straight into one partition, each a message of
    random bytes and length."""
    refs = set()
    for i in range(count):
        body = random.randbytes(random.randint(1, 3000)).hex()
        key = await storage.blobs.put(f"Subject: {i}\r\n\r\n{body}\r\n".encode())
        part = storage.queue.partitions[partition]
        refs.add(await part.enqueue("s@example.org", [f"r{i}@remote.test"], key, now=now))
    return refs


async def test_enqueue_spreads_over_every_partition(sharded: SqlStorage) -> None:
    count = random.randint(6, 11)
    key = await sharded.blobs.put(random.randbytes(random.randint(10, 999)))
    refs = [
        await sharded.queue.enqueue("s@example.org", [f"r{i}@remote.test"], key, now=NOW)
        for i in range(count)
    ]
    per_partition = {name: 0 for name in ("default", SHARD_B)}
    for ref in refs:
        per_partition[ref.partition] += 1
    # Round robin: no partition carries more than half (rounded up).
    assert sorted(per_partition.values()) == [count // 2, count - count // 2]
    # Each partition's own database holds its entries; the queue lists both.
    for name, part in sharded.queue.partitions.items():
        assert {m.id for m in await part.list()} == {r for r in refs if r.partition == name}
    assert {m.id for m in await sharded.queue.list()} == set(refs)
    got = await sharded.queue.get(refs[1])
    assert got.id == refs[1] and got.recipients[0].address == "r1@remote.test"


async def test_one_worker_leases_from_both_partitions_fairly(sharded: SqlStorage) -> None:
    busy = await _fill(sharded, "default", random.randint(9, 14))
    quiet = await _fill(sharded, SHARD_B, 3)
    first = await sharded.queue.lease_due("w", 4, 60, now=NOW)
    # A backlog in one partition does not starve the other: half each.
    assert sum(m.id in busy for m in first) == 2 and sum(m.id in quiet for m in first) == 2
    second = await sharded.queue.lease_due("w", 4, 60, now=NOW)
    # The quiet partition has one left; its unused share goes to the busy one.
    assert sum(m.id in quiet for m in second) == 1 and len(second) == 4
    rest = await sharded.queue.lease_due("w", 100, 60, now=NOW)
    leased = [m.id for m in first + second + rest]
    assert sorted(leased) == sorted(busy | quiet)  # every entry, each once


async def test_no_entry_leased_twice_by_concurrent_instances(
    sharded: SqlStorage, database_url: str, second_url: str, tmp_path: Path
) -> None:
    refs = await _fill(sharded, "default", 10) | await _fill(sharded, SHARD_B, 9)
    other = await _open(database_url, second_url, tmp_path / "blobs")
    try:
        batches = await asyncio.gather(
            *(
                (sharded if i % 2 else other).queue.lease_due(f"w{i}", 3, 60, now=NOW)
                for i in range(10)
            )
        )
    finally:
        await other.close()
    leased = [m.id for batch in batches for m in batch]
    assert len(leased) == len(set(leased))
    assert set(leased) == refs


async def test_killed_workers_leases_expire_in_every_partition(sharded: SqlStorage) -> None:
    refs = await _fill(sharded, "default", 2) | await _fill(sharded, SHARD_B, 2)
    q = sharded.queue
    taken = await q.lease_due("killed", 10, 60, now=NOW)
    assert {m.id for m in taken} == refs
    assert await q.lease_due("w2", 10, 60, now=NOW + 59) == []
    again = await q.lease_due("w2", 10, 60, now=NOW + 61)
    assert {m.id for m in again} == refs
    assert {m.lease_owner for m in again} == {"w2"} and {m.attempts for m in again} == {2}
    # The dead worker's late outcome is still a fact; the entry completes.
    ref = next(r for r in refs if r.partition == SHARD_B)
    entry = await q.get(ref)
    done = await q.record_attempt(
        ref,
        "killed",
        {entry.recipients[0].address: Outcome("delivered", "250 ok")},
        None,
        now=NOW + 62,
    )
    assert done.status == "done" and done.id == ref


async def test_admin_ids_name_the_partition(sharded: SqlStorage) -> None:
    [in_default] = await _fill(sharded, "default", 1)
    [in_b] = await _fill(sharded, SHARD_B, 1)
    # Each partition numbers its own entries; the default shard's keep bare numbers.
    assert in_default.number == in_b.number == 1
    assert (str(in_default), str(in_b)) == ("1", "b:1")
    assert QueueRef.parse("1") == in_default and QueueRef.parse("b:1") == in_b
    await sharded.queue.hold(QueueRef.parse("b:1"))
    assert (await sharded.queue.get(in_b)).held and not (await sharded.queue.get(1)).held
    assert [m.id for m in await sharded.queue.lease_due("w", 5, 60, now=NOW)] == [in_default]
    assert await sharded.queue.retry_now(now=NOW) == 2  # both partitions
    await sharded.queue.delete(in_b)
    with pytest.raises(StorageError) as err:
        await sharded.queue.get(in_b)
    assert err.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(StorageError) as err:
        await sharded.queue.get(QueueRef.parse("nosuch:1"))
    assert err.value.kind is ErrorKind.NOT_FOUND
    for text in ("", "b:", "b:x", ":1", "-1", "1.5"):
        with pytest.raises(StorageError) as err:
            QueueRef.parse(text)
        assert err.value.kind is ErrorKind.INVALID


async def test_suppression_is_seen_from_every_partition(sharded: SqlStorage) -> None:
    q = sharded.queue
    [ref] = await _fill(sharded, SHARD_B, 1)
    entry = await q.get(ref)
    address = entry.recipients[0].address
    await q.lease_due("w", 1, 60, now=NOW)
    await q.record_attempt(ref, "w", {address: Outcome("delivered", "250 ok")}, None, now=NOW)
    for _ in range(2):
        await q.record_bounce(address.upper(), True, "5.1.1", "no such user", suppress_after=2)
    assert await q.suppressed([address, "other@remote.test"]) == {address}
    # The DSN's feedback lands on the recipient row, whichever partition holds it.
    assert (await q.get(ref)).recipients[0].feedback == "hard"
    assert [s.address for s in await q.list_suppressions()] == [address]
    await q.unsuppress(address)
    assert await q.suppressed([address]) == set()
    with pytest.raises(StorageError) as err:
        await q.unsuppress(address)
    assert err.value.kind is ErrorKind.NOT_FOUND


def _homed(q, partition: str) -> str:
    """A random account address whose home partition is ``partition``."""
    while True:
        address = f"u{random.getrandbits(40):x}@example.net"
        if q._home_name(address) == partition:
            return address


async def test_a_sending_limit_flag_holds_every_partition_and_is_seen_from_all(
    sharded: SqlStorage,
) -> None:
    q = sharded.queue
    for home in ("default", SHARD_B):
        address = _homed(q, home)
        key = await sharded.blobs.put(random.randbytes(random.randint(10, 999)))
        counts = {p: random.randint(1, 3) for p in ("default", SHARD_B)}
        refs = [
            await q.partitions[p].enqueue(address, [f"r{i}@remote.test"], key, now=NOW)
            for p, n in counts.items()
            for i in range(n)
        ]
        reason = f"sending limit: {address}: over user_messages_per_hour = 1"
        assert await q.flag(address.upper(), reason, now=NOW) == sum(counts.values())
        assert all([(await q.get(r)).held for r in refs])
        # The flag is in the home partition alone; the site sees it.
        assert [await part.is_flagged(address) for part in q.partitions.values()] == [
            name == home for name in q.partitions
        ]
        assert await q.is_flagged(address)
        answers = await q.release_account(address, f"sending limit: {address}: ")
        assert answers == {p: (counts[p], p == home) for p in ("default", SHARD_B)}
        assert not any([(await q.get(r)).held for r in refs])
        assert not await q.is_flagged(address)


async def test_stats_count_each_partition(sharded: SqlStorage) -> None:
    await _fill(sharded, "default", 3)
    [held] = await _fill(sharded, SHARD_B, 1)
    await sharded.queue.hold(held)
    await sharded.queue.lease_due("w", 1, 60, now=NOW)
    stats = await sharded.queue.stats(now=NOW)
    assert set(stats) == {"default", SHARD_B}
    default, b = stats["default"], stats[SHARD_B]
    assert (default.queued + default.delivering, default.held) == (3, 0)
    assert (b.queued, b.held, b.delivering) == (0, 1, 0)
    assert default.delivering + b.delivering == 1


async def test_garbage_collection_keeps_blobs_queued_in_any_partition(
    sharded: SqlStorage,
) -> None:
    [ref] = await _fill(sharded, SHARD_B, 1)
    kept = (await sharded.queue.get(ref)).blob_key
    loose = await sharded.blobs.put(random.randbytes(random.randint(10, 500)))
    removed = await sharded.collect_garbage(min_age_seconds=-60)
    assert removed == 1
    assert await sharded.blobs.get(kept)
    with pytest.raises((StorageError, FileNotFoundError)):
        await sharded.blobs.get(loose)


# --- a partition's database goes down (PostgreSQL: a server of its own) ------


@pytest.fixture
async def outage(pg_server, tmp_path: Path) -> AsyncIterator[tuple[SqlStorage, PgServer]]:
    """Storage whose shard "b" lives on its own PostgreSQL server, which the
    test may stop."""
    main_url = await pg_server.database()
    server_b = PgServer.start()
    try:
        url_b = await server_b.create_database()
        store = await _open(main_url, url_b, tmp_path / "blobs")
        try:
            yield store, server_b
        finally:
            await store.close()
    finally:
        server_b.stop()


async def test_a_partition_down_stops_no_other(outage, caplog) -> None:
    storage, server_b = outage
    alive = await _fill(storage, "default", 3)
    await _fill(storage, SHARD_B, 2)
    server_b.stop()
    caplog.set_level(logging.WARNING, logger="storage.queue")
    q = storage.queue
    first = await q.lease_due("w", 2, 60, now=NOW)
    rest = await q.lease_due("w", 10, 60, now=NOW)
    assert {m.id for m in first + rest} == alive
    assert await q.lease_due("w", 10, 60, now=NOW) == []
    down = [r for r in caplog.records if "partition b" in r.getMessage()]
    assert len(down) == 1  # logged once, not at every poll
    # New mail still queues: the enqueue moves on to a partition that is up.
    key = await storage.blobs.put(random.randbytes(random.randint(10, 999)))
    for _ in range(3):
        ref = await q.enqueue("s@example.org", ["x@remote.test"], key, now=NOW)
        assert ref.partition == "default"
    # What needs the lost partition is a temporary error, never a wrong answer.
    for call in (q.list(), q.get(QueueRef(SHARD_B, 1)), storage.collect_garbage(-60)):
        with pytest.raises(StorageError) as err:
            await call
        assert err.value.kind is ErrorKind.TEMPORARY
    listing = await q.list_by_partition()
    assert len(listing["default"]) == 6
    assert isinstance(listing[SHARD_B], StorageError)


async def test_a_sending_limit_flag_with_a_partition_down(outage) -> None:
    """A flag is read where it answers; an unknown answer is TEMPORARY
    (the submission gets a 451), never "not flagged"."""
    storage, server_b = outage
    q = storage.queue
    on_default, on_b = _homed(q, "default"), _homed(q, SHARD_B)
    for address in (on_default, on_b):
        await q.flag(address, f"sending limit: {address}: over x = 1", now=NOW)
    server_b.stop()
    assert await q.is_flagged(on_default)
    assert not await q.is_flagged(_homed(q, "default"))
    for call in (
        q.is_flagged(on_b),
        q.is_flagged(_homed(q, SHARD_B)),
        q.flag(_homed(q, SHARD_B), "sending limit: x"),
    ):
        with pytest.raises(StorageError) as err:
            await call
        assert err.value.kind is ErrorKind.TEMPORARY
    answers = await q.release_account(on_default, f"sending limit: {on_default}: ")
    assert answers["default"] == (0, True)
    assert isinstance(answers[SHARD_B], StorageError)
    assert not await q.is_flagged(on_default)


async def test_mail_of_a_live_partition_goes_out_while_another_is_down(
    outage, tmp_path: Path
) -> None:
    from mtad.dns import MxRecord
    from mtad.outbound.worker import QueueRunner
    from tests.conftest import make_settings
    from tests.integration.outbound.sink import SinkServer
    from tests.ports import free_port
    from tests.unit.test_outbound_mx import FakeResolver

    storage, server_b = outage
    port = free_port(("127.0.0.2",))
    settings = make_settings(
        tmp_path / "data",
        queue={"workers": 3, "smtp_port": port, "dkim_key_dir": str(tmp_path / "dkim")},
    )
    resolver = FakeResolver(
        mx={"remote.test": [MxRecord(10, "mx.remote.test")]}, a={"mx.remote.test": ["127.0.0.2"]}
    )
    now = time.time()
    alive = await _fill(storage, "default", random.randint(4, 7), now=now)
    await _fill(storage, SHARD_B, 2, now=now)
    server_b.stop()
    runner = QueueRunner(settings, storage, resolver, owner="w")
    try:
        async with SinkServer("127.0.0.2", port) as sink:
            await runner.drain(timeout=30)
    finally:
        await runner.close()
    assert len(sink.received) == len(alive)
    for ref in alive:
        assert (await storage.queue.get(ref)).status == "done"


async def test_a_retired_shard_gets_no_new_queue_entries(
    database_url: str, second_url: str, tmp_path: Path
) -> None:
    from storage.backend import ShardSpec

    store = await open_storage_from_url(
        database_url,
        tmp_path / "blobs",
        {SHARD_B: ShardSpec(second_url, weight=0.0)},
        password_hasher=TEST_HASHER,
    )
    try:
        key = await store.blobs.put(random.randbytes(random.randint(10, 999)))
        refs = [
            await store.queue.enqueue("s@example.org", ["x@remote.test"], key, now=NOW)
            for _ in range(random.randint(3, 8))
        ]
        assert {r.partition for r in refs} == {"default"}
    finally:
        await store.close()

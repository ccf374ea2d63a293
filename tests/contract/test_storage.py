"""The Storage object on every SQL backend: migrations and shards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from storage.backend import SqlStorage, open_storage_from_url
from storage.sql import schema
from tests.contract.conftest import TEST_HASHER


async def test_migrations_are_recorded_and_idempotent(
    storage: SqlStorage, database_url: str, tmp_path: Path
) -> None:
    again = await open_storage_from_url(database_url, tmp_path / "blobs")  # migrates again
    await again.close()
    db = storage.databases["default"]
    async with db.read() as conn:
        versions = [r[0] for r in await conn.execute(select(schema.schema_version.c.version))]
        assert sorted(versions) == list(range(1, schema.SCHEMA_VERSION + 1))

        def columns(sync_conn: object) -> dict[str, set[str]]:
            insp = inspect(sync_conn)
            return {t.name: {c["name"] for c in insp.get_columns(t.name)} for t in schema.V1_TABLES}

        found = await conn.run_sync(columns)
    # The live schema has every column the code's table definitions name.
    for table in schema.V1_TABLES:
        assert {c.name for c in table.columns} <= found[table.name], table.name


@pytest.fixture
async def second_shard_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'shard2.db'}"
        return
    pg = request.getfixturevalue("pg_server")
    url = await pg.server.create_database()
    try:
        yield url
    finally:
        await pg.server.drop_database(url)


async def test_accounts_live_in_their_shard(
    database_url: str, second_shard_url: str, tmp_path: Path
) -> None:
    shards = {"s2": second_shard_url}
    a = await open_storage_from_url(
        database_url, tmp_path / "blobs", shards, password_hasher=TEST_HASHER
    )
    try:
        assert list(a.shards) == ["default", "s2"]
        await a.directory.add_domain("example.org")
        bob = await a.directory.add_account("bob@example.org", "pw")
        eve = await a.directory.add_account("eve@example.org", "pw", shard="s2")
        assert eve.shard == "s2"
        assert a.mail(eve) is a.stores["s2"] and a.mail(eve.id) is a.stores["s2"]
        assert a.mail(bob.id) is a.stores["default"]
        assert await a.stores["default"].list_mailboxes(eve.id) == []
        assert len(await a.stores["s2"].list_mailboxes(eve.id)) == 6
        # Another instance opened before a new account exists routes it too.
        b = await open_storage_from_url(database_url, tmp_path / "blobs", shards)
        try:
            zoe = await a.directory.add_account("zoe@example.org", "pw", shard="s2")
            boxes = await b.mail(zoe.id).list_mailboxes(zoe.id)
            assert len(boxes) == 6
        finally:
            await b.close()
    finally:
        await a.close()


async def test_garbage_collection_keeps_referenced_blobs(storage: SqlStorage) -> None:
    from storage.model import DELETED, StoreMode, UidSet
    from tests.contract.mailfactory import deliver

    await storage.directory.add_domain("example.org")
    bob = await storage.directory.add_account("bob@example.org", "pw")
    mail = storage.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    await deliver(storage, bob, body="kept")
    await deliver(storage, bob, body="expunged")
    queued = await storage.blobs.put(b"queued for relay")
    await storage.queue.enqueue("bob@example.org", ["x@remote.test"], queued)
    stray = await storage.blobs.put(b"an ingest that never committed")
    await mail.store_flags(bob.id, box, UidSet.of([2]), StoreMode.ADD, [DELETED])
    await mail.expunge(bob.id, box)
    [kept] = await mail.uids(bob.id, box)
    # Young blobs may belong to an ingest in progress: never collected.
    assert await storage.collect_garbage(min_age_seconds=3600) == 0
    assert await storage.collect_garbage(min_age_seconds=0) == 2
    assert set(await storage.blobs.keys()) == {kept.blob_key, queued}
    assert stray not in await storage.blobs.keys()


async def test_postgres_storage_publishes_across_instances(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two daemons over one PostgreSQL database: a delivery through one wakes
    an IDLE subscriber on the other (LISTEN/NOTIFY)."""
    from tests.contract.mailfactory import deliver

    url = await request.getfixturevalue("pg_server").database()
    a = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    b = await open_storage_from_url(url, tmp_path / "blobs")
    try:
        await a.directory.add_domain("example.org")
        bob = await a.directory.add_account("bob@example.org", "pw")
        sub = b.events.subscribe(bob.id)
        uid = await deliver(a, bob)
        change = await sub.get(timeout=2)
        while change is not None and change.kind.value != "new":
            change = await sub.get(timeout=2)
        assert change is not None and change.uid == uid
        sub.close()
    finally:
        await a.close()
        await b.close()

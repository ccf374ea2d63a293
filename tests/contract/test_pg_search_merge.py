"""PostgreSQL: deliveries leave the word index's merge to the background
merger (schema steps 17 and 20, ``storage/sql/fts.py``), and what it merged is
still found."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from storage.backend import SqlStorage
from storage.search import Text
from tests.contract.test_search_freshness import _bob, _deliver, _prose, _word


@pytest.fixture(params=["postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _pending_pages(database_url: str) -> int:
    """The word index's pending-list pages (pgstattuple's view of it)."""
    u = make_url(database_url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        row = await conn.fetchrow("SELECT * FROM pgstatginindex('messages_search_words')")
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'messages'"
        )
    finally:
        await conn.close()
    # Step 17 dropped the tsvector nothing queried: no delivery computes it.
    assert "search" not in {c[0] for c in columns}
    return int(row["pending_pages"])


async def _no_autovacuum(database_url: str) -> None:
    u = make_url(database_url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        await conn.execute("ALTER TABLE messages SET (autovacuum_enabled = false)")
    finally:
        await conn.close()


async def test_the_merger_merges_what_deliveries_left_pending(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    storage = quiet_storage
    bob = await _bob(storage)
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    # In one loaded run something else emptied 20 of 23 pending pages under
    # this test; the only other thing that empties a GIN pending list here
    # is autovacuum (PostgreSQL's "GIN Fast Update Technique": vacuum and
    # autoanalyze). Off for this table, so the merger is alone.
    await _no_autovacuum(database_url)
    markers = [_word() for _ in range(random.randint(20, 40))]
    for marker in markers:
        await _deliver(storage, bob, f"{_prose(random.randint(50, 300))} {marker}")
    # Far below the pending list's limit: no delivery merged it.
    pending = await _pending_pages(database_url)
    assert pending > 0
    indexer = storage.databases["default"].indexer()
    assert indexer is not None
    assert await indexer.run_once() == pending
    assert await _pending_pages(database_url) == 0
    assert await indexer.run_once() == 0
    for uid, marker in enumerate(markers, start=1):
        assert await mail.search(bob.id, inbox, Text("body", marker)) == [uid]


async def test_one_merge_at_a_time_the_others_return_at_once(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    """Every instance runs a merger; PostgreSQL's own merge waits for one in
    progress, so without a site-wide turn they pile up behind each other.
    While another session holds the merge's turn, a merger returns 0 at
    once and leaves the pending list to it."""
    from storage.sql.db import MERGE_LOCK_KEY

    storage = quiet_storage
    bob = await _bob(storage)
    for _ in range(random.randint(5, 15)):
        await _deliver(storage, bob, _prose(random.randint(50, 300)))
    pending = await _pending_pages(database_url)
    assert pending > 0
    indexer = storage.databases["default"].indexer()
    assert indexer is not None
    u = make_url(database_url)
    other = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", MERGE_LOCK_KEY)
        assert await asyncio.wait_for(indexer.run_once(), 5) == 0
        assert await _pending_pages(database_url) == pending
        await other.execute("SELECT pg_advisory_unlock($1)", MERGE_LOCK_KEY)
    finally:
        await other.close()
    assert await indexer.run_once() == pending

"""SQLite's trigram index in its own file, filled in the background
(``storage/sql/fts.py``, schema step 6): search finds queued and indexed
messages alike, deletions leave the index, a reused message id is not
shadowed by its predecessor, a crash between the index's commit and the
queue's loses nothing, and an older database is re-indexed after upgrade."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.model import Account, StoreMode, UidSet
from storage.search import Text
from storage.sql.criteria import fts_trigram_query
from storage.sql.fts import index_file
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import deliver


async def open_at(db: Path, background: bool = False) -> SqlStorage:
    return await open_storage_from_url(
        f"sqlite+aiosqlite:///{db}", db.parent / "blobs", password_hasher=TEST_HASHER,
        fts_indexer=background,
    )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[SqlStorage, Account, Path]]:
    db = tmp_path / "shard.db"
    storage = await open_at(db)
    await storage.directory.add_domain("example.org")
    bob = await storage.directory.add_account("bob@example.org", "pw")
    try:
        yield storage, bob, db
    finally:
        await storage.close()


def queued(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT message_id FROM fts_pending ORDER BY seq")]


def index_hits(db: Path, value: str) -> list[int]:
    """Row ids the index file itself returns for ``value``."""
    with sqlite3.connect(index_file(str(db))) as conn:
        rows = conn.execute(
            "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?",
            (fts_trigram_query(value),),
        )
        return sorted(r[0] for r in rows)


async def run_indexer(storage: SqlStorage) -> int:
    indexer = storage.databases["default"].indexer()
    assert indexer is not None
    return await indexer.run_once()


async def search(storage: SqlStorage, bob: Account, value: str) -> list[int]:
    mail = storage.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    return await mail.search(bob.id, inbox.id, Text("body", value))


async def expunge(storage: SqlStorage, bob: Account, uids: list[int]) -> None:
    mail = storage.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    await mail.store_flags(bob.id, inbox.id, UidSet.of(uids), StoreMode.ADD, ["\\Deleted"])
    await mail.expunge(bob.id, inbox.id, UidSet.of(uids))


async def test_delivery_queues_and_the_indexer_empties_the_queue(env) -> None:
    storage, bob, db = env
    await deliver(storage, bob, subject="Budget", body="The zeppelin lands at noon")
    await deliver(storage, bob, subject="Other", body="Nothing to see")
    assert len(queued(db)) == 2
    assert index_hits(db, "zeppelin") == []
    # Queued messages are found before they are indexed...
    assert await search(storage, bob, "ZEPPELIN LAND") == [1]
    assert await run_indexer(storage) == 2
    assert queued(db) == []
    assert len(index_hits(db, "zeppelin")) == 1
    # ...and through the index afterwards.
    assert await search(storage, bob, "ZEPPELIN LAND") == [1]
    assert await search(storage, bob, "nothing to") == [2]
    assert await run_indexer(storage) == 0


def _trigrams(text: str) -> set[str]:
    return {text[i : i + 3].lower() for i in range(len(text) - 2)}


async def test_the_index_query_wants_every_trigram_of_the_value(env) -> None:
    """A text holding only some of a value's trigrams (here those that
    cover it, each apart) is not a candidate; a value with more trigrams
    than one query takes is still found, inside a longer word and in
    another case, and the exact test decides as before."""
    storage, bob, db = env
    rng = random.Random()
    letters = "abcdefghijklmnopqrstuvwxyz"
    while True:
        value = "".join(rng.choices(letters, k=rng.randint(7, 11)))
        cover = " ".join(value[i : i + 3] for i in [*range(0, len(value) - 2, 3), len(value) - 3])
        if not _trigrams(value) <= _trigrams(cover):
            break
    long_text = "".join(rng.choices(letters, k=60))
    start = rng.randrange(20)
    long_value = long_text[start : start + rng.randint(25, 40)]
    await deliver(storage, bob, body=f"x{value.upper()}y and more")  # message 1
    await deliver(storage, bob, body=cover)  # message 2: the cover, apart
    await deliver(storage, bob, body=f"pre {long_text} post")  # message 3
    await run_indexer(storage)
    assert index_hits(db, value) == [1]
    assert len(_trigrams(long_value)) > 16 and index_hits(db, long_value.upper()) == [3]
    assert await search(storage, bob, value) == [1]
    assert await search(storage, bob, long_value.swapcase()) == [3]
    assert await search(storage, bob, cover[: len(value)].strip()) == [2]


async def test_a_deleted_message_leaves_the_index(env) -> None:
    storage, bob, db = env
    await deliver(storage, bob, body="first zeppelin")
    await deliver(storage, bob, body="second zeppelin")
    await run_indexer(storage)
    assert len(index_hits(db, "zeppelin")) == 2
    await expunge(storage, bob, [1])
    await run_indexer(storage)
    assert len(index_hits(db, "zeppelin")) == 1
    assert await search(storage, bob, "zeppelin") == [2]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM fts_deleted").fetchone()[0] == 0


async def test_a_message_deleted_before_indexing_only_leaves_the_queue(env) -> None:
    storage, bob, db = env
    await deliver(storage, bob, body="short-lived zeppelin")
    await expunge(storage, bob, [1])
    assert queued(db) == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM fts_deleted").fetchone()[0] == 0
    assert await run_indexer(storage) == 0
    assert index_hits(db, "zeppelin") == []


async def test_a_new_message_after_a_deleted_one_is_indexed_with_its_new_text(env) -> None:
    storage, bob, db = env
    await deliver(storage, bob, body="alpha zeppelin one")
    await run_indexer(storage)
    with sqlite3.connect(db) as conn:
        (first_id,) = conn.execute("SELECT max(id) FROM messages").fetchone()
    await expunge(storage, bob, [1])
    # The id of a deleted row is never handed out again (schema v8).
    await deliver(storage, bob, body="beta zeppelin two")
    with sqlite3.connect(db) as conn:
        (second_id,) = conn.execute("SELECT max(id) FROM messages").fetchone()
    assert second_id > first_id
    await run_indexer(storage)
    assert index_hits(db, "beta zeppelin") == [second_id]
    assert index_hits(db, "alpha") == []
    assert await search(storage, bob, "beta zeppelin") == [2]
    assert await search(storage, bob, "zeppelin") == [2]
    assert await search(storage, bob, "alpha") == []


async def test_a_crash_before_the_queue_is_cleared_loses_nothing(env) -> None:
    storage, bob, db = env
    await deliver(storage, bob, body="the zeppelin")
    indexer = storage.databases["default"].indexer()
    assert indexer is not None

    async def crash(pending: int | None, deleted: int | None) -> None:
        raise RuntimeError("killed between the two commits")

    real_clear, indexer._clear = indexer._clear, crash
    with pytest.raises(RuntimeError):
        await indexer.run_once()
    indexer._clear = real_clear
    # Indexed, still queued: found once, and indexed again harmlessly.
    assert len(index_hits(db, "zeppelin")) == 1
    assert len(queued(db)) == 1
    assert await search(storage, bob, "zeppelin") == [1]
    assert await indexer.run_once() == 1
    assert queued(db) == []
    assert await search(storage, bob, "zeppelin") == [1]


async def test_search_agrees_with_a_scan_whatever_is_indexed(env) -> None:
    """Deliveries, expunges and indexer runs interleaved at random: every
    search gives what a plain substring scan of the live messages gives."""
    storage, bob, _db = env
    rng = random.Random(5)
    words = ["zeppelin", "budget", "harbour", "noon", "lantern", "quartz"]
    live: dict[int, str] = {}
    for _ in range(60):
        op = rng.random()
        if op < 0.55 or not live:
            body = " ".join(rng.choice(words) for _ in range(3))
            uid = await deliver(storage, bob, body=body)
            live[uid] = body
        elif op < 0.75:
            gone = rng.sample(sorted(live), k=min(len(live), rng.randint(1, 2)))
            await expunge(storage, bob, gone)
            for uid in gone:
                del live[uid]
        else:
            await run_indexer(storage)
        word = rng.choice(words)
        expected = sorted(uid for uid, body in live.items() if word in body)
        assert await search(storage, bob, word) == expected


async def test_the_background_indexer_drains_the_queue(tmp_path: Path) -> None:
    db = tmp_path / "shard.db"
    storage = await open_at(db, background=True)
    try:
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw")
        await deliver(storage, bob, body="a zeppelin at noon")
        for _ in range(100):
            if not queued(db):
                break
            await asyncio.sleep(0.05)
        assert queued(db) == []
        assert len(index_hits(db, "zeppelin")) == 1
    finally:
        await storage.close()


async def one_message_stored(db: Path, index: bool) -> Account:
    """A closed database at ``db`` holding one message for bob."""
    storage = await open_at(db)
    try:
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw")
        await deliver(storage, bob, subject="Budget", body="The zeppelin lands at noon")
        if index:
            await run_indexer(storage)
            assert queued(db) == []
    finally:
        await storage.close()
    return bob


async def test_a_lost_index_file_is_rebuilt(tmp_path: Path) -> None:
    db = tmp_path / "shard.db"
    bob = await one_message_stored(db, index=True)
    await asyncio.to_thread(Path(index_file(str(db))).unlink)
    storage = await open_at(db)
    try:
        assert len(queued(db)) == 1
        assert await search(storage, bob, "zeppelin") == [1]
        await run_indexer(storage)
        assert index_hits(db, "zeppelin") != []
        assert await search(storage, bob, "zeppelin") == [1]
    finally:
        await storage.close()


# The index as schema step 5 left it: in the database file, kept by triggers.
V5_FTS = (
    "CREATE VIRTUAL TABLE messages_fts USING fts5(subject, from_text, to_text, cc_text, "
    "body_text, content='messages', content_rowid='id', tokenize='trigram', detail=none)",
    "CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts(rowid, subject, from_text, to_text, cc_text, body_text) "
    "VALUES (new.id, new.subject, new.from_text, new.to_text, new.cc_text, new.body_text); END",
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
)


async def test_an_older_database_is_reindexed_after_upgrade(tmp_path: Path) -> None:
    db = tmp_path / "shard.db"
    bob = await one_message_stored(db, index=False)
    # Back to a version-5 file: the index inside it, no queue, no step 6.
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER fts_queue")
        conn.execute("DROP TRIGGER fts_unqueue")
        conn.execute("DROP TABLE fts_pending")
        conn.execute("DROP TABLE fts_deleted")
        for stmt in V5_FTS:
            conn.execute(stmt)
        conn.execute("DELETE FROM schema_version WHERE version >= 6")
    await asyncio.to_thread(Path(index_file(str(db))).unlink)

    storage = await open_at(db)
    try:
        with sqlite3.connect(db) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "messages_fts" not in names and "messages_fts_ai" not in names
        assert len(queued(db)) == 1
        assert await search(storage, bob, "ZEPPELIN LAND") == [1]
        await run_indexer(storage)
        assert queued(db) == []
        assert await search(storage, bob, "ZEPPELIN LAND") == [1]
        assert await search(storage, bob, "budget") == []
        await deliver(storage, bob, subject="Again", body="A second zeppelin")
        assert await search(storage, bob, "zeppelin") == [1, 2]
    finally:
        await storage.close()

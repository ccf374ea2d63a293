"""SQLite's trigram index: built without positions (schema step 5), and a
database made before that step is re-indexed when it is opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from storage.backend import open_storage_from_url
from storage.search import Text
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import deliver

# The index as schema step 2 made it (with positions), for the upgrade test.
V2_FTS = (
    "CREATE VIRTUAL TABLE messages_fts USING fts5(subject, from_text, to_text, cc_text, "
    "body_text, content='messages', content_rowid='id', tokenize='trigram')"
)


def fts_sql(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages_fts'").fetchone()
    return row[0]


async def test_index_is_rebuilt_without_positions_on_upgrade(tmp_path: Path) -> None:
    db = tmp_path / "shard.db"
    url = f"sqlite+aiosqlite:///{db}"
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw")
        await deliver(storage, bob, subject="Budget", body="The zeppelin lands at noon")
    finally:
        await storage.close()
    assert "detail=none" in fts_sql(db)
    # Turn the file back into a version-4 database: the old index, empty of
    # what was delivered, and no record of step 5.
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE messages_fts")
        conn.execute(V2_FTS)
        conn.execute("DELETE FROM schema_version WHERE version = 5")
    assert "detail=none" not in fts_sql(db)

    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        mail = storage.mail(bob)
        inbox = await mail.get_mailbox(bob.id, "INBOX")
        assert await mail.search(bob.id, inbox.id, Text("body", "ZEPPELIN LAND")) == [1]
        assert await mail.search(bob.id, inbox.id, Text("body", "budget")) == []
        # New deliveries keep the rebuilt index up to date.
        await deliver(storage, bob, subject="Again", body="A second zeppelin")
        assert await mail.search(bob.id, inbox.id, Text("body", "zeppelin")) == [1, 2]
    finally:
        await storage.close()
    assert "detail=none" in fts_sql(db)

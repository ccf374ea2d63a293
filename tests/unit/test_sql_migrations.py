"""Schema migrations of an existing SQLite database, in place.

The database is built from the DDL schema version 7 created
(``tests/fixtures/schema_v7_sqlite.sql``), filled with rows the way the
stores write them, then opened by the current code: every row survives
unchanged, and ids deleted before the upgrade are not handed out again
where a trace of them remains.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from storage.backend import open_storage_from_url
from storage.mime import parse_message
from storage.model import DELETED, UidSet
from storage.sql import fts, schema
from storage.sql.db import Database

V7_DDL = Path(__file__).parent.parent / "fixtures" / "schema_v7_sqlite.sql"
ID_TABLES = (
    "domains",
    "accounts",
    "aliases",
    "mailboxes",
    "messages",
    "queue_messages",
    "queue_recipients",
)


def _text() -> str:
    return random.randbytes(random.randint(1, 300)).hex()


def _fill_v7(conn: sqlite3.Connection, messages: int) -> dict[str, int]:
    """Rows as the v7 stores write them; returns the highest id of each
    kind ever handed out (some of those rows are deleted again)."""
    conn.execute("INSERT INTO domains (name) VALUES ('example.org')")
    conn.execute(
        "INSERT INTO accounts (address, domain_id, password_hash, shard, created) "
        "VALUES ('bob@example.org', 1, 'x', 'default', 1.0)"
    )
    conn.execute("INSERT INTO aliases (source, target) VALUES ('@example.org', 'bob@example.org')")
    conn.execute("INSERT INTO shard_accounts VALUES (1, 3, 100, NULL, 0)")
    for name in ("INBOX", "Trash", "Old"):
        conn.execute(
            "INSERT INTO mailboxes (account_id, name, uidvalidity, uidnext, highestmodseq,"
            " recent_floor, subscribed) VALUES (1, ?, 7, 1, 1, 0, 1)",
            (name,),
        )
    for _ in range(messages):
        cur = conn.execute(
            "INSERT INTO messages (account_id, blob_key, size, parsed, subject, from_text,"
            " to_text, cc_text, body_text, created) VALUES (1, ?, ?, '{}', ?, ?, ?, '', ?, 1.0)",
            (_text()[:64], random.randint(1, 10**6), _text(), _text(), _text(), _text()),
        )
        mid = cur.lastrowid
        conn.execute("UPDATE messages SET thread_id = id WHERE id = ?", (mid,))
        conn.execute(
            "INSERT INTO mailbox_entries VALUES (1, ?, ?, 0, ' ', 1, 0, 0, 1, 10)", (mid, mid)
        )
    conn.execute("UPDATE mailboxes SET uidnext = ? WHERE id = 1", (messages + 1,))
    for _ in range(2):
        cur = conn.execute(
            "INSERT INTO queue_messages (sender, blob_key, created, next_attempt, expires,"
            " attempts, status) VALUES ('bob@example.org', 'k', 1.0, 1.0, 2.0, 0, 'queued')"
        )
        conn.execute(
            "INSERT INTO queue_recipients (queue_id, address, status) "
            "VALUES (?, 'a@remote.test', 'pending')",
            (cur.lastrowid,),
        )
    # The indexer took every message, then the newest one was expunged: the
    # delete trigger keeps its id for the index in fts_deleted.
    conn.execute("DELETE FROM fts_pending")
    conn.execute("DELETE FROM mailbox_entries WHERE message_id = ?", (messages,))
    conn.execute("DELETE FROM messages WHERE id = ?", (messages,))
    conn.execute("INSERT INTO expunged VALUES (1, ?, 2)", (messages,))
    # Mailbox "Old" (id 3) deleted; the change log still names it.
    conn.execute("DELETE FROM mailboxes WHERE id = 3")
    conn.execute(
        "INSERT INTO change_log VALUES (1, 3, 'mailbox', 3, NULL, NULL, 1.0,"
        ' \'{"op": "delete", "name": "Old"}\')'
    )
    conn.commit()
    return {"messages": messages, "mailboxes": 3}


def _snapshot(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT IN ('sqlite_sequence', 'schema_version') "
                "AND name NOT LIKE 'fts_%'"  # the full-text queue: its index file is new
            )
        ]
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"'), key=repr) for n in names}
    finally:
        conn.close()


def _schema_objects(path: Path) -> set[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return set(conn.execute("SELECT type, name FROM sqlite_master"))
    finally:
        conn.close()


@pytest.fixture
def v7_database(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    path = tmp_path / "shardmail.db"
    conn = sqlite3.connect(path)
    conn.executescript(V7_DDL.read_text())
    conn.execute("PRAGMA foreign_keys=ON")
    high = _fill_v7(conn, random.randint(3, 9))
    conn.close()
    return path, high


async def test_v8_keeps_every_row_and_makes_ids_autoincrement(
    v7_database: tuple[Path, dict[str, int]],
) -> None:
    path, _ = v7_database
    before, objects = _snapshot(path), _schema_objects(path)
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        assert await db.migrate() == schema.SCHEMA_VERSION >= 8
    finally:
        await db.close()
    after = _snapshot(path)
    # Later steps add tables, and columns (at the end of a row).
    assert {name: [r[: len(before[name][0])] for r in after[name]] if before[name] else after[name]
            for name in before} == before
    assert objects <= _schema_objects(path)  # indexes and triggers too
    conn = sqlite3.connect(path)
    try:  # v30: the RFC 3461 DSN parameters of the queue
        columns = {
            table: {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            for table in ("queue_messages", "queue_recipients")
        }
    finally:
        conn.close()
    assert {"dsn_ret", "dsn_envid"} <= columns["queue_messages"]
    assert {"dsn_notify", "dsn_orcpt"} <= columns["queue_recipients"]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        for table in ID_TABLES:
            (sql,) = conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            assert "AUTOINCREMENT" in sql.upper(), table
    finally:
        conn.close()


async def test_v9_keeps_every_subscription(v7_database: tuple[Path, dict[str, int]]) -> None:
    """The subscription flag of each mailbox becomes a row of the
    subscription list; an unsubscribed mailbox stays off it."""
    path, _ = v7_database
    conn = sqlite3.connect(path)
    conn.execute("UPDATE mailboxes SET subscribed = 0 WHERE name = 'Trash'")
    conn.commit()
    conn.close()
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        assert await db.migrate() == schema.SCHEMA_VERSION >= 9
    finally:
        await db.close()
    assert _snapshot(path)["subscriptions"] == [(1, "INBOX")]


async def test_after_v8_new_ids_pass_every_id_ever_handed_out(
    v7_database: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path, high = v7_database
    storage = await open_storage_from_url(
        f"sqlite+aiosqlite:///{path}",
        tmp_path / "blobs",
        password_hasher=PasswordHasher.from_parameters(CHEAPEST),
    )
    try:
        bob = await storage.directory.get_account("bob@example.org")
        mail = storage.mail(bob)
        raw = b"Subject: after\r\n\r\n" + random.randbytes(random.randint(1, 999))
        key = await storage.blobs.put(raw)
        mid = await mail.add_message(bob.id, key, parse_message(raw))
        assert mid > high["messages"]
        box = await mail.create_mailbox(bob.id, "New")
        assert box.id > high["mailboxes"]
        inbox = await mail.get_mailbox(bob.id, "INBOX")
        uid = (await mail.append(bob.id, inbox.id, mid)).uid
        (stored,) = await mail.fetch(bob.id, inbox.id, UidSet.of([uid]))
        assert stored.entry.message_id == mid
        assert await storage.blobs.get(stored.entry.blob_key) == raw
    finally:
        await storage.close()
    # It opens a thread of its own, named by its own new id.
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT thread_id FROM messages WHERE id = ?", (mid,)).fetchone() == (
            mid,
        )
    finally:
        conn.close()


async def test_a_lost_index_file_is_rebuilt_without_stale_deletions(tmp_path: Path) -> None:
    """Deletions queued for an index file that is gone are dropped with it:
    asking the new, contentless FTS5 index to delete rows it never had
    corrupts it ("database disk image is malformed")."""
    path = tmp_path / "shardmail.db"
    url = f"sqlite+aiosqlite:///{path}"
    storage = await open_storage_from_url(url, tmp_path / "blobs", fts_indexer=False)
    try:
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw")
        mail = storage.mail(bob)
        inbox = await mail.get_mailbox(bob.id, "INBOX")
        words = [random.randbytes(random.randint(4, 40)).hex() for _ in range(random.randint(2, 5))]
        for word in words:
            raw = f"Subject: {word}\r\n\r\n{word}\r\n".encode()
            mid = await mail.add_message(bob.id, await storage.blobs.put(raw), parse_message(raw))
            await mail.append(bob.id, inbox.id, mid, [DELETED])
        indexer = storage.databases["default"].indexer()
        assert await indexer.run_once() == len(words)
        assert len(await mail.expunge(bob.id, inbox.id)) == len(words)
    finally:
        await storage.close()
    Path(fts.index_file(str(path))).unlink()  # noqa: ASYNC240 (a test's setup)
    db = Database(url)
    try:
        await db.migrate()
        indexer = db.indexer()
        assert indexer is not None
        await indexer.run_once()
        conn = sqlite3.connect(fts.index_file(str(path)))
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
        finally:
            conn.close()
    finally:
        await db.close()


async def test_v11_places_stored_entries_by_date_capped_at_arrival(
    v7_database: tuple[Path, dict[str, int]],
) -> None:
    """Entries stored before step 11 get the folder-list place new ones get:
    the Date (epoch seconds in messages.sent_date), never after the arrival."""
    path, _ = v7_database
    conn = sqlite3.connect(path)
    expected: dict[int, int] = {}
    for (mid,) in conn.execute("SELECT message_id FROM mailbox_entries").fetchall():
        arrived = random.randint(10**15, 2 * 10**15)  # epoch microseconds
        sent = random.choice([None, arrived / 1e6 - random.randint(1, 10**7),
                              arrived / 1e6 + random.randint(1, 10**7), -random.randint(1, 9)])
        conn.execute("UPDATE messages SET sent_date = ? WHERE id = ?", (sent, mid))
        conn.execute("UPDATE mailbox_entries SET internal_date = ? WHERE message_id = ?",
                     (arrived, mid))
        expected[mid] = arrived if sent is None else max(0, min(int(sent * 1e6), arrived))
    conn.commit()
    conn.close()
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await db.migrate()
    finally:
        await db.close()
    conn = sqlite3.connect(path)
    try:
        got = dict(conn.execute("SELECT message_id, list_date FROM mailbox_entries"))
        plan = " ".join(r[-1] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT uid FROM mailbox_entries WHERE mailbox_id = 1 "
            "ORDER BY list_date DESC, uid DESC LIMIT 5"))
    finally:
        conn.close()
    assert {m: abs(got[m] - v) <= 1 for m, v in expected.items()} == dict.fromkeys(expected, True)
    assert "mailbox_entries_mailbox_list" in plan and "TEMP B-TREE" not in plan


async def test_v28_older_entries_save_date_is_their_internal_date(
    v7_database: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    """Step 28 adds ``mailbox_entries.saved_at`` without rewriting a row: an
    entry stored before reads its internal date as its RFC 8514 save date;
    an entry made after gets its own."""
    path, _ = v7_database
    store = await open_storage_from_url(
        f"sqlite+aiosqlite:///{path}", tmp_path / "blobs",
        password_hasher=PasswordHasher.from_parameters(CHEAPEST),
    )
    try:
        mail = store.mail(1)
        old = await mail.entries(1, 1, UidSet.all())
        assert old and all(e.saved is None and e.save_date == e.internal_date for e in old)
        raw = b"Subject: new\r\n\r\nnew\r\n"
        mid = await mail.add_message(1, await store.blobs.put(raw), parse_message(raw))
        added = await mail.append(1, 1, mid)
        (new,) = await mail.entries(1, 1, UidSet.of([added.uid]))
        assert new.saved is not None and new.saved > old[0].internal_date
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        nulls = conn.execute("SELECT count(*) FROM mailbox_entries WHERE saved_at IS NULL")
        assert nulls.fetchone()[0] == len(old)
    finally:
        conn.close()

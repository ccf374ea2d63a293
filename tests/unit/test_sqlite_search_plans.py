"""SQLite searches start from what the full-text index returns.

A word in a few messages of a 100,000-message account must cost those few
messages, not a read of every entry of every mailbox: the statements that
``search`` and ``search_account`` run are planned from the index's rows
(through the entries' message_id index), never by scanning a mailbox.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from sqlalchemy import Engine, event

from storage.backend import open_storage_from_url
from storage.search import Header, Text
from storage.sql import fts
from tests.contract.mailfactory import deliver


@contextmanager
def statements() -> Iterator[list[tuple[str, Any]]]:
    """Every SQL statement run (on any engine) inside the block."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        seen.append((statement, params))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def plan(db_file: Path, statement: str, params: Any) -> list[str]:
    conn = sqlite3.connect(db_file)
    try:
        fts.attach(conn, str(db_file))
        return [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, params)]
    finally:
        conn.close()


async def test_text_searches_are_planned_from_the_index(tmp_path: Path) -> None:
    db_file = tmp_path / "shardmail.db"
    storage = await open_storage_from_url(
        f"sqlite+aiosqlite:///{db_file}", tmp_path / "blobs",
        password_hasher=PasswordHasher.from_parameters(CHEAPEST),
    )
    try:
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw")
        word = random.randbytes(6).hex()
        for i in range(random.randint(3, 7)):
            await deliver(storage, bob, body=f"line {i} {word if i % 2 else 'other'}")
        mail = storage.mail(bob)
        inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
        with statements() as seen:
            found = await mail.search(bob.id, inbox, Text("body", word))
            everywhere = await mail.search_account(bob.id, Text("content", word))
            subject = await mail.search_account(bob.id, Header("subject", "hello"))
        assert found == [e.uid for e in everywhere][::-1] and subject
        # The subject search goes to the subject-only index (schema step 19).
        searches = [(s, p) for s, p in seen if "messages_fts" in s or "subject_fts" in s]
        assert len(searches) == 3
        for statement, params in searches:
            steps = plan(db_file, statement, params)
            entries = [s for s in steps if "mailbox_entries" in s]
            assert entries and all("message_id=?" in s for s in entries), steps
    finally:
        await storage.close()

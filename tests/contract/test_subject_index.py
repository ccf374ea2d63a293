"""SEARCH SUBJECT is answered from a subject-only index (schema step 19) on
both backends: the statement a subject search runs is planned on that
index, so a word common in bodies costs the few subjects holding it, not
every message of the mailbox (issue #20: 504 ms on SQLite, 7.7 s on
PostgreSQL at 100,000 messages when bodies made every message a candidate)."""

from __future__ import annotations

import random
from pathlib import Path

from sqlalchemy.engine import make_url

from storage.backend import SqlStorage
from storage.search import Header
from tests.contract.mailfactory import deliver
from tests.contract.test_pg_search_plans import _plan as pg_plan
from tests.unit.test_sqlite_search_plans import plan as sqlite_plan
from tests.unit.test_sqlite_search_plans import statements


async def test_subject_search_is_planned_on_the_subject_index(
    storage: SqlStorage, database_url: str, backend: str
) -> None:
    await storage.directory.add_domain("example.org")
    bob = await storage.directory.add_account("bob@example.org", "pw")
    word = random.randbytes(4).hex()
    hits = []
    for i in range(random.randint(4, 9)):
        subject = f"report {i} x{word}y" if i % 3 == 0 else f"report {i}"
        uid = await deliver(storage, bob, subject=subject, body=f"{word} in every body")
        if i % 3 == 0:
            hits.append(uid)
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    with statements() as seen:
        found = await mail.search(bob.id, inbox, Header("subject", word.upper()))
    assert found == hits
    (statement, params), *_ = [(s, p) for s, p in seen if "LIKE" in s.upper()]
    if backend == "sqlite":
        steps = sqlite_plan(Path(make_url(database_url).database or ""), statement, params)
        assert any("messages_subject_fts" in step for step in steps), steps
        return
    # PostgreSQL plans a few rows by the mailbox's entries whatever the
    # indexes: the search carries the condition the index answers (the
    # planner matches the indexed expression), and the index answers it.
    assert "messages.subject ILIKE" in statement, statement
    plan = await pg_plan(
        database_url, "SELECT id FROM messages WHERE messages.subject ILIKE $1", [f"%{word}%"]
    )
    assert "messages_subject_trgm" in plan, plan

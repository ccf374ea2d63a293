"""PostgreSQL text searches can be answered from the word index (schema
step 20): every substring search the storage runs carries a condition that
the planner answers from ``messages_search_words`` (and the vocabulary's
trigram index), so a word in a few messages of a big account costs those
messages, not a scan of the account."""

from __future__ import annotations

import random
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from storage.backend import SqlStorage
from storage.search import Header, Text
from tests.contract.mailfactory import deliver
from tests.unit.test_sqlite_search_plans import statements


@pytest.fixture(params=["postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _plan(url: str, statement: str, params: Any) -> str:
    u = make_url(url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        # Few rows: without this a sequential scan is cheaper; the question
        # is whether the index can answer the statement at all.
        await conn.execute("SET enable_seqscan = off")
        rows = await conn.fetch("EXPLAIN " + statement, *(params or ()))
        return "\n".join(r[0] for r in rows)
    finally:
        await conn.close()


async def test_text_searches_can_use_the_word_index(
    storage: SqlStorage, database_url: str
) -> None:
    await storage.directory.add_domain("example.org")
    bob = await storage.directory.add_account("bob@example.org", "pw")
    word = random.randbytes(5).hex()
    for i in range(random.randint(3, 7)):
        await deliver(storage, bob, body=f"line {i} x{word if i % 2 else 'other'}y")
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    with statements() as seen:
        found = await mail.search(bob.id, inbox, Text("body", word))  # inside a word
        everywhere = await mail.search_account(bob.id, Text("content", word))
        await mail.search_account(bob.id, Header("subject", "hello"))
    assert found and found == sorted(e.uid for e in everywhere)
    searches = [s for s, _ in seen if "LIKE" in s.upper()]
    # search: one statement. search_account: the index's candidates in
    # order, then the exact test on a few of them by message id.
    assert len(searches) == 5, searches
    text, subject = [searches[0], searches[1]], searches[3]
    checks = [searches[2], searches[4]]
    # Text searches carry the word index's condition; SUBJECT has an index
    # of its own (step 19, tests/contract/test_subject_index.py)...
    assert all("messages.search_words &&" in s for s in text), searches
    assert "messages.subject ILIKE" in subject, subject
    # ...and the exact test after them reads only the messages they listed,
    # without the index's condition; a text check first asks their word
    # hashes whether they surely hold the word (schema step 38).
    assert all("mailbox_entries.message_id IN" in s for s in checks), checks
    assert all("array_append" not in s for s in checks), checks
    assert "messages.search_words[1] =" in checks[0], checks
    assert "search_words" not in checks[1], checks
    # ...which the indexes answer: the vocabulary's trigrams, then the words.
    plan = await _plan(
        database_url,
        "SELECT id FROM messages WHERE search_words && "
        "(SELECT array_agg(hash) FROM search_vocab WHERE word LIKE $1)",
        [f"%{word}%"],
    )
    assert "messages_search_words" in plan, plan
    assert "search_vocab_trgm" in plan, plan

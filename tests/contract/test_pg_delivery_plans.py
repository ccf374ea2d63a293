"""What PostgreSQL reads to store a delivery does not grow with the
account: the plan each pooled session keeps for the delivery's statement
(the generic plan of a prepared statement, after its first five
executions) looks up a referenced message through the index, by both of
its columns, and reads no message of the account when there is none to
look up; it takes the message's id from the sequence without a catalog
lookup. Checked on the plans the server itself ran (auto_explain with
ANALYZE, in the server log)."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.ingest import Delivery, ingest
from storage.model import Account
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build

# More than the five custom plans a prepared statement gets before
# PostgreSQL may switch it to its generic plan.
DELIVERIES = 24


@pytest.fixture
async def explained(pg_server: Any, tmp_path: Path) -> AsyncIterator[tuple[SqlStorage, Path]]:
    """A storage whose sessions log every statement's plan as it ran."""
    server = pg_server.server
    url = await server.create_database()
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(
        host="127.0.0.1", port=server.port, user=server.user, database=name
    )
    try:
        await admin.execute("LOAD 'auto_explain'")
        for setting in (
            "session_preload_libraries = 'auto_explain'",
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_analyze = on",
            "auto_explain.log_buffers = on",
            "auto_explain.log_nested_statements = on",
        ):
            await admin.execute(f'ALTER DATABASE "{name}" SET {setting}')
    finally:
        await admin.close()
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        yield storage, server.root / "postgres.log"
    finally:
        await storage.close()


def _delivery_plans(log: str) -> list[str]:
    """The logged plans of the statements that insert a message row."""
    plans = re.split(r"LOG:  duration: [0-9.]+ ms  plan:", log)
    return [p for p in plans if "INSERT INTO messages" in _query_text(p)]


def _messages_filtered(plan: str) -> bool:
    """Whether a scan of ``messages`` in ``plan`` read rows it then dropped
    (its index found the account's rows, a filter the reference)."""
    nodes = plan.split("->")
    return any(" on messages " in n and "Rows Removed by Filter" in n for n in nodes)


def _new_id_pages(plan: str) -> int:
    """The pages taking the new message's id (the plan's ``n`` CTE) read:
    the sequence's own, and the catalog's if it looks the sequence up."""
    node = plan.partition("CTE n\n")[2].split("->")[1]
    found = re.search(r"Buffers: shared hit=(\d+)", node)
    return int(found.group(1)) if found else 0


def _query_text(plan: str) -> str:
    found = re.search(r"Query Text: (.*)", plan)
    return found.group(1) if found else ""


async def _account(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("bob@example.org", "pw")


async def test_a_delivery_reads_no_other_message_of_the_account(
    explained: tuple[SqlStorage, Path],
) -> None:
    storage, log_file = explained
    bob = await _account(storage)
    start = log_file.stat().st_size
    for _ in range(DELIVERIES):  # one at a time: the same pooled session
        raw, _ = build(body="x" * random.randint(1, 3000))
        await ingest(storage, [Delivery(bob, "INBOX")], raw)
    plans = _delivery_plans(log_file.read_bytes()[start:].decode(errors="replace"))
    assert len(plans) >= DELIVERIES, plans
    # No message referenced, none read: no scan of the account's rows.
    assert not any(_messages_filtered(p) for p in plans), plans[-1]
    # Its id from the sequence, named once: no catalog read per delivery
    # (a session's first ones fill its caches).
    assert max(_new_id_pages(p) for p in plans[-5:]) <= 1, plans[-1]


async def test_a_reply_finds_its_thread_through_the_index(
    explained: tuple[SqlStorage, Path],
) -> None:
    storage, log_file = explained
    bob = await _account(storage)
    delivery = [Delivery(bob, "INBOX")]
    parents = [f"<p{n}.{random.random()}@example.org>" for n in range(3)]
    for parent in parents:
        await ingest(storage, delivery, build(message_id=parent)[0])
    start = log_file.stat().st_size
    for n in range(DELIVERIES):
        await ingest(storage, delivery, build(in_reply_to=parents[n % 3])[0])
    plans = _delivery_plans(log_file.read_bytes()[start:].decode(errors="replace"))
    assert len(plans) >= DELIVERIES, plans
    # Each reference is one probe of (account_id, message_id_header).
    assert not any(_messages_filtered(p) for p in plans), plans[-1]
    assert all("message_id_header = " in p and "Index Cond" in p for p in plans), plans[-1]
    mail = storage.mail(bob)
    threads = {await mail.thread_of(bob.id, mid) for mid in await _message_ids(storage, bob)}
    assert len(threads) == 3  # every reply joined its parent's thread


async def _message_ids(storage: SqlStorage, bob: Account) -> list[int]:
    from sqlalchemy import select

    from storage.sql.schema import messages

    async with storage.mail(bob).db.read() as conn:
        rows = await conn.execute(select(messages.c.id).where(messages.c.account_id == bob.id))
        return [int(r.id) for r in rows]

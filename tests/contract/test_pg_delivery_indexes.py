"""PostgreSQL: a delivery writes no index that no query needs (schema step
``_v39_pg_fewer_delivery_indexes``, issue #20: every index of a table a
delivery writes is one more relation its statements open and lock, and
one more insertion). The queries the dropped indexes could serve keep an
index: the delivery finds its mailbox by account and name in the unique
(account_id, name) index, both columns in the index condition, in the
plan the server ran (auto_explain, after the first five executions of the
prepared statement: its generic plan), not by the account alone with a
filter on the name, as it did while the one-column index existed. Fails
before the step."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import text

from storage.backend import SqlStorage
from storage.ingest import Delivery, ingest
from storage.sql.schema import PG_DROPPED_INDEXES
from tests.contract.mailfactory import build
from tests.contract.test_pg_delivery_plans import (  # noqa: F401 (the fixture)
    DELIVERIES,
    _account,
    _query_text,
    explained,
)

# The indexes each table a delivery writes keeps (name: why).
KEPT = {
    "mailboxes": {"mailboxes_pkey", "mailboxes_account_name"},
    "messages": {
        "messages_pkey",
        "messages_account_msgid",  # the thread lookup by reference
        "messages_subject_trgm",  # SEARCH SUBJECT
        "messages_search_words",  # BODY / TEXT
        "messages_search_unindexed",  # rows without word hashes
        "messages_search_untagged",  # rows indexed before step 38
    },
}


def _mailbox_scans(log: str) -> list[str]:
    """The plan nodes reading ``mailboxes`` of the logged plans of the
    statements that store a delivery (those naming the mailbox by name)."""
    plans = re.split(r"LOG:  duration: [0-9.]+ ms  plan:", log)
    nodes = []
    for plan in plans:
        if "INSERT INTO messages" in _query_text(plan) or "mailbox_entries" in _query_text(plan):
            nodes += [n for n in plan.split("->") if " on mailboxes " in n]
    return nodes


async def test_the_delivery_tables_keep_only_the_indexes_queries_use(
    explained: tuple[SqlStorage, Path],  # noqa: F811
) -> None:
    storage, _ = explained
    bob = await _account(storage)
    async with storage.mail(bob).db.read() as conn:
        rows = await conn.execute(
            text(
                "SELECT tablename, indexname FROM pg_indexes "
                "WHERE tablename IN ('mailboxes', 'messages')"
            )
        )
        found: dict[str, set[str]] = {}
        for table, index in rows:
            found.setdefault(table, set()).add(index)
    assert found == KEPT
    assert not set(PG_DROPPED_INDEXES) & (found["mailboxes"] | found["messages"])


async def test_a_delivery_finds_its_mailbox_by_both_columns_of_one_index(
    explained: tuple[SqlStorage, Path],  # noqa: F811
) -> None:
    storage, log_file = explained
    bob = await _account(storage)
    mail = storage.mail(bob)
    for name in ("Lists", "Projects", "Receipts", "Travel"):
        await mail.create_mailbox(bob.id, name)
    start = log_file.stat().st_size
    for n in range(DELIVERIES):  # one at a time: the same pooled session
        await ingest(storage, [Delivery(bob, "Lists" if n % 2 else "INBOX")], build()[0])
    nodes = _mailbox_scans(log_file.read_bytes()[start:].decode(errors="replace"))
    by_name = [n for n in nodes if "name = " in n or "name)" in n]
    assert by_name, nodes
    # The generic plans of the last executions: one probe of (account, name).
    for node in by_name[-5:]:
        assert "using mailboxes_account_name" in node, node
        assert "Rows Removed by Filter" not in node, node
        cond = node.partition("Index Cond:")[2].splitlines()[0]
        assert "account_id" in cond and "name" in cond, node

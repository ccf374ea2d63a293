"""PostgreSQL: a SORT by SUBJECT or FROM alone (and REVERSE) is read from
its index without the table (schema step ``_v37_pg_sort_key_heads``,
storage.sql.sortkeys): an index-only scan, as SORT (DATE)'s. Before the
step the index held an expression of the key column and the query named
that column, and the planner then reads every entry from the table in key
order (100,000 random heap reads, issue #24). The order itself is
test_sort_keys.py's (long keys, every criterion): here, the plan and that
the new columns are the keys' prefixes, whoever wrote the entry."""

from __future__ import annotations

import random

from storage.backend import SqlStorage
from storage.model import StoreMode, UidSet
from storage.sql.sortkeys import PG_PREFIX, PREFIXED, SORT_COLUMNS, _sorted_uids_sql, pg_head
from tests.contract.test_pg_word_index import _connect, backend  # noqa: F401 (PostgreSQL only)
from tests.contract.test_sort_keys import _filled


async def test_subject_and_from_orders_are_index_only_scans(
    storage: SqlStorage, database_url: str
) -> None:
    # Subjects of 600 and 2,000 octets among them (test_sort_keys._SUBJECTS).
    bob, mail, box = await _filled(storage, random.Random())
    other = await mail.create_mailbox(bob.id, "Other")
    await mail.copy(bob.id, box.id, UidSet.all(), other.id)
    conn = await _connect(database_url)
    try:
        # What autovacuum does after a fill: the visibility map an
        # index-only scan relies on. A few rows: the planner would read the
        # table whole, so sequential scans and sorts are priced out.
        await conn.execute("VACUUM (ANALYZE) mailbox_entries")
        await conn.execute("SET enable_seqscan = off")
        await conn.execute("SET enable_bitmapscan = off")
        await conn.execute("SET enable_sort = off")
        for name in PREFIXED:
            col = SORT_COLUMNS[name].name
            # Generated: every entry's is its key's prefix, delivered or copied.
            mismatched = await conn.fetchval(
                f"SELECT count(*) FROM mailbox_entries WHERE {pg_head(SORT_COLUMNS[name])} "
                f"IS DISTINCT FROM substring({col} from 1 for {PG_PREFIX})"
            )
            assert mismatched == 0
            for reverse in (False, True):
                sql = str(_sorted_uids_sql(((name, reverse),), "postgresql"))
                plan = "\n".join(
                    r[0] for r in await conn.fetch("EXPLAIN " + sql.replace(":b_box", str(box.id)))
                )
                assert f"Index Only Scan{' Backward' if reverse else ''} using " \
                    f"mailbox_entries_by_{name.lower()} " in plan, plan
    finally:
        await conn.close()


async def test_the_uids_of_a_select_come_in_index_order_unsorted(
    storage: SqlStorage, database_url: str
) -> None:
    """A SELECT's snapshot reads every UID of the mailbox as one array
    (storage.sql.mailstore._UIDS_PG): in the order the (mailbox_id, uid)
    index gives them, with no aggregate sorting them again, and the same
    UIDs as the entries."""
    from sqlalchemy.dialects import postgresql

    from storage.sql.mailstore import _UIDS_PG

    bob, mail, box = await _filled(storage, random.Random())
    await mail.store_flags(bob.id, box.id, UidSet.of([1]), StoreMode.ADD, ["\\Deleted"])
    await mail.expunge(bob.id, box.id)
    snapshot = await mail.snapshot(bob.id, box.id)
    assert list(snapshot.uids) == [e.uid for e in await mail.uids(bob.id, box.id)]
    sql = str(_UIDS_PG.compile(dialect=postgresql.dialect())).replace("%(b_box)s", str(box.id))
    conn = await _connect(database_url)
    try:
        await conn.execute("VACUUM (ANALYZE) mailbox_entries")
        await conn.execute("SET enable_seqscan = off")
        await conn.execute("SET enable_bitmapscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql))
    finally:
        await conn.close()
    assert "Index Only Scan using mailbox_entries_mailbox_uid " in plan, plan
    assert "Aggregate" not in plan and "Sort" not in plan, plan

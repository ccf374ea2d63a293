"""A STORE of system flags on PostgreSQL in one statement
(``storage.sql.mailstore._STORE_SYSTEM_FLAGS_PG``): the flag arithmetic of
``_plan_store`` (RFC 3501 section 6.4.6 +FLAGS / -FLAGS), the RFC 7162
section 3.1.3 UNCHANGEDSINCE guard, the modseq, and change-log rows whose
JSON is byte for byte the Python path's (``_flag_texts``), done by the
server. Each STORE here is checked to be that one statement, so these fail
where the Python path plans it (two statements); what it cannot decide
alone (a gap in the range, REPLACE, keywords) goes the long way, correctly."""

# The "site" fixture is imported: its name is every test's and helper's argument.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from storage import errors
from storage.model import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN, StoreMode, UidSet
from storage.sql import mailstore
from storage.sql.criteria import FLAG_BITS
from tests.contract.test_pg_round_trips import (
    Site,
    _waiting_for_a_lock,
    deliver_some,
    site,  # noqa: F401 (the fixture)
)

# Keywords whose code point order (the change log's) differs from their
# case-insensitive one (the stored text's), around the system flags' "\\".
KEYWORDS = ["zeta", "$Junk", "Alpha", "_x", "it's", "~y", "Beta"]


async def _box(site: Site) -> int:
    mail = site.storage.mail(site.bob)
    return (await mail.get_mailbox(site.bob.id, "INBOX")).id


async def _store(
    site: Site,
    uids: UidSet,
    mode: StoreMode,
    flags: list[str],
    unchanged_since: int | None = None,
    statements: int | None = 1,
) -> Any:
    """The STORE, and that it cost ``statements`` statements (None: any)."""
    mail = site.storage.mail(site.bob)
    work = mail.store_flags(site.bob.id, await _box(site), uids, mode, flags, unchanged_since)
    result, calls, _ = await site.statements(work)
    if statements is not None:
        assert len(calls) == statements, calls
    return result


async def _rows(site: Site, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await site.connect()
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _entries(site: Site) -> dict[int, asyncpg.Record]:
    rows = await _rows(
        site,
        "SELECT uid, sysflags, keywords, modseq FROM mailbox_entries WHERE mailbox_id = $1",
        await _box(site),
    )
    return {r["uid"]: r for r in rows}


async def _log(site: Site, after: int) -> list[asyncpg.Record]:
    return await _rows(
        site,
        "SELECT id, kind, mailbox_id, uid, modseq, data FROM change_log "
        "WHERE account_id = $1 AND id > $2 ORDER BY id",
        site.bob.id,
        after,
    )


async def _counters(site: Site) -> tuple[int, int]:
    """(the account's last change id, INBOX's HIGHESTMODSEQ)."""
    rows = await _rows(
        site,
        "SELECT a.last_change_id, m.highestmodseq FROM shard_accounts a "
        "JOIN mailboxes m ON m.account_id = a.account_id AND m.id = $2 "
        "WHERE a.account_id = $1",
        site.bob.id,
        await _box(site),
    )
    return rows[0]["last_change_id"], rows[0]["highestmodseq"]


def _python_json(sysflags: int, keywords: str) -> str:
    return mailstore._flag_texts(sysflags, keywords)[1]


async def _check_written(site: Site, result: Any, before: tuple[int, int]) -> None:
    """The STORE's entries are the rows now stored, one change-log row each
    (ids after the account's last, in UID order, the Python path's JSON),
    and the counters moved by exactly that."""
    last_change, highest = before
    rows = await _entries(site)
    updated = result.updated
    modseq = highest + 1
    for entry in updated:
        row = rows[entry.uid]
        assert entry.modseq == row["modseq"] == modseq
        assert entry.flags == mailstore._flags_of(row["sysflags"], row["keywords"])
    log = await _log(site, last_change)
    assert [r["id"] for r in log] == [last_change + 1 + i for i in range(len(updated))]
    assert [r["uid"] for r in log] == [e.uid for e in updated]
    for r in log:
        row = rows[r["uid"]]
        assert (r["kind"], r["modseq"]) == ("flags", modseq)
        assert r["data"] == _python_json(row["sysflags"], row["keywords"])
    assert await _counters(site) == (
        (last_change + len(updated), modseq) if updated else (last_change, highest)
    )


async def test_add_and_remove_in_one_statement_keep_keywords(site: Site) -> None:
    """+FLAGS and -FLAGS of system flags change only those bits, leave the
    keywords as stored, and log the Python path's JSON (flag names in code
    point order: "$Junk" < "Alpha" < "\\\\Seen" < "_x" < "it's" < "zeta")."""
    await deliver_some(site, 5)
    await _store(site, UidSet.of([2, 3]), StoreMode.ADD, KEYWORDS, statements=None)
    before = await _counters(site)
    result = await _store(site, UidSet.of([1, 2, 3, 4]), StoreMode.ADD, [SEEN, FLAGGED])
    assert [e.uid for e in result.updated] == [1, 2, 3, 4]
    assert result.modified == ()
    assert result.updated[1].flags == {SEEN, FLAGGED, *KEYWORDS}
    await _check_written(site, result, before)
    log = await _log(site, before[0])
    assert log[1]["data"] == (
        '{"flags":["$Junk","Alpha","Beta","\\\\Flagged","\\\\Seen","_x","it\'s","zeta","~y"]}'
    )
    assert log[0]["data"] == '{"flags":["\\\\Flagged","\\\\Seen"]}'

    before = await _counters(site)
    result = await _store(site, UidSet.of([2, 3, 4, 5]), StoreMode.REMOVE, [SEEN, DRAFT])
    assert [e.uid for e in result.updated] == [2, 3, 4]  # 5 had neither
    assert all(e.flags == {FLAGGED, *KEYWORDS} for e in result.updated[:2])
    assert result.updated[2].flags == {FLAGGED}
    await _check_written(site, result, before)

    everything = FLAG_BITS.keys() - {DRAFT}
    before = await _counters(site)
    result = await _store(site, UidSet.of([5]), StoreMode.ADD, sorted(everything))
    assert result.updated[0].flags == everything
    await _check_written(site, result, before)
    log = await _log(site, before[0])
    assert log[0]["data"] == (
        '{"flags":["\\\\Answered","\\\\Deleted","\\\\Flagged","\\\\Seen"]}'
    )


async def test_rows_whose_flags_do_not_change_are_not_written(site: Site) -> None:
    """No new modseq, change-log row or counter for an entry that already
    has (or already lacks) the flags; none at all when no entry changes."""
    await deliver_some(site, 4)
    await _store(site, UidSet.of([2]), StoreMode.ADD, [SEEN])
    before = await _counters(site)
    result = await _store(site, UidSet.of([1, 2, 3]), StoreMode.ADD, [SEEN])
    assert [e.uid for e in result.updated] == [1, 3]
    await _check_written(site, result, before)

    before = await _counters(site)
    entries = await _entries(site)
    result = await _store(site, UidSet.of([1, 2, 3]), StoreMode.ADD, [SEEN])
    assert result.updated == () and result.modified == ()
    assert await _counters(site) == before
    assert await _log(site, before[0]) == []
    assert await _entries(site) == entries
    result = await _store(site, UidSet.of([1, 2, 3, 4]), StoreMode.REMOVE, [ANSWERED])
    assert result.updated == ()
    assert await _counters(site) == before


async def test_unchangedsince_refuses_entries_changed_since(site: Site) -> None:
    """RFC 7162 section 3.1.3: an entry whose modseq is above the
    UNCHANGEDSINCE value is not stored and comes back in ``modified``; the
    others are, with one new modseq."""
    await deliver_some(site, 5)  # modseqs 2..6 (the mailbox's creation is 1)
    await _store(site, UidSet.of([4]), StoreMode.ADD, [FLAGGED])
    entries = await _entries(site)
    since = entries[3]["modseq"]
    before = await _counters(site)
    result = await _store(site, UidSet.of([1, 2, 3, 4, 5]), StoreMode.ADD, [SEEN], since)
    assert list(result.modified) == [4, 5]
    assert [e.uid for e in result.updated] == [1, 2, 3]
    await _check_written(site, result, before)
    assert (await _entries(site))[4] == entries[4]

    before = await _counters(site)
    result = await _store(site, UidSet.of([1, 2, 3]), StoreMode.REMOVE, [SEEN], 0)
    assert list(result.modified) == [1, 2, 3] and result.updated == ()
    assert await _counters(site) == before

    # Refused or not, an entry that would not change is not in "updated".
    before = await _counters(site)
    result = await _store(site, UidSet.of([3, 4]), StoreMode.ADD, [SEEN], before[1])
    assert result.modified == () and [e.uid for e in result.updated] == [4]
    await _check_written(site, result, before)


async def test_a_gap_in_the_range_goes_the_long_way(site: Site) -> None:
    """An expunged UID (or one past the last) in the range: the statement
    cannot tell whether a commit it waited for filled it, writes nothing,
    and the STORE is planned again under its locks: same outcome."""
    await deliver_some(site, 5)
    mail = site.storage.mail(site.bob)
    await _store(site, UidSet.of([3]), StoreMode.ADD, [DELETED])
    await mail.expunge(site.bob.id, await _box(site), UidSet.of([3]))
    before = await _counters(site)
    everything = UidSet.from_ranges([(1, 9)])
    result = await _store(site, everything, StoreMode.ADD, [SEEN], statements=None)
    assert [e.uid for e in result.updated] == [1, 2, 4, 5]
    await _check_written(site, result, before)


async def test_replace_and_keywords_go_the_long_way(site: Site) -> None:
    await deliver_some(site, 3)
    before = await _counters(site)
    result = await _store(site, UidSet.of([1, 2]), StoreMode.ADD, [SEEN, "$Junk"], statements=2)
    assert [e.flags for e in result.updated] == [{SEEN, "$Junk"}] * 2
    await _check_written(site, result, before)
    before = await _counters(site)
    result = await _store(site, UidSet.of([2, 3]), StoreMode.REPLACE, [FLAGGED], statements=2)
    assert [e.flags for e in result.updated] == [{FLAGGED}] * 2
    await _check_written(site, result, before)


async def test_a_store_behind_another_writer_reads_its_commit(site: Site) -> None:
    """Another session's write of the same entry, the mailbox's HIGHESTMODSEQ
    and the account's change log commits while the STORE waits for the
    account's lock: the STORE plans from, and numbers after, what it wrote
    (READ COMMITTED rereads a row that was waited for)."""
    await deliver_some(site, 3)
    box = await _box(site)
    last_change, highest = await _counters(site)
    other = await site.connect()
    await other.execute("BEGIN")
    await other.execute(
        "SELECT 1 FROM shard_accounts WHERE account_id = $1 FOR UPDATE", site.bob.id
    )
    await other.execute(
        "UPDATE mailbox_entries SET sysflags = sysflags | $3, keywords = ' Other ', "
        "modseq = $4 WHERE mailbox_id = $1 AND uid = $2",
        box,
        2,
        FLAG_BITS[ANSWERED],
        highest + 1,
    )
    await other.execute("UPDATE mailboxes SET highestmodseq = $2 WHERE id = $1", box, highest + 1)
    await other.execute(
        "INSERT INTO change_log (account_id, id, kind, mailbox_id, uid, modseq, at, data) "
        "VALUES ($1, $2, 'flags', $3, 2, $4, 0, '{}')",
        site.bob.id,
        last_change + 1,
        box,
        highest + 1,
    )
    await other.execute(
        "UPDATE shard_accounts SET last_change_id = $2 WHERE account_id = $1",
        site.bob.id,
        last_change + 1,
    )
    mail = site.storage.mail(site.bob)
    store = asyncio.ensure_future(
        mail.store_flags(site.bob.id, box, UidSet.of([1, 2, 3]), StoreMode.ADD, [SEEN])
    )
    await _waiting_for_a_lock(site)
    await other.execute("COMMIT")
    await other.close()
    result = await store
    assert result.updated[1].flags == {SEEN, ANSWERED, "Other"}
    assert all(e.modseq == highest + 2 for e in result.updated)
    await _check_written(site, result, (last_change + 1, highest + 1))


async def test_a_fenced_account_writes_nothing(site: Site) -> None:
    """An account being moved (its row's fence set) refuses the STORE as
    TEMPORARY and nothing is written."""
    await deliver_some(site, 2)
    before = await _counters(site)
    entries = await _entries(site)
    conn = await site.connect()
    await conn.execute(
        "UPDATE shard_accounts SET fence = 'out:elsewhere' WHERE account_id = $1", site.bob.id
    )
    await conn.close()
    with pytest.raises(errors.AccountMoving):
        await _store(site, UidSet.of([1, 2]), StoreMode.ADD, [SEEN])
    assert await _counters(site) == before
    assert await _entries(site) == entries

"""Flag changes on PostgreSQL (``SqlMailStore.store_flags``), with another
transaction holding the account's rows, as another instance's write does.

What a user would notice: one account's STORE waiting for a lock does not
hold up another account's (batches of different accounts commit side by
side, ``Database.write_batched``'s ``key``), while two STOREs of one account
still commit in the order they were made; and a STORE that had to wait
starts from the flags and messages the other transaction committed, never
from what it read before the wait (no lost flag, no message left out).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import make_url

from storage.backend import SqlStorage, open_storage_from_url
from storage.model import FLAGGED, SEEN, Account, StoreMode, StoreResult, UidSet
from storage.sql.criteria import FLAG_BITS
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build

# Long enough for any load; a STORE that is not blocked takes milliseconds.
NOT_BLOCKED = 60.0


@dataclass
class Site:
    storage: SqlStorage
    dsn: str
    accounts: list[Account]


@pytest.fixture
async def site(pg_server: Any, tmp_path: Path) -> AsyncIterator[Site]:
    url = await pg_server.server.create_database()
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        await storage.directory.add_domain("example.org")
        accounts = [
            await storage.directory.add_account(f"{name}@example.org", "pw")
            for name in ("alice", "bob")
        ]
        yield Site(storage, dsn, accounts)
    finally:
        await storage.close()


async def fill(site: Site, account: Account, count: int) -> int:
    """``count`` messages of random sizes in the account's INBOX; its id."""
    mail = site.storage.mail(account)
    for _ in range(count):
        raw, parsed = build(body="x" * random.randint(1, 4000))
        key = await site.storage.blobs.put(raw)
        await mail.deliver(account.id, key, parsed, [("INBOX", (), None)])
    return (await mail.get_mailbox(account.id, "INBOX")).id


async def holding_account(site: Site, account: Account) -> asyncpg.Connection:
    """Another session with the account's counters row locked, as every
    write of the account locks it first; ROLLBACK or COMMIT lets it go."""
    other = await asyncpg.connect(site.dsn)
    await other.execute("BEGIN")
    await other.execute(
        "SELECT 1 FROM shard_accounts WHERE account_id = $1 FOR UPDATE", account.id
    )
    return other


async def waiting_for_a_lock(site: Site, count: int) -> None:
    """Returns once ``count`` sessions of the database wait for a row lock."""
    probe = await asyncpg.connect(site.dsn)
    try:
        while True:
            waiting = await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting >= count:
                return
            await asyncio.sleep(0.01)
    finally:
        await probe.close()


def store(site: Site, account: Account, box: int, uids: UidSet, flag: str) -> Any:
    mail = site.storage.mail(account)
    return asyncio.ensure_future(mail.store_flags(account.id, box, uids, StoreMode.ADD, [flag]))


async def test_a_store_waiting_for_one_account_holds_up_no_other(site: Site) -> None:
    alice, bob = site.accounts
    alice_box = await fill(site, alice, random.randint(2, 6))
    bob_box = await fill(site, bob, random.randint(1, 6))
    other = await holding_account(site, alice)
    try:
        first = store(site, alice, alice_box, UidSet.of([1]), SEEN)
        await waiting_for_a_lock(site, 1)
        second = store(site, alice, alice_box, UidSet.of([2]), FLAGGED)  # same account
        bobs: StoreResult = await asyncio.wait_for(
            store(site, bob, bob_box, UidSet.of([1]), SEEN), NOT_BLOCKED
        )
        assert [e.flags for e in bobs.updated] == [frozenset({SEEN})]
        assert not first.done() and not second.done()  # alice's wait on her lock
    finally:
        await other.execute("ROLLBACK")
        await other.close()
    done_first, done_second = await first, await second
    # In the order they were made: the second's modseq is the higher.
    assert done_first.updated[0].modseq < done_second.updated[0].modseq
    flags = {e.uid: e.flags for e in await site.storage.mail(alice).uids(alice.id, alice_box)}
    assert flags[1] == {SEEN} and flags[2] == {FLAGGED}


async def test_a_store_that_waited_starts_from_the_flags_committed_meanwhile(
    site: Site,
) -> None:
    alice = site.accounts[0]
    count = random.randint(1, 8)
    box = await fill(site, alice, count)
    uid = random.randint(1, count)
    mail = site.storage.mail(alice)
    top = (await mail.get_mailbox(alice.id, "INBOX")).highestmodseq
    other = await holding_account(site, alice)
    try:
        # The other transaction flags the message, then commits while the
        # STORE waits: the STORE must keep \Flagged and come after it.
        await other.execute(
            "UPDATE mailbox_entries SET sysflags = sysflags | $1, modseq = $2 "
            "WHERE mailbox_id = $3 AND uid = $4",
            FLAG_BITS[FLAGGED], top + 1, box, uid,
        )
        await other.execute("UPDATE mailboxes SET highestmodseq = $1 WHERE id = $2", top + 1, box)
        pending = store(site, alice, box, UidSet.of([uid]), SEEN)
        await waiting_for_a_lock(site, 1)
        await other.execute("COMMIT")
    finally:
        await other.close()
    result = await pending
    assert [(e.uid, e.flags, e.modseq) for e in result.updated] == [
        (uid, frozenset({SEEN, FLAGGED}), top + 2)
    ]
    stored = {e.uid: e for e in await mail.uids(alice.id, box)}
    assert stored[uid].flags == {SEEN, FLAGGED} and stored[uid].modseq == top + 2
    assert (await mail.status(alice.id, box)).highestmodseq == top + 2


async def test_a_store_that_waited_covers_messages_added_meanwhile(site: Site) -> None:
    alice = site.accounts[0]
    count = random.randint(1, 8)
    box = await fill(site, alice, count)
    added = random.randint(1, 4)
    other = await holding_account(site, alice)
    try:
        # The other transaction adds messages at the end of the range the
        # STORE names (copies of the first one), and commits while it waits.
        for uid in range(count + 1, count + added + 1):
            await other.execute(
                "INSERT INTO mailbox_entries (mailbox_id, uid, message_id, sysflags, keywords,"
                " modseq, internal_date, internal_tz, internal_day, size, list_date)"
                " SELECT mailbox_id, $1, message_id, 0, keywords, modseq, internal_date,"
                " internal_tz, internal_day, size, list_date FROM mailbox_entries"
                " WHERE mailbox_id = $2 AND uid = 1",
                uid, box,
            )
        await other.execute(
            "UPDATE mailboxes SET uidnext = $1 WHERE id = $2", count + added + 1, box
        )
        pending = store(site, alice, box, UidSet.from_ranges([(1, count + added)]), SEEN)
        await waiting_for_a_lock(site, 1)
        await other.execute("COMMIT")
    finally:
        await other.close()
    result = await pending
    assert [e.uid for e in result.updated] == list(range(1, count + added + 1))
    mail = site.storage.mail(alice)
    assert all(e.flags == {SEEN} for e in await mail.uids(alice.id, box))

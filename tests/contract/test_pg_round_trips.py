"""Round trips of a delivery on PostgreSQL, counted by the server itself
(``log_statement = all``). Each one is a wakeup of the server process and
of ours, and on a busy host a wait for a core: that, not the SQL, bounds
how many messages a second a site on PostgreSQL stores."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.ingest import Delivery, ingest
from storage.model import SEEN, Account, StoreMode, UidSet
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build

# Per delivery: the blob (when the shard keeps it), the message row, and the
# account locked with its mailbox in one; then its entry, the mailbox's
# counters, the change log and the account's counters in one. BEGIN and
# COMMIT are shared by the batch.
ROUND_TRIPS_PER_DELIVERY = 2
# Per STORE of one UID range: lock the account, the mailbox and the
# range's entries in one; then the entries' flags, HIGHESTMODSEQ, change log
# and counters in one.
ROUND_TRIPS_PER_STORE = 2
# Not per call: BEGIN and COMMIT (per batch), NOTIFY (per commit), and per
# connection the pool's ping (an empty statement) and asyncpg's first look
# at a type (the array types of the one-statement flush); the batch's look
# for blobs being deleted; and, once a second, not per call: the search
# index's background merger and indexer, the old commit marks' deletion,
# and the event bus's look for other instances' listeners.
_PER_BATCH = (
    "BEGIN",
    "COMMIT",
    "SELECT pg_notify",
    "WITH RECURSIVE typeinfo_tree",
    "SET LOCAL statement_timeout",
    "SELECT CASE WHEN pg_try_advisory_xact_lock",
    "SELECT blob_deletions.id",
    "SELECT id, subject, from_text",
    "SELECT pg_try_advisory_xact_lock",
    "DELETE FROM commit_marks",
    "SELECT gin_clean_pending_list",
    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity",
)


@dataclass
class Site:
    storage: SqlStorage
    bob: Account
    log: Path
    ran: list[str] = field(default_factory=list)  # the last statements() call's

    async def statements(self, work: Awaitable[Any]) -> tuple[Any, list[str], int]:
        """What ``work`` returned, the statements the server ran for it
        (less those of _PER_BATCH), and its COMMITs."""
        start = self.log.stat().st_size
        result = await work
        text = self.log.read_bytes()[start:].decode(errors="replace")
        ran = [s.strip() for s in re.findall(r"(?:statement|execute [^:]*): (.*)", text)]
        calls = [s for s in ran if s and not s.startswith(_PER_BATCH)]
        self.ran = ran
        return result, calls, sum(s.startswith("COMMIT") for s in ran)


@pytest.fixture
async def site(pg_server: Any, tmp_path: Path) -> AsyncIterator[Site]:
    """A site on its own database, every statement of its sessions logged."""
    server = pg_server.server
    url = await server.create_database()
    name = url.rsplit("/", 1)[1]
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw")
        admin = await asyncpg.connect(
            host="127.0.0.1", port=server.port, user=server.user, database=name
        )
        await admin.execute(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
        await admin.close()
        await storage.databases["default"].engine.dispose()  # new sessions log
        yield Site(storage, bob, server.root / "postgres.log")
    finally:
        await storage.close()


async def deliver_some(site: Site, count: int) -> list[Any]:
    made = []
    for _ in range(count):
        raw, parsed = build(body="x" * random.randint(1, 3000))
        made.append((await site.storage.blobs.put(raw), parsed))
    mail = site.storage.mail(site.bob)
    return await asyncio.gather(
        *(mail.deliver(site.bob.id, key, parsed, [("INBOX", (), None)]) for key, parsed in made)
    )


async def test_a_delivery_costs_two_statements_and_shares_begin_and_commit(site: Site) -> None:
    count = random.randint(10, 30)
    results, calls, commits = await site.statements(deliver_some(site, count))
    assert sorted(r[0].uid for r in results) == list(range(1, count + 1))
    assert len(calls) <= ROUND_TRIPS_PER_DELIVERY * count, calls
    assert 1 <= commits < count  # shared


async def test_a_delivery_with_its_blob_in_the_shard_costs_two_statements(site: Site) -> None:
    """The ingest path as mtad runs it: a small message's blob goes into the
    shard's own table with its row, in the same two statements; it reads
    back byte for byte, and a reply joins the thread of the message it
    answers (found in the same statement)."""
    delivery = [Delivery(site.bob, "INBOX")]
    parents = [build(message_id=f"<p{n}.{random.random()}@example.org>")[0] for n in range(3)]
    for raw in parents:
        await ingest(site.storage, delivery, raw)
    count = random.randint(10, 30)
    made = [
        build(
            body=random.randbytes(random.randint(1, 3000)).hex(),
            in_reply_to=_message_id(parents[n % 3]),
        )[0]
        for n in range(count)
    ]
    work = asyncio.gather(*(ingest(site.storage, delivery, raw) for raw in made))
    results, calls, commits = await site.statements(work)
    assert len(calls) <= ROUND_TRIPS_PER_DELIVERY * count, calls
    assert 1 <= commits < count
    mail = site.storage.mail(site.bob)
    box = results[0][0].mailbox_id
    everything = await mail.fetch(site.bob.id, box, UidSet.of(list(range(1, count + 4))))
    stored = {await site.storage.blobs.get(s.entry.blob_key): s.entry for s in everything}
    assert set(stored) == {*parents, *made}  # byte for byte
    parent_threads = [await mail.thread_of(site.bob.id, stored[p].message_id) for p in parents]
    assert len(set(parent_threads)) == 3
    for n, raw in enumerate(made):
        thread = await mail.thread_of(site.bob.id, stored[raw].message_id)
        assert thread == parent_threads[n % 3]


def _message_id(raw: bytes) -> str:
    return re.search(rb"Message-ID: (<[^>]+>)", raw).group(1).decode()  # type: ignore[union-attr]


async def test_a_flag_change_costs_two_statements(site: Site) -> None:
    count = random.randint(5, 15)
    await deliver_some(site, count)
    mail = site.storage.mail(site.bob)
    box = (await mail.get_mailbox(site.bob.id, "INBOX")).id
    flagged = random.sample(range(1, count + 1), random.randint(1, count))
    stores = asyncio.gather(
        *(
            mail.store_flags(site.bob.id, box, UidSet.of([u]), StoreMode.ADD, [SEEN])
            for u in flagged
        )
    )
    _, calls, _ = await site.statements(stores)
    assert len(calls) <= ROUND_TRIPS_PER_STORE * len(flagged), calls
    seen = [e.uid for e in await mail.uids(site.bob.id, box) if SEEN in e.flags]
    assert sorted(seen) == sorted(flagged)
    status = await mail.status(site.bob.id, box)
    assert status.highestmodseq == count + 1 + len(flagged)


async def test_reading_a_blob_kept_in_the_shard_is_one_statement(site: Site) -> None:
    """A message's first FETCH reads its bytes from the shard's ``blobs``
    table (small messages are kept there): one statement on a held
    connection, no BEGIN, ROLLBACK or pool ping around it; byte for byte."""
    delivery = [Delivery(site.bob, "INBOX")]
    made = [build(body=random.randbytes(random.randint(1, 3000)).hex())[0] for _ in range(3)]
    for raw in made:
        await ingest(site.storage, delivery, raw)
    mail = site.storage.mail(site.bob)
    box = (await mail.get_mailbox(site.bob.id, "INBOX")).id
    keys = [e.blob_key for e in await mail.uids(site.bob.id, box)]
    assert await site.storage.blobs.get(keys[0]) == made[0]  # a reader connection made
    for key, raw in zip(keys[1:], made[1:], strict=True):
        data, _, _ = await site.statements(site.storage.blobs.get(key))
        assert data == raw
        assert [s for s in site.ran if s] == ["SELECT data FROM blobs WHERE key = $1"], site.ran

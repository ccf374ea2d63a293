"""Round trips of a delivery on PostgreSQL, counted by the server itself
(``log_statement = all``). Each one is a wakeup of the server process and
of ours, and on a busy host a wait for a core: that, not the SQL, bounds
how many messages a second a site on PostgreSQL stores."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
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
# Per STORE of system flags (+FLAGS, -FLAGS) on one UID range: the locks of
# the account, the mailbox and the range's entries, the flag arithmetic, and
# the entries' flags, HIGHESTMODSEQ, change log and counters, in one.
ROUND_TRIPS_PER_STORE = 1
# Not per call: BEGIN and COMMIT (per batch; with the blob lock, and the
# commit mark or synchronous_commit off in the COMMIT's round trip), NOTIFY (per commit), and per
# connection the pool's ping (an empty statement) and asyncpg's first look
# at a type (the array types of the one-statement flush); the batch's look
# for blobs being deleted; and, once a second, not per call: the search
# index's background merger and indexer, the old commit marks' deletion,
# and the event bus's look for other instances' listeners.
_PER_BATCH = (
    "BEGIN",
    "COMMIT",
    "SELECT pg_advisory_xact_lock_shared",
    "INSERT INTO commit_marks",
    "SET LOCAL synchronous_commit",
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


# A batch writer's BEGIN, alone or with what its round trip carries (the
# blob lock); not SQLAlchemy's "BEGIN;" of other sessions (the search
# index's merger).
_WRITER_BEGIN = re.compile(r"BEGIN(?:$|; \S)")
# A batch's COMMIT, alone or at the end of its round trip's statements.
_COMMIT = re.compile(r"(?:^|; )COMMIT(?: AND CHAIN)?$")


@dataclass
class Site:
    storage: SqlStorage
    bob: Account
    log: Path
    connect: Callable[[], Awaitable[asyncpg.Connection]]  # another session
    ran: list[str] = field(default_factory=list)  # the last statements() call's
    begins: int = 0  # of them, the batch writer's BEGINs

    async def statements(self, work: Awaitable[Any]) -> tuple[Any, list[str], int]:
        """What ``work`` returned, the statements the server ran for it
        (less those of _PER_BATCH), and its COMMITs."""
        start = self.log.stat().st_size
        result = await work
        text = self.log.read_bytes()[start:].decode(errors="replace")
        ran = [s.strip() for s in re.findall(r"(?:statement|execute [^:]*): (.*)", text)]
        calls = [s for s in ran if s and not s.startswith(_PER_BATCH)]
        self.ran = ran
        self.begins = sum(bool(_WRITER_BEGIN.match(s)) for s in ran)
        return result, calls, sum(bool(_COMMIT.search(s)) for s in ran)


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
        def connect() -> Awaitable[asyncpg.Connection]:
            return asyncpg.connect(
                host="127.0.0.1", port=server.port, user=server.user, database=name
            )

        admin = await connect()
        await admin.execute(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
        await admin.close()
        await storage.databases["default"].engine.dispose()  # new sessions log
        yield Site(storage, bob, server.root / "postgres.log", connect)
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


async def test_an_append_that_claims_recent_costs_two_statements(site: Site) -> None:
    """An APPEND to the mailbox its session has selected moves the recent
    floor past the new message (RFC 3501 section 2.3.1.1) in the flush's
    one statement, not a round trip of its own; the floor is committed."""
    mail = site.storage.mail(site.bob)
    count = random.randint(5, 15)
    made = []
    for _ in range(count):
        raw, parsed = build(body=random.randbytes(random.randint(1, 3000)).hex())
        made.append((await site.storage.blobs.put(raw), parsed))
    work = asyncio.gather(
        *(
            mail.deliver(site.bob.id, key, parsed, [("INBOX", (), None)], claim_recent=True)
            for key, parsed in made
        )
    )
    results, calls, commits = await site.statements(work)
    assert len(calls) <= ROUND_TRIPS_PER_DELIVERY * count, calls
    assert not any(c.startswith("UPDATE mailboxes SET recent_floor") for c in calls), calls
    assert 1 <= commits < count  # shared
    box = results[0][0].mailbox_id
    # Each claim found the floor its predecessors left: every UID once.
    assert sorted(r[0].recent_floor for r in results) == list(range(1, count + 1))
    # The committed floor is past the last message: nothing is \Recent to
    # a session that claims again, and the next delivery is.
    assert await mail.claim_recent(site.bob.id, box) == count + 1
    assert await mail.peek_recent(site.bob.id, box) == 0
    await deliver_some(site, 1)
    assert await mail.peek_recent(site.bob.id, box) == 1


async def test_appends_to_several_accounts_share_one_flush_per_batch(site: Site) -> None:
    """Many sessions APPEND at once, each to its own account's selected
    INBOX (the IMAP bench): a batch's deliveries write their entries,
    mailbox counters, change log and account counters in ONE statement
    for the batch, not one each; a second delivery to an account in the
    same batch still finds the first's UID taken, and its counters moved."""
    accounts = [site.bob] + [
        await site.storage.directory.add_account(f"a{n}@example.org", "pw")
        for n in range(random.randint(6, 12))
    ]
    twice = random.choice(accounts)  # two deliveries to one account
    logged = {a.id: await site.storage.mail(a).last_change_id(a.id) for a in accounts}
    made = []
    for account in [*accounts, twice]:
        raw, parsed = build(body=random.randbytes(random.randint(1, 3000)).hex())
        made.append((account, await site.storage.blobs.put(raw), parsed))
    work = asyncio.gather(
        *(
            site.storage.mail(a).deliver(a.id, key, parsed, [("INBOX", (), None)],
                                         claim_recent=True)
            for a, key, parsed in made
        )
    )
    results, calls, commits = await site.statements(work)
    flushes = [c for c in calls if c.startswith("WITH bump AS")]
    assert 1 <= commits < len(made)  # shared
    # One for the batch, and at most one more for the account seen twice.
    assert len(flushes) <= 2 * commits, calls
    assert len(calls) <= len(made) + 2 * commits, calls
    appended: dict[int, list[Any]] = {}
    for (account, _, _), result in zip(made, results, strict=True):
        appended.setdefault(account.id, []).append(result[0])
    for account in accounts:
        mail = site.storage.mail(account)
        mine = sorted(appended[account.id], key=lambda r: r.uid)
        count = 2 if account is twice else 1
        assert [r.uid for r in mine] == list(range(1, count + 1))
        assert mine == sorted(mine, key=lambda r: r.modseq)  # MODSEQ ascends with UID
        box = mine[0].mailbox_id
        assert [e.uid for e in await mail.uids(account.id, box)] == [r.uid for r in mine]
        status = await mail.status(account.id, box)
        assert (status.uidnext, status.highestmodseq) == (count + 1, mine[-1].modseq)
        assert await mail.last_change_id(account.id) == logged[account.id] + count
        assert await mail.peek_recent(account.id, box) == 0  # claimed, committed


def _message_id(raw: bytes) -> str:
    return re.search(rb"Message-ID: (<[^>]+>)", raw).group(1).decode()  # type: ignore[union-attr]


async def test_a_flag_change_costs_one_statement(site: Site) -> None:
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


async def _until(site: Site, count_sql: str, done: Callable[[int], bool]) -> None:
    """Returns once ``done`` holds for the count another session reads."""
    probe = await site.connect()
    try:
        while True:
            if done(await probe.fetchval(count_sql)):
                return
            await asyncio.sleep(0.01)
    finally:
        await probe.close()


async def _waiting_for_a_lock(site: Site) -> None:
    await _until(
        site,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'",
        bool,
    )


async def _holding_bob(site: Site) -> asyncpg.Connection:
    """Another session with Bob's account row locked, as another
    instance's write holds it; its ROLLBACK lets it go."""
    other = await site.connect()
    await other.execute("BEGIN")
    await other.execute(
        "SELECT 1 FROM shard_accounts WHERE account_id = $1 FOR UPDATE", site.bob.id
    )
    return other


async def _flag_while_held(
    site: Site, other: asyncpg.Connection, uids: list[int], cancelled: bool
) -> list[Any]:
    """STOREs of ``uids`` of Bob's INBOX behind ``other``'s lock: the first
    waits for it while the others queue behind it; with ``cancelled`` their
    callers give up before the lock goes."""
    mail = site.storage.mail(site.bob)
    box = (await mail.get_mailbox(site.bob.id, "INBOX")).id

    def flag(uid: int) -> asyncio.Future[Any]:
        stored = mail.store_flags(site.bob.id, box, UidSet.of([uid]), StoreMode.ADD, [SEEN])
        return asyncio.ensure_future(stored)

    first = flag(uids[0])
    await _waiting_for_a_lock(site)
    rest = [flag(uid) for uid in uids[1:]]
    await asyncio.sleep(0)  # queued
    if cancelled:
        for later in rest:
            later.cancel()
    await other.execute("ROLLBACK")
    await other.close()
    return await asyncio.gather(first, *rest, return_exceptions=True)


async def test_a_batch_after_another_sends_no_begin(site: Site) -> None:
    """A busy writer: a batch's COMMIT begins the next transaction in its
    round trip (COMMIT AND CHAIN), so the batch after it sends no BEGIN: a
    STORE batch is three round trips, not four."""
    count = random.randint(3, 12)
    await deliver_some(site, count)
    uids = random.sample(range(1, count + 1), random.randint(2, count))
    other = await _holding_bob(site)
    results, _, commits = await site.statements(_flag_while_held(site, other, uids, False))
    assert [r.updated[0].uid for r in results] == uids
    assert commits == 2  # the first STORE, then all the others in one batch
    # The second batch runs in the transaction the first's COMMIT began (and
    # the first, unless seconds passed, in the one the deliveries' began).
    assert site.begins <= 1, site.ran
    mail = site.storage.mail(site.bob)
    box = (await mail.get_mailbox(site.bob.id, "INBOX")).id
    seen = [e.uid for e in await mail.uids(site.bob.id, box) if SEEN in e.flags]
    assert sorted(seen) == sorted(uids)


async def test_a_chained_transaction_nobody_used_ends(site: Site) -> None:
    """The calls queued behind a batch went away (their callers gave up):
    the transaction its COMMIT began is not left open on the idle writer
    connection (a site's ``idle_in_transaction_session_timeout`` would cut
    it), and the STOREs given up wrote nothing."""
    count = random.randint(3, 12)
    await deliver_some(site, count)
    uids = random.sample(range(1, count + 1), random.randint(2, count))
    results = await _flag_while_held(site, await _holding_bob(site), uids, True)
    assert [e.uid for e in results[0].updated] == uids[:1]
    assert all(isinstance(r, asyncio.CancelledError) for r in results[1:])
    idle_in_transaction = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'idle in transaction'"
    )
    await _until(site, idle_in_transaction, lambda n: n == 0)
    log = site.log.read_text(errors="replace")
    assert "COMMIT AND CHAIN" in log
    mail = site.storage.mail(site.bob)
    box = (await mail.get_mailbox(site.bob.id, "INBOX")).id
    seen = [e.uid for e in await mail.uids(site.bob.id, box) if SEEN in e.flags]
    assert seen == uids[:1]


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

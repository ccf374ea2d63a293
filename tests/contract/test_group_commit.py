"""Group commit on every SQL backend (``Database.write_batched``).

What a user would notice: many SMTP sessions delivering at once all get
their mail stored, each with its own UID, in far fewer transactions than
deliveries (so a site on PostgreSQL is not bound by one WAL flush per
message); one refused delivery, or one failing statement, fails only its
own caller; and no caller hears "stored" before its batch has committed,
so a message acknowledged once is there for good (even if the delivering
process is killed right after).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select, text
from sqlalchemy.exc import IntegrityError

from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.model import Account, UidSet
from storage.sql.db import Database
from storage.sql.schema import change_log, shard_accounts
from tests.contract.mailfactory import build

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def bob(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("bob@example.org", "pw")


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the transactions the batch writer ran, on either backend."""
    sizes: list[int] = []
    original = Database._run_batch

    def counting(self: Database, conn: Connection, items: list[Any], *rest: Any) -> Any:
        sizes.append(len(items))
        return original(self, conn, items, *rest)

    monkeypatch.setattr(Database, "_run_batch", counting)
    return sizes


def random_body(rng: random.Random) -> str:
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "zürich", "naïve", "😀"]
    lines = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 40))]
    return "\n".join(lines)


async def test_concurrent_deliveries_all_commit_in_shared_transactions(
    storage: SqlStorage, bob: Account, batches: list[int], backend: str
) -> None:
    rng = random.Random()
    count = rng.randint(15, 40)
    made = []
    for _ in range(count):
        raw, parsed = build(body=random_body(rng))
        made.append((raw, await storage.blobs.put(raw), parsed))
    mail = storage.mail(bob)
    results = await asyncio.gather(
        *(mail.deliver(bob.id, key, parsed, [("INBOX", (), None)]) for _, key, parsed in made)
    )
    assert sorted(r[0].uid for r in results) == list(range(1, count + 1))
    assert sum(batches) == count and len(batches) < count  # shared transactions
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    fetched = await mail.fetch(bob.id, inbox.id, UidSet.all())
    by_uid = {m.entry.uid: m for m in fetched}
    for (raw, key, _), result in zip(made, results, strict=True):
        stored = by_uid[result[0].uid]
        assert stored.entry.blob_key == key
        assert await storage.blobs.get(stored.entry.blob_key) == raw
    if backend == "postgres":
        # PostgreSQL's own word: rows of one transaction share its xmin.
        async with storage.databases["default"].read() as conn:
            xids = (
                await conn.execute(text("SELECT count(DISTINCT xmin::text) FROM messages"))
            ).scalar()
        assert xids is not None and xids < count


async def test_a_refused_delivery_fails_alone_in_its_batch(
    storage: SqlStorage, bob: Account, batches: list[int]
) -> None:
    small = await storage.directory.add_account("small@example.org", "pw", quota_bytes=10)
    calls: list[tuple[Account, str | int, tuple[str, ...]]] = [
        (bob, "INBOX", ()),
        (bob, "No/Such/Box", ()),
        (small, "INBOX", ()),  # over quota
        (bob, "INBOX", ("bad flag",)),
        (bob, "Archive", ()),
    ]
    made = []
    for _ in calls:
        raw, parsed = build()
        made.append((await storage.blobs.put(raw), parsed))
    outcomes = await asyncio.gather(
        *(
            storage.mail(account).deliver(account.id, key, parsed, [(box, flags, None)])
            for (account, box, flags), (key, parsed) in zip(calls, made, strict=True)
        ),
        return_exceptions=True,
    )
    assert batches[0] == len(calls)  # all in one transaction
    kinds = [o.kind if isinstance(o, StorageError) else None for o in outcomes]
    assert kinds == [None, ErrorKind.NOT_FOUND, ErrorKind.OVER_QUOTA, ErrorKind.INVALID, None]
    mail = storage.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    archive = await mail.get_mailbox(bob.id, "Archive")
    assert [e.uid for e in await mail.uids(bob.id, inbox.id)] == [1]
    assert [e.uid for e in await mail.uids(bob.id, archive.id)] == [1]
    assert await storage.mail(small).quota_used(small.id) == 0


async def test_an_entry_the_database_refuses_fails_only_its_delivery(
    storage: SqlStorage, bob: Account, batches: list[int]
) -> None:
    """Deliveries to several accounts in one batch (on PostgreSQL their
    entries and change logs written by one statement at its end): the one
    whose change-log row the database refuses (a row already there, as a
    bug might leave) fails alone, with nothing of it written; every other
    commits."""
    others = [
        await storage.directory.add_account(f"u{n}@example.org", "pw")
        for n in range(random.randint(3, 8))
    ]
    accounts = [bob, *others]
    broken = random.choice(accounts)
    db = storage.databases["default"]
    async with db.write() as conn:
        last = (
            await conn.execute(
                select(shard_accounts.c.last_change_id).where(
                    shard_accounts.c.account_id == broken.id
                )
            )
        ).scalar_one()
        await conn.execute(
            insert(change_log).values(
                account_id=broken.id, id=last + 1, kind="new", at=0.0, data="{}"
            )
        )
    made = []
    for _ in accounts:
        raw, parsed = build()
        made.append((await storage.blobs.put(raw), parsed))
    batches.clear()
    outcomes = await asyncio.gather(
        *(
            storage.mail(a).deliver(a.id, key, parsed, [("INBOX", (), None)])
            for a, (key, parsed) in zip(accounts, made, strict=True)
        ),
        return_exceptions=True,
    )
    assert batches[0] == len(accounts)  # all in one transaction
    for account, outcome in zip(accounts, outcomes, strict=True):
        mail = storage.mail(account)
        inbox = await mail.get_mailbox(account.id, "INBOX")
        uids = [e.uid for e in await mail.uids(account.id, inbox.id)]
        if account is broken:
            # SQLAlchemy's, or SQLite's own from the writer's driver.
            assert isinstance(outcome, (IntegrityError, sqlite3.IntegrityError)), outcome
            assert uids == []
            assert (inbox.uidnext, await mail.quota_used(account.id)) == (1, 0)
        else:
            assert [r.uid for r in outcome] == uids == [1], outcome
            assert (inbox.uidnext, inbox.highestmodseq) == (2, outcome[0].modseq)


@pytest.fixture
async def scratch(database_url: str) -> Any:
    """A migrated database with a table of unique keys, and a second
    Database on it (another process's view)."""
    db = Database(database_url)
    other = Database(database_url)
    await db.migrate()
    async with db.write() as conn:
        await conn.execute(text("DROP TABLE IF EXISTS gc_keys"))
        await conn.execute(text("CREATE TABLE gc_keys (k INTEGER PRIMARY KEY)"))
    try:
        yield db, other
    finally:
        await db.close()
        await other.close()


def insert_key(key: int, then: Any = None) -> Any:
    def write(conn: Connection) -> int:
        conn.execute(text("INSERT INTO gc_keys (k) VALUES (:k)"), {"k": key})
        if then is not None:
            then(conn)
        return key

    return write


async def keys_seen_by(db: Database) -> set[int]:
    async with db.read() as conn:
        return {r[0] for r in await conn.execute(text("SELECT k FROM gc_keys"))}


async def test_a_failing_statement_fails_only_its_caller(scratch: Any, batches: list[int]) -> None:
    db, other = scratch
    await db.write_batched(insert_key(0))
    batches.clear()
    keys = random.sample(range(1, 10_000), random.randint(5, 20))
    bad = random.randrange(len(keys) + 1)
    fns = [insert_key(k) for k in keys]
    fns.insert(bad, insert_key(0))  # a duplicate key: the database refuses it
    outcomes = await asyncio.gather(*(db.write_batched(fn) for fn in fns), return_exceptions=True)
    assert isinstance(outcomes[bad], IntegrityError)
    assert [o for i, o in enumerate(outcomes) if i != bad] == keys
    assert batches[0] == len(fns)  # one transaction, savepoints after the failure
    assert await keys_seen_by(other) == {0, *keys}


async def test_a_caller_is_told_only_after_its_whole_batch_commits(
    scratch: Any, backend: str
) -> None:
    db, other = scratch
    pause = 0.3

    def slowly(conn: Connection) -> None:
        if backend == "postgres":
            conn.execute(text("SELECT pg_sleep(:s)"), {"s": pause})
        else:
            time.sleep(pause)  # the SQLite writer's own thread

    quick = asyncio.ensure_future(db.write_batched(insert_key(1)))
    slow = asyncio.ensure_future(db.write_batched(insert_key(2, slowly)))
    started = time.monotonic()
    assert await quick == 1
    # Told only once the transaction it shares with the slow call committed:
    # both rows are visible to another connection, and the pause has passed.
    assert time.monotonic() - started >= pause * 0.9
    assert await keys_seen_by(other) == {1, 2}
    assert await slow == 2


_DELIVERING_CHILD = """
import asyncio, sys
from storage.backend import open_storage_from_url
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build

async def main(url, blobs, login):
    storage = await open_storage_from_url(url, blobs, password_hasher=TEST_HASHER)
    account = await storage.directory.get_account(login)
    mail = storage.mail(account)

    async def session(first):  # as one SMTP session: a message at a time
        for n in range(first, first + 100_000, 20):
            raw, parsed = build(subject=f"n{n}")
            key = await storage.blobs.put(raw)
            await mail.deliver(account.id, key, parsed, [("INBOX", (), None)])
            print(f"acked n{n}", flush=True)

    await asyncio.gather(*(session(first) for first in range(20)))

asyncio.run(main(*sys.argv[1:]))
"""


async def test_every_acknowledged_delivery_survives_a_killed_process(
    storage: SqlStorage, bob: Account, database_url: str, tmp_path: Path
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DELIVERING_CHILD,
        database_url,
        str(tmp_path / "blobs"),
        "bob@example.org",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout is not None
    acked: set[str] = set()
    wanted = random.randint(30, 80)
    try:
        while len(acked) < wanted:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            assert line, "the delivering process ended early"
            acked.add(line.decode().split()[1])
    finally:
        child.send_signal(signal.SIGKILL)  # mid-batch: deliveries still in flight
        await child.wait()
    mail = storage.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    stored = {m.parsed.subject for m in await mail.fetch(bob.id, inbox.id, UidSet.all())}
    assert acked <= stored

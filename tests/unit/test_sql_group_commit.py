"""SQLite group commit of deliveries, the route cache and the blob fast path.

What a user would notice: many SMTP sessions delivering at once each get
their own UID, change-log entry and event, in order; one refused delivery
(missing mailbox, full quota, bad flag) never takes the others down with it
nor leaves anything of itself behind; a database failure refuses them all
as temporary (the clients retry), and a delivery whose client went away
is still committed and announced.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from sqlalchemy.exc import OperationalError

import storage.sql.directory as directory_mod
from storage import open_storage_from_url
from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.ingest import Delivery, ingest_each
from storage.model import Account, AppendResult, ChangeKind, StoreMode, UidSet
from storage.sql.db import Database
from storage.sql.mailstore import SqlMailStore
from tests.contract.mailfactory import build

HASHER = PasswordHasher.from_parameters(CHEAPEST)


async def open_site(tmp_path: Path) -> SqlStorage:
    return await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}", tmp_path / "blobs", password_hasher=HASHER
    )


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[SqlStorage]:
    s = await open_site(tmp_path)
    try:
        await s.directory.add_domain("example.net")
        yield s
    finally:
        await s.close()


@pytest.fixture
async def bob(site: SqlStorage) -> Account:
    return await site.directory.add_account("bob@example.net", "pw")


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the group commits the writer thread ran."""
    sizes: list[int] = []
    original = Database._run_batch

    def counting(self: Database, conn, items):  # type: ignore[no-untyped-def]
        sizes.append(len(items))
        return original(self, conn, items)

    monkeypatch.setattr(Database, "_run_batch", counting)
    return sizes


async def deliver(site: SqlStorage, account: Account, target="INBOX", flags=()):  # type: ignore[no-untyped-def]
    """As the ingest path delivers a small message here: its blob in the
    delivery's own transaction."""
    raw, parsed = build()
    key = hashlib.sha256(raw).hexdigest()
    return await site.mail(account).deliver(
        account.id, key, parsed, [(target, flags, None)], blob_data=raw
    )


async def at_once(site: SqlStorage, *calls) -> list:  # type: ignore[no-untyped-def]
    """Deliveries started together (blobs written first), as concurrent
    SMTP sessions reaching end of data: (account, target, flags) each."""
    made = []
    for _ in calls:
        raw, parsed = build()
        made.append((await site.blobs.put(raw), parsed))
    return await asyncio.gather(
        *(
            site.mail(account).deliver(account.id, key, parsed, [(target, flags, None)])
            for (account, target, flags), (key, parsed) in zip(calls, made, strict=True)
        ),
        return_exceptions=True,
    )


async def test_concurrent_deliveries_share_commits_in_uid_order(
    site: SqlStorage, bob: Account, batches: list[int]
) -> None:
    mail = site.mail(bob)
    sub = site.events.subscribe(bob.id)
    try:
        results = await at_once(site, *[(bob, "INBOX", ())] * 40)
        uids = [r[0].uid for r in results]
        assert sorted(uids) == list(range(1, 41))
        assert len({r[0].modseq for r in results}) == 40
        assert sum(batches) == 40 and len(batches) < 40  # shared commits
        inbox = await mail.get_mailbox(bob.id, "INBOX")
        assert inbox.uidnext == 41
        assert [e.uid for e in await mail.uids(bob.id, inbox.id)] == list(range(1, 41))
        # One change-log entry and one event per delivery, ids without gaps.
        changes = [c for c in await mail.account_changes(bob.id, 0) if c.kind is ChangeKind.NEW]
        assert sorted(c.uid for c in changes) == list(range(1, 41))
        ids = [c.id for c in await mail.account_changes(bob.id, 0)]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        seen = [await sub.get(timeout=1) for _ in range(40)]
        assert sorted(c.uid for c in seen if c is not None) == list(range(1, 41))
    finally:
        sub.close()


async def test_a_refused_delivery_undoes_only_itself(
    site: SqlStorage, bob: Account, batches: list[int]
) -> None:
    small = await site.directory.add_account("small@example.net", "pw", quota_bytes=10)
    sub = site.events.subscribe(bob.id)
    try:
        outcomes = await at_once(
            site,
            (bob, "INBOX", ()),
            (bob, "No/Such/Box", ()),
            (small, "INBOX", ()),
            (bob, "INBOX", ("bad flag",)),
            (bob, "Archive", ()),
        )
        assert batches[-1] == 5  # all in one transaction
        kinds = [o.kind if isinstance(o, StorageError) else None for o in outcomes]
        assert kinds == [None, ErrorKind.NOT_FOUND, ErrorKind.OVER_QUOTA, ErrorKind.INVALID, None]
        mail = site.mail(bob)
        inbox = await mail.get_mailbox(bob.id, "INBOX")
        archive = await mail.get_mailbox(bob.id, "Archive")
        assert [e.uid for e in await mail.uids(bob.id, inbox.id)] == [1]
        assert [e.uid for e in await mail.uids(bob.id, archive.id)] == [1]
        assert await site.mail(small).quota_used(small.id) == 0
        assert len(await site.mail(bob).referenced_blobs()) == 2  # no row of the refused
        new = [c for c in await mail.account_changes(bob.id, 0) if c.kind is ChangeKind.NEW]
        assert len(new) == 2
        got = [await sub.get(timeout=1), await sub.get(timeout=1), await sub.get(timeout=0.05)]
        assert [c.mailbox_id for c in got if c is not None] == [inbox.id, archive.id]
    finally:
        sub.close()


@pytest.fixture
def writer_sql(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement the SQLite writer connection runs."""
    seen: list[str] = []
    original = Database._connect_writer

    def traced(self: Database):  # type: ignore[no-untyped-def]
        conn = original(self)
        conn.connection.driver_connection.set_trace_callback(seen.append)
        return conn

    monkeypatch.setattr(Database, "_connect_writer", traced)
    return seen


async def test_a_group_without_refusals_runs_no_savepoints(
    site: SqlStorage, bob: Account, batches: list[int], writer_sql: list[str]
) -> None:
    await at_once(site, (bob, "INBOX", ()), (bob, "Archive", ()), (bob, "INBOX", ()))
    assert batches[-1] == 3
    assert any(s.startswith("INSERT INTO messages") for s in writer_sql)
    assert not any("SAVEPOINT" in s for s in writer_sql)
    # One refusal: the group rolls back and runs again, a savepoint each,
    # and the others still commit once.
    writer_sql.clear()
    outcomes = await at_once(site, (bob, "INBOX", ()), (bob, "No/Such/Box", ()))
    assert batches[-1] == 2
    assert isinstance(outcomes[0], list) and isinstance(outcomes[1], StorageError)
    assert sum(s.startswith("SAVEPOINT") for s in writer_sql) == 2
    mail = site.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    assert [e.uid for e in await mail.uids(bob.id, inbox.id)] == [1, 2, 3]


async def test_a_delivery_locks_its_mailbox_and_opens_its_thread_in_one_statement_each(
    site: SqlStorage, bob: Account, writer_sql: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import insert, literal_column

    import storage.sql.mailstore as mailstore_mod
    from storage.sql.schema import messages

    await at_once(site, (bob, "INBOX", ()))  # the account's counters row exists now
    writer_sql.clear()
    (results,) = await at_once(site, (bob, "INBOX", ()))
    statements = [s for s in writer_sql if not s.startswith(("BEGIN", "COMMIT", "PRAGMA"))]
    assert statements[0].startswith("SELECT") and "JOIN mailboxes" in statements[0]
    assert statements[1].startswith("INSERT INTO messages")
    assert not any(s.startswith("SELECT") for s in statements[1:])
    assert not any("SET thread_id" in s for s in statements)
    mail = site.mail(bob)
    entry = (await mail.uids(bob.id, results[0].mailbox_id))[-1]
    assert await mail.thread_of(bob.id, entry.message_id) == entry.message_id
    # Were SQLite to hand out another id, the thread is still the message's own.
    wrong = (
        insert(messages)
        .values(thread_id=literal_column("424242"))
        .returning(messages.c.id, messages.c.thread_id)
    )
    monkeypatch.setattr(mailstore_mod, "_INSERT_MESSAGE_OWN_THREAD", wrong)
    (results,) = await at_once(site, (bob, "INBOX", ()))
    entry = (await mail.uids(bob.id, results[0].mailbox_id))[-1]
    assert await mail.thread_of(bob.id, entry.message_id) == entry.message_id


async def test_a_database_failure_refuses_the_whole_group_as_temporary(
    site: SqlStorage, bob: Account, batches: list[int]
) -> None:
    db = site.databases["default"]

    def broken(conn):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    raw, parsed = build()
    key = await site.blobs.put(raw)
    outcomes = await asyncio.gather(
        site.mail(bob).deliver(bob.id, key, parsed, [("INBOX", (), None)]),
        db.write_batched(broken),
        return_exceptions=True,
    )
    assert batches[-1] == 2
    for outcome in outcomes:
        assert isinstance(outcome, StorageError) and outcome.kind is ErrorKind.TEMPORARY
    inbox = await site.mail(bob).get_mailbox(bob.id, "INBOX")
    assert await site.mail(bob).uids(bob.id, inbox.id) == []
    # The writer recovers: the next delivery commits.
    (result,) = await deliver(site, bob)
    assert result.uid == 1


async def test_a_delivery_cancelled_while_queued_writes_nothing(
    site: SqlStorage, bob: Account
) -> None:
    """The SMTP client went away before its delivery reached the database:
    nothing is stored (it never got its 250, it will retry)."""
    raw, parsed = build()
    key = await site.blobs.put(raw)
    task = asyncio.create_task(site.mail(bob).deliver(bob.id, key, parsed, [("INBOX", (), None)]))
    await asyncio.sleep(0)  # queued, not yet written
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (result,) = await deliver(site, bob)  # the writer goes on
    assert result.uid == 1
    assert key not in await site.mail(bob).referenced_blobs()


async def test_a_write_cancelled_once_running_commits_and_is_announced(site: SqlStorage) -> None:
    db = site.databases["default"]
    running, release = threading.Event(), threading.Event()
    announced: list[int] = []

    def write(conn):  # type: ignore[no-untyped-def]
        running.set()
        release.wait(5)
        conn.exec_driver_sql("INSERT INTO domains (name) VALUES ('late.example')")
        return 7

    async def after_commit(result: int) -> None:
        announced.append(result)

    task = asyncio.create_task(db.write_batched(write, after_commit))
    assert await asyncio.to_thread(running.wait, 5)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if announced:
            break
        await asyncio.sleep(0.01)
    assert announced == [7]
    assert "late.example" in [d.name for d in await site.directory.list_domains()]


async def test_close_finishes_queued_deliveries(tmp_path: Path) -> None:
    site = await open_site(tmp_path)
    await site.directory.add_domain("example.net")
    bob = await site.directory.add_account("bob@example.net", "pw")
    pending = [asyncio.ensure_future(deliver(site, bob)) for _ in range(5)]
    await asyncio.sleep(0.05)  # blobs written, deliveries queued or running
    await site.close()
    assert sorted(r[0].uid for r in await asyncio.gather(*pending)) == [1, 2, 3, 4, 5]
    site = await open_site(tmp_path)
    try:
        inbox = await site.mail(bob).get_mailbox(bob.id, "INBOX")
        assert len(await site.mail(bob).uids(bob.id, inbox.id)) == 5
    finally:
        await site.close()


async def test_several_stores_share_the_database_file(tmp_path: Path) -> None:
    """Two instances (two mtad processes) write the same SQLite file."""
    one = await open_site(tmp_path)
    two = await open_site(tmp_path)
    try:
        await one.directory.add_domain("example.net")
        bob = await one.directory.add_account("bob@example.net", "pw")
        results = await asyncio.gather(
            *(deliver(one, bob) for _ in range(10)), *(deliver(two, bob) for _ in range(10))
        )
        assert sorted(r[0].uid for r in results) == list(range(1, 21))
    finally:
        await one.close()
        await two.close()


async def test_one_message_to_several_accounts_commits_once(
    site: SqlStorage, bob: Account, batches: list[int]
) -> None:
    """SMTP with several local recipients: one transaction for all of them."""
    carol = await site.directory.add_account("carol@example.net", "pw")
    dave = await site.directory.add_account("dave@example.net", "pw")
    raw, _ = build()
    outcomes = await ingest_each(
        site, [Delivery(bob), Delivery(carol), Delivery(dave, "No/Such")], raw
    )
    assert batches[-1] == 3
    assert [type(o) for o in outcomes] == [AppendResult, AppendResult, StorageError]
    for account in (bob, carol):
        inbox = await site.mail(account).get_mailbox(account.id, "INBOX")
        assert len(await site.mail(account).uids(account.id, inbox.id)) == 1


# --- the route cache (SqlDirectory.resolve on every RCPT) -----------------------


async def test_local_directory_writes_are_seen_at_once(site: SqlStorage) -> None:
    d = site.directory
    assert (await d.resolve("carol@example.net")).accounts == ()
    carol = await d.add_account("carol@example.net", "pw")
    assert (await d.resolve("carol@example.net")).accounts == (carol,)
    await d.add_alias("team@example.net", "carol@example.net")
    assert (await d.resolve("team@example.net")).accounts == (carol,)
    await d.remove_alias("team@example.net")
    assert (await d.resolve("team@example.net")).accounts == ()
    await d.remove_account("carol@example.net")
    assert (await d.resolve("carol@example.net")).accounts == ()


async def test_another_instances_change_is_seen_within_the_cache_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(directory_mod, "ROUTE_CACHE_SECONDS", 0.3)
    mx = await open_site(tmp_path)
    admin = await open_site(tmp_path)  # mailctl, in its own process
    try:
        await admin.directory.add_domain("example.net")
        assert (await mx.directory.resolve("dave@example.net")).accounts == ()
        dave = await admin.directory.add_account("dave@example.net", "pw")
        assert (await mx.directory.resolve("dave@example.net")).accounts == ()  # cached
        await asyncio.sleep(0.35)
        assert (await mx.directory.resolve("dave@example.net")).accounts == (dave,)
    finally:
        await mx.close()
        await admin.close()


# --- the blob store's worker-thread write ------------------------------------------


async def test_put_sync_is_content_addressed_and_leaves_no_temp_files(
    site: SqlStorage, tmp_path: Path
) -> None:
    blobs = site.blobs
    getattr(blobs, "inner", blobs).pack_max_bytes = 0  # the file tier, under skeleton.py
    key = await asyncio.to_thread(blobs.put_sync, b"raw message\r\n")
    assert await asyncio.to_thread(blobs.put_sync, b"raw message\r\n") == key
    assert await blobs.get(key) == b"raw message\r\n"
    leftovers = [p for p in (tmp_path / "blobs").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    # The tree removed under a running store (an operator's cleanup): made again.
    blobs.path(key).unlink()
    blobs.path(key).parent.rmdir()
    assert await blobs.put(b"raw message\r\n") == key
    assert await blobs.get(key) == b"raw message\r\n"


async def test_a_delivery_commits_only_once_its_blob_is_durable(
    site: SqlStorage, bob: Account, batches: list[int]
) -> None:
    """``blob_ready``: a delivery joins a group commit only once its blob
    is durable, and the deliveries whose blobs are ready commit without
    waiting for it; a failed blob write fails its delivery alone
    (TEMPORARY, nothing of it stored) and the rest of its batch commits."""
    import concurrent.futures

    mail = site.mail(bob)
    made = []
    for _ in range(3):
        raw, parsed = build()
        made.append((await site.blobs.put(raw), parsed))
    gate = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(3)
    slow = pool.submit(lambda: gate.wait(5) and made[0][0])
    broken = pool.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    fine: concurrent.futures.Future[str] = concurrent.futures.Future()
    fine.set_result(made[2][0])
    try:
        pending = [
            asyncio.ensure_future(
                mail.deliver(bob.id, key, parsed, [("INBOX", (), None)], blob_ready=ready)
            )
            for (key, parsed), ready in zip(made, (slow, broken, fine), strict=True)
        ]
        await asyncio.wait(pending[1:])
        # The slow blob is still being written: its delivery waits, uncommitted.
        assert not pending[0].done()
        assert sum(batches) == 2  # the slow call was in none of them
        broken_outcome = pending[1].exception()
        assert isinstance(broken_outcome, StorageError)
        assert broken_outcome.kind is ErrorKind.TEMPORARY
        inbox = await mail.get_mailbox(bob.id, "INBOX")
        assert [e.uid for e in await mail.uids(bob.id, inbox.id)] == [1]
        await asyncio.sleep(0.2)
        assert not pending[0].done()
        gate.set()
        slow_results = await pending[0]
    finally:
        gate.set()
        pool.shutdown()
    assert batches[-1] == 1 and sum(batches) == 3
    assert slow_results[0].uid == 2 and pending[2].result()[0].uid == 1
    assert [e.uid for e in await mail.uids(bob.id, inbox.id)] == [1, 2]
    referenced = await mail.referenced_blobs()
    assert made[1][0] not in referenced and {made[0][0], made[2][0]} <= set(referenced)
    new = [c for c in await mail.account_changes(bob.id, 0) if c.kind is ChangeKind.NEW]
    assert len(new) == 2


@pytest.mark.parametrize("tier", ["file", "pack"])
async def test_ingest_overlaps_the_blob_write_and_fails_cleanly_if_it_fails(
    site: SqlStorage, bob: Account, monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    """The ingest path starts the blob write and hands it to deliver; when
    the write fails, the delivery is TEMPORARY and no row names the blob.
    Either tier: a blob file of its own, or the pack's group commit."""
    import sqlite3

    from storage.blob.pack import BlobPack

    raw, _ = build()
    calls: list[bytes] = []
    if tier == "file":
        getattr(site.blobs, "inner", site.blobs).pack_max_bytes = 0

        def failing(data: bytes) -> str:
            calls.append(data)
            raise OSError(5, "Input/output error")

        # The store that writes files (under the attachments' wrapper, if any).
        monkeypatch.setattr(getattr(site.blobs, "inner", site.blobs), "put_sync", failing)
    else:
        assert site.blobs.pack_max_bytes >= len(raw)  # packed by default on SQLite
        # A shard whose database does not hold the pack (a second one).
        monkeypatch.setattr(SqlMailStore, "inline_blob_max", 0)

        def failing_commit(conn, lock_fd, batch) -> None:  # type: ignore[no-untyped-def]
            calls.extend(op.data for op in batch)
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(BlobPack, "_commit", staticmethod(failing_commit))
    [outcome] = await ingest_each(site, [Delivery(bob)], raw)
    assert calls == [raw]
    assert isinstance(outcome, StorageError) and outcome.kind is ErrorKind.TEMPORARY
    assert await site.mail(bob).referenced_blobs() == set()
    monkeypatch.undo()
    [ok] = await ingest_each(site, [Delivery(bob)], raw)
    assert isinstance(ok, AppendResult) and ok.uid == 1
    [key] = await site.mail(bob).referenced_blobs()
    assert await site.blobs.get(key) == raw
    packed = site.blobs.pack.row_sync("SELECT 1 FROM blobs WHERE key = ?", (key,))
    assert (packed is not None) == (tier == "pack")


# --- a small message's blob in its delivery's transaction ---------------------------


async def test_a_small_message_and_its_rows_are_made_durable_by_one_fsync(
    site: SqlStorage, bob: Account, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one host the blob pack is a table of the shard database: an
    ingested message's bytes commit with its rows, and the one WAL fsync
    before the caller is told covers both (a pack of its own, or a file,
    needs a second fsync, before the metadata may commit)."""
    import os
    import sqlite3

    from storage.ingest import ingest

    db = _database(site)
    fsynced: list[str] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        fsynced.append("wal" if _is_wal(fd, db) else os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    raw, _ = build()
    [result] = await ingest(site, [Delivery(bob)], raw)
    assert fsynced == ["wal"]
    assert site.blobs.pack._writer is None  # the pack's own writer never ran
    assert not (tmp_path / "blobs" / "pack.sqlite").exists()
    key = hashlib.sha256(raw).hexdigest()
    [entry] = await site.mail(bob).uids(bob.id, result.mailbox_id)
    assert entry.blob_key == key
    with sqlite3.connect(db.file) as conn:  # type: ignore[arg-type]
        assert conn.execute("SELECT data FROM blobs WHERE key = ?", (key,)).fetchone() == (raw,)
    assert await site.blobs.get(key) == raw
    assert await site.blobs.get_range(key, 0, 4) == raw[:4]


async def test_a_refused_small_message_leaves_no_blob_behind(
    site: SqlStorage, bob: Account
) -> None:
    """A delivery refused inside its transaction (no such mailbox, over
    quota) rolls its blob back with it: nothing for garbage collection."""
    from storage.ingest import ingest

    raw, _ = build()
    with pytest.raises(StorageError) as missing:
        await ingest(site, [Delivery(bob, mailbox="No such folder")], raw)
    assert missing.value.kind is ErrorKind.NOT_FOUND
    await site.directory.set_quota("bob@example.net", 10)
    [over] = await ingest_each(site, [Delivery(bob)], raw)
    assert isinstance(over, StorageError) and over.kind is ErrorKind.OVER_QUOTA
    assert await site.blobs.keys() == []
    await site.directory.set_quota("bob@example.net", None)
    [ok] = await ingest_each(site, [Delivery(bob)], raw)
    assert isinstance(ok, AppendResult)
    assert await site.blobs.keys() == [hashlib.sha256(raw).hexdigest()]


async def test_one_message_to_several_accounts_stores_one_blob(
    site: SqlStorage, bob: Account, batches: list[int]
) -> None:
    """Each account's transaction writes the blob; the second only
    refreshes its stored time (content-addressed, as the pack does)."""
    carol = await site.directory.add_account("carol@example.net", "pw")
    raw, _ = build()
    outcomes = await ingest_each(site, [Delivery(bob), Delivery(carol)], raw)
    assert all(isinstance(o, AppendResult) for o in outcomes)
    key = hashlib.sha256(raw).hexdigest()
    assert await site.blobs.keys() == [key]
    assert await site.mail(bob).referenced_blobs() == {key}
    assert await site.mail(carol).referenced_blobs() == {key}
    assert await site.blobs.get(key) == raw


# --- the WAL's fsync, outside the writers' lock ------------------------------------


def _database(site: SqlStorage) -> Database:
    return site.databases["default"]


def _is_wal(fd: int, db: Database) -> bool:
    import os

    try:
        return os.fstat(fd).st_ino == os.stat(f"{db.file}-wal").st_ino
    except FileNotFoundError:
        return False


async def test_a_delivery_is_acknowledged_only_after_the_wal_fsync_and_the_writer_goes_on(
    site: SqlStorage, bob: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer commits without the fsync and hands it to a second thread:
    while it runs the delivery is visible (committed) but not acknowledged,
    and the next batch commits meanwhile (the writers' lock is free)."""
    import os

    db = _database(site)
    gate = threading.Event()
    synced_files: list[int] = []
    real_fsync = os.fsync

    def gated_fsync(fd: int) -> None:  # os.fsync of every module: only the WAL's waits
        if _is_wal(fd, db):
            gate.wait(5)
            synced_files.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    import storage.sql.db as db_mod

    monkeypatch.setattr(db_mod.os, "fsync", gated_fsync)
    mail = site.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    try:
        first = asyncio.ensure_future(deliver(site, bob))
        for _ in range(100):  # committed: a reader sees it
            if await mail.uids(bob.id, inbox.id):
                break
            await asyncio.sleep(0.02)
        assert [e.uid for e in await mail.uids(bob.id, inbox.id)] == [1]
        second = asyncio.ensure_future(deliver(site, bob))
        for _ in range(100):
            if len(await mail.uids(bob.id, inbox.id)) == 2:
                break
            await asyncio.sleep(0.02)
        # The second batch committed while the first one's fsync is held.
        assert [e.uid for e in await mail.uids(bob.id, inbox.id)] == [1, 2]
        assert not first.done() and not second.done()
        gate.set()
        assert (await first)[0].uid == 1 and (await second)[0].uid == 2
    finally:
        gate.set()
    wal_inode = os.stat(f"{db.file}-wal").st_ino
    assert synced_files and set(synced_files) == {wal_inode}


async def test_a_failed_wal_fsync_refuses_the_batch_as_temporary(
    site: SqlStorage, bob: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are written but not known to be on disk: the client is told
    to retry (a 4xx), never that its message is safe. The next write opens
    the WAL again and succeeds."""
    import errno
    import os

    import storage.sql.db as db_mod

    real_fsync = os.fsync

    db = _database(site)

    def failing_fsync(fd: int) -> None:
        if _is_wal(fd, db):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(db_mod.os, "fsync", failing_fsync)
    with pytest.raises(StorageError) as refused:
        await deliver(site, bob)
    assert refused.value.kind is ErrorKind.TEMPORARY
    monkeypatch.setattr(db_mod.os, "fsync", real_fsync)
    assert (await deliver(site, bob))[0].uid == 2


async def test_flag_changes_skip_the_wal_fsync_and_deliveries_share_one(
    site: SqlStorage, bob: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.model import StoreMode, UidSet

    db = _database(site)
    syncs: list[int] = []
    real = Database._sync_wal

    def counting(self: Database, commit: int) -> None:
        syncs.append(commit)
        real(self, commit)

    monkeypatch.setattr(Database, "_sync_wal", counting)
    await deliver(site, bob)
    assert len(syncs) == 1
    mail = site.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    await mail.store_flags(bob.id, inbox.id, UidSet.of([1]), StoreMode.ADD, ["\\Seen"])
    assert len(syncs) == 1  # durable=False: no fsync
    # A commit an earlier fsync covered costs none.
    covered = db._synced
    db._sync_wal(covered)
    assert db._synced == covered


async def test_the_writer_runs_the_next_batch_without_waiting_for_the_event_loop(
    site: SqlStorage,
) -> None:
    """Calls queued while a batch runs are taken by the writer thread as
    soon as that batch ends, even while the event loop is busy elsewhere:
    the next batch does not wait for the loop's round trip."""
    import time

    db = site.databases["default"]
    gate = threading.Event()
    ran: list[str] = []

    def slow(conn):  # type: ignore[no-untyped-def]
        gate.wait(5)
        ran.append("first")
        return 1

    def quick(conn):  # type: ignore[no-untyped-def]
        ran.append("second")
        return 2

    first = asyncio.ensure_future(db.write_batched(slow, durable=False))
    await asyncio.sleep(0.05)  # the first batch is running, waiting on the gate
    second = asyncio.ensure_future(db.write_batched(quick, durable=False))
    await asyncio.sleep(0.05)  # queued behind it
    threading.Timer(0.05, gate.set).start()
    time.sleep(0.5)  # noqa: ASYNC251  (the event loop is busy, on purpose)
    assert ran == ["first", "second"]
    assert await first == 1 and await second == 2


async def test_a_plain_write_is_not_starved_by_a_stream_of_batches(site: SqlStorage) -> None:
    """The batch writer keeps the write lock while batches keep coming, but
    lets it go to a waiting ``write()`` (account changes, mailbox renames)."""
    import time

    db = site.databases["default"]
    stop = asyncio.Event()
    calls: list[asyncio.Future[int]] = []

    def tiny(conn):  # type: ignore[no-untyped-def]
        time.sleep(0.002)
        return 1

    async def stream() -> None:  # the queue never runs dry
        while not stop.is_set():
            calls.append(asyncio.ensure_future(db.write_batched(tiny, durable=False)))
            await asyncio.sleep(0.001)

    async def plain_write() -> None:
        async with db.write() as conn:
            await conn.exec_driver_sql("INSERT INTO domains (name) VALUES ('fair.example')")

    producer = asyncio.ensure_future(stream())
    try:
        await asyncio.sleep(0.1)  # the batch writer is busy without a pause
        started = time.monotonic()
        await asyncio.wait_for(plain_write(), 5)
        waited = time.monotonic() - started
    finally:
        stop.set()
        await producer
        await asyncio.gather(*calls)
    assert waited < 1.0, waited


async def test_calls_queued_while_another_process_writes_join_the_next_batch(
    site: SqlStorage, bob: Account, batches: list[int]
) -> None:
    """While another process's writer holds the database (its writers' file
    lock), flag changes keep arriving here: once the lock is free they all
    commit together, rather than the first alone and the rest after it."""
    import fcntl
    import os

    db = site.databases["default"]
    await deliver(site, bob)  # the writer thread and its lock file exist
    mail = site.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    other = os.open(f"{db.file}-writers", os.O_RDWR)  # another open file: another owner
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        batches.clear()

        def store(mode: StoreMode) -> asyncio.Future[object]:
            return asyncio.ensure_future(
                mail.store_flags(bob.id, inbox.id, UidSet.of([1]), mode, ["\\Flagged"])
            )

        first = store(StoreMode.ADD)
        await asyncio.sleep(0.1)  # the writer thread waits for the lock
        rest = [store(StoreMode.REMOVE if i % 2 else StoreMode.ADD) for i in range(9)]
        await asyncio.sleep(0.1)
        assert not first.done()
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    await asyncio.gather(first, *rest)
    assert batches == [10]

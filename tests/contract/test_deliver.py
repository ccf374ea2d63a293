"""MailStore.deliver: a message row plus its appends in one transaction,
on every SQL backend (the ingest path's commit)."""

from __future__ import annotations

import pytest

from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.model import SEEN, UidSet
from tests.contract.mailfactory import build, staged_rows


@pytest.fixture
async def account(storage: SqlStorage):
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("bob@example.org", "pw", quota_bytes=10_000)


async def test_deliver_appends_to_every_target_in_one_commit(storage: SqlStorage, account) -> None:
    raw, parsed = build(subject="both places")
    key = await storage.blobs.put(raw)
    mail = storage.mail(account)
    sent = await mail.get_mailbox(account.id, "Sent")
    results = await mail.deliver(
        account.id,
        key,
        parsed,
        [("inbox", (), None), (sent.id, (SEEN,), None), ("INBOX", (), None)],
    )
    assert [r.uid for r in results] == [1, 1, 2]
    assert results[0].modseq < results[2].modseq
    inbox = await mail.get_mailbox(account.id, "INBOX")
    assert inbox.uidnext == 3
    entries = await mail.uids(account.id, inbox.id)
    assert len({e.message_id for e in entries}) == 1  # one stored message row
    fetched = await mail.fetch(account.id, sent.id, UidSet.all())
    assert fetched[0].entry.flags == frozenset({SEEN})
    assert fetched[0].parsed.subject == "both places"


@pytest.mark.parametrize("bad", ["No/Such/Box", 999_999])
async def test_a_missing_target_stores_nothing(storage: SqlStorage, account, bad) -> None:
    raw, parsed = build()
    key = await storage.blobs.put(raw)
    mail = storage.mail(account)
    with pytest.raises(StorageError) as err:
        await mail.deliver(account.id, key, parsed, [("INBOX", (), None), (bad, (), None)])
    assert err.value.kind is ErrorKind.NOT_FOUND
    inbox = await mail.get_mailbox(account.id, "INBOX")
    assert await mail.uids(account.id, inbox.id) == []
    assert await mail.quota_used(account.id) == 0


async def test_over_quota_stores_nothing(storage: SqlStorage, account) -> None:
    raw, parsed = build(body="x" * 6000)
    key = await storage.blobs.put(raw)
    mail = storage.mail(account)
    with pytest.raises(StorageError) as err:
        await mail.deliver(account.id, key, parsed, [("INBOX", (), None), ("Sent", (), None)])
    assert err.value.kind is ErrorKind.OVER_QUOTA
    assert await mail.quota_used(account.id) == 0


async def test_ingest_many_is_all_or_none(storage: SqlStorage, account) -> None:
    """storage.ingest.ingest_many (a COPY from another account): the
    mailbox sees every message or none; a refusal (the quota, the source
    failing on the Nth message) leaves no row behind and UIDNEXT as it was."""
    import random

    from storage.ingest import ingest_many

    rng = random.Random()
    mail = storage.mail(account)
    box = await mail.get_mailbox(account.id, "INBOX")
    raws = [build(subject=f"m{i}", body="x" * rng.randint(10, 1500))[0] for i in range(8)]

    async def source(fail_at: int | None = None):  # type: ignore[no-untyped-def]
        for i, raw in enumerate(raws):
            if i == fail_at:
                raise StorageError(ErrorKind.TEMPORARY, "source unreachable")
            yield raw, (SEEN,) if i % 2 else (), None

    before = await mail.status(account.id, box.id)
    await storage.directory.set_quota(account.address, sum(map(len, raws)) - 1)
    with pytest.raises(StorageError) as err:
        await ingest_many(storage, account, box.id, source())
    assert err.value.kind is ErrorKind.OVER_QUOTA
    await storage.directory.set_quota(account.address, None)
    with pytest.raises(StorageError) as err:
        await ingest_many(storage, account, box.id, source(rng.randint(1, len(raws) - 1)))
    assert err.value.kind is ErrorKind.TEMPORARY
    assert await mail.status(account.id, box.id) == before
    assert await staged_rows(storage, account) == 0

    results = await ingest_many(storage, account, box.id, source())
    assert [r.uid for r in results] == list(range(before.uidnext, before.uidnext + len(raws)))
    fetched = await mail.fetch(account.id, box.id, UidSet.all())
    assert [await storage.blobs.get(m.entry.blob_key) for m in fetched] == raws
    assert [SEEN in m.entry.flags for m in fetched] == [i % 2 == 1 for i in range(len(raws))]
    assert await staged_rows(storage, account) == 0


async def test_stale_staged_rows_are_swept(storage: SqlStorage, account) -> None:
    """What a process that died mid-COPY left (message rows in no
    mailbox) is deleted by garbage collection's pass once older than its
    grace; a fresh staged row and a delivered message stay."""
    import time

    from sqlalchemy import update

    from storage.blob.gc import drop_stale_staged
    from storage.sql.schema import messages

    mail = storage.mail(account)
    ids = []
    for i in range(3):
        raw, parsed = build(subject=f"staged {i}")
        ids.append(await mail.add_message(account.id, await storage.blobs.put(raw), parsed))
    raw, parsed = build(subject="delivered")
    await mail.deliver(account.id, await storage.blobs.put(raw), parsed, [("INBOX", (), None)])
    async with mail.db.write() as conn:  # the first two staged long ago, all rows old
        await conn.execute(update(messages).values(created=time.time() - 7200))
        fresh = update(messages).where(messages.c.id == ids[2]).values(created=time.time())
        await conn.execute(fresh)
    await drop_stale_staged(storage, time.time() - 3600)
    assert await staged_rows(storage, account) == 1  # the fresh one
    inbox = await mail.get_mailbox(account.id, "INBOX")
    fetched = await mail.fetch(account.id, inbox.id, UidSet.all())
    assert [m.parsed.subject for m in fetched] == ["delivered"]

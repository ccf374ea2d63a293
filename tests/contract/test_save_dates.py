"""RFC 8514 save dates in the mail store, on every SQL backend: each way an
entry is made (append, delivery, copy, move) records when it was made in
that mailbox; a rename of INBOX keeps them; an entry older than the schema
step reads its internal date; ``Date("saved", ...)`` searches by the save
date's UTC day, in SQL and in the Python evaluator alike."""

from __future__ import annotations

import datetime as dt
import random

from sqlalchemy import update

from storage.backend import SqlStorage
from storage.model import Account, UidSet
from storage.search import And, Date, Header, Not
from storage.sql.schema import mailbox_entries as E
from tests.contract.mailfactory import deliver, store_message
from tests.contract.test_mailstore import bob, inbox_id  # noqa: F401 (fixture)

UTC = dt.UTC


def _micros(when: dt.datetime) -> int:
    return int(when.timestamp() * 1_000_000)


async def _backdate(
    storage: SqlStorage, account: Account, box: int, uid: int, saved: object
) -> None:
    """Sets an entry's stored save date (None: as an entry stored before save dates)."""
    mail = storage.mail(account)
    async with mail.db.write() as conn:  # type: ignore[attr-defined]
        await conn.execute(
            update(E).where(E.c.mailbox_id == box, E.c.uid == uid).values(saved_at=saved)
        )
    mail._stored_cache.clear()  # type: ignore[attr-defined]  # rows changed under the cache


async def _saved(storage: SqlStorage, account: Account, box: int, uid: int) -> dt.datetime:
    (entry,) = await storage.mail(account).entries(account.id, box, UidSet.of([uid]))
    return entry.save_date


async def test_every_new_entry_is_saved_now(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    mail = storage.mail(bob)
    inbox = await inbox_id(storage, bob)
    old = dt.datetime(2001, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    before = dt.datetime.now(UTC).replace(microsecond=0)
    uid = await deliver(storage, bob, internal_date=old)
    made = await store_message(storage, bob, subject="second")
    results = await mail.deliver(bob.id, made.blob_key, _parsed("x"), [("INBOX", (), old)])
    after = dt.datetime.now(UTC)
    (entry,) = await mail.entries(bob.id, inbox, UidSet.of([uid]))
    assert entry.internal_date == old  # the client's date is kept as INTERNALDATE
    assert entry.saved is not None and before <= entry.saved <= after
    assert entry.saved.utcoffset() == dt.timedelta(0)
    # What deliver hands back is what a read gives.
    (read,) = await mail.entries(bob.id, inbox, UidSet.of([results[0].uid]))
    assert results[0].entry == read and read.saved is not None and before <= read.saved <= after


async def test_copy_and_move_save_anew_rename_keeps(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    mail = storage.mail(bob)
    inbox = await inbox_id(storage, bob)
    uids = [await deliver(storage, bob, subject=f"m{i}") for i in range(3)]
    long_ago = dt.datetime(2010, 6, 7, 8, 9, 10, tzinfo=UTC)
    for uid in uids:
        await _backdate(storage, bob, inbox, uid, _micros(long_ago))
    assert await _saved(storage, bob, inbox, uids[0]) == long_ago
    archive = (await mail.get_mailbox(bob.id, "Archive")).id
    start = dt.datetime.now(UTC).replace(microsecond=0)
    copied = await mail.copy(bob.id, inbox, UidSet.of([uids[0]]), archive)
    moved = await mail.move(bob.id, inbox, UidSet.of([uids[1]]), archive)
    for _, new_uid in (*copied.pairs, *moved.pairs):
        assert await _saved(storage, bob, archive, new_uid) >= start
    assert await _saved(storage, bob, inbox, uids[0]) == long_ago  # the original is untouched
    # RFC 3501 section 6.3.5: renaming INBOX moves its messages; no new save.
    await mail.rename_mailbox(bob.id, "INBOX", "Old")
    old_box = (await mail.get_mailbox(bob.id, "Old")).id
    entries = await mail.entries(bob.id, old_box, UidSet.all())
    assert [e.save_date for e in entries] == [long_ago, long_ago]


async def test_unknown_save_date_is_the_internal_date(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    inbox = await inbox_id(storage, bob)
    when = dt.datetime(2015, 3, 4, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2)))
    uid = await deliver(storage, bob, internal_date=when)
    await _backdate(storage, bob, inbox, uid, None)
    (entry,) = await storage.mail(bob).entries(bob.id, inbox, UidSet.of([uid]))
    assert entry.saved is None and entry.save_date == when  # 5 March, 01:30 UTC
    hits = await storage.mail(bob).search(bob.id, inbox, Date("saved", "on", dt.date(2015, 3, 5)))
    assert hits == [uid]


async def test_search_by_save_day(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    """The SQL condition and the Python evaluator (forced by a header key
    SQL cannot decide) agree with a day-by-day reading of the save dates."""
    rng = random.Random()
    mail = storage.mail(bob)
    inbox = await inbox_id(storage, bob)
    base = dt.datetime(2020, 2, 27, tzinfo=UTC)
    saved: dict[int, dt.datetime] = {}
    for i in range(rng.randint(8, 14)):
        uid = await deliver(storage, bob, subject=f"s{i}")
        # Around midnight boundaries, so the day split is what is tested.
        when = base + dt.timedelta(days=rng.randint(0, 4), seconds=rng.choice([0, 1, 86399]))
        await _backdate(storage, bob, inbox, uid, _micros(when))
        saved[uid] = when
    for _ in range(6):
        day = (base + dt.timedelta(days=rng.randint(-1, 5))).date()
        for op, want in (
            ("before", lambda d, day=day: d.date() < day),
            ("on", lambda d, day=day: d.date() == day),
            ("since", lambda d, day=day: d.date() >= day),
        ):
            expected = sorted(u for u, d in saved.items() if want(d))
            key = Date("saved", op, day)  # type: ignore[arg-type]
            assert await mail.search(bob.id, inbox, key) == expected, (op, day)
            # X-Absent is in no message: NOT of it is true, decided in Python.
            python = And((key, Not(Header("x-absent", ""))))
            assert await mail.search(bob.id, inbox, python) == expected, (op, day)


def _parsed(subject: str):  # type: ignore[no-untyped-def]
    from tests.contract.mailfactory import build

    return build(subject=subject)[1]

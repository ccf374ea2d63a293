"""The RFC 5256 sort and thread keys stored with each entry (schema step
``_v31_sort_keys``, storage.sortkeys), on every SQL backend.

- For random and hostile headers (RFC 2047 subjects, malformed and
  missing dates, quoted Message-IDs, group syntax, non-ASCII, 2,000-octet
  subjects, bytes that are no header at all) the stored keys of every
  entry, made by delivery, APPEND of a stored message, COPY and MOVE, are
  exactly what the key functions compute from the parsed form.
- The backfill of the step (``backfill_sync``) writes the same keys into
  entries that have none.
- ``sorted_uids`` gives, for every SORT criterion and REVERSE, the order
  the in-memory path (imapd.imap.sortkeys over ``sort_rows``) gives, and
  ``thread_rows`` the inputs that path threads; with an entry lacking
  keys both answer None (the caller then sorts in memory).
"""

from __future__ import annotations

import random

from sqlalchemy import select, update

from imapd.imap.sortkeys import sort_fields, sort_messages
from storage.backend import SqlStorage
from storage.ingest import Delivery, ingest
from storage.model import Account, UidSet
from storage.sortkeys import KEY_COLUMNS, entry_keys, thread_ids, thread_input
from storage.sql.schema import mailbox_entries as E
from storage.sql.sortkeys import PG_PREFIX, backfill_sync

_FROMS = [
    "ann@example.net",
    "Ann Other <ann@example.net>",
    '"Doe, J." <j@x.test>',
    "=?utf-8?q?=C3=89mile?= <e@x.test>",
    "team: a@x.test, b@x.test;",
    "",
    "<@route,@x:weird@x.test>",
    "undisclosed-recipients:;",
    "Zoë <zoe@ëxample.test>",
    "=?iso-8859-1?q?Andr=E9?= <andre@x.test>",
    "no-at-sign",
    "@",
    "<>",
]
_SUBJECTS = [
    "Re: hello",
    "=?utf-8?b?w4ljaG8=?=",
    "[list] Fwd: x (fwd)",
    "",
    "plain",
    "RE: [fwd: nested] (fwd)",
    "[fwd: [list] re: deep]",
    "Re:Re:re: RE: \t x",
    "=?utf-8?q?Re=3A_encoded_reply?=",
    "=?bogus?q?x?=",
    "[]",
    "[a][b][c]",
    "Fw: Ünïcödé ǅ ß",
    "re" * 300,
    "Re: " * 500 + "end",
    "\u00e9t\u00e9",
]
_DATES = [
    "Mon, {d} Feb 2021 10:{m}:00 +0200",
    "{d} Feb 2021 10:{m}:00 -0000",
    "Tue, 31 Feb 2021 25:{m}:00 +9999",
    "yesterday",
    "",
    "Mon, {d} Feb 1901 00:00:00 GMT",
]
_IDS = [
    "<{i}@x.test>",
    '<"quoted.{i}"@x.test>',
    '<"q\\"{i}"@x.test>',
    "{i}@no-brackets",
    "<>",
    "<{i}@x.test> <{i}b@x.test>",
]


def _raw(rng: random.Random, i: int) -> bytes:
    if rng.random() < 0.03:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))  # no header at all
    head = []
    if sender := rng.choice(_FROMS):
        head.append(f"From: {sender}")
    if rng.random() < 0.8:
        head.append(f"To: {rng.choice(_FROMS) or 'bob@example.org'}")
    if rng.random() < 0.5:
        head.append(f"Cc: {rng.choice(_FROMS) or 'c@x.test'}")
    if rng.random() < 0.9:
        head.append(f"Subject: {rng.choice(_SUBJECTS)}")
    if rng.random() < 0.8:
        date = rng.choice(_DATES).format(d=rng.randint(1, 28), m=rng.randint(10, 59))
        head.append(f"Date: {date}")
    if rng.random() < 0.9:
        head.append("Message-ID: " + rng.choice(_IDS).format(i=rng.randint(0, 30)))
    if rng.random() < 0.5:
        refs = [rng.choice(_IDS).format(i=rng.randint(0, 30)) for _ in range(rng.randint(0, 4))]
        head.append("References: " + " ".join(refs))
    if rng.random() < 0.4:
        head.append("In-Reply-To: " + rng.choice(_IDS).format(i=rng.randint(0, 30)))
    body = "body " * rng.randint(1, 50)
    return ("\r\n".join(head) + "\r\n\r\n" + body + "\r\n").encode()


async def _stored(storage: SqlStorage, box_id: int) -> dict[int, tuple[object, ...]]:
    async with storage.databases["default"].engine.connect() as c:
        cols = [E.c[k] for k in KEY_COLUMNS]
        rows = (await c.execute(select(E.c.uid, *cols).where(E.c.mailbox_id == box_id))).all()
    return {r[0]: tuple(bytes(v) if isinstance(v, memoryview) else v for v in r[1:]) for r in rows}


def _normal(keys: tuple[object, ...]) -> tuple[object, ...]:
    """sort_reply as a bool (SQLite gives 1/0)."""
    return tuple(
        bool(v) if k == "sort_reply" else v for k, v in zip(KEY_COLUMNS, keys, strict=True)
    )


async def _check_keys(storage: SqlStorage, mail, account: Account, box_id: int) -> int:  # type: ignore[no-untyped-def]
    rows = await mail.sort_rows(account.id, box_id, UidSet.all())
    stored = await _stored(storage, box_id)
    assert sorted(stored) == [r.uid for r in rows]
    for r in rows:
        assert _normal(stored[r.uid]) == tuple(entry_keys(r)), r
    return len(rows)


async def _filled(storage: SqlStorage, rng: random.Random):  # type: ignore[no-untyped-def]
    await storage.directory.add_domain("example.org")
    bob: Account = await storage.directory.add_account("bob@example.org", "pw")
    for i in range(rng.randint(25, 50)):
        await ingest(storage, [Delivery(bob, "INBOX", ())], _raw(rng, i))
    mail = storage.mail(bob)
    return bob, mail, await mail.get_mailbox(bob.id, "INBOX")


async def test_stored_keys_are_the_computed_keys(storage: SqlStorage) -> None:
    rng = random.Random()
    bob, mail, box = await _filled(storage, rng)
    assert await _check_keys(storage, mail, bob, box.id) > 0
    # COPY, MOVE and an APPEND of a stored message make entries too.
    other = await mail.create_mailbox(bob.id, "Other")
    uids = [r.uid for r in await mail.sort_rows(bob.id, box.id, UidSet.all())]
    await mail.copy(bob.id, box.id, UidSet.of(rng.sample(uids, len(uids) // 2)), other.id)
    await mail.move(bob.id, box.id, UidSet.of(rng.sample(uids, len(uids) // 3)), other.id)
    stored = await mail.fetch(bob.id, box.id, UidSet.all())
    await mail.append(bob.id, other.id, stored[0].entry.message_id)
    assert await _check_keys(storage, mail, bob, other.id) > len(uids) // 2
    assert await _check_keys(storage, mail, bob, box.id) > 0


async def test_backfill_fills_what_the_keys_would_be(storage: SqlStorage) -> None:
    rng = random.Random()
    bob, mail, box = await _filled(storage, rng)
    before = await _stored(storage, box.id)
    nulls = dict.fromkeys(KEY_COLUMNS)
    async with storage.databases["default"].engine.begin() as c:
        await c.execute(update(E).values(nulls))
    assert await mail.sorted_uids(bob.id, box.id, [("DATE", False)]) is None
    assert await mail.thread_rows(bob.id, box.id) is None
    async with storage.databases["default"].engine.begin() as c:
        done = await c.run_sync(backfill_sync)
    assert done == len(before) > 0
    assert await _stored(storage, box.id) == before
    await _check_keys(storage, mail, bob, box.id)


_CRITERIA = ["ARRIVAL", "DATE", "SIZE", "SUBJECT", "FROM", "TO", "CC", "DISPLAYFROM", "DISPLAYTO"]


async def test_sql_order_is_the_in_memory_order(storage: SqlStorage) -> None:
    rng = random.Random()
    bob, mail, box = await _filled(storage, rng)
    rows = await mail.sort_rows(bob.id, box.id, UidSet.all())
    fields = [sort_fields(r) for r in rows]
    tries = [[(k, rng.random() < 0.5)] for k in _CRITERIA]
    tries += [
        [(rng.choice(_CRITERIA), rng.random() < 0.5) for _ in range(rng.randint(2, 4))]
        for _ in range(12)
    ]
    for criteria in tries:
        want = [f.uid for f in sort_messages(fields, criteria)]
        assert await mail.sorted_uids(bob.id, box.id, criteria) == want, criteria
    stored = await mail.thread_rows(bob.id, box.id)
    assert stored is not None
    threads, ids = thread_input(stored)
    assert [t.uid for t in threads] == [f.uid for f in fields]
    for t, i, f in zip(threads, ids, fields, strict=True):
        assert (t.date, t.subject, t.is_reply) == (f.date, f.subject, f.is_reply)
        assert i == thread_ids(f.message_id, f.in_reply_to, f.references)


async def test_long_keys_sharing_the_indexed_prefix(storage: SqlStorage) -> None:
    """Subjects and From mailboxes longer than PostgreSQL's indexed prefix
    (storage.sql.sortkeys.PG_PREFIX octets) that share it and differ
    after it, among short ones: SUBJECT, FROM and their REVERSE still give
    the in-memory order (there the ORDER BY is the prefix's, and the long
    ones are put in order after)."""
    rng = random.Random()
    await storage.directory.add_domain("example.org")
    bob: Account = await storage.directory.add_account("bob@example.org", "pw")
    stem = "x" * (PG_PREFIX - rng.randint(0, 3))  # a prefix shared, or nearly
    tails = ["", "a", "b", "ab", "z" * rng.randint(1, 300), "\u00e9"]
    for i in range(rng.randint(30, 60)):
        subject = rng.choice([f"short {rng.randint(0, 3)}", stem + rng.choice(tails), "zz"])
        if i < 2:  # at least two past the prefix, whatever the draws
            subject = stem + "z" * rng.randint(3, 300)
        local = rng.choice(["ann", stem + rng.choice(tails), "zed"])
        raw = (
            f"From: {local}@x.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{i}@x.test>\r\n\r\nbody\r\n"
        ).encode()
        await ingest(storage, [Delivery(bob, "INBOX", ())], raw)
    mail = storage.mail(bob)
    box = await mail.get_mailbox(bob.id, "INBOX")
    fields = [sort_fields(r) for r in await mail.sort_rows(bob.id, box.id, UidSet.all())]
    assert sum(len(f.subject) >= PG_PREFIX for f in fields) > 1
    for key in ("SUBJECT", "FROM"):
        for reverse in (False, True):
            criteria = [(key, reverse)]
            want = [f.uid for f in sort_messages(fields, criteria)]
            assert await mail.sorted_uids(bob.id, box.id, criteria) == want, criteria

"""MailStore.sort_rows on every SQL backend: for random real messages it
gives exactly what the full parsed form (fetch) says of each sort and
thread input (of addresses, the first real one), in UID order, for any UID
set, missing UIDs skipped."""

from __future__ import annotations

import random

from storage.backend import SqlStorage
from storage.ingest import Delivery, ingest
from storage.model import Account, Address, UidSet

_FROMS = ["ann@example.net", "Ann Other <ann@example.net>", '"Doe, J." <j@x.test>',
          "=?utf-8?q?=C3=89mile?= <e@x.test>", "team: a@x.test, b@x.test;", ""]
_SUBJECTS = ["Re: hello", "=?utf-8?b?w4ljaG8=?=", "[list] Fwd: x (fwd)", "", "plain"]


def _first(addresses: tuple[Address, ...]) -> tuple[Address, ...]:
    """The first address that is not a group marker (RFC 3501 section 7.4.2)."""
    return next(((a,) for a in addresses if a.host is not None and a.mailbox is not None), ())


def _raw(rng: random.Random, i: int) -> bytes:
    head = []
    if (sender := rng.choice(_FROMS)):
        head.append(f"From: {sender}")
    head.append(f"To: {rng.choice(['bob@example.org', 'Bob <bob@example.org>, c@x.test'])}")
    if rng.random() < 0.5:
        head.append(f"Cc: c{i}@x.test")
    head.append(f"Subject: {rng.choice(_SUBJECTS)}")
    if rng.random() < 0.8:  # else no Date: sent date unknown
        head.append(f"Date: Mon, {rng.randint(1, 28)} Feb 2021 10:{rng.randint(10, 59)}:00 +0200")
    if rng.random() < 0.9:
        head.append(f"Message-ID: <{i}@x.test>")
    if rng.random() < 0.5:
        head.append("References: " + " ".join(f"<{j}@x.test>" for j in range(rng.randint(0, 4))))
    if rng.random() < 0.3:
        head.append(f"In-Reply-To: <{rng.randint(0, 9)}@x.test>")
    return ("\r\n".join(head) + "\r\n\r\n" + "body " * rng.randint(1, 50) + "\r\n").encode()


async def test_sort_rows_match_the_parsed_form(storage: SqlStorage) -> None:
    await storage.directory.add_domain("example.org")
    bob: Account = await storage.directory.add_account("bob@example.org", "pw")
    rng = random.Random()
    for i in range(rng.randint(15, 40)):
        await ingest(storage, [Delivery(bob, "INBOX", ())], _raw(rng, i))
    mail = storage.mail(bob)
    box = await mail.get_mailbox(bob.id, "INBOX")
    everything = UidSet.all()
    stored = await mail.fetch(bob.id, box.id, everything)
    rows = await mail.sort_rows(bob.id, box.id, everything)
    assert [r.uid for r in rows] == [m.entry.uid for m in stored]
    for r, m in zip(rows, stored, strict=True):
        p = m.parsed
        assert r.internal_date == m.entry.internal_date.timestamp()
        assert r.size == m.entry.size
        assert r.sent_date == (None if p.sent_date is None else p.sent_date.timestamp())
        assert r.subject == p.subject
        env = p.envelope
        assert (r.from_, r.to, r.cc) == (_first(env.from_), _first(env.to), _first(env.cc))
        assert (r.message_id, r.in_reply_to, r.references) == (
            p.message_id, p.in_reply_to, p.references)
    # A subset, with UIDs that do not exist: those are skipped.
    uids = [m.entry.uid for m in stored]
    some = [*rng.sample(uids, len(uids) // 2), max(uids) + 5, max(uids) + 9]
    got = await mail.sort_rows(bob.id, box.id, UidSet.of(some))
    assert [r.uid for r in got] == sorted(u for u in some if u in uids)

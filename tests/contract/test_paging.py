"""Folder list pages (``MailStore.page``) on every backend: newest first by
the message's Date (never later than its arrival), then UID; every entry on
exactly one page while mail keeps arriving; filters that SQL decides and
ones it cannot decide page alike."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from storage.backend import SqlStorage
from storage.model import SEEN, Account, UidSet
from storage.search import All, Criteria, Flag, Header
from tests.contract.mailfactory import build, deliver

UTC = dt.UTC
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def carol(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("carol@example.org", "pw")


def _expected_key(sent: dt.datetime, arrived: dt.datetime, uid: int) -> tuple[int, int]:
    """Where the spec puts an entry: its Date, capped at its arrival, in microseconds."""
    when = min(sent, arrived)
    return (max(0, int(when.timestamp() * 1_000_000)), uid)


async def _fill(storage: SqlStorage, account: Account, rng: random.Random, count: int,
                keys: dict[int, tuple[int, int]], subjects: dict[int, str]) -> None:
    """``count`` messages with random Dates (some in the future, some equal)
    and arrivals, half through ``append``, half through ``deliver``."""
    mail = storage.mail(account)
    for _ in range(count):
        sent = NOW - dt.timedelta(minutes=rng.choice([rng.randint(-600, 90_000), 5]))
        arrived = NOW - dt.timedelta(minutes=rng.randint(0, 90_000))
        subject = rng.choice(["Größe", "report", "lunch"]) + f" {rng.randbytes(3).hex()}"
        flags = (SEEN,) if rng.random() < 0.7 else ()
        if rng.random() < 0.5:
            uid = await deliver(storage, account, flags=flags, internal_date=arrived,
                                subject=subject, date=sent)
        else:
            raw, parsed = build(subject=subject, date=sent)
            key = await storage.blobs.put(raw)
            [result] = await mail.deliver(account.id, key, parsed, [("INBOX", flags, arrived)])
            uid = result.uid
        keys[uid] = _expected_key(sent, arrived, uid)
        subjects[uid] = subject


@pytest.mark.parametrize(
    ("criteria", "keep"),
    [
        (All(), lambda subject, seen: True),
        (Flag(SEEN, False), lambda subject, seen: not seen),
        # Not ASCII: decided in Python after SQL narrows nothing.
        (Header("subject", "GRÖSSE"), lambda subject, seen: subject.startswith("Größe")),
    ],
)
async def test_every_entry_once_in_order_while_mail_arrives(
    storage: SqlStorage, carol: Account, criteria: Criteria, keep: object
) -> None:
    rng = random.Random()
    mail = storage.mail(carol)
    inbox = (await mail.get_mailbox(carol.id, "INBOX")).id
    keys: dict[int, tuple[int, int]] = {}
    subjects: dict[int, str] = {}
    await _fill(storage, carol, rng, rng.randint(40, 90), keys, subjects)
    seen = {e.uid for e in await mail.uids(carol.id, inbox) if SEEN in e.flags}
    wanted = sorted(
        (key for uid, key in keys.items() if keep(subjects[uid], uid in seen)),  # type: ignore[operator]
        reverse=True,
    )
    before_paging = dict(keys)
    listed: list[tuple[int, int]] = []
    before = None
    while True:
        page = await mail.page(carol.id, inbox, criteria, rng.randint(1, 9), before)
        assert all(stored.entry.uid == key[1] for key, stored in page)
        listed.extend(key for key, _ in page)
        if not page:
            break
        before = page[-1][0]
        # New mail arrives between pages; it is newer, so never on a later page.
        await _fill(storage, carol, rng, rng.randint(0, 2), keys, subjects)
    assert [k for k in listed if k[1] in before_paging] == wanted
    assert listed == sorted(listed, reverse=True)
    assert len(set(listed)) == len(listed)


async def test_a_copy_keeps_its_place(storage: SqlStorage, carol: Account) -> None:
    mail = storage.mail(carol)
    inbox = (await mail.get_mailbox(carol.id, "INBOX")).id
    archive = (await mail.get_mailbox(carol.id, "Archive")).id
    old = NOW - dt.timedelta(days=300)
    await deliver(storage, carol, internal_date=NOW, subject="old", date=old)
    await deliver(storage, carol, internal_date=NOW - dt.timedelta(days=1), subject="newer",
                  date=NOW - dt.timedelta(days=2))
    await mail.copy(carol.id, inbox, UidSet.of([1, 2]), archive)
    page = await mail.page(carol.id, archive, All(), 10)
    assert [s.parsed.subject for _, s in page] == ["newer", "old"]
    assert page[1][0][0] == _expected_key(old, NOW, 0)[0]

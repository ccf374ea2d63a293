"""What the mail store remembers between folder pages and fetches (issue #20)
never shows a stale entry and stays bounded, on every backend."""

from __future__ import annotations

import random

import pytest

from storage.backend import SqlStorage
from storage.model import DELETED, SEEN, Account, StoreMode, UidSet
from storage.search import All
from storage.sql import mailstore as sql_mailstore
from tests.contract.mailfactory import deliver


@pytest.fixture
async def dana(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("dana@example.org", "pw")


async def _all_pages(storage: SqlStorage, account: Account, box: int, size: int) -> list:
    mail, found, before = storage.mail(account), [], None
    while True:
        page = await mail.page(account.id, box, All(), size, before)
        found += [stored for _, stored in page]
        if len(page) < size:
            return found
        before = page[-1][0]


async def test_pages_and_fetches_follow_flags_expunges_and_new_mail(
    storage: SqlStorage, dana: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random()
    limit = rng.randint(3, 6)
    monkeypatch.setattr(sql_mailstore, "PARSED_CACHE_SIZE", limit)
    mail = storage.mail(dana)
    box = (await mail.get_mailbox(dana.id, "INBOX")).id
    subjects = {}
    for i in range(rng.randint(limit + 2, 3 * limit)):
        subject = f"note {i} {rng.randbytes(rng.randint(1, 9)).hex()}"
        subjects[await deliver(storage, dana, subject=subject)] = subject
    size = rng.randint(1, 4)
    first = await _all_pages(storage, dana, box, size)
    assert sorted(s.entry.uid for s in first) == sorted(subjects)
    assert all(s.parsed.subject == subjects[s.entry.uid] for s in first)
    assert len(mail._stored_cache) <= limit

    seen = rng.choice(sorted(subjects))
    await mail.store_flags(dana.id, box, UidSet.of([seen]), StoreMode.ADD, [SEEN])
    gone = rng.choice([u for u in subjects if u != seen])
    await mail.store_flags(dana.id, box, UidSet.of([gone]), StoreMode.ADD, [DELETED])
    await mail.expunge(dana.id, box, UidSet.of([gone]))
    del subjects[gone]
    latest = await deliver(storage, dana, subject="after the expunge")
    subjects[latest] = "after the expunge"

    again = await _all_pages(storage, dana, box, size)
    assert sorted(s.entry.uid for s in again) == sorted(subjects)
    assert {s.entry.uid for s in again if SEEN in s.entry.flags} == {seen}
    assert all(s.parsed.subject == subjects[s.entry.uid] for s in again)
    [fetched] = await mail.fetch(dana.id, box, UidSet.of([seen]))
    assert SEEN in fetched.entry.flags
    assert len(mail._stored_cache) <= limit

"""What the mail store remembers between folder pages and fetches (issue #20)
never shows a stale entry and stays bounded, on every backend."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from storage.backend import SqlStorage, open_storage_from_url
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


async def test_a_kept_page_is_served_only_while_no_process_changed_its_folder(
    storage: SqlStorage,
    dana: Account,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unfiltered page read again runs no page query while the folder is
    unchanged; each kind of change another process makes (a second storage
    on the same database: its own caches, its own connections) shows on the
    very next read: flags, an expunge, new mail, a move in and out, a copy."""
    rng = random.Random()
    page_queries: list[object] = []
    counted = sql_mailstore.execute

    def execute(conn: object, stmt: object, params: object = None) -> object:
        if stmt is sql_mailstore._PAGE_ALL_FIRST:
            page_queries.append(stmt)
        return counted(conn, stmt, params)

    monkeypatch.setattr(sql_mailstore, "execute", execute)
    mail = storage.mail(dana)
    box = (await mail.get_mailbox(dana.id, "INBOX")).id
    for i in range(rng.randint(3, 9)):
        await deliver(storage, dana, subject=f"kept {i} {rng.randbytes(4).hex()}")
    size = rng.randint(2, 12)

    async def page() -> list[tuple[int, frozenset[str]]]:
        found = await mail.page(dana.id, box, All(), size)
        return [(s.entry.uid, frozenset(s.entry.flags)) for _, s in found]

    first = await page()
    queries = len(page_queries)
    for _ in range(rng.randint(2, 5)):
        assert await page() == first
    assert len(page_queries) == queries  # served kept: no page query

    other = await open_storage_from_url(database_url, tmp_path / "blobs", password_hasher=None)
    try:
        theirs = other.mail(dana)
        archive = await theirs.create_mailbox(dana.id, f"Kept {rng.randbytes(3).hex()}")
        target = rng.choice([uid for uid, _ in first])
        steps = [
            lambda: theirs.store_flags(dana.id, box, UidSet.of([target]), StoreMode.ADD, [SEEN]),
            lambda: theirs.store_flags(dana.id, box, UidSet.of([target]), StoreMode.ADD, [DELETED]),
            lambda: theirs.expunge(dana.id, box, UidSet.of([target])),
            lambda: deliver(other, dana, subject="arrived elsewhere"),
            lambda: theirs.move(dana.id, box, UidSet.of([seen[0][0]]), archive.id),
            lambda: theirs.copy(dana.id, archive.id, UidSet.all(), box),
        ]
        seen = first
        for step in steps:
            await step()
            queries = len(page_queries)
            seen = await page()
            assert len(page_queries) == queries + 1  # the change forced a fresh read
            fresh = await other.mail(dana).page(dana.id, box, All(), size)
            assert seen == [(s.entry.uid, frozenset(s.entry.flags)) for _, s in fresh]
    finally:
        await other.close()

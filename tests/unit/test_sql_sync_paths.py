"""The single-hop SQLite paths of the mail store: STORE, EXPUNGE and
claim_recent as group-committed write functions, the hot reads in reader
threads, and ``status_all``.

What a user would notice: flags set by many sessions at once all land, each
change once, with its own modseq and event; UNCHANGEDSINCE still refuses
what changed meanwhile; a read right after a write sees it; UID sets of any
shape (``n:*`` past the end, many ranges) pick exactly the right messages;
a folder list's counters equal those of STATUS per folder.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from storage import open_storage_from_url
from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.model import DELETED, FLAGGED, SEEN, Account, ChangeKind, StoreMode, UidSet
from tests.contract.mailfactory import deliver

HASHER = PasswordHasher.from_parameters(CHEAPEST)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[SqlStorage]:
    store = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}", tmp_path / "blobs", password_hasher=HASHER
    )
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def bob(site: SqlStorage) -> Account:
    await site.directory.add_domain("example.org")
    account = await site.directory.add_account("bob@example.org", "secret")
    await site.mail(account).create_default_mailboxes(account.id)
    return account


async def test_concurrent_stores_each_land_once(site: SqlStorage, bob: Account) -> None:
    mail = site.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    for _ in range(20):
        await deliver(site, bob)
    base = (await mail.status(bob.id, box)).highestmodseq
    after = await mail.last_change_id(bob.id)
    stores = [
        mail.store_flags(bob.id, box, UidSet.of([u]), StoreMode.ADD, [SEEN]) for u in range(1, 21)
    ]
    results = await asyncio.gather(*stores)
    modseqs = sorted(r.updated[0].modseq for r in results)
    # Each STORE got its own modseq, all above the old HIGHESTMODSEQ.
    assert modseqs == list(range(base + 1, base + 21))
    st = await mail.status(bob.id, box)
    assert (st.unseen, st.highestmodseq) == (0, base + 20)
    changes = await mail.account_changes(bob.id, after)
    assert sorted(c.uid for c in changes if c.kind is ChangeKind.FLAGS) == list(range(1, 21))
    # Nothing changes: no new modseq, no change logged.
    again = await mail.store_flags(bob.id, box, UidSet.all(), StoreMode.ADD, [SEEN])
    assert again.updated == () and (await mail.status(bob.id, box)).highestmodseq == base + 20


async def test_unchangedsince_and_read_after_write(site: SqlStorage, bob: Account) -> None:
    mail = site.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    for _ in range(3):
        await deliver(site, bob)
    seen = await mail.store_flags(bob.id, box, UidSet.of([2]), StoreMode.ADD, [SEEN])
    guard = seen.updated[0].modseq - 1
    # RFC 7162 section 3.1.3: UID 2 changed after ``guard``: refused.
    res = await mail.store_flags(
        bob.id, box, UidSet.of([1, 2, 3]), StoreMode.REPLACE, [FLAGGED, "$Work"], guard
    )
    assert res.modified == (2,)
    assert [e.uid for e in res.updated] == [1, 3]
    fetched = await mail.fetch(bob.id, box, UidSet.of([1, 2, 3]))
    assert [sorted(m.entry.flags) for m in fetched] == [
        ["$Work", FLAGGED],
        [SEEN],
        ["$Work", FLAGGED],
    ]
    changed = await mail.changes_since(bob.id, box, guard + 1)
    assert [e.uid for e in changed.changed] == [1, 3]
    with pytest.raises(StorageError) as err:
        await mail.store_flags(bob.id, 999_999, UidSet.of([1]), StoreMode.ADD, [SEEN])
    assert err.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(StorageError) as err:
        await mail.fetch(bob.id, 999_999, UidSet.of([1]))
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_uid_sets_of_every_shape(site: SqlStorage, bob: Account) -> None:
    mail = site.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    for _ in range(12):
        await deliver(site, bob)

    async def uids(s: UidSet) -> list[int]:
        return [m.entry.uid for m in await mail.fetch(bob.id, box, s)]

    assert await uids(UidSet.of([5])) == [5]
    assert await uids(UidSet(((3, 4), (10, None)))) == [3, 4, 10, 11, 12]
    # RFC 3501 section 9: ``50:*`` still covers the highest UID.
    assert await uids(UidSet(((50, None),))) == [12]
    assert await uids(UidSet(((11, 11), (50, None)))) == [11, 12]
    odd = [u for u in range(1, 13) if u % 2]
    assert await uids(UidSet.of(odd)) == odd  # more ranges than range queries
    many = UidSet((*((u, u) for u in range(1, 400, 2)), (1000, 1000)))
    assert await uids(many) == odd  # more ranges than one SQL condition takes
    assert await uids(UidSet(())) == []


async def test_expunge_and_claim_recent(site: SqlStorage, bob: Account) -> None:
    mail = site.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    for _ in range(4):
        await deliver(site, bob)
    assert await mail.claim_recent(bob.id, box) == 1
    assert await mail.claim_recent(bob.id, box) == 5
    await mail.store_flags(bob.id, box, UidSet.of([1, 3, 4]), StoreMode.ADD, [DELETED])
    base = (await mail.status(bob.id, box)).highestmodseq
    assert await mail.expunge(bob.id, box, UidSet(((3, None),))) == [3, 4]
    assert await mail.expunge(bob.id, box) == [1]
    assert [e.uid for e in await mail.uids(bob.id, box)] == [2]
    assert (await mail.changes_since(bob.id, box, base)).vanished == (1, 3, 4)
    assert await mail.quota_used(bob.id) == sum(e.size for e in await mail.uids(bob.id, box))
    with pytest.raises(StorageError) as err:
        await mail.claim_recent(bob.id, 999_999)
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_status_all_matches_status(site: SqlStorage, bob: Account) -> None:
    mail = site.mail(bob)
    await deliver(site, bob, flags=(SEEN,), body="a" * 100)
    await deliver(site, bob)
    await deliver(site, bob, mailbox="Archive")
    boxes = await mail.list_mailboxes(bob.id)
    every = await mail.status_all(bob.id)  # type: ignore[attr-defined]
    assert set(every) == {b.id for b in boxes}
    for b in boxes:
        assert every[b.id] == await mail.status(bob.id, b.id)
    inbox = await mail.get_mailbox(bob.id, "inbox")
    assert (every[inbox.id].messages, every[inbox.id].unseen) == (2, 1)

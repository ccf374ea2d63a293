"""MailStore \\Recent contract on every SQL backend: peek_recent counts the
entries at or above the recent floor without moving it (RFC 3501 sections
6.3.2 EXAMINE and 6.3.10 STATUS RECENT); claim_recent still hands them to
exactly one session."""

from __future__ import annotations

import pytest

from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.model import DELETED, Account, StoreMode, UidSet
from tests.contract.mailfactory import deliver


@pytest.fixture
async def bob(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("bob@example.org", "pw")


async def test_peek_recent_does_not_claim(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    assert await mail.peek_recent(bob.id, box) == 0  # empty mailbox
    await deliver(storage, bob)
    await deliver(storage, bob)
    assert await mail.peek_recent(bob.id, box) == 2
    assert await mail.peek_recent(bob.id, box) == 2  # peeking twice changes nothing
    assert await mail.claim_recent(bob.id, box) == 1  # both still there to claim
    assert await mail.peek_recent(bob.id, box) == 0
    await deliver(storage, bob)
    assert await mail.peek_recent(bob.id, box) == 1
    assert await mail.claim_recent(bob.id, box) == 3


async def test_peek_recent_counts_entries_not_uids(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    for _ in range(3):
        await deliver(storage, bob)
    await mail.store_flags(bob.id, box, UidSet.of([2]), StoreMode.ADD, [DELETED])
    await mail.expunge(bob.id, box)
    assert await mail.peek_recent(bob.id, box) == 2  # UIDs 1 and 3 remain
    other = await mail.create_mailbox(bob.id, "Other")
    assert await mail.peek_recent(bob.id, other.id) == 0  # per mailbox


async def test_peek_recent_unknown_mailbox(storage: SqlStorage, bob: Account) -> None:
    with pytest.raises(StorageError) as info:
        await storage.mail(bob).peek_recent(bob.id, 999_999)
    assert info.value.kind is ErrorKind.NOT_FOUND


async def test_a_delivery_can_claim_recent_in_its_transaction(
    storage: SqlStorage, bob: Account
) -> None:
    from storage.ingest import Delivery, ingest

    mail = storage.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    await deliver(storage, bob)  # UID 1, unclaimed
    raw = b"Subject: appended\r\n\r\nbody\r\n"
    (plain,) = await ingest(storage, [Delivery(bob, box)], raw)
    assert plain.recent_floor is None  # nothing claimed
    assert await mail.peek_recent(bob.id, box) == 2
    (claimed,) = await ingest(storage, [Delivery(bob, box, claim_recent=True)], raw)
    # UIDs 1 to 3 are the claimer's; the floor now lies past them.
    assert (claimed.recent_floor, claimed.uid) == (1, 3)
    assert await mail.peek_recent(bob.id, box) == 0
    assert await mail.claim_recent(bob.id, box) == 4
    (again,) = await ingest(storage, [Delivery(bob, box, claim_recent=True)], raw)
    assert (again.recent_floor, again.uid) == (4, 4)


async def test_ingest_many_can_claim_recent_in_its_transaction(
    storage: SqlStorage, bob: Account
) -> None:
    """A MULTIAPPEND to the appender's selected mailbox: every message is
    \\Recent for it, and the floor moves past them in the same commit."""
    import random
    from collections.abc import AsyncIterator

    from storage.ingest import ingest_many

    mail = storage.mail(bob)
    box = (await mail.get_mailbox(bob.id, "INBOX")).id
    await deliver(storage, bob)  # UID 1, unclaimed
    count = random.randint(2, 5)

    async def messages() -> AsyncIterator[tuple[bytes, tuple[str, ...], None]]:
        for n in range(count):
            yield b"Subject: %d\r\n\r\n" % n + random.randbytes(random.randint(1, 300)), (), None

    plain = await ingest_many(storage, bob, box, messages())
    assert [r.recent_floor for r in plain] == [None] * count
    assert await mail.peek_recent(bob.id, box) == 1 + count
    claimed = await ingest_many(storage, bob, box, messages(), claim_recent=True)
    # UIDs 1 up to the last are the claimer's; the floor lies past them.
    assert [(r.recent_floor, r.uid) for r in claimed] == [
        (1, 2 + count + n) for n in range(count)
    ]
    assert await mail.peek_recent(bob.id, box) == 0
    assert await mail.claim_recent(bob.id, box) == 2 + 2 * count

"""Identities that leave storage are never handed out twice, on every backend.

Message row ids key parsed-message caches (this process's and an IMAP
session's), mailbox ids are the HTTP API's folder ids and half of its
message ids, account and domain ids key directory caches, queue ids are
shown by ``mailctl queue`` and in SMTP replies. Once such a row is deleted
its id must not come back for a new row, or a cache or a client holding
it silently sees another message, mailbox or account.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.model import DELETED, Account, StoreMode, UidSet
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import store_message


@pytest.fixture
async def bob(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("bob@example.org", "pw")


def _body() -> str:
    return random.randbytes(random.randint(1, 700)).hex()


async def _deliver_and_expunge_all(storage: SqlStorage, bob: Account, count: int) -> list[int]:
    """Delivers ``count`` messages to INBOX, then expunges them all (their
    message rows are deleted); returns the message ids they had."""
    mail = storage.mail(bob)
    box = await mail.get_mailbox(bob.id, "INBOX")
    ids = []
    for _ in range(count):
        made = await store_message(storage, bob, body=_body())
        await mail.append(bob.id, box.id, made.message_id)
        ids.append(made.message_id)
    uids = UidSet.of([e.uid for e in await mail.uids(bob.id, box.id)])
    await mail.store_flags(bob.id, box.id, uids, StoreMode.ADD, [DELETED])
    assert len(await mail.expunge(bob.id, box.id)) == count
    assert await mail.uids(bob.id, box.id) == []
    return ids


async def test_a_message_id_is_never_reused_after_expunge(
    storage: SqlStorage, bob: Account, database_url: str, tmp_path: Path
) -> None:
    handed_out = await _deliver_and_expunge_all(storage, bob, random.randint(2, 6))
    made = await store_message(storage, bob, body=_body())
    assert made.message_id > max(handed_out)
    # Nor after a restart: the high-water mark is stored, not remembered.
    handed_out.append(made.message_id)
    mail = storage.mail(bob)
    box = await mail.get_mailbox(bob.id, "INBOX")
    await mail.append(bob.id, box.id, made.message_id, [DELETED])
    assert await mail.expunge(bob.id, box.id) != []
    await storage.close()
    blobs = tmp_path / "blobs"
    again = await open_storage_from_url(database_url, blobs, password_hasher=TEST_HASHER)
    try:
        fresh = await store_message(again, bob, body=_body())
    finally:
        await again.close()
    assert fresh.message_id > max(handed_out)


async def test_a_mailbox_id_is_never_reused_after_delete(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    first = await mail.create_mailbox(bob.id, "Projects")
    await mail.delete_mailbox(bob.id, "Projects")
    again = await mail.create_mailbox(bob.id, "Projects")
    assert again.id > first.id


async def test_account_and_domain_ids_are_never_reused(storage: SqlStorage) -> None:
    d = storage.directory
    domain = await d.add_domain("example.org")
    account = await d.add_account("carol@example.org", "pw")
    await d.remove_account("carol@example.org")
    await d.remove_domain("example.org")
    domain2 = await d.add_domain("example.org")
    account2 = await d.add_account("carol@example.org", "pw")
    assert domain2.id > domain.id
    assert account2.id > account.id


async def test_a_queue_id_is_never_reused_after_delete(storage: SqlStorage) -> None:
    key = await storage.blobs.put(random.randbytes(random.randint(10, 500)))
    ids = [await storage.queue.enqueue("bob@example.org", ["a@remote.test"], key)]
    ids.append(await storage.queue.enqueue("bob@example.org", ["b@remote.test"], key))
    for qid in ids:
        await storage.queue.delete(qid)
    assert await storage.queue.enqueue("bob@example.org", ["c@remote.test"], key) > max(ids)

"""A message is found by a body search as soon as its delivery returned,
though neither backend indexes it in the delivery: SQLite's indexer fills
its index later (``storage/sql/fts.py``), PostgreSQL's word index keeps
the message in its pending list until the background merger (or
autovacuum) merges it (schema steps 17 and 20). The background workers are off
here, so every search below runs before any of them did."""

from __future__ import annotations

import random
import string

from storage.backend import SqlStorage
from storage.ingest import Delivery, ingest
from storage.model import Account
from storage.search import Text
from tests.contract.mailfactory import build


def _word() -> str:
    return "".join(random.choices(string.ascii_lowercase, k=random.randint(7, 12)))


def _prose(words: int) -> str:
    """Text of ``words`` random words, wrapped in lines of under 78 characters."""
    lines, line = [], ""
    for _ in range(words):
        word = _word()
        if len(line) + len(word) > 70:
            lines.append(line)
            line = ""
        line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


async def _deliver(storage: SqlStorage, bob: Account, body: str) -> None:
    raw, _ = build(subject=f"note {random.randint(1, 10**6)}", body=body)
    await ingest(storage, [Delivery(bob)], raw)


async def _bob(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("bob@example.org", "pw")


async def test_a_delivered_message_is_found_at_once(quiet_storage: SqlStorage) -> None:
    storage = quiet_storage
    bob = await _bob(storage)
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    markers = [_word() for _ in range(random.randint(3, 9))]
    for uid, marker in enumerate(markers, start=1):
        # The word among others; searched whole, and in part in upper case.
        body = f"{_prose(random.randint(20, 400))}\n{marker}\n{_prose(random.randint(1, 40))}"
        await _deliver(storage, bob, body)
        # IMAP SEARCH BODY (RFC 3501 section 6.4.4: a substring, any case)
        # and the API's account-wide search, right after the delivery.
        assert await mail.search(bob.id, inbox, Text("body", marker)) == [uid]
        assert await mail.search(bob.id, inbox, Text("body", marker[1:].upper())) == [uid]
        found = await mail.search_account(bob.id, Text("content", marker))
        assert [e.uid for e in found] == [uid]
        assert await mail.search(bob.id, inbox, Text("body", _word())) == []
    # And after the background work ran, the same.
    indexer = storage.databases["default"].indexer()
    assert indexer is not None
    await indexer.run_once()
    for uid, marker in enumerate(markers, start=1):
        assert await mail.search(bob.id, inbox, Text("body", marker)) == [uid]

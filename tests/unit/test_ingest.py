"""storage.ingest over the SQL backend (SQLite in tmp_path, filesystem blobs).

What a user would notice: every fixture is stored byte-exact and FETCH's
parsed form equals a fresh parse; deliveries land in the named mailboxes
with their flags and dates; a missing mailbox or a full quota is a
classified error, never a half-stored message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

import storage.ingest as ingest_mod
from storage import open_storage_from_url
from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.ingest import Delivery, ingest, ingest_each, parse
from storage.mime import parse_message
from storage.model import SEEN, Account, AppendResult, UidSet
from tests.fixtures.mime.large import ATTACHMENT_SIZE, write_large_message

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mime"
CORPUS = sorted(FIXTURES.glob("*.eml"))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStorage]:
    s = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}",
        tmp_path / "blobs",
        password_hasher=PasswordHasher.from_parameters(CHEAPEST),
    )
    try:
        await s.directory.add_domain("example.net")
        yield s
    finally:
        await s.close()


@pytest.fixture
async def bob(store: SqlStorage) -> Account:
    return await store.directory.add_account("bob@example.net", "secret")


async def fetch_one(store: SqlStorage, account: Account, mailbox: str, uid: int):
    ms = store.mail(account)
    box = await ms.get_mailbox(account.id, mailbox)
    (stored,) = await ms.fetch(account.id, box.id, UidSet.of([uid]))
    return stored


async def test_every_fixture_round_trips_byte_exact(store: SqlStorage, bob: Account):
    assert len(CORPUS) >= 30
    for uid, path in enumerate(CORPUS, start=1):
        raw = path.read_bytes()
        (res,) = await ingest(store, [Delivery(bob)], raw)
        assert res.uid == uid
        stored = await fetch_one(store, bob, "INBOX", uid)
        assert await store.blobs.get(stored.entry.blob_key) == raw, path.name
        assert stored.entry.size == len(raw)
        # FETCH reads the parsed form stored at ingest: equal to a fresh
        # parse, less the search text (a column of its own, never read back).
        assert stored.parsed == dataclasses.replace(parse_message(raw), body_text=""), path.name


async def test_large_file_is_streamed_and_stored_byte_exact(
    store: SqlStorage, bob: Account, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = write_large_message(tmp_path)

    async def no_put(data: bytes) -> str:
        raise AssertionError("a file source must be streamed with put_file")

    monkeypatch.setattr(store.blobs, "put", no_put)
    (res,) = await ingest(store, [Delivery(bob, "Archive")], path)
    stored = await fetch_one(store, bob, "Archive", res.uid)
    raw = path.read_bytes()
    assert await store.blobs.get(stored.entry.blob_key) == raw
    att = stored.parsed.body.children[1]
    assert att.disposition == ("attachment", (("filename", "blob.bin"),))
    # BODY[2] straight from the blob by the stored offsets.
    body = await store.blobs.get_range(stored.entry.blob_key, att.body_start, att.end)
    assert body == raw[att.body_start : att.end]
    assert len(body) > ATTACHMENT_SIZE  # base64 grows it by a third


async def test_deliveries_to_one_account_share_the_message_row(store: SqlStorage, bob: Account):
    raw = (FIXTURES / "alternative.eml").read_bytes()
    date = dt.datetime(2023, 12, 24, 18, 0, tzinfo=dt.UTC)
    inbox = await store.mail(bob).get_mailbox(bob.id, "INBOX")
    res = await ingest(
        store,
        [Delivery(bob), Delivery(bob, "Archive", (SEEN, "$Work"), date), Delivery(bob, inbox.id)],
        raw,
    )
    assert [r.uid for r in res] == [1, 1, 2]
    assert res[0].mailbox_id == res[2].mailbox_id == inbox.id
    a = await fetch_one(store, bob, "INBOX", 1)
    b = await fetch_one(store, bob, "Archive", 1)
    c = await fetch_one(store, bob, "INBOX", 2)
    assert a.entry.message_id == b.entry.message_id == c.entry.message_id
    assert b.entry.flags == frozenset({SEEN, "$Work"})
    assert b.entry.internal_date == date
    assert a.entry.flags == frozenset()


async def test_deliveries_to_several_accounts(store: SqlStorage, bob: Account):
    carol = await store.directory.add_account("carol@example.net", "secret")
    raw = (FIXTURES / "simple_crlf.eml").read_bytes()
    res = await ingest(store, [Delivery(bob), Delivery(carol)], raw)
    x = await fetch_one(store, bob, "INBOX", res[0].uid)
    y = await fetch_one(store, carol, "INBOX", res[1].uid)
    assert x.entry.message_id != y.entry.message_id  # one row per account
    assert x.entry.blob_key == y.entry.blob_key  # one blob, content-addressed
    assert await store.blobs.keys() == [x.entry.blob_key]


async def test_missing_mailbox_is_not_found_and_stores_nothing(store: SqlStorage, bob: Account):
    raw = (FIXTURES / "simple_crlf.eml").read_bytes()
    with pytest.raises(StorageError) as err:
        await ingest(store, [Delivery(bob), Delivery(bob, "No/Such/Box")], raw)
    assert err.value.kind is ErrorKind.NOT_FOUND
    # One account's deliveries commit together: no message row, no entry
    # (the blob may be written; unreferenced, garbage collection removes it).
    mail = store.mail(bob)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    assert await mail.uids(bob.id, inbox.id) == []
    assert await mail.referenced_blobs() == set()
    assert await mail.quota_used(bob.id) == 0
    with pytest.raises(StorageError) as err:
        await ingest(store, [Delivery(bob, 999_999)], raw)
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_over_quota(store: SqlStorage, bob: Account):
    small = await store.directory.add_account("small@example.net", "secret", quota_bytes=1000)
    raw = (FIXTURES / "nested_mixed_alt_related.eml").read_bytes()
    assert len(raw) > 1000
    with pytest.raises(StorageError) as err:
        await ingest(store, [Delivery(small)], raw)
    assert err.value.kind is ErrorKind.OVER_QUOTA
    # Per-delivery outcomes: the full account fails, the other still gets it.
    out = await ingest_each(store, [Delivery(small), Delivery(bob), Delivery(small, "Nope")], raw)
    assert isinstance(out[0], StorageError) and out[0].kind is ErrorKind.OVER_QUOTA
    assert isinstance(out[1], AppendResult)
    assert isinstance(out[2], StorageError) and out[2].kind is ErrorKind.NOT_FOUND
    assert (await fetch_one(store, bob, "INBOX", out[1].uid)).entry.size == len(raw)


async def test_prior_parse_is_reused(
    store: SqlStorage, bob: Account, monkeypatch: pytest.MonkeyPatch
):
    raw = (FIXTURES / "rfc822_attachment.eml").read_bytes()
    parsed = await parse(raw)
    assert parsed == await parse(FIXTURES / "rfc822_attachment.eml")

    def boom(_raw: bytes):
        raise AssertionError("parsed twice")

    monkeypatch.setattr(ingest_mod, "parse_message", boom)
    (res,) = await ingest(store, [Delivery(bob)], raw, parsed=parsed)
    stored = (await fetch_one(store, bob, "INBOX", res.uid)).parsed
    assert stored == dataclasses.replace(parsed, body_text="")  # its search text in its column


async def test_no_deliveries_is_a_no_op(store: SqlStorage):
    assert await ingest(store, [], b"Subject: x\r\n\r\n") == []
    assert await store.blobs.keys() == []

"""Small messages are stored with their rows, on both backends: a message of
at most ``blob_pack_max_bytes`` goes into the shard database's ``blobs``
table in the delivery's own transaction (SQLite: its file; PostgreSQL:
schema step 18), a larger one into a blob file. Either way the blob store
reads it back byte for byte."""

from __future__ import annotations

import base64
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.ingest import Delivery, ingest
from tests.contract.conftest import TEST_HASHER


@pytest.fixture
def threshold() -> int:
    return random.randint(3_000, 40_000)


@pytest.fixture
async def packing(
    database_url: str, tmp_path: Path, threshold: int
) -> AsyncIterator[SqlStorage]:
    store = await open_storage_from_url(
        database_url,
        tmp_path / "blobs",
        password_hasher=TEST_HASHER,
        blob_pack_max_bytes=threshold,
    )
    try:
        yield store
    finally:
        await store.close()


def message_of(size: int) -> bytes:
    """A message of exactly ``size`` octets: headers, then random bytes
    (an attachment's base64 in lines of 76, cut to length)."""
    header = (
        f"From: alice@example.net\r\nTo: bob@example.org\r\n"
        f"Subject: {random.randbytes(6).hex()}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    encoded = base64.encodebytes(random.randbytes(size)).replace(b"\n", b"\r\n")
    raw = header + encoded[: max(0, size - len(header))]
    assert len(raw) == size
    return raw


async def test_small_blobs_live_with_their_rows_and_read_back_exactly(
    packing: SqlStorage, threshold: int
) -> None:
    storage = packing
    await storage.directory.add_domain("example.org")
    bob = await storage.directory.add_account("bob@example.org", "pw")
    blobs = storage.blobs_for(bob)
    assert storage.mail(bob).inline_blob_max == threshold
    offsets = {0, 1, -1, *random.sample(range(-900, 900), 6)}
    sizes = [threshold + d for d in offsets] + [random.randint(600, threshold)]
    random.shuffle(sizes)
    for size in sizes:
        raw = message_of(size)
        (result,) = await ingest(storage, [Delivery(bob)], raw)
        key = result.entry.blob_key
        # A small message leaves no blob file: its bytes are in the database.
        assert blobs.path(key).exists() == (size > threshold), size
        assert await blobs.get(key) == raw
        assert await blobs.size(key) == size
        assert await blobs.exists(key)
        start = random.randint(0, size - 1)
        end = random.randint(start, size + 10)
        assert await blobs.get_range(key, start, end) == raw[start:end]
        chunk = random.randint(1, 5000)
        assert b"".join([c async for c in blobs.stream(key, chunk)]) == raw
    # What garbage collection sees: every blob is referenced, none removed.
    assert await storage.collect_garbage(min_age_seconds=0) == 0
    inbox = storage.mail(bob)
    box = await inbox.get_mailbox(bob.id, "INBOX")
    entries = await inbox.uids(bob.id, box.id)
    assert sorted([await blobs.size(e.blob_key) for e in entries]) == sorted(sizes)

"""Attachments stored once (``storage/blob/skeleton.py``) on both database
backends: random MIME trees ingested (the inline path that writes the blob
with its rows, and the blob-file path) read back byte-exact through every
read call, whole, ranged and streamed; messages stored before skeletons
existed read as they are; and garbage collection counts a skeleton's
attachment blobs as referenced."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.blob.skeleton import MAGIC, SkeletonBlobStore
from storage.ingest import Delivery, ingest
from tests.contract.conftest import TEST_HASHER
from tests.mimetrees import MimeTrees


@pytest.fixture
def seed() -> int:
    seed = int(os.environ.get("SHARDMAIL_TEST_SEED") or random.randrange(2**32))
    print(f"seed {seed} (SHARDMAIL_TEST_SEED={seed} repeats the run)")
    return seed


@pytest.fixture
def threshold(seed: int) -> int:
    return random.Random(seed).randint(500, 6_000)


@pytest.fixture
async def site(database_url: str, tmp_path: Path, threshold: int) -> AsyncIterator[SqlStorage]:
    store = await open_storage_from_url(
        database_url,
        tmp_path / "blobs",
        password_hasher=TEST_HASHER,
        attachment_min_bytes=threshold,
        # Some messages go with their rows, some to files: both paths split.
        blob_pack_max_bytes=threshold * 4 + random.randint(1, 999),
    )
    try:
        yield store
    finally:
        await store.close()


async def _read_back(blobs: SkeletonBlobStore, key: str, raw: bytes, rng: random.Random) -> None:
    assert await blobs.get(key) == raw
    assert await blobs.size(key) == len(raw)
    for _ in range(6):
        start = rng.randint(0, len(raw) + 3)
        end = rng.randint(start, len(raw) + 9)
        assert await blobs.get_range(key, start, end) == raw[start:end]
    chunk = rng.randint(1, 5_000)
    chunks = [c async for c in blobs.stream(key, chunk)]
    assert b"".join(chunks) == raw
    assert all(len(c) == chunk for c in chunks[:-1])
    for _ in range(4):
        start = rng.randint(0, len(raw) + 3)
        end = rng.choice([None, rng.randint(start, len(raw) + 9)])
        chunks = [c async for c in blobs.stream_range(key, start, end, chunk)]
        assert b"".join(chunks) == raw[start:end]
        assert all(len(c) == chunk for c in chunks[:-1])


async def test_random_mime_trees_read_back_byte_exact(
    site: SqlStorage, seed: int, threshold: int
) -> None:
    rng = random.Random(seed)
    await site.directory.add_domain("example.org")
    account = await site.directory.add_account("alice@example.org", "pw")
    blobs = site.blobs_for(account)
    assert isinstance(blobs, SkeletonBlobStore)
    trees = MimeTrees(rng, threshold)
    sent = [trees.message() for _ in range(rng.randint(25, 40))]
    sent.append(MAGIC + trees.message())  # looks like a skeleton: kept as one with no refs
    sent.append(trees.message().replace(b"\r\n\r\n", b"\r\n\r\n" + MAGIC, 2))
    for raw in sent:
        (result,) = await ingest(site, [Delivery(account)], raw)
        assert result.uid > 0
    split = 0
    for raw in sent:
        key = hashlib.sha256(raw).hexdigest()
        await _read_back(blobs, key, raw, rng)
        split += bool(await blobs.references(key))
    assert split > 0, "no message had a part over the threshold"


async def test_messages_stored_whole_before_read_as_they_are(
    site: SqlStorage, seed: int, threshold: int
) -> None:
    rng = random.Random(seed)
    blobs = site.blobs
    assert isinstance(blobs, SkeletonBlobStore)
    raws = [MimeTrees(rng, threshold).message() for _ in range(10)]
    for raw in raws:
        key = await blobs.inner.put(raw)  # as stored before skeletons
        await _read_back(blobs, key, raw, rng)
        assert await blobs.references(key) == set()


async def test_garbage_collection_keeps_attachments_of_referenced_messages(
    site: SqlStorage, threshold: int
) -> None:
    await site.directory.add_domain("example.org")
    account = await site.directory.add_account("bob@example.org", "pw")
    blobs = site.blobs_for(account)
    assert isinstance(blobs, SkeletonBlobStore)
    attachment = random.randbytes(threshold + random.randint(1, 5_000)).hex().encode()

    def message(n: int) -> bytes:
        return (
            f"Subject: {n}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=z\r\n"
            f"\r\n--z\r\n\r\ntext {n}\r\n--z\r\nContent-Type: application/pdf\r\n\r\n"
        ).encode() + attachment + b"\r\n--z--\r\n"  # fmt: skip

    kept = [message(n) for n in range(2)]
    for raw in kept:
        await ingest(site, [Delivery(account)], raw)
    # An ingest that died before its rows: its skeleton and its own part.
    orphan_part = random.randbytes(threshold + random.randint(1, 999)).hex().encode()
    orphan = message(9).replace(attachment, orphan_part)
    orphan_key = await blobs.put(orphan)
    (orphan_part_key,) = await blobs.references(orphan_key)
    (part_key,) = await blobs.references(hashlib.sha256(kept[0]).hexdigest())
    assert part_key == hashlib.sha256(attachment).hexdigest()

    removed = await site.collect_garbage(min_age_seconds=-60)  # all old enough
    assert removed >= 2
    keys = set(await blobs.keys())
    assert part_key in keys
    assert orphan_key not in keys and orphan_part_key not in keys
    for raw in kept:
        assert await blobs.get(hashlib.sha256(raw).hexdigest()) == raw


async def test_a_missing_attachment_part_is_named_in_the_error(
    site: SqlStorage, threshold: int
) -> None:
    """The message's skeleton is there, one of its parts is not: every read
    fails NOT_FOUND naming that part (a log must tell which blob went
    missing; the message's own key is the one that is there)."""
    from storage.errors import ErrorKind, StorageError

    blobs, raw, key, part_key = await _one_part_message(site, threshold, "carol", b"x")
    await blobs.inner.delete(part_key)
    reads = [
        lambda: blobs.get(key),
        lambda: blobs.get_range(key, 0, len(raw)),
        lambda: _drain(blobs.stream(key, random.randint(1, 4_000))),
    ]
    for read in reads:
        with pytest.raises(StorageError) as failed:
            await read()
        assert failed.value.kind is ErrorKind.NOT_FOUND
        assert part_key in str(failed.value)


async def _drain(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


async def test_garbage_collection_keeps_the_other_parts_of_a_message_missing_one(
    site: SqlStorage, threshold: int
) -> None:
    """One part of a kept message is lost (say, by an operator): its other
    parts are still referenced and garbage collection keeps them, rather
    than counting every part of the message unreferenced."""
    await site.directory.add_domain("example.org")
    account = await site.directory.add_account("dave@example.org", "pw")
    blobs = site.blobs_for(account)
    assert isinstance(blobs, SkeletonBlobStore)
    parts = [
        random.randbytes(threshold + random.randint(1, 5_000)).hex().encode() for _ in range(3)
    ]
    raw = b"Subject: y\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
    for part in parts:
        raw += b"--z\r\nContent-Type: application/pdf\r\n\r\n" + part + b"\r\n"
    raw += b"--z--\r\n"
    await ingest(site, [Delivery(account)], raw)
    key = hashlib.sha256(raw).hexdigest()
    part_keys = {hashlib.sha256(p).hexdigest() for p in parts}
    assert await blobs.references(key) == part_keys
    lost = random.choice(sorted(part_keys))
    await blobs.inner.delete(lost)
    assert await blobs.references(key) == part_keys  # the lost one still named
    await site.collect_garbage(min_age_seconds=-60)  # all old enough
    assert set(await blobs.keys()) >= part_keys - {lost}


async def test_garbage_collection_deletes_nothing_while_a_named_skeleton_reads_missing(
    site: SqlStorage, threshold: int
) -> None:
    """A row names a message whose skeleton reads as missing (lost, or a
    store that answered 404 for a moment): which parts it refers to is
    unknown, so the pass deletes nothing (TEMPORARY, retried at the next
    interval) rather than every part only it referred to. Counting
    (`blobs stats`) still works."""
    from storage.blob.audit import blob_stats
    from storage.errors import ErrorKind, StorageError

    blobs, raw, key, part_key = await _one_part_message(site, threshold, "erin", b"z")
    blobs._skeletons.clear()  # a process that has not read it yet
    original = blobs.inner.get_range

    async def missing(k: str, start: int, end: int) -> bytes:
        if k == key:
            raise StorageError(ErrorKind.NOT_FOUND, "no such blob")
        return await original(k, start, end)

    blobs.inner.get_range = missing  # type: ignore[method-assign]
    try:
        with pytest.raises(StorageError) as failed:
            await site.collect_garbage(min_age_seconds=-60)
        assert failed.value.kind is ErrorKind.TEMPORARY and key in str(failed.value)
        assert part_key in set(await blobs.keys())
        assert (await blob_stats(site)).messages >= 1
    finally:
        blobs.inner.get_range = original  # type: ignore[method-assign]
    await site.collect_garbage(min_age_seconds=-60)
    assert await blobs.get(key) == raw


async def _one_part_message(
    site: SqlStorage, threshold: int, user: str, subject: bytes
) -> tuple[SkeletonBlobStore, bytes, str, str]:
    """A message of one attachment part over the threshold, ingested for a
    new account ``user``: its store, bytes, key and the part's key."""
    await site.directory.add_domain("example.org")
    account = await site.directory.add_account(f"{user}@example.org", "pw")
    blobs = site.blobs_for(account)
    assert isinstance(blobs, SkeletonBlobStore)
    part = random.randbytes(threshold + random.randint(1, 5_000)).hex().encode()
    raw = (
        b"Subject: " + subject + b"\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n\r\ntext\r\n"
        b"--z\r\nContent-Type: application/pdf\r\n\r\n" + part + b"\r\n--z--\r\n"
    )
    await ingest(site, [Delivery(account)], raw)
    key = hashlib.sha256(raw).hexdigest()
    (part_key,) = await blobs.references(key)
    return blobs, raw, key, part_key

"""BlobStore contract, run on every blob backend (filesystem, with and
without small blobs packed into one SQLite file; S3 plugs in beside them
in ``blob_store``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.blob import open_blob_store
from storage.errors import ErrorKind, StorageError

BLOB_BACKENDS = ["fs", "fs-pack"]
# fs-pack: blobs up to 64 KiB packed; the 3 MB file of test_put_file_streams
# still goes to a file of its own.
PACK_MAX = 64 * 1024


@pytest.fixture(params=BLOB_BACKENDS)
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    pack = PACK_MAX if request.param == "fs-pack" else 0
    store = open_blob_store(tmp_path / "blobs", pack_max_bytes=pack)
    try:
        yield store
    finally:
        await store.close()


RAW = b"From: a@example.net\r\nSubject: x\r\n\r\nbody\r\n"


async def test_put_get_byte_exact(blobs) -> None:
    data = bytes(range(256)) * 10 + b"\r\n.\r\n\x00"
    key = await blobs.put(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert await blobs.get(key) == data
    assert await blobs.exists(key)


async def test_same_bytes_same_key(blobs) -> None:
    k1 = await blobs.put(RAW)
    k2 = await blobs.put(bytearray(RAW))
    assert k1 == k2
    assert await blobs.keys() == [k1]
    assert await blobs.put(RAW + b"x") != k1


async def test_empty_blob(blobs) -> None:
    key = await blobs.put(b"")
    assert await blobs.get(key) == b""


async def test_put_file_streams(blobs, tmp_path: Path) -> None:
    src = tmp_path / "big.eml"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    key = await blobs.put_file(src)
    assert key == hashlib.sha256(data).hexdigest()
    assert await blobs.get(key) == data
    assert await blobs.put_file(src) == key  # idempotent
    chunks = [c async for c in blobs.stream(key, chunk_size=1 << 20)]
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= 1 << 20 and len(chunks) == 4


async def test_ranges(blobs) -> None:
    key = await blobs.put(RAW)
    assert await blobs.get_range(key, 0, 4) == b"From"
    assert await blobs.get_range(key, 6, 19) == RAW[6:19]
    assert await blobs.get_range(key, len(RAW) - 2, len(RAW) + 100) == b"\r\n"
    assert await blobs.get_range(key, 5, 5) == b""
    with pytest.raises(StorageError) as err:
        await blobs.get_range(key, 5, 2)
    assert err.value.kind is ErrorKind.INVALID


async def test_missing_and_delete(blobs) -> None:
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not await blobs.exists(missing)
    with pytest.raises(StorageError) as err:
        await blobs.get(missing)
    assert err.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(StorageError):
        [c async for c in blobs.stream(missing)]
    key = await blobs.put(RAW)
    await blobs.delete(key)
    assert not await blobs.exists(key)
    await blobs.delete(key)  # idempotent
    assert await blobs.keys() == []


async def test_bad_keys_are_refused(blobs) -> None:
    for bad in ("../../etc/passwd", "ABC", "0" * 63, "g" * 64):
        with pytest.raises(StorageError) as err:
            await blobs.get(bad)
        assert err.value.kind is ErrorKind.INVALID


async def test_no_temp_files_left(blobs, tmp_path: Path) -> None:
    await blobs.put(RAW)
    src = tmp_path / "m.eml"
    src.write_bytes(RAW * 3)
    await blobs.put_file(src)
    leftovers = [p for p in (tmp_path / "blobs").rglob(".tmp-*")]
    assert leftovers == []


async def test_stored_at_and_conditional_delete(blobs) -> None:
    """Garbage collection's view: a blob stored again after the time GC read
    is not deleted by it (an ingest of the same bytes may be using it)."""
    import time

    key = await blobs.put(RAW)
    first = await blobs.stored_at(key)
    assert abs(first - time.time()) < 60
    await blobs.delete(key, stored_before=first - 1)  # stored after that: kept
    assert await blobs.exists(key)
    await blobs.delete(key, stored_before=first + 1)
    assert not await blobs.exists(key)
    with pytest.raises(StorageError) as err:
        await blobs.stored_at(key)
    assert err.value.kind is ErrorKind.NOT_FOUND


@pytest.mark.parametrize("size", ["small", "large"])
async def test_storing_the_same_bytes_again_refreshes_stored_at(
    blobs, tmp_path: Path, size: str
) -> None:
    """An ingest of bytes already there marks them stored now, so garbage
    collection and a move's cleanup (``delete(stored_before=...)`` with a
    time read before) spare them while that ingest commits."""
    import asyncio
    import random

    n = random.randint(1, 999) if size == "small" else PACK_MAX + random.randint(1, 99_999)
    data = os.urandom(n)
    key = await blobs.put(data)
    first = await blobs.stored_at(key)
    for again in ("put", "put_file"):
        await asyncio.sleep(0.02)
        if again == "put":
            assert await blobs.put(data) == key
        else:
            path = tmp_path / "again.eml"
            path.write_bytes(data)
            assert await blobs.put_file(path) == key
        later = await blobs.stored_at(key)
        assert later > first, again
        await blobs.delete(key, stored_before=later - 0.01)  # as GC having looked before
        assert await blobs.get(key) == data
        first = later

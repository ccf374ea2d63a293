"""A spooled message's big parts go to the blob store straight from its file
(``SkeletonBlobStore.put_file``, issue #21), on the filesystem and on S3
(Swift's s3api on loopback, tests/swiftserver.py): byte-exact for
attachments of random sizes either side of the threshold, of the 1 MiB
read chunk and of S3's multipart part, split from the ingest's own parse
or from the store's; and a 20 MB attachment is never held in memory."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import random
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.blob import open_blob_store
from storage.blob.s3 import S3BlobStore, S3Config
from storage.blob.skeleton import _CHUNK, MAGIC, SkeletonBlobStore, _plan_file
from storage.mime import parse_message
from tests.mimetrees import MimeTrees

MIB = 1024 * 1024
PART = 5 * MIB  # S3's smallest multipart part, and the test store's threshold


@pytest.fixture
def seed() -> int:
    seed = int(os.environ.get("SHARDMAIL_TEST_SEED") or random.randrange(2**32))
    print(f"seed {seed} (SHARDMAIL_TEST_SEED={seed} repeats the run)")
    return seed


@pytest.fixture(params=["fs", "s3"])
async def inner(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    if request.param == "s3":
        from tests.swiftserver import SwiftServer

        server = await asyncio.to_thread(SwiftServer.shared)
        url = server.blob_url(f"stream-{uuid.uuid4().hex}")
        # Parts of 5 MiB: a 6-11 MB attachment goes up in two or three.
        config = dataclasses.replace(
            S3Config.from_url(url), multipart_threshold=PART, part_size=PART
        )
        store: object = S3BlobStore(config)
    else:
        store = open_blob_store(tmp_path / "blobs")
    try:
        yield store
    finally:
        await store.close()  # type: ignore[attr-defined]


def _base64_lines(data: bytes, rng: random.Random) -> bytes:
    """``data`` in base64, lines of 76 (RFC 2045 section 6.8) or of a
    random length, so part lengths are not multiples of anything."""
    text = base64.b64encode(data)
    width = rng.choice([76, rng.randint(40, 76)])
    return b"\r\n".join(text[i : i + width] for i in range(0, len(text), width))


def _message(rng: random.Random, bodies: list[tuple[str, bytes]]) -> bytes:
    """multipart/mixed: a short text part, then each (encoding, body)."""
    out = [
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n"
        b"Content-Type: text/plain\r\n\r\n" + rng.randbytes(rng.randint(1, 900)).hex().encode()
    ]
    for n, (encoding, body) in enumerate(bodies):
        out.append(
            b"\r\n--zz\r\nContent-Type: application/octet-stream; name=f%d\r\n"
            b"Content-Transfer-Encoding: %s\r\n\r\n" % (n, encoding.encode()) + body
        )
    out.append(b"\r\n--zz--\r\n")
    return b"".join(out)


def _sizes(rng: random.Random, threshold: int) -> list[int]:
    """Encoded sizes around the threshold and across the 1 MiB chunk."""
    return [
        threshold + rng.randint(1, 3),  # just over: kept apart
        threshold - rng.randint(0, 3),  # at or just under: stays in the skeleton
        _CHUNK + rng.randint(-5_000, 5_000) | 1,  # across the read chunk, odd
        rng.randint(2 * _CHUNK, 3 * _CHUNK) | 1,
        rng.randint(threshold + 1, 4 * threshold),
    ]


def _encoded(rng: random.Random, size: int) -> bytes:
    """Base64 lines of exactly ``size`` octets."""
    body = _base64_lines(rng.randbytes(size * 3 // 4 + 3), rng)[:size]
    return body.rstrip(b"\r\n").ljust(size, b"A")


async def _check(store: SkeletonBlobStore, path: Path, raw: bytes, parts: set[bytes]) -> None:
    """Stored from ``path`` (its parse given, then not): reads back
    byte-exact, references exactly ``parts`` and keeps each as it is."""
    body = parse_message(raw).body
    assert _plan_file(path, store.min_bytes, body) == _plan_file(path, store.min_bytes, None)
    for given in (body, None):
        key = await store.put_file(path, body=given)
        assert key == hashlib.sha256(raw).hexdigest()
        assert await store.get(key) == raw
        assert b"".join([c async for c in store.stream(key, 65_537)]) == raw
        at = random.randrange(len(raw))
        assert await store.get_range(key, at, at + 3 * _CHUNK) == raw[at : at + 3 * _CHUNK]
        expected = {hashlib.sha256(p).hexdigest() for p in parts}
        assert await store.references(key) == expected
        assert store.parts_of(key) == expected
        for part in parts:
            assert await store.get(hashlib.sha256(part).hexdigest()) == part


def _store(
    inner: object, seed: int, low: int, high: int
) -> tuple[random.Random, int, SkeletonBlobStore]:
    """The test's random source, a threshold in ``low`` .. ``high`` and a
    store splitting parts over it."""
    rng = random.Random(seed)
    threshold = rng.randint(low, high)
    return rng, threshold, SkeletonBlobStore(inner, threshold)


async def test_big_parts_stream_from_the_file_byte_exact(
    inner: object, tmp_path: Path, seed: int
) -> None:
    rng, threshold, store = _store(inner, seed, 60_000, 70_000)
    sizes = _sizes(rng, threshold)
    bodies = [("base64", _encoded(rng, n)) for n in sizes]
    # An 8-bit part that looks like a skeleton: kept as one with no refs.
    magic = MAGIC + rng.randbytes(threshold + rng.randint(1, 999)).hex().encode()
    bodies.insert(rng.randrange(len(bodies)), ("8bit", magic))
    # S3's multipart path: over one 5 MiB part, not a multiple of it.
    bodies.append(("base64", _encoded(rng, PART + rng.randint(1, 3 * MIB) | 1)))
    raw = _message(rng, bodies)
    path = tmp_path / "message.eml"
    path.write_bytes(raw)
    await _check(store, path, raw, {b for _, b in bodies if len(b) > threshold})

    # A message that starts like a skeleton and has no part to keep apart.
    crafted = MAGIC + raw[: threshold * 2]
    path.write_bytes(crafted)
    key = await store.put_file(path)
    assert await store.get(key) == crafted
    assert await store.references(key) == set()


async def test_random_mime_trees_from_files_byte_exact(
    inner: object, tmp_path: Path, seed: int
) -> None:
    rng, threshold, store = _store(inner, seed, 500, 6_000)
    trees = MimeTrees(rng, threshold)
    split = 0
    for n in range(rng.randint(8, 14)):
        raw = trees.message()
        path = tmp_path / f"{n}.eml"
        path.write_bytes(raw)
        key = await store.put_file(path, body=parse_message(raw).body if n % 2 else None)
        assert key == hashlib.sha256(raw).hexdigest()
        assert await store.get(key) == raw
        assert b"".join([c async for c in store.stream(key, rng.randint(1, 5_000))]) == raw
        split += bool(await store.references(key))
    assert split > 0, "no message had a part over the threshold"


async def test_a_20_mb_attachment_is_never_held_in_memory(
    inner: object, tmp_path: Path, seed: int
) -> None:
    """The part goes from the file to the store in chunks: the peak of
    Python's allocations while it is stored stays a few MB, where reading
    it whole (as before) costs its 20 MB at least."""
    rng = random.Random(seed)
    store = SkeletonBlobStore(inner)
    attachment = _encoded(rng, 20_000_000 + rng.randint(1, 99_999))
    raw = _message(rng, [("base64", attachment)])
    path = tmp_path / "big.eml"
    path.write_bytes(raw)
    body = parse_message(raw).body
    expected = hashlib.sha256(attachment).hexdigest()
    del raw, attachment
    for given in (body, None):
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            key = await store.put_file(path, body=given)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert await store.references(key) == {expected}
        print(f"put_file (parse given: {given is not None}): {(peak - before) / MIB:.2f} MiB")
        assert peak - before < 4 * MIB, f"{(peak - before) / MIB:.1f} MiB held"

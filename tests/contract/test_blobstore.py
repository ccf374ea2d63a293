"""BlobStore contract, run on every blob backend: the filesystem, with and
without small blobs packed into one SQLite file, and S3 on a real
S3-compatible server the suite starts on loopback (OpenStack Swift's s3api,
tests/swiftserver.py). S3's retries and error mapping are also checked
against a small fake server that injects failures."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from storage.blob import open_blob_store
from storage.blob.s3 import S3BlobStore, S3Config
from storage.errors import ErrorKind, StorageError

BLOB_BACKENDS = ["fs", "fs-pack", "s3"]
# fs-pack: blobs up to 64 KiB packed; the 3 MB file of test_put_file_streams
# still goes to a file of its own.
PACK_MAX = 64 * 1024


@pytest.fixture(params=BLOB_BACKENDS)
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    if request.param == "s3":
        from tests.swiftserver import SwiftServer

        # Fails (never skips) with the daemons' logs if Swift cannot start.
        server = await asyncio.to_thread(SwiftServer.shared)
        store = open_blob_store(server.blob_url(f"contract-{uuid.uuid4().hex}"))
    else:
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


async def test_stream_range_is_byte_exact_and_clipped(blobs) -> None:
    """Random ranges of a blob of random size, streamed in chunks of random
    size (never a divisor of the size): the bytes of the range, in chunks
    of exactly the chunk size but the last, clipped to the blob."""
    rng = random.Random()
    data = os.urandom(rng.randint(100_000, 700_000))
    key = await blobs.put(data)
    for _ in range(8):
        start = rng.randint(0, len(data) + 10)
        end = rng.choice([None, rng.randint(start, len(data) + 1000)])
        chunk = rng.randint(1, 200_000)
        chunks = [c async for c in blobs.stream_range(key, start, end, chunk)]
        assert b"".join(chunks) == data[start:end]
        assert all(len(c) == chunk for c in chunks[:-1]) and all(chunks)
    with pytest.raises(StorageError) as err:
        [c async for c in blobs.stream_range(key, 5, 2)]
    assert err.value.kind is ErrorKind.INVALID
    with pytest.raises(StorageError) as err:
        [c async for c in blobs.stream_range(hashlib.sha256(b"none").hexdigest(), 3, 9)]
    assert err.value.kind is ErrorKind.NOT_FOUND


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


async def test_sizes_across_the_multipart_threshold(blobs, tmp_path: Path) -> None:
    """Blobs just under and over S3's multipart threshold and over several
    parts, random sizes (multiples of nothing), random bytes: stored with
    put and put_file, read back whole, by ranges and streamed, byte-exact."""
    threshold, part = S3Config.multipart_threshold, S3Config.part_size
    sizes = [
        threshold - random.randint(1, 4096),
        threshold + random.randint(1, 4096),
        2 * part + random.randint(1, part - 1),
    ]
    stored = []
    for n, size in enumerate(sizes):
        data = os.urandom(size)
        if n % 2:
            src = tmp_path / f"m{n}.eml"
            src.write_bytes(data)
            key = await blobs.put_file(src)
        else:
            key = await blobs.put(data)
        assert key == hashlib.sha256(data).hexdigest()
        assert await blobs.get(key) == data
        start = random.randrange(size)
        end = min(size + 10, start + random.randint(0, 3 * part))
        assert await blobs.get_range(key, start, end) == data[start:end]
        chunk = random.randint(1000, 3 * 1024 * 1024)
        chunks = [c async for c in blobs.stream(key, chunk_size=chunk)]
        assert b"".join(chunks) == data
        assert all(len(c) == chunk for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk
        stored.append(key)
    assert await blobs.keys() == sorted(stored)


# --- S3 failures, against a fake server on loopback ---------------------------


class FakeS3:
    """Just enough of S3 on 127.0.0.1 (any credentials): PUT, GET with
    ranges, HEAD, DELETE, multipart. ``fail``: answers it gives first, by
    method (a status; "drop": send half a GET's body and hang up; "lost":
    do it, then answer 503 as if the answer had been lost)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.fail: dict[str, list[int | str]] = {}
        self.seen: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def store(self, **changes: object) -> S3BlobStore:
        config = S3Config.from_url(
            f"s3://bucket/pre?endpoint=http://127.0.0.1:{self.port}"
            "&access_key_id=k&secret_access_key=s"
        )
        changes = {"backoff_base": 0.001, "backoff_max": 0.01, **changes}
        return S3BlobStore(dataclasses.replace(config, **changes))  # type: ignore[arg-type]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        what = request.method + (" part" if "partNumber" in q else "")
        what += " uploads" if "uploads" in q else ""
        self.seen.append(what if "uploadId" not in q or "partNumber" in q else what + " upload")
        failing = self.fail.get(what)
        body = await request.read()
        name = request.path
        answer = failing.pop(0) if failing else None
        if answer == "lost":  # done, but the answer never arrives
            await self.answer(request, name, body)
            return web.Response(status=503)
        if answer is not None:
            if answer == "drop" and name in self.objects:
                status, data = _ranged(request, self.objects[name])
                resp = web.StreamResponse(status=status, headers={"ETag": '"e"'})
                resp.content_length = len(data)
                await resp.prepare(request)
                await resp.write(data[: len(data) // 2])
                assert request.transport is not None
                request.transport.close()
                return resp
            return web.Response(status=int(answer))
        return await self.answer(request, name, body)

    async def answer(self, request: web.Request, name: str, body: bytes) -> web.Response:
        q = request.query
        if "uploads" in q:
            upload = uuid.uuid4().hex
            self.uploads[upload] = {}
            return web.Response(
                text=f"<InitiateMultipartUploadResult><UploadId>{upload}</UploadId>"
                "</InitiateMultipartUploadResult>"
            )
        if "uploadId" in q:
            if q["uploadId"] not in self.uploads:
                return web.Response(status=404, text="<Error><Code>NoSuchUpload</Code></Error>")
            parts = self.uploads[q["uploadId"]]
            if request.method == "PUT":
                parts[int(q["partNumber"])] = body
                return web.Response(headers={"ETag": f'"{len(parts)}"'})
            if request.method == "DELETE":
                del self.uploads[q["uploadId"]]
                return web.Response(status=204)
            self.objects[name] = b"".join(parts[n] for n in sorted(parts))
            del self.uploads[q["uploadId"]]
            return web.Response(text="<CompleteMultipartUploadResult/>")
        if request.method == "PUT":
            assert hashlib.sha256(body).hexdigest() == request.headers["x-amz-content-sha256"]
            self.objects[name] = body
            return web.Response()
        if name not in self.objects:
            return web.Response(status=404)
        data = self.objects[name]
        if request.method == "DELETE":
            del self.objects[name]
            return web.Response(status=204)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        status, data = _ranged(request, data)
        return web.Response(status=status, body=data, headers={"ETag": '"e"'})


def _ranged(request: web.Request, data: bytes) -> tuple[int, bytes]:
    """A GET's status and body: 206 and the range ("bytes=first-[last]") if
    it asks for one, else 200 and the whole object."""
    if "Range" not in request.headers:
        return 200, data
    first, _, last = request.headers["Range"].split("=")[1].partition("-")
    return 206, data[int(first) : int(last) + 1 if last else None]


@pytest.fixture
async def fake_s3() -> AsyncIterator[FakeS3]:
    fake = FakeS3()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_s3_retries_5xx_and_429_then_succeeds(fake_s3: FakeS3, status: int) -> None:
    store = fake_s3.store()
    data = os.urandom(random.randint(1, 100_000))
    fake_s3.fail = {"PUT": [status, status], "GET": [status], "HEAD": [status]}
    try:
        key = await store.put(data)
        assert await store.get(key) == data
        assert await store.exists(key)
    finally:
        await store.close()
    assert fake_s3.seen == ["PUT"] * 3 + ["GET"] * 2 + ["HEAD"] * 2


async def test_s3_gives_up_after_bounded_tries_with_a_temporary_error(fake_s3: FakeS3) -> None:
    """A server failing every time: TEMPORARY (SMTP then answers 4xx) after
    exactly ``attempts`` tries, and the blob is not acknowledged."""
    store = fake_s3.store(attempts=4)
    fake_s3.fail = {"PUT": [503] * 10}
    try:
        with pytest.raises(StorageError) as err:
            await store.put(os.urandom(random.randint(1, 5000)))
    finally:
        await store.close()
    assert err.value.kind is ErrorKind.TEMPORARY
    assert fake_s3.seen == ["PUT"] * 4 and fake_s3.objects == {}


async def test_s3_unreachable_endpoint_is_a_temporary_error() -> None:
    """Nothing listens there (a port just closed): every call is TEMPORARY,
    never NOT_FOUND or a traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = S3Config.from_url(
        f"s3://bucket/p?endpoint=http://127.0.0.1:{port}&access_key_id=k&secret_access_key=s"
    )
    store = S3BlobStore(dataclasses.replace(config, backoff_base=0.001, attempts=3))
    key = hashlib.sha256(b"x").hexdigest()
    calls = [
        store.put(os.urandom(100)),
        store.get(key),
        store.get_range(key, 0, 10),
        store.exists(key),
        store.stored_at(key),
        store.delete(key),
        store.keys(),
    ]
    try:
        for call in calls:
            with pytest.raises(StorageError) as err:
                await call
            assert err.value.kind is ErrorKind.TEMPORARY
        with pytest.raises(StorageError) as err:
            [c async for c in store.stream(key)]
        assert err.value.kind is ErrorKind.TEMPORARY
    finally:
        await store.close()


async def test_s3_stream_resumes_where_the_connection_dropped(fake_s3: FakeS3) -> None:
    store = fake_s3.store()
    data = os.urandom(random.randint(200_000, 900_000))
    try:
        key = await store.put(data)
        fake_s3.fail = {"GET": ["drop"]}
        chunk = random.randint(1000, 70_000)
        chunks = [c async for c in store.stream(key, chunk_size=chunk)]
    finally:
        await store.close()
    assert b"".join(chunks) == data
    assert all(len(c) == chunk for c in chunks[:-1])
    assert fake_s3.seen == ["PUT", "GET", "GET"]


async def test_s3_stream_range_is_one_get_and_resumes_within_the_range(
    fake_s3: FakeS3,
) -> None:
    """A range is read from ONE ranged GET whatever the chunk size (the
    old FETCH path sent one per 256 KiB); a connection dropped midway
    resumes from the octet after the last one received, up to the same end."""
    store = fake_s3.store()
    data = os.urandom(random.randint(1_000_000, 3_000_000))
    start = random.randint(1, 300_000)
    end = random.randint(len(data) - 300_000, len(data) - 1)
    chunk = random.randint(1000, 70_000)
    try:
        key = await store.put(data)
        whole = [c async for c in store.stream_range(key, start, end, chunk)]
        assert fake_s3.seen == ["PUT", "GET"]
        fake_s3.fail = {"GET": ["drop"]}
        resumed = [c async for c in store.stream_range(key, start, end, chunk)]
    finally:
        await store.close()
    assert b"".join(whole) == b"".join(resumed) == data[start:end]
    assert all(len(c) == chunk for c in resumed[:-1])
    assert fake_s3.seen == ["PUT", "GET", "GET", "GET"]


async def test_s3_multipart_upload_byte_exact_and_aborted_on_failure(fake_s3: FakeS3) -> None:
    """Over the threshold: parts, then CompleteMultipartUpload; a part the
    server keeps refusing aborts the upload (no parts left behind) and the
    put is TEMPORARY."""
    store = fake_s3.store(multipart_threshold=1000, part_size=1000 + random.randint(0, 999))
    data = os.urandom(random.randint(5000, 20_000))
    try:
        key = await store.put(data)
        assert await store.get(key) == data
        assert fake_s3.uploads == {}
        fake_s3.fail = {"PUT part": [500] * 100}
        with pytest.raises(StorageError) as err:
            await store.put(os.urandom(random.randint(3000, 9000)))
        assert err.value.kind is ErrorKind.TEMPORARY
    finally:
        await store.close()
    assert fake_s3.uploads == {} and "DELETE upload" in fake_s3.seen


async def test_s3_multipart_completed_but_answer_lost_is_stored(fake_s3: FakeS3) -> None:
    """CompleteMultipartUpload done but its answer lost: the retry finds no
    such upload, and the put succeeds, since the whole object is there."""
    store = fake_s3.store(multipart_threshold=1000, part_size=1000 + random.randint(0, 999))
    data = os.urandom(random.randint(5000, 20_000))
    fake_s3.fail = {"POST": ["lost"]}
    try:
        key = await store.put(data)
        assert await store.get(key) == data
    finally:
        await store.close()
    assert fake_s3.seen.count("POST upload") == 2 and "DELETE upload" not in fake_s3.seen


async def test_s3_keys_pages_through_a_long_listing() -> None:
    """keys() follows ListObjects' pages (IsTruncated, marker) on Swift: a
    page of a few keys makes a listing of many pages, and every key comes
    back once, and only this prefix's keys."""
    from tests.swiftserver import SwiftServer

    server = await asyncio.to_thread(SwiftServer.shared)
    url = server.blob_url(f"paging-{uuid.uuid4().hex}")
    page = random.randint(2, 4)
    store = S3BlobStore(dataclasses.replace(S3Config.from_url(url), list_page=page))
    neighbour = open_blob_store(url.replace("paging-", "paging-other-", 1))
    try:
        await neighbour.put(os.urandom(10))
        stored = {await store.put(os.urandom(random.randint(0, 500))) for _ in range(3 * page + 1)}
        assert await store.keys() == sorted(stored)
    finally:
        await store.close()
        await neighbour.close()


async def test_skeleton_on_s3_reads_each_stored_piece_with_one_get(fake_s3: FakeS3) -> None:
    """A message kept as a skeleton and its attachment blobs
    (storage/blob/skeleton.py): streamed whole, it costs one GET per stored
    piece; any range of it, byte-exact across the pieces' edges."""
    from storage.blob.skeleton import SkeletonBlobStore

    rng = random.Random()
    store = SkeletonBlobStore(fake_s3.store(), min_bytes=64 * 1024)
    bodies = [
        base64.encodebytes(os.urandom(rng.randint(100_000, 900_000)))
        for _ in range(rng.randint(2, 4))
    ]
    raw = (
        b"Subject: s\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
        + b"".join(
            b"--z\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body + b"\r\n" for body in bodies
        )
        + b"--z--\r\n"
    )
    try:
        key = await store.put(raw)
        fake_s3.seen.clear()
        chunk = rng.randint(1000, 300_000)
        chunks = [c async for c in store.stream_range(key, 0, None, chunk)]
        assert b"".join(chunks) == raw
        assert all(len(c) == chunk for c in chunks[:-1])
        assert fake_s3.seen == ["GET"] * (1 + len(bodies))
        edges = [raw.index(body) for body in bodies] + [raw.index(b) + len(b) for b in bodies]
        for edge in edges:
            start = max(0, edge - rng.randint(0, 5000))
            end = edge + rng.randint(1, 200_000)
            got = [c async for c in store.stream_range(key, start, end, chunk)]
            assert b"".join(got) == raw[start:end]
    finally:
        await store.close()


async def test_s3_a_read_that_meets_a_passing_404_is_asked_again(fake_s3: FakeS3) -> None:
    """A blob stored again while it is read may answer 404 for a moment
    (Swift's object server, when the file it listed was replaced before
    it opened it): every read asks again before it says NOT_FOUND, and a
    blob that stays missing is NOT_FOUND after the retries."""
    store = fake_s3.store()
    data = os.urandom(random.randint(70_000, 400_000))
    try:
        key = await store.put(data)
        start = random.randint(0, len(data) - 2)
        end = random.randint(start + 1, len(data))
        reads = [
            ("get", lambda: store.get(key), data),
            ("range", lambda: store.get_range(key, start, end), data[start:end]),
            ("stream", lambda: _joined(store.stream(key, random.randint(1, 70_000))), data),
            (
                "stream range",
                lambda: _joined(store.stream_range(key, start, end, random.randint(1, 9_000))),
                data[start:end],
            ),
        ]
        for name, read, want in reads:
            fake_s3.fail = {"GET": [404] * random.randint(1, 2)}
            assert await read() == want, name
        missing = "0" * 64
        for name, read in [
            ("get", lambda: store.get(missing)),
            ("stream", lambda: _joined(store.stream(missing))),
        ]:
            fake_s3.seen.clear()
            with pytest.raises(StorageError) as err:
                await read()
            assert err.value.kind is ErrorKind.NOT_FOUND, name
            assert fake_s3.seen == ["GET"] * 3, name
    finally:
        await store.close()


async def _joined(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])

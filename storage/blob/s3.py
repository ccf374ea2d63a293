"""S3-compatible blob store: ``s3://bucket/prefix`` holds ``prefix/<sha256>``.

A small client of our own over aiohttp (already a dependency) signing with
AWS Signature Version 4: the seam needs a dozen calls (PUT, ranged GET,
HEAD, DELETE, list, multipart), and owning them keeps the error mapping
exact (404: NOT_FOUND; anything the server or network cannot do now:
TEMPORARY, so SMTP answers 4xx), the retry policy ours, and a PUT's
payload hash free: the key *is* the SHA-256 of the bytes, which SigV4 sends
as ``x-amz-content-sha256`` and the server checks.

Durability: a put returns only after the server answered 200 to the PUT
(or to CompleteMultipartUpload, whose 200 may still carry an error, which
is checked). Blobs above ``multipart_threshold`` go up in parts of
``part_size`` bytes, a few at a time, so a 25 MB message is never copied
whole. A file (:meth:`S3BlobStore.put_file`, and a range of one,
:meth:`S3BlobStore.put_file_range`: an attachment of a spooled message) is
sent as it is read, in chunks of ``_SEND_CHUNK`` bytes: each request's
payload hash comes from a first read of its bytes, so at most a chunk per
request in flight is in memory, whatever the blob's size.

Every request is retried with exponential backoff and jitter on 5xx, 429,
timeouts and connection errors, a bounded number of times; then it is a
TEMPORARY error.

"When stored" (:meth:`S3BlobStore.stored_at`, for garbage collection) is
the object's ``x-amz-meta-stored`` (a Unix time with microseconds, set by
each put: storing the same bytes again re-uploads and so refreshes it);
``Last-Modified`` has only whole seconds. A conditional delete reads it
with HEAD then deletes, so a put between the two is NOT seen: S3 has no
delete conditional on that (``If-Match`` compares ETags, the same for the
same bytes stored again; Swift's s3api ignores it on DELETE). Garbage
collection does not rely on it: writers learn of a deletion from the
database (``storage/blob/deleting.py``, ``storage/blob/gc.py``).

Configuration, in the URL or else the environment::

    s3://bucket/prefix?endpoint=http://127.0.0.1:8080&region=us-east-1
        &access_key_id=...&secret_access_key=...&addressing=path|virtual

``endpoint``: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS's
regional endpoint; ``region``: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
else us-east-1; credentials: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``). Addressing is
path-style (``endpoint/bucket/key``, what self-hosted servers such as
Swift, MinIO and Ceph expect) with an endpoint given, virtual-hosted on AWS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import logging
import os
import random
import re
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from storage.blob.key import content_key
from storage.errors import ErrorKind, StorageError

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[0-9a-f]{64}$")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MIB = 1024 * 1024
# Bytes of a file read at a time to hash it, and to send it.
_HASH_CHUNK = MIB
_SEND_CHUNK = 256 * 1024
_T = TypeVar("_T")


def _check_key(key: str) -> str:
    if not _KEY.match(key):
        raise StorageError(ErrorKind.INVALID, "bad blob key")
    return key


@dataclass(frozen=True)
class S3Config:
    """Where and how to reach the bucket. ``part_size`` is at least 5 MiB
    (S3's smallest part but the last)."""

    bucket: str
    prefix: str
    endpoint: str
    region: str
    access_key_id: str
    secret_access_key: str
    session_token: str = ""
    path_style: bool = True
    multipart_threshold: int = 8 * MIB
    part_size: int = 8 * MIB
    part_concurrency: int = 4
    attempts: int = 5  # tries per request before TEMPORARY
    backoff_base: float = 0.1  # seconds; doubles each retry, with jitter
    backoff_max: float = 2.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    list_page: int = 1000  # keys per ListObjects request (S3 gives at most 1000)
    # A read answered 404 is asked again this many times (after 50 ms, then
    # 200 ms) before it is NOT_FOUND: see S3BlobStore._reading.
    missing_retries: int = 2

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None) -> S3Config:
        """Parses ``s3://bucket/prefix?...`` (see the module docstring)."""
        env = os.environ if env is None else env
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StorageError(ErrorKind.INVALID, "an S3 blob URL is s3://bucket/prefix")
        query = dict(urllib.parse.parse_qsl(parts.query))
        unknown = set(query) - {
            "endpoint",
            "region",
            "access_key_id",
            "secret_access_key",
            "session_token",
            "addressing",
        }
        if unknown:
            raise StorageError(ErrorKind.INVALID, f"unknown S3 URL parameters {sorted(unknown)}")
        region = query.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        region = region or "us-east-1"
        endpoint = (
            query.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        )
        addressing = query.get("addressing") or ("path" if endpoint else "virtual")
        if addressing not in ("path", "virtual"):
            raise StorageError(ErrorKind.INVALID, 'S3 addressing is "path" or "virtual"')
        access = query.get("access_key_id") or env.get("AWS_ACCESS_KEY_ID", "")
        secret = query.get("secret_access_key") or env.get("AWS_SECRET_ACCESS_KEY", "")
        if not access or not secret:
            raise StorageError(
                ErrorKind.INVALID,
                "S3 credentials missing (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
            )
        return cls(
            bucket=parts.netloc,
            prefix=parts.path.strip("/"),
            endpoint=(endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/"),
            region=region,
            access_key_id=access,
            secret_access_key=secret,
            session_token=query.get("session_token") or env.get("AWS_SESSION_TOKEN", ""),
            path_style=addressing == "path",
        )


# --- AWS Signature Version 4 ------------------------------------------------


def _quote(text: str, safe: str = "") -> str:
    # SigV4 encodes everything but RFC 3986's unreserved characters.
    return urllib.parse.quote(text, safe="-_.~" + safe)


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    payload_sha256: str,
    access_key_id: str,
    secret_access_key: str,
    region: str,
    *,
    session_token: str = "",
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """``headers`` plus Host, X-Amz-Date, X-Amz-Content-Sha256 and the
    Authorization of AWS Signature Version 4 for service ``s3``. ``url``'s
    path and query must already be percent-encoded as they will be sent."""
    now = now or datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    parts = urllib.parse.urlsplit(url)
    out = {k: v for k, v in headers.items()}
    out["host"] = parts.netloc
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = payload_sha256
    if session_token:
        out["x-amz-security-token"] = session_token
    signed = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
    names = sorted(n for n in signed if n == "host" or n.startswith(("x-amz-", "content-")))
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            "&".join(f"{_quote(k)}={_quote(v)}" for k, v in query),
            "".join(f"{n}:{signed[n]}\n" for n in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret_access_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return out


# --- the store --------------------------------------------------------------


class _Retry(Exception):
    """A failure worth another try (5xx, 429, timeout, connection)."""


@dataclass(frozen=True)
class _FileBody:
    """A request payload read from a file when sent: bytes ``lo`` ..
    ``hi`` of ``prefix`` followed by the file's bytes from ``start`` on.
    Each send (a retry too) reads it again; never held whole."""

    path: Path
    prefix: bytes
    start: int
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo

    def read_chunks(self, size: int) -> Iterator[bytes]:
        """The payload in chunks of at most ``size`` bytes (blocking);
        TEMPORARY if the file is shorter than the payload."""
        lo, hi = self.lo, self.hi
        if lo < len(self.prefix):
            head = self.prefix[lo:hi]
            yield head
            lo += len(head)
        if lo >= hi:
            return
        with open(self.path, "rb") as f:
            f.seek(self.start + lo - len(self.prefix))
            while lo < hi:
                chunk = f.read(min(size, hi - lo))
                if not chunk:
                    raise StorageError(ErrorKind.TEMPORARY, "the file shrank while stored")
                lo += len(chunk)
                yield chunk

    def sha256(self) -> str:
        """The payload's SHA-256 (blocking: one read of it)."""
        digest = hashlib.sha256()
        for chunk in self.read_chunks(_SEND_CHUNK):  # several parts at once: small
            digest.update(chunk)
        return digest.hexdigest()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The payload as it is read, a thread hop per chunk."""
        reader = self.read_chunks(_SEND_CHUNK)
        try:
            while chunk := await asyncio.to_thread(next, reader, b""):
                yield chunk
        finally:
            reader.close()


@dataclass
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def _xml_text(body: bytes, tag: str) -> str | None:
    """The text of the first element named ``tag`` (any namespace)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag == tag or el.tag.endswith("}" + tag):
            return el.text or ""
    return None


class S3BlobStore:
    """A :class:`storage.api.BlobStore` over an S3-compatible bucket."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def root(self) -> str:
        """Where the blobs are, for logs (no credentials)."""
        return f"s3://{self.config.bucket}/{self.config.prefix}"

    def migrate_layout(self) -> int:
        """Nothing to migrate: an S3 store has one flat layout."""
        return 0

    # --- HTTP ---------------------------------------------------------------

    def _url(self, key: str | None, query: Mapping[str, str] | None = None) -> str:
        c = self.config
        name = "/".join(p for p in (c.prefix, key) if p) if key is not None else None
        if c.path_style:
            base = f"{c.endpoint}/{_quote(c.bucket)}"
        else:
            scheme, rest = c.endpoint.split("://", 1)
            base = f"{scheme}://{c.bucket}.{rest}"
        path = f"{base}/{_quote(name, safe='/')}" if name is not None else f"{base}/"
        if query:
            path += "?" + "&".join(
                f"{_quote(k)}={_quote(v)}" if v != "" else _quote(k)
                for k, v in sorted(query.items())
            )
        return path

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._loop = loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self.config.connect_timeout,
                    sock_connect=self.config.connect_timeout,
                    sock_read=self.config.read_timeout,
                ),
                auto_decompress=False,
            )
        return self._session

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """``attempt()`` until it does not raise :class:`_Retry`, at most
        ``attempts`` times with exponential backoff; then TEMPORARY."""
        c = self.config
        for n in range(c.attempts):
            try:
                return await attempt()
            except (TimeoutError, _Retry, aiohttp.ClientError, OSError) as err:
                last = err
                if n + 1 < c.attempts:
                    delay = min(c.backoff_max, c.backoff_base * 2**n)
                    await asyncio.sleep(delay * (0.5 + random.random() / 2))
        log.warning("S3 %s failed %d times: %r", what, c.attempts, last)
        raise StorageError(ErrorKind.TEMPORARY, "blob store unavailable, try again later")

    async def _request(
        self,
        method: str,
        key: str | None,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | memoryview | _FileBody = b"",
        body_sha256: str = EMPTY_SHA256,
        ok: tuple[int, ...] = (200,),
    ) -> _Answer:
        """One request, retried; its answer if the status is in ``ok``
        (or 404, for the caller to map). Other 4xx: TEMPORARY (a bucket or
        credentials misconfigured are not the sender's fault)."""
        url = self._url(key, query)
        c = self.config

        async def attempt() -> _Answer:
            signed = sign(
                method,
                url,
                {**(headers or {}), "content-length": str(len(body))}
                if method in ("PUT", "POST")
                else dict(headers or {}),
                body_sha256,
                c.access_key_id,
                c.secret_access_key,
                c.region,
                session_token=c.session_token,
            )
            # A file's payload is read as it is sent; its length is given,
            # so aiohttp sends it as is, not chunked (S3 wants a length).
            data = body.chunks() if isinstance(body, _FileBody) else body or None
            async with self._client().request(
                method, URL(url, encoded=True), headers=signed, data=data
            ) as resp:
                data = await resp.read()
                if resp.status in ok or resp.status == 404:
                    return _Answer(resp.status, resp.headers, data)
                if resp.status >= 500 or resp.status in (408, 429):
                    raise _Retry(f"HTTP {resp.status}")
                log.error("S3 %s %s: HTTP %d %r", method, url, resp.status, data[:500])
                raise StorageError(
                    ErrorKind.TEMPORARY, "blob store refused the request, try again later"
                )

        return await self._retrying(f"{method} {key or ''}", attempt)

    async def _head(self, key: str) -> _Answer:
        answer = await self._request("HEAD", _check_key(key))
        if answer.status == 404:
            raise StorageError(ErrorKind.NOT_FOUND, "no such blob")
        return answer

    # --- writes -------------------------------------------------------------

    def _meta(self) -> dict[str, str]:
        return {
            "x-amz-meta-stored": f"{time.time():.6f}",
            "content-type": "message/rfc822",
        }

    async def put(self, data: bytes) -> str:
        """Durable on return (the server acknowledged it); the same bytes
        give the same key."""
        data = bytes(data)
        key = await content_key(data)
        await self._put(key, data, key)
        return key

    async def put_as(self, key: str, data: bytes) -> str:
        """Stores ``data`` under ``key`` (durable on return): a message's
        skeleton, kept under its message's key (``storage/blob/skeleton.py``)."""
        data = bytes(data)
        await self._put(_check_key(key), data, await content_key(data))
        return key

    async def _put(self, key: str, data: bytes, sha: str) -> None:
        """``data`` (whose SHA-256 is ``sha``) as the object ``key``."""
        if len(data) <= self.config.multipart_threshold:
            await self._put_single(key, data, sha)
            return
        view = memoryview(data)
        step = self.config.part_size

        async def part(n: int) -> tuple[memoryview, str]:
            chunk = view[n * step : (n + 1) * step]
            return chunk, await asyncio.to_thread(_sha256, chunk)

        await self._put_multipart(key, -(-len(data) // step), part)

    async def _put_single(self, key: str, data: bytes | memoryview | _FileBody, sha: str) -> None:
        answer = await self._request("PUT", key, headers=self._meta(), body=data, body_sha256=sha)
        if answer.status == 404:
            raise StorageError(ErrorKind.TEMPORARY, "blob store has no such bucket")

    async def _put_multipart(
        self,
        key: str,
        count: int,
        part: Callable[[int], Awaitable[tuple[bytes | memoryview | _FileBody, str]]],
    ) -> None:
        """CreateMultipartUpload, ``count`` parts (``part(n)``: the bytes of
        part n from 0 and their SHA-256), CompleteMultipartUpload; aborted
        on failure so that no parts linger."""
        created = await self._request("POST", key, query={"uploads": ""}, headers=self._meta())
        upload = _xml_text(created.body, "UploadId") if created.status == 200 else None
        if not upload:
            raise StorageError(ErrorKind.TEMPORARY, "blob store did not start an upload")
        etags: list[str] = [""] * count
        gate = asyncio.Semaphore(self.config.part_concurrency)

        async def send(n: int) -> None:
            async with gate:
                data, sha = await part(n)
                answer = await self._request(
                    "PUT",
                    key,
                    query={"partNumber": str(n + 1), "uploadId": upload},
                    body=data,
                    body_sha256=sha,
                )
                if answer.status != 200 or "ETag" not in answer.headers:
                    raise StorageError(ErrorKind.TEMPORARY, "blob store lost an upload")
                etags[n] = answer.headers["ETag"]

        try:
            async with asyncio.TaskGroup() as tasks:
                for n in range(count):
                    tasks.create_task(send(n))
            body = (
                "<CompleteMultipartUpload>"
                + "".join(
                    f"<Part><PartNumber>{n + 1}</PartNumber><ETag>{_xml_escape(tag)}</ETag></Part>"
                    for n, tag in enumerate(etags)
                )
                + "</CompleteMultipartUpload>"
            ).encode()
            done = await self._request(
                "POST", key, query={"uploadId": upload}, body=body, body_sha256=_sha256(body)
            )
            if done.status == 404 and await self.exists(key):
                # An earlier try completed it and its answer was lost (the
                # retry finds no such upload): the object is there, whole.
                return
            # A 200 may still carry <Error> (the S3 API's CompleteMultipartUpload).
            if done.status != 200 or _xml_text(done.body, "Code") is not None:
                log.error("S3 completing %s: %r", key, done.body[:500])
                raise StorageError(ErrorKind.TEMPORARY, "blob store did not finish an upload")
        except BaseException as err:
            with contextlib.suppress(Exception):
                await self._request("DELETE", key, query={"uploadId": upload}, ok=(200, 204))
            if isinstance(err, BaseExceptionGroup):
                first = err.exceptions[0]
                raise first if isinstance(first, StorageError) else err from None
            raise

    async def put_file(self, path: Path) -> str:
        """Stores a file's bytes, never all in memory: hashed in one pass,
        then sent as read (:meth:`put_file_range`)."""
        path = Path(path)
        size, key = await asyncio.to_thread(_hash_file, path)
        if size <= self.config.multipart_threshold:
            # One request, whose payload hash is the key already.
            await self._put_single(key, _FileBody(path, b"", 0, 0, size), key)
            return key
        return await self.put_file_range(key, path, 0, size)

    async def put_file_range(
        self, key: str, path: Path, start: int, end: int, *, prefix: bytes = b""
    ) -> str:
        """Stores ``prefix`` followed by bytes ``start`` .. ``end`` of the
        file under ``key`` (the caller's, as :meth:`put_as`), durable on
        return, read from the file as it is sent: one request, or above
        ``multipart_threshold`` parts of ``part_size``, each hashed by a
        first read of it (SigV4's payload hash, which the server checks)."""
        _check_key(key)
        path = Path(path)
        total = len(prefix) + end - start
        if total <= self.config.multipart_threshold:
            body = _FileBody(path, prefix, start, 0, total)
            await self._put_single(key, body, await asyncio.to_thread(body.sha256))
            return key
        step = self.config.part_size

        async def part(n: int) -> tuple[_FileBody, str]:
            body = _FileBody(path, prefix, start, n * step, min(total, (n + 1) * step))
            return body, await asyncio.to_thread(body.sha256)

        await self._put_multipart(key, -(-total // step), part)
        return key

    # --- reads --------------------------------------------------------------

    async def _reading(self, read: Callable[[], Awaitable[_T]]) -> _T:
        """``read()``, asked again after a NOT_FOUND (``missing_retries``
        times, 50 ms then 200 ms apart) before that is the answer. A blob
        being stored again while it is read can read as missing for a
        moment: Swift's object server answers 404 when the file it listed
        was replaced before it opened it (``DiskFileNotExist``), and every
        delivery of a shared attachment stores its part again (refreshing
        its stored time for garbage collection). A blob that is really
        missing costs 250 ms more to report; HEADs (``exists``,
        ``stored_at``) answer at once, as garbage collection wants."""
        for n in range(self.config.missing_retries + 1):
            try:
                return await read()
            except StorageError as err:
                if err.kind is not ErrorKind.NOT_FOUND or n == self.config.missing_retries:
                    raise
            await asyncio.sleep(0.05 * 4**n)
        raise AssertionError("unreachable")

    async def get(self, key: str) -> bytes:
        """The whole blob; NOT_FOUND if absent (:meth:`_reading`)."""
        _check_key(key)

        async def read() -> bytes:
            answer = await self._request("GET", key)
            if answer.status == 404:
                raise StorageError(ErrorKind.NOT_FOUND, "no such blob")
            return answer.body

        return await self._reading(read)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` .. ``end`` (exclusive), clipped to the blob's size
        (a ranged GET, RFC 9110 section 14.2)."""
        if start < 0 or end < start:
            raise StorageError(ErrorKind.INVALID, "bad byte range")
        _check_key(key)
        if end == start:
            await self._head(key)  # NOT_FOUND as for any other range
            return b""

        async def read() -> _Answer:
            answer = await self._request(
                "GET", key, headers={"range": f"bytes={start}-{end - 1}"}, ok=(200, 206, 416)
            )
            if answer.status == 404:
                raise StorageError(ErrorKind.NOT_FOUND, "no such blob")
            return answer

        answer = await self._reading(read)
        if answer.status == 416:  # start at or past the end (RFC 9110 section 15.5.17)
            return b""
        if answer.status == 200:  # the server ignored the range: whole blob
            return answer.body[start:end]
        return answer.body

    def stream(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """The blob in chunks of ``chunk_size`` bytes (the last may be
        shorter): :meth:`stream_range` of all of it."""
        return self.stream_range(key, 0, None, chunk_size)

    async def stream_range(
        self, key: str, start: int, end: int | None = None, chunk_size: int = 65536
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` .. ``end`` (None: to the end), clipped to the
        blob's size, in chunks of ``chunk_size`` bytes (the last may be
        shorter), from ONE GET (ranged unless the whole blob is wanted, RFC
        9110 section 14.2) whose body is read as it is consumed: at most a
        chunk and aiohttp's read buffer are held, and a slow consumer slows
        the transfer (TCP flow control) rather than growing memory.

        A connection lost midway (or a read timeout) resumes with a ranged
        GET of the rest of the same version (``If-Match`` its ETag); only
        ``attempts`` failures in a row without a byte received in between
        make it TEMPORARY. NOT_FOUND if absent."""
        if start < 0 or (end is not None and end < start):
            raise StorageError(ErrorKind.INVALID, "bad byte range")
        _check_key(key)
        if end == start:
            await self._head(key)  # NOT_FOUND as for any other range
            return
        url = self._url(key)
        c = self.config
        pos = start  # the next offset wanted: every byte before it was received
        etag: str | None = None
        buffer = bytearray()
        failures = 0
        missing = 0  # 404s before the first byte (see _reading)
        while end is None or pos < end:
            headers: dict[str, str] = {}
            if pos or end is not None:
                last = "" if end is None else str(end - 1)
                headers["range"] = f"bytes={pos}-{last}"
            if etag is not None:
                headers["if-match"] = etag
            signed = sign(
                "GET",
                url,
                headers,
                EMPTY_SHA256,
                c.access_key_id,
                c.secret_access_key,
                c.region,
                session_token=c.session_token,
            )
            try:
                async with self._client().get(URL(url, encoded=True), headers=signed) as resp:
                    if resp.status == 404 and etag is None and missing < c.missing_retries:
                        # Before any byte: as :meth:`_reading` does.
                        missing += 1
                        await asyncio.sleep(0.05 * 4 ** (missing - 1))
                        continue
                    if resp.status == 404:
                        raise StorageError(ErrorKind.NOT_FOUND, "no such blob")
                    if resp.status == 416:  # at or past the end (RFC 9110 section 15.5.17)
                        break
                    if resp.status >= 500 or resp.status in (408, 429):
                        raise _Retry(f"HTTP {resp.status}")
                    if resp.status not in (200, 206) or (etag and resp.status != 206):
                        log.error("S3 GET %s: HTTP %d", url, resp.status)
                        raise StorageError(ErrorKind.TEMPORARY, "blob store refused a read")
                    etag = etag or resp.headers.get("ETag", "*")
                    # A 200 to a ranged GET: the server sent the whole blob.
                    skip = pos if resp.status == 200 else 0
                    async for data in resp.content.iter_chunked(chunk_size):
                        if skip:
                            cut, skip = min(skip, len(data)), max(0, skip - len(data))
                            data = data[cut:]
                        if end is not None:
                            data = data[: end - pos]
                        if not data:
                            if end is not None and pos >= end:
                                break
                            continue
                        pos += len(data)
                        failures = 0
                        buffer += data
                        while len(buffer) >= chunk_size:
                            out = bytes(buffer[:chunk_size])
                            del buffer[:chunk_size]
                            yield out
                    break
            except (TimeoutError, _Retry, aiohttp.ClientError, OSError) as err:
                failures += 1
                if failures >= c.attempts:
                    log.warning("S3 GET %s failed %d times: %r", key, failures, err)
                    raise StorageError(
                        ErrorKind.TEMPORARY, "blob store unavailable, try again later"
                    ) from None
                await asyncio.sleep(min(c.backoff_max, c.backoff_base * 2 ** (failures - 1)))
        if buffer:
            yield bytes(buffer)

    async def exists(self, key: str) -> bool:
        answer = await self._request("HEAD", _check_key(key))
        return answer.status != 404

    async def size(self, key: str) -> int:
        """The blob's length in bytes; NOT_FOUND if absent."""
        return int((await self._head(key)).headers.get("Content-Length", "0"))

    async def stored_at(self, key: str) -> float:
        """When the blob was last stored (a Unix time; storing the same
        bytes again refreshes it); NOT_FOUND if absent."""
        return _stored(await self._head(key))

    async def delete(self, key: str, *, stored_before: float | None = None) -> None:
        """Removes the blob; a missing blob is not an error (GC is idempotent).
        ``stored_before``: not if stored again since that Unix time before
        its HEAD; NOT atomic: a put between the HEAD and the DELETE is
        lost (see the module docstring for what makes that safe)."""
        _check_key(key)
        if stored_before is not None:
            answer = await self._request("HEAD", key)
            if answer.status == 404 or _stored(answer) >= stored_before:
                return
        await self._request("DELETE", key, ok=(200, 204))

    async def keys(self) -> list[str]:
        """Every stored key, sorted (ListObjects, a page at a time)."""
        prefix = f"{self.config.prefix}/" if self.config.prefix else ""
        found: list[str] = []
        marker = ""
        while True:
            query = {"prefix": prefix, "max-keys": str(self.config.list_page)}
            if marker:
                query["marker"] = marker
            answer = await self._request("GET", None, query=query)
            if answer.status == 404:
                raise StorageError(ErrorKind.TEMPORARY, "blob store has no such bucket")
            try:
                root = ET.fromstring(answer.body)
            except ET.ParseError:
                raise StorageError(ErrorKind.TEMPORARY, "blob store sent a bad listing") from None
            names = [
                el.text or "" for el in root.iter() if el.tag.endswith("}Key") or el.tag == "Key"
            ]
            found.extend(n[len(prefix) :] for n in names if _KEY.match(n[len(prefix) :]))
            truncated = (_xml_text(answer.body, "IsTruncated") or "").lower() == "true"
            if not truncated or not names:
                break
            marker = _xml_text(answer.body, "NextMarker") or names[-1]
        return sorted(found)

    async def close(self) -> None:
        """Closes the HTTP connections."""
        if self._session is not None:
            session, self._session = self._session, None
            with contextlib.suppress(RuntimeError):  # its loop is gone
                await session.close()


def _stored(answer: _Answer) -> float:
    value = answer.headers.get("x-amz-meta-stored")
    if value:
        with contextlib.suppress(ValueError):
            return float(value)
    modified = answer.headers.get("Last-Modified")
    if modified:
        return parsedate_to_datetime(modified).timestamp()
    return 0.0


def _sha256(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

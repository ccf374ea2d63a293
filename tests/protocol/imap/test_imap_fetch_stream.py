"""FETCH of large messages streamed from the blob store (issue #21).

Multi-megabyte messages of random sizes with attachments of random bytes,
stored as a skeleton and attachment blobs (storage/blob/skeleton.py), on
the filesystem and on a real S3 (Swift's s3api on loopback,
tests/swiftserver.py), read back through imaplib: BODY[] whole, partial
ranges crossing the 256 KiB write chunks and the stored pieces' edges,
BODY[n] and BINARY[n] / BINARY.SIZE decoded and checked against the
standard library's decoders. On S3 a whole-body FETCH costs one GET per
stored piece (counted at aiohttp); BINARY never holds a decoded part or
the whole message (tracemalloc's peak)."""

from __future__ import annotations

import asyncio
import base64
import email
import hashlib
import imaplib
import quopri
import random
import re
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from imapd.imap.commands.fetch import CHUNK
from storage.blob.skeleton import DEFAULT_ATTACHMENT_MIN_BYTES
from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv


def _odd_size(rng: random.Random, low: int, high: int) -> int:
    """A size that is a multiple neither of 3 (base64 padding) nor of CHUNK."""
    while True:
        n = rng.randint(low, high)
        if n % 3 and n % CHUNK:
            return n


def _b64(data: bytes, width: int) -> bytes:
    text = base64.b64encode(data)
    return b"".join(text[i : i + width] + b"\r\n" for i in range(0, len(text), width))


def _big_message(
    rng: random.Random, big: int, smallest: int = 300_000
) -> tuple[bytes, list[bytes], int]:
    """A multipart/mixed message: a text part, ``big`` base64 attachments of
    random bytes (``smallest`` up to 1.6 MB decoded, each over the
    attachment threshold: a blob of its own), a
    small base64 one (kept in the skeleton) and a quoted-printable one. The
    raw message, each part's decoded content, and how many attachment blobs
    it is stored with."""
    boundary = f"b-{uuid.uuid4().hex}"
    text = b"Hello,\r\n\r\nthe files.\r\n"
    parts: list[tuple[str, str, bytes]] = [("text/plain", "7bit", text)]
    contents = [text]
    for _ in range(big):
        data = rng.randbytes(_odd_size(rng, smallest, 1_600_000))
        parts.append(("application/octet-stream", "base64", _b64(data, rng.choice([64, 76]))))
        contents.append(data)
    small = rng.randbytes(_odd_size(rng, 100, 20_000))
    parts.append(("application/octet-stream", "base64", _b64(small, 76)))
    contents.append(small)
    qp_text = bytes(b for b in rng.randbytes(_odd_size(rng, 1_000, 30_000)) if b not in b"\r\n")
    parts.append(("text/plain", "quoted-printable", quopri.encodestring(qp_text, True)))
    contents.append(qp_text)
    out = [
        b"From: Carol <carol@example.net>\r\nTo: alice@example.org\r\nSubject: files\r\n"
        b"Message-ID: <%s@example.net>\r\nMIME-Version: 1.0\r\n" % uuid.uuid4().hex.encode(),
        b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n' % boundary.encode(),
    ]
    for ctype, encoding, body in parts:
        out.append(
            b"--%s\r\nContent-Type: %s\r\nContent-Transfer-Encoding: %s\r\n\r\n%s\r\n"
            % (boundary.encode(), ctype.encode(), encoding.encode(), body)
        )
    out.append(b"--%s--\r\n" % boundary.encode())
    return b"".join(out), contents, big


@pytest.fixture(params=["fs", "s3"])
async def env(
    request: pytest.FixtureRequest, imap_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> ImapEnv:
    """An IMAP server whose blobs are on disk, or in a bucket on Swift."""
    if request.param == "s3":
        from argon2 import PasswordHasher, profiles

        from storage.backend import open_storage_from_url
        from tests.conftest import storage_url
        from tests.swiftserver import SwiftServer

        swift = await asyncio.to_thread(SwiftServer.shared)  # fails, never skips

        async def s3_storage(where: Path) -> Any:
            return await open_storage_from_url(
                storage_url(where / "data") or f"sqlite+aiosqlite:///{where / 'db.sqlite'}",
                swift.blob_url(f"fetch-{uuid.uuid4().hex}"),
                password_hasher=PasswordHasher.from_parameters(profiles.CHEAPEST),
            )

        # The conftest module imap_factory runs in (pytest's own import of it).
        monkeypatch.setitem(imap_factory.__globals__, "open_test_storage", s3_storage)
    made = await imap_factory()
    blobs = type(getattr(made.storage.blobs, "inner", made.storage.blobs)).__name__
    assert blobs == ("S3BlobStore" if request.param == "s3" else "FsBlobStore")
    made.backend = request.param  # type: ignore[attr-defined]
    return made  # type: ignore[no-any-return]


def _imap(port: int) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", port, timeout=120)
    m.login(USER, PASSWORD)
    m.select("INBOX", readonly=True)
    return m


def _fetch(m: imaplib.IMAP4, item: str) -> bytes:
    """The one literal of ``FETCH 1 (item)``."""
    typ, data = m.fetch("1", f"({item})")
    assert typ == "OK", (item, data)
    literal = data[0]
    assert isinstance(literal, tuple), (item, data)
    return literal[1]


def _edges(raw: bytes, contents: list[bytes]) -> list[int]:
    """Offsets worth crossing: multiples of the write chunk and where each
    attachment's encoded body starts and ends (the stored pieces' edges)."""
    edges = list(range(CHUNK, len(raw), CHUNK))
    for body in re.finditer(rb"base64\r\n\r\n", raw):
        start = body.end()
        edges += [start, raw.index(b"\r\n--", start)]
    return edges


def _crossing(rng: random.Random, edges: list[int], size: int) -> Iterator[tuple[int, int]]:
    """(origin, octets) ranges that start before an edge and end past it."""
    for edge in rng.sample(edges, min(len(edges), 8)):
        origin = max(0, edge - rng.randint(1, 70_000))
        yield origin, min(size - origin, edge - origin + rng.randint(1, 300_000))


async def test_fetch_is_byte_exact_across_chunks_and_stored_pieces(env: ImapEnv) -> None:
    rng = random.Random()
    raw, contents, _ = _big_message(rng, rng.randint(1, 3))
    await env.deliver(raw)
    edges = _edges(raw, contents)
    ranges = list(_crossing(rng, edges, len(raw)))
    ranges.append((len(raw) - rng.randint(1, 100), 1000))  # past the end: clipped
    parsed = email.message_from_bytes(raw)
    leaves = [p for p in parsed.walk() if not p.is_multipart()]

    def read() -> None:
        m = _imap(env.port)
        try:
            assert _fetch(m, "BODY.PEEK[]") == raw
            for origin, octets in ranges:
                got = _fetch(m, f"BODY.PEEK[]<{origin}.{octets}>")
                assert got == raw[origin : origin + octets], (origin, octets)
            for n, (leaf, content) in enumerate(zip(leaves, contents, strict=True), 1):
                encoded = _fetch(m, f"BODY.PEEK[{n}]")
                assert encoded == leaf.get_payload(decode=False).encode("ascii")
                decoded = _fetch(m, f"BINARY.PEEK[{n}]")
                # The standard library's decoders agree with ours, and both
                # give the original bytes.
                assert decoded == leaf.get_payload(decode=True) == content
                _, sized = m.fetch("1", f"(BINARY.SIZE[{n}])")
                assert sized[0] == b"1 (BINARY.SIZE[%d] %d)" % (n, len(content)), sized
                origin = rng.randrange(len(content))
                octets = rng.randint(1, len(content) + 10)
                got = _fetch(m, f"BINARY.PEEK[{n}]<{origin}.{octets}>")
                assert got == content[origin : origin + octets]
                origin = rng.randrange(len(encoded))
                got = _fetch(m, f"BODY.PEEK[{n}]<{origin}.{octets}>")
                assert got == encoded[origin : origin + octets]
            assert _fetch(m, "BINARY.PEEK[]") == raw
        finally:
            m.logout()

    await asyncio.to_thread(read)


def _count_gets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every HTTP GET this process sends through aiohttp from now on (the
    S3 blob store's client), by URL."""
    gets: list[str] = []
    original: Callable[..., Any] = aiohttp.ClientSession._request

    def counting(self: aiohttp.ClientSession, method: str, url: Any, **kw: Any) -> Any:
        if method == "GET":
            gets.append(str(url))
        return original(self, method, url, **kw)

    monkeypatch.setattr(aiohttp.ClientSession, "_request", counting)
    return gets


async def test_whole_body_fetch_from_s3_is_one_get_per_stored_piece(
    env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env.backend != "s3":  # type: ignore[attr-defined]
        return  # counted at S3's HTTP client; the fs run of this test checks nothing
    rng = random.Random()
    # Over 2 MiB whatever the draw: two attachments of 850 KB or more are
    # 1.13 MB or more each in base64.
    raw, _, big = _big_message(rng, rng.randint(2, 3), smallest=850_000)
    assert len(raw) > 2 * 1024 * 1024 and big >= 2
    await env.deliver(raw)
    gets = _count_gets(monkeypatch)

    def read() -> tuple[bytes, int, bytes]:
        m = _imap(env.port)
        try:
            first = _fetch(m, "BODY.PEEK[]")
            after_first = len(gets)
            return first, after_first, _fetch(m, "BODY.PEEK[]")
        finally:
            m.logout()

    first, after_first, second = await asyncio.to_thread(read)
    assert first == second == raw
    # The skeleton, then each attachment blob: one GET each, whatever the
    # message's size (the old code sent one per 256 KiB, over 10 here).
    assert after_first == 1 + big, gets
    # The skeleton is then known: only the attachment blobs are read.
    assert len(gets) - after_first == big, gets[after_first:]


async def _read_literal(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Reads a FETCH response with one literal, hashing the literal a piece
    at a time (never holding it): its length and SHA-256."""
    line = await reader.readline()
    m = re.search(rb"~?\{(\d+)\}\r\n$", line)
    assert m, line
    left, digest = int(m.group(1)), hashlib.sha256()
    while left:
        piece = await reader.read(min(left, 65536))
        assert piece
        digest.update(piece)
        left -= len(piece)
    assert (await reader.readline()).startswith(b")")
    tagged = await reader.readline()
    assert tagged.startswith(b"t OK"), tagged
    return int(m.group(1)), digest.hexdigest()


async def test_binary_fetch_holds_no_part_whole(imap_factory: Any) -> None:
    """BINARY[n] of a 6-9 MB attachment and BINARY[] of its message: the
    imapd's Python allocations (same process, tracemalloc) peak far below
    the part's size, so it is decoded and sent a chunk at a time."""
    env = await imap_factory()
    rng = random.Random()
    data = rng.randbytes(_odd_size(rng, 6_000_000, 9_000_000))
    raw = (
        b"From: a@example.net\r\nTo: alice@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\nhi\r\n--x\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(data, 76) + b"--x--\r\n"
    )
    assert len(data) > 8 * DEFAULT_ATTACHMENT_MIN_BYTES
    await env.deliver(raw)
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    await reader.readline()
    for command in (f"t LOGIN {USER} {PASSWORD}", "t SELECT INBOX"):
        writer.write(command.encode() + b"\r\n")
        while not (await reader.readline()).startswith(b"t OK"):
            pass
    peaks = []
    tracemalloc.start()
    try:
        for item, expect in (("BINARY.PEEK[2]", data), ("BINARY.PEEK[]", raw)):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            writer.write(f"t FETCH 1 ({item})\r\n".encode())
            size, digest = await _read_literal(reader)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
            assert (size, digest) == (len(expect), hashlib.sha256(expect).hexdigest())
    finally:
        tracemalloc.stop()
        writer.close()
    # A few 256 KiB chunks in flight, nowhere near the 6-12 MB held before.
    assert max(peaks) < 3 * 1024 * 1024, peaks


async def test_a_blob_unreadable_mid_literal_ends_the_connection_never_padded(
    env: ImapEnv,
) -> None:
    """An attachment blob lost after the message was stored (damage): the
    literal is announced (the skeleton is there), its first octets go out,
    then the read fails. The client never receives octets that were not
    stored (no padding): what came is a prefix of the message and the
    connection ends; a new session still reads the mailbox's other message."""
    rng = random.Random()
    raw, _, _ = _big_message(rng, 1)
    intact = b"From: a@example.net\r\nSubject: intact\r\n\r\n" + rng.randbytes(400).hex().encode()
    stored = await env.deliver(raw)
    await env.deliver(intact)
    blobs = env.storage.blobs  # type: ignore[attr-defined]
    entry = stored.entry  # type: ignore[attr-defined]
    skeleton = await blobs.skeleton(entry.blob_key)
    assert skeleton is not None and skeleton.refs
    await blobs.inner.delete(skeleton.refs[0].key)
    blobs._skeletons.clear()  # as a fresh process would: read it from the store

    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        await reader.readline()
        writer.write(f"a LOGIN {USER} {PASSWORD}\r\nb SELECT INBOX\r\n".encode())
        while not (await reader.readline()).startswith(b"b OK"):
            pass
        writer.write(b"c FETCH 1 (BODY.PEEK[])\r\n")
        line = await asyncio.wait_for(reader.readline(), 60)
        announced = re.search(rb"\{(\d+)\}\r\n$", line)
        assert announced is not None and int(announced[1]) == len(raw), line
        got = await asyncio.wait_for(reader.read(), 60)  # until the server closes
    finally:
        writer.close()
    assert len(got) < len(raw)
    assert raw.startswith(got), "octets sent that the message does not hold"

    def read_other() -> bytes:
        m = _imap(env.port)
        try:
            return _fetch_n(m, 2)
        finally:
            m.logout()

    assert await asyncio.to_thread(read_other) == intact


def _fetch_n(m: imaplib.IMAP4, n: int) -> bytes:
    typ, data = m.fetch(str(n), "(BODY.PEEK[])")
    assert typ == "OK" and isinstance(data[0], tuple), data
    return data[0][1]


async def test_a_store_unavailable_before_the_message_is_a_temporary_no(
    env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob store fails before any octet of a large message is sent:
    the FETCH is NO [UNAVAILABLE] (RFC 5530 section 3), the session goes on,
    and once the store answers again the same FETCH is byte-exact."""
    rng = random.Random()
    raw, _, _ = _big_message(rng, 1)
    await env.deliver(raw)
    blobs = env.storage.blobs  # type: ignore[attr-defined]
    inner = blobs.inner
    real_exists = inner.exists

    async def down(key: str) -> bool:
        from storage.errors import ErrorKind, StorageError

        raise StorageError(ErrorKind.TEMPORARY, "blob store unavailable, try again later")

    monkeypatch.setattr(inner, "exists", down)

    def read(expect_ok: bool) -> bytes | str:
        m = _imap(env.port)
        try:
            typ, data = m.fetch("1", "(BODY.PEEK[])")
            if not expect_ok:
                assert typ == "NO", data
                return str(data)
            assert typ == "OK", data
            return data[0][1]  # type: ignore[index]
        finally:
            m.logout()

    refused = await asyncio.to_thread(read, False)
    assert "[UNAVAILABLE]" in refused, refused
    monkeypatch.setattr(inner, "exists", real_exists)
    assert await asyncio.to_thread(read, True) == raw

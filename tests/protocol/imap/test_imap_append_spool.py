"""APPEND literals past imap.spool_threshold go to a file in <data_dir>/spool
as they arrive (RFC 3501 section 6.3.11 allows APPENDLIMIT-sized messages):
a session holds at most the threshold of message text in memory, the
message is stored byte-exact, and no spool file outlives its command,
whether the APPEND succeeds, fails, or the client goes away mid-literal."""

from __future__ import annotations

import asyncio
import random
import re
import time
import tracemalloc
from pathlib import Path

from tests.conftest import make_settings
from tests.protocol.imap.conftest import ImapClient, ImapEnv
from tests.protocol.smtp.test_smtp_spool import random_body  # real random bytes, base64

THRESHOLD = 64 * 1024
LIMIT = 4_000_000


async def make_env(imap_factory) -> ImapEnv:  # type: ignore[no-untyped-def]
    return await imap_factory(imap={"spool_threshold": THRESHOLD, "max_literal_size": LIMIT})


async def send_slowly(client: ImapClient, data: bytes) -> None:
    """In 64 KiB writes, each drained: the client never buffers much."""
    for i in range(0, len(data), 64 * 1024):
        client.writer.write(data[i : i + 64 * 1024])
        await client.writer.drain()


async def fetch_body(client: ImapClient, uid: int) -> bytes:
    lines = await client.command(f"UID FETCH {uid} BODY.PEEK[]")
    m = re.match(rb"\* \d+ FETCH \(UID \d+ BODY\[\] \{(\d+)\}\r\n", lines[0])
    assert m, lines[0][:200]
    start = m.end()
    return lines[0][start : start + int(m.group(1))]


def files_in(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


async def test_appends_round_trip_byte_exact(imap_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = await make_env(imap_factory)
    spool = tmp_path / "env0" / "data" / "spool"
    rng = random.Random()
    sizes = [rng.randrange(1, THRESHOLD // 2) for _ in range(2)]
    sizes += [rng.randrange(THRESHOLD, LIMIT // 2) for _ in range(3)]
    client = await env.client(login=True)
    try:
        await client.ok("SELECT INBOX")
        for i, size in enumerate(sizes):
            raw = random_body(rng, size)
            if i % 2:  # LITERAL+ (RFC 7888)
                await send_slowly(client, b"a%d APPEND INBOX {%d+}\r\n" % (i, len(raw)) + raw)
            else:
                await client.send(b"a%d APPEND INBOX {%d}\r\n" % (i, len(raw)))
                assert (await client.line()).startswith(b"+ ")
                await send_slowly(client, raw)
            await client.send(b"\r\n")
            lines = await client.until(f"a{i}")
            m = re.search(rb"OK \[APPENDUID \d+ (\d+)\]", lines[-1])
            assert m, lines
            assert await fetch_body(client, int(m.group(1))) == raw
            assert files_in(spool) == []
    finally:
        await client.close()


async def wait_spooled(folder: Path, count: int, seconds: float = 10.0) -> None:
    """Until ``count`` spool files have stopped growing (or time is up)."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size for p in files_in(folder)]
        if len(sizes) == count and sizes == last:
            return
        last = sizes
        await asyncio.sleep(0.2)


async def test_unfinished_appends_hold_no_text_in_memory(imap_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = await make_env(imap_factory)
    spool = tmp_path / "env0" / "data" / "spool"
    rng = random.Random()
    raws = [random_body(rng, rng.randrange(1_500_000, 2_500_000)) for _ in range(3)]
    clients = [await env.client(login=True) for _ in raws]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, (client, raw) in enumerate(zip(clients, raws, strict=True)):
            await send_slowly(client, b"a%d APPEND INBOX {%d+}\r\n" % (i, len(raw)) + raw[:-7])
        await wait_spooled(spool, len(clients))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Each session holds at most the threshold and a few read blocks.
    assert grown < len(clients) * (THRESHOLD + 256 * 1024), grown
    assert len(files_in(spool)) == len(clients)
    # One finishes and is stored byte-exact; the others hang up mid-literal.
    await clients[0].send(raws[0][-7:] + b"\r\n")
    lines = await clients[0].until("a0")
    m = re.search(rb"OK \[APPENDUID \d+ (\d+)\]", lines[-1])
    assert m, lines
    await clients[0].ok("SELECT INBOX")
    assert await fetch_body(clients[0], int(m.group(1))) == raws[0]
    for client in clients:
        await client.close()
    for _ in range(50):  # the sessions notice the hang-ups
        if not files_in(spool):
            break
        await asyncio.sleep(0.1)
    assert files_in(spool) == []


async def test_spool_failure_is_a_temporary_error(imap_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The disk, not the client, failed: NO [UNAVAILABLE] (RFC 5530 section
    3) and the connection carries on."""
    env = await make_env(imap_factory)
    data = tmp_path / "env0" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "spool").write_bytes(b"a file where the spool folder should be")
    rng = random.Random()
    raw = random_body(rng, rng.randrange(THRESHOLD, 3 * THRESHOLD))
    client = await env.client(login=True)
    try:
        await send_slowly(client, b"a APPEND INBOX {%d+}\r\n" % len(raw) + raw + b"\r\n")
        lines = await client.until("a")
        assert lines[-1].startswith(b"a NO [UNAVAILABLE] "), lines
        small = random_body(rng, rng.randrange(10, THRESHOLD // 2))
        await client.send(b"b APPEND INBOX {%d+}\r\n" % len(small) + small + b"\r\n")
        assert re.match(rb"b OK \[APPENDUID ", (await client.until("b"))[-1])
    finally:
        await client.close()


def test_settings_know_the_threshold(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, imap={"spool_threshold": 5000})
    assert settings.imap.spool_threshold == 5000


async def test_a_long_tag_does_not_hide_the_append(imap_factory) -> None:  # type: ignore[no-untyped-def]
    """A tag may be as long as the framer reads (64 octets): the literal is
    still an APPEND's, allowed up to APPENDLIMIT (RFC 7889), not the small
    limit of other arguments."""
    env = await make_env(imap_factory)
    rng = random.Random()
    tag = "t" * rng.randrange(58, 64)
    raw = random_body(rng, rng.randrange(70_000, 3 * THRESHOLD))
    client = await env.client(login=True)
    try:
        await client.send(f"{tag} APPEND INBOX {{{len(raw)}+}}\r\n".encode() + raw + b"\r\n")
        lines = await client.until(tag)
        assert re.match(rb"t+ OK \[APPENDUID ", lines[-1]), lines
    finally:
        await client.close()

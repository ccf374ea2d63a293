"""A client that connects and never logs in (IMAP, POP3) or never starts a
transaction (SMTP) is dropped after the short pre-authentication timeout,
with the protocol's own goodbye; one that has logged in (or given MAIL)
keeps the long RFC timers."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from conf.settings import Settings

SHORT = 0.5  # seconds: the test-configured pre-authentication timeout
USER, PASSWORD = "dora@example.org", "correct horse"


@dataclass
class Dialogue:
    """One protocol's greeting, goodbye on timeout, and a way in."""

    greeting: bytes
    goodbye: bytes
    way_in: list[bytes]  # lines sent after the greeting, each answered with `ok`
    ok: bytes
    still_there: bytes  # a command answered with `ok` after the wait


DIALOGUES = {
    "imap": Dialogue(
        b"* OK", b"* BYE Autologout",
        [f'a LOGIN "{USER}" "{PASSWORD}"\r\n'.encode()], b"a OK", b"b NOOP\r\n",
    ),
    "pop3": Dialogue(
        b"+OK", b"-ERR autologout",
        [f"USER {USER}\r\n".encode(), f"PASS {PASSWORD}\r\n".encode()], b"+OK", b"NOOP\r\n",
    ),
    "smtp": Dialogue(
        b"220 ", b"421 4.4.2",
        [b"HELO client.example\r\n", b"MAIL FROM:<someone@remote.example>\r\n"], b"250",
        b"NOOP\r\n",
    ),
}


async def _listen(
    protocol: str, settings: Settings, storage: Any, tls_context: ssl.SSLContext
) -> tuple[int, Any]:
    """The daemon serving ``protocol``, started; its port and its service."""
    import imapd.service
    import mtad.service

    if protocol == "smtp":
        mta = await mtad.service.start(settings, storage, tls_context)
        return mta.port("mx"), mta
    access = await imapd.service.start(settings, storage, tls_context)
    servers = access.imap if protocol == "imap" else access.pop3
    return servers[0].sockets[0].getsockname()[1], access


@dataclass
class Greeted:
    """A client connected to one protocol's listener, its greeting read."""

    dialogue: Dialogue
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@pytest.fixture(params=sorted(DIALOGUES))
async def greeted(
    request: pytest.FixtureRequest, settings: Settings, storage, tls_context: ssl.SSLContext
) -> AsyncIterator[Greeted]:
    """Each protocol in turn, with the short pre-authentication timeout."""
    settings.auth.allow_plaintext = True  # plain loopback logins
    settings.smtp.spf = False
    settings.imap.preauth_timeout_seconds = SHORT
    settings.pop3.preauth_timeout_seconds = SHORT
    settings.smtp.before_mail_timeout_seconds = SHORT
    await storage.directory.add_domain("example.org")
    await storage.directory.add_account(USER, PASSWORD)
    dialogue = DIALOGUES[request.param]
    port, service = await _listen(request.param, settings, storage, tls_context)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            assert line.startswith(dialogue.greeting), line
            yield Greeted(dialogue, reader, writer)
        finally:
            writer.close()
    finally:
        await service.close()


async def final_reply(reader: asyncio.StreamReader) -> bytes:
    """The next line that is not IMAP untagged data."""
    while (line := await asyncio.wait_for(reader.readline(), 10)).startswith(b"* "):
        pass
    return line


async def test_a_silent_client_is_dropped_with_a_goodbye(greeted: Greeted) -> None:
    started = time.monotonic()
    rest = await asyncio.wait_for(greeted.reader.read(), 20)  # until the server closes
    waited = time.monotonic() - started
    assert rest.startswith(greeted.dialogue.goodbye), rest
    assert SHORT * 0.8 <= waited < SHORT + 5


async def test_a_logged_in_client_keeps_the_long_timer(greeted: Greeted) -> None:
    dialogue, reader, writer = greeted.dialogue, greeted.reader, greeted.writer
    for line in dialogue.way_in:
        writer.write(line)
        answer = await final_reply(reader)
        assert answer.startswith(dialogue.ok), answer
    await asyncio.sleep(SHORT * 4)
    writer.write(dialogue.still_there)
    answer = await final_reply(reader)
    assert answer.startswith(dialogue.ok.replace(b"a OK", b"b OK")), answer

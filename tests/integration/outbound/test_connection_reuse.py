"""Outbound sessions are reused: many messages to Debian's Postfix over a few
connections, every message arriving once and byte for byte, also when the
peer closes the sessions the relay keeps idle.

The relay's MX for postfix.test is a counting TCP proxy on loopback in
front of the session's Postfix: it counts the connections the relay opens
(what the peer sees) and can close them all at once, as a peer whose idle
timer fired would.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import string
from pathlib import Path

import aiosmtplib

from mtad.service import start
from tests.dnsserver import Zone, dns_server
from tests.integration.outbound.conftest import (
    ALICE,
    ALICE_PW,
    POSTFIX_IP,
    SENDER_DOMAIN,
    DkimSetup,
    eventually,
    open_test_storage,
    sender_settings,
)
from tests.ports import free_port
from tests.postfixpeer import PostfixPeer

PROXY_IP = "127.0.0.13"
WORKERS = 4


class CountingProxy:
    """A TCP proxy ``listen -> upstream`` that counts the connections it
    accepts and can cut every open one (both sides)."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int]) -> None:
        self.host, self.port, self.upstream = host, port, upstream
        self.connections = 0
        self.cut_count = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._pair, self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()

    @property
    def open(self) -> int:
        return len(self._open) // 2

    def cut(self) -> int:
        """Closes every open connection, both sides; how many pairs."""
        pairs = self.open
        for writer in list(self._open):
            writer.close()
        self.cut_count += pairs
        return pairs

    async def _pair(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._open |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}
            writer.close()
            up_writer.close()


def random_message(rng: random.Random, index: int, to: str) -> bytes:
    """A message of random size (1-60 KB) and random printable text, with
    lines that start with dots (RFC 5321 section 4.5.2 transparency)."""
    lines = [
        f"From: Alice <{ALICE}>",
        f"To: {to}",
        f"Subject: reuse {index}",
        "Date: Mon, 01 Jan 2024 00:00:00 +0000",
        f"Message-ID: <reuse.{index}.{rng.getrandbits(64):x}@{SENDER_DOMAIN}>",
        "",
    ]
    size = rng.randint(1_000, 60_000)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
    body = 0
    while body < size:
        line = "".join(rng.choices(alphabet, k=rng.randint(0, 200)))
        if rng.random() < 0.1:
            line = "." + line
        lines.append(line)
        body += len(line) + 2
    return ("\r\n".join(lines) + "\r\n").encode()


async def submit_all(port: int, ctx: ssl.SSLContext, messages: list[bytes], rcpt: str) -> None:
    """One submission session (587, STARTTLS, AUTH) sending every message."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=True, tls_context=ctx, timeout=30
    )
    async with client:
        await client.login(ALICE, ALICE_PW)
        for message in messages:
            await client.sendmail(ALICE, [rcpt], message)


async def test_many_messages_few_connections_and_a_peer_that_closes_idle_sessions(
    tmp_path: Path,
    postfix: PostfixPeer,
    dkim_setup: DkimSetup,
    tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
) -> None:
    rng = random.Random()
    total = rng.randint(20, 60)
    first = rng.randint(5, total - 5)
    rcpt = f"reuse{rng.getrandbits(32):x}@postfix.test"
    messages = [random_message(rng, i, rcpt) for i in range(total)]
    proxy_port = free_port((PROXY_IP,))
    zone = Zone().a("mx.postfix.test", PROXY_IP).mx("postfix.test", "mx.postfix.test", 10)
    before = len(postfix.messages())
    with dns_server(zone) as dns:
        settings = sender_settings(
            tmp_path / "sender",
            dns,
            proxy_port,
            dkim_setup,
            workers=WORKERS,
            connection_cache_seconds=60,
        )
        storage = await open_test_storage(settings.data_dir)
        await storage.directory.add_domain(SENDER_DOMAIN)
        await storage.directory.add_account(ALICE, ALICE_PW)
        service = await start(settings, storage, tls_context)
        cache = service.queue_runner.destination.connections  # type: ignore[attr-defined]

        async def all_done():
            entries = await storage.queue.list()
            return entries if entries and all(e.status == "done" for e in entries) else None

        try:
            async with CountingProxy(PROXY_IP, proxy_port, (POSTFIX_IP, postfix.port)) as proxy:
                port = service.port("submission")
                await submit_all(port, client_tls_context, messages[:first], rcpt)
                await eventually(lambda: len(postfix.messages()) >= before + first, 60)
                await eventually(all_done, 30)
                # The peer closes the sessions the relay holds idle.
                assert cache.idle > 0 and proxy.open == cache.idle
                assert proxy.cut() > 0
                await submit_all(port, client_tls_context, messages[first:], rcpt)
                await eventually(lambda: len(postfix.messages()) >= before + total, 60)
                entries = await eventually(all_done, 30)
                await asyncio.sleep(0.5)  # a duplicate would have arrived by now
                arrived = postfix.messages()[before:]
        finally:
            await service.close()
            await storage.close()
    # Every message once, byte for byte (Postfix prepends its trace fields
    # and our DKIM-Signature, and stores LF line ends).
    assert len(arrived) == total
    for message in messages:
        found = [m for m in arrived if m.replace(b"\n", b"\r\n").endswith(message)]
        assert len(found) == 1, message[:200]
    # One attempt each: the cut sessions were not delivery failures.
    assert len(entries) == total
    assert all(e.attempts == 1 and e.recipients[0].status == "delivered" for e in entries)
    # What the peer saw: at most WORKERS sessions before the cut and as many
    # after it, for 20-60 messages.
    assert proxy.connections <= 2 * WORKERS < total / 2, (proxy.connections, total)
    assert cache.reused >= total - proxy.connections

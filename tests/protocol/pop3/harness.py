"""Shared by the POP3 protocol and integration suites: storage, a server, a raw client.

Imported as ``tests.protocol.pop3.harness`` (``tests`` is a package).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from conf.settings import Settings
from imapd.pop3.server import Pop3Service, start_pop3_service

LOOPBACK = ["127.0.0.1:0"]
USER = "alice@example.org"
PASSWORD = "correct horse battery"
OTHER_USER = "bob@example.org"

# Stored with CRLF, a line that starts with "." and one that is just ".".
MSG1 = (
    b"From: Carol <carol@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: first\r\n"
    b"Message-ID: <one@example.net>\r\n"
    b"\r\n"
    b"line one\r\n"
    b".starts with a dot\r\n"
    b".\r\n"
    b"last line\r\n"
)
# Stored with bare LF line endings and without a final line ending.
MSG2 = (
    b"From: Dave <dave@example.net>\n"
    b"To: alice@example.org\n"
    b"Subject: second\n"
    b"\n"
    b"body 1\n"
    b"body 2\n"
    b"..two dots"
)


def make_settings(data_dir: Path, pop3: dict | None = None, auth: dict | None = None) -> Settings:
    """Loopback port-0 listeners, fast auth delays, plaintext refused."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return Settings.model_validate(
        {
            "server": {"hostname": "mail.test", "data_dir": str(data_dir)},
            "auth": {
                "failure_delay_seconds": 0.01,
                "failure_delay_max_seconds": 0.05,
                **(auth or {}),
            },
            "pop3": {"listen": LOOPBACK, "tls_listen": LOOPBACK, **(pop3 or {})},
        }
    )


async def open_test_storage(tmp_path: Path):  # -> storage.api.Storage
    import argon2

    from storage.backend import open_storage_from_url

    return await open_storage_from_url(
        "sqlite+aiosqlite:///" + str(tmp_path / "db.sqlite"),
        tmp_path / "blobs",
        password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
    )


async def deliver(storage, account, raw: bytes) -> int:
    """Store ``raw`` in the account's INBOX through the one ingest path; its UID."""
    from storage.ingest import Delivery, ingest

    (result,) = await ingest(storage, [Delivery(account, "INBOX")], raw)
    return result.uid


@contextlib.asynccontextmanager
async def running_pop3(
    settings: Settings, storage, tls: ssl.SSLContext, idle_timeout: float | None = None
) -> AsyncIterator[Pop3Service]:
    service = await start_pop3_service(settings, storage, tls, idle_timeout=idle_timeout)
    try:
        yield service
    finally:
        await service.close()


@dataclass
class Ports:
    plain: int
    tls: int


def ports_of(service: Pop3Service) -> Ports:
    plain, implicit = service.ports
    return Ports(plain, implicit)


class Pop3Client:
    """A raw line client: send lines, read status lines and multi-line bodies."""

    MULTILINE = {"CAPA", "LIST", "UIDL", "RETR", "TOP", "AUTH"}

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = ""

    @classmethod
    async def connect(
        cls, port: int, tls: ssl.SSLContext | None = None, greet: bool = True
    ) -> Pop3Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=tls,
            server_hostname="localhost" if tls else None,
            limit=64 * 1024 * 1024,  # whole RETR bodies are read with readuntil
        )
        client = cls(reader, writer)
        if greet:
            client.greeting = await client.status()
        return client

    async def status(self, timeout: float = 10) -> str:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise EOFError("server closed the connection")
        assert line.endswith(b"\r\n"), line
        return line[:-2].decode()

    async def body(self, timeout: float = 10) -> bytes:
        """A multi-line body up to the terminator, still dot-stuffed, CRLFs kept."""
        data = await asyncio.wait_for(self.reader.readuntil(b"\r\n.\r\n"), timeout)
        return data

    async def send(self, line: str | bytes) -> None:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        await self.writer.drain()

    async def command(self, line: str) -> str:
        """Send ``line`` and return its reply: the status line, plus the body
        lines (un-stuffed, joined by "\\n") for a positive multi-line reply."""
        await self.send(line)
        status = await self.status()
        words = line.split()
        name = words[0].upper() if words else ""
        multi = name in self.MULTILINE and status.startswith("+OK")
        if name in {"LIST", "UIDL"} and len(words) > 1:
            multi = False
        if name == "AUTH" and len(words) > 1:
            multi = False
        if not multi:
            return status
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), 10)
            assert raw.endswith(b"\r\n"), raw
            text = raw[:-2]
            if text == b".":
                break
            lines.append((text[1:] if text.startswith(b".") else text).decode())
        return "\n".join([status, *lines])

    async def login(self, user: str = USER, password: str = PASSWORD) -> str:
        assert (await self.command(f"USER {user}")).startswith("+OK")
        return await self.command(f"PASS {password}")

    async def closed(self, timeout: float = 10) -> bool:
        """True once the server has closed the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def unstuff(body: bytes) -> bytes:
    """Undo RFC 1939 byte-stuffing of a body that ends with CRLF "." CRLF."""
    assert body.endswith(b"\r\n.\r\n")
    lines = body[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)

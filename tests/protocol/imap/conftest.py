"""IMAP protocol fixtures: a fresh SQLite storage with one account, an IMAP
server on a loopback ephemeral port, and a small line-level client."""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from imapd.imap.server import start_imap
from tests.conftest import make_settings

USER = "alice@example.org"
PASSWORD = "secret-pw"
OTHER = "bob@example.org"


def message(subject: str = "Hello", body: str = "Hello world\r\n", **headers: str) -> bytes:
    """A small RFC 5322 message for tests."""
    head = {
        "From": "Carol <carol@example.net>",
        "To": "Alice <alice@example.org>",
        "Subject": subject,
        "Date": "Mon, 7 Feb 1994 21:52:25 -0800",
        "Message-ID": f"<{abs(hash(subject + body))}@example.net>",
    }
    head.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return (lines + "\r\n" + body).encode()


async def open_test_storage(tmp_path: Path):  # type: ignore[no-untyped-def]
    from argon2 import PasswordHasher, profiles

    from storage.backend import open_storage_from_url
    from tests.conftest import storage_url

    # The data dir make_settings is given beside it: the same database.
    return await open_storage_from_url(
        storage_url(tmp_path / "data") or "sqlite+aiosqlite:///" + str(tmp_path / "db.sqlite"),
        tmp_path / "blobs",
        password_hasher=PasswordHasher.from_parameters(profiles.CHEAPEST),
    )


@dataclass
class ImapEnv:
    storage: object
    port: int
    tls_port: int
    account: object
    other: object
    servers: list
    client_tls: ssl.SSLContext

    async def deliver(self, raw: bytes, mailbox: str = "INBOX", flags: tuple[str, ...] = (),
                      account: object | None = None) -> object:
        from storage.ingest import Delivery, ingest

        results = await ingest(
            self.storage, [Delivery(account or self.account, mailbox, flags)], raw
        )
        return results[0]

    async def client(self, login: bool = False) -> ImapClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        c = ImapClient(reader, writer)
        greeting = await c.line()
        assert greeting.startswith(b"* OK"), greeting
        if login:
            await c.ok(f"LOGIN {USER} {PASSWORD}")
        return c


@pytest.fixture
async def imap_factory(tmp_path: Path, tls_context: ssl.SSLContext,
                       client_tls_context: ssl.SSLContext):  # type: ignore[no-untyped-def]
    """Builds an ImapEnv; keyword arguments override settings sections."""
    made: list[ImapEnv] = []

    async def make(**sections: dict) -> ImapEnv:
        base = {
            "auth": {"allow_plaintext": True, "failure_delay_seconds": 0.05,
                     "failure_delay_max_seconds": 0.2},
            "imap": {"listen": ["127.0.0.1:0"], "tls_listen": ["127.0.0.1:0"],
                     "max_literal_size": 1_000_000},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        where = tmp_path / f"env{len(made)}"
        where.mkdir()
        settings = make_settings(where / "data", **base)
        storage = await open_test_storage(where)
        await storage.directory.add_domain("example.org")
        account = await storage.directory.add_account(USER, PASSWORD)
        other = await storage.directory.add_account(OTHER, PASSWORD)
        servers = await start_imap(settings, storage, tls_context)
        port = servers[0].sockets[0].getsockname()[1]
        tls_port = servers[1].sockets[0].getsockname()[1]
        env = ImapEnv(storage, port, tls_port, account, other, servers, client_tls_context)
        made.append(env)
        return env

    yield make
    for env in made:
        for server in env.servers:
            server.close()
        await env.storage.close()  # type: ignore[attr-defined]


@pytest.fixture
async def imap_env(imap_factory) -> ImapEnv:  # type: ignore[no-untyped-def]
    return await imap_factory()


_LITERAL_END = re.compile(rb"\{(\d+)\}\r\n$")


class ImapClient:
    """Sends raw lines; reads responses with literals folded into the line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.n = 0

    async def line(self, timeout: float = 5.0) -> bytes:
        """One response line without CRLF; literals are inlined as {n}\\r\\n<data>."""
        out = b""
        while True:
            part = await asyncio.wait_for(self.reader.readline(), timeout)
            if not part:
                raise ConnectionError("server closed the connection")
            m = _LITERAL_END.search(part)
            if m:
                data = await asyncio.wait_for(self.reader.readexactly(int(m.group(1))), timeout)
                out += part + data
                continue
            return out + part.removesuffix(b"\r\n")

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, text: str | bytes, tag: str | None = None) -> list[bytes]:
        """Send ``tag text`` and return every response line up to the tagged one."""
        if tag is None:
            self.n += 1
            tag = f"t{self.n}"
        raw = text.encode() if isinstance(text, str) else text
        await self.send(tag.encode() + b" " + raw + b"\r\n")
        return await self.until(tag)

    async def until(self, tag: str, timeout: float = 5.0) -> list[bytes]:
        lines = []
        while True:
            line = await self.line(timeout)
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines

    async def ok(self, text: str | bytes) -> list[bytes]:
        lines = await self.command(text)
        assert b" OK" in lines[-1].split(b"]")[0] or lines[-1].split(b" ")[1] == b"OK", lines
        return lines

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

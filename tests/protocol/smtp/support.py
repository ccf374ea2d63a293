"""Shared helpers for the SMTP protocol and integration suites.

* :func:`standard_zone`: the DNS world the tests live in (SPF, DKIM, DMARC
  records of a few sender domains), served by tests/dnsserver.py.
* :func:`populate`: the local domain ``example.net`` with alice, bob, an
  alias, a forward to a remote address and a catch-all domain.
* :class:`SmtpDialogue`: a raw line-level client for RFC-style tables of
  client lines and expected replies.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.dnsserver import Zone

LOCAL_DOMAIN = "example.net"
ALICE = "alice@example.net"
BOB = "bob@example.net"
ALICE_PW = "alice-secret"
BOB_PW = "bob-secret"
TEAM = "team@example.net"  # alias -> alice, bob
FORWARD = "fwd@example.net"  # alias -> someone@remote.example (forwarded via the queue)
REMOTE = "someone@remote.example"
CATCHALL_DOMAIN = "catchall.example"  # @catchall.example -> bob
DKIM_SELECTOR = "sel"


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_pem: bytes
    public_b64: str

    def sign(self, message: bytes) -> bytes:
        signature = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.private_pem,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        return signature + message


def make_dkim_key(domain: str, selector: str = DKIM_SELECTOR) -> DkimKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKey(domain, selector, private_pem, base64.b64encode(public_der).decode())


def standard_zone(dkim_key: DkimKey) -> Zone:
    """Sender domains, named by what their records make of mail from 127.0.0.1."""
    zone = Zone()
    zone.txt("spf-pass.example", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("_dmarc.spf-pass.example", "v=DMARC1; p=reject")
    zone.txt("spf-fail.example", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("spf-soft.example", "v=spf1 ip4:192.0.2.1 ~all")
    zone.txt("dkim.example", "v=spf1 -all")
    zone.txt("_dmarc.dkim.example", "v=DMARC1; p=none")
    zone.txt(
        f"{dkim_key.selector}._domainkey.{dkim_key.domain}",
        f"v=DKIM1; k=rsa; p={dkim_key.public_b64}",
    )
    zone.txt("reject.example", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("_dmarc.reject.example", "v=DMARC1; p=reject")
    zone.txt("quarantine.example", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("_dmarc.quarantine.example", "v=DMARC1; p=quarantine")
    zone.a("mx.example.net", "127.0.0.1")
    zone.mx(LOCAL_DOMAIN, "mx.example.net", 10)
    return zone


async def populate(storage) -> None:
    directory = storage.directory
    await directory.add_domain(LOCAL_DOMAIN)
    await directory.add_domain(CATCHALL_DOMAIN)
    await directory.add_account(ALICE, ALICE_PW)
    await directory.add_account(BOB, BOB_PW)
    await directory.add_alias(TEAM, ALICE)
    await directory.add_alias(TEAM, BOB)
    await directory.add_alias(FORWARD, REMOTE)
    await directory.add_alias(f"@{CATCHALL_DOMAIN}", BOB)


async def mailbox_messages(storage, address: str, mailbox: str = "INBOX") -> list[bytes]:
    """Raw bytes of every message in ``address``'s ``mailbox``, UID order."""
    from storage.model import UidSet

    account = await storage.directory.get_account(address)
    store = storage.mail(account)
    box = await store.get_mailbox(account.id, mailbox)
    entries = await store.fetch(account.id, box.id, UidSet.all())
    return [await storage.blobs.get(e.entry.blob_key) for e in entries]


async def arrived(storage, address: str, explain, timeout: float = 30.0) -> list[bytes]:
    """:func:`mailbox_messages` of ``address``'s INBOX once it holds any;
    AssertionError with ``explain()`` (a peer's log) after ``timeout``."""
    import asyncio

    for _ in range(int(timeout * 10)):
        stored = await mailbox_messages(storage, address)
        if stored:
            return stored
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing arrived:\n{explain()}")


async def mailbox_entries(storage, address: str, mailbox: str = "INBOX") -> list:
    from storage.model import UidSet

    account = await storage.directory.get_account(address)
    store = storage.mail(account)
    box = await store.get_mailbox(account.id, mailbox)
    return [m.entry for m in await store.fetch(account.id, box.id, UidSet.all())]


def message(
    sender: str = "someone@spf-pass.example",
    to: str = ALICE,
    subject: str = "Hello",
    body: str = "Hi there.\r\n",
) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{abs(hash(subject))}@test>\r\n"
        f"\r\n{body}"
    ).encode()


class SmtpDialogue:
    """A raw SMTP client: send lines, read whole (multi-line) replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, port: int, tls: ssl.SSLContext | None = None, source: str | None = None
    ) -> SmtpDialogue:
        """Connects to 127.0.0.1, from ``source`` if given (another loopback
        address: a second client IP)."""
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, local_addr=local)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10) -> str:
        """One complete reply; lines joined with "\\n"."""
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError("closed: " + "\n".join(lines))
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def send(self, data: str | bytes) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def cmd(self, line: str) -> str:
        await self.send(line + "\r\n")
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="mail.test")

    async def closed(self, timeout: float = 5) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionError, ssl.SSLError):
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass

    async def __aenter__(self) -> SmtpDialogue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def auth_plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def write_ca(path: Path, ca) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path

"""A small asyncio SMTP client for relaying: the protocol half of delivery.

Contract: :class:`SmtpClient` speaks to one server over one connection.
``open`` reads the greeting, ``ehlo`` learns the extensions (falling back to
HELO), ``starttls`` upgrades and says EHLO again (RFC 3207 section 4.2),
``transaction`` sends one message to many recipients and returns every
recipient's reply; ``quit`` ends politely. Replies are :class:`Reply`
values; a broken connection or a timeout raises :class:`ConnectionLost`.
Nothing here decides what a reply means for the queue: delivery.py does.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets; be lenient.
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 100
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class ConnectionLost(Exception):
    """The connection broke, timed out or the server spoke garbage."""


class StaleSession(ConnectionLost):
    """A reused session failed the RSET sent ahead of its transaction (no
    250, closed, or silent past the RSET timeout): nothing was delivered on
    it; the caller drops it and takes or opens another."""


@dataclass(frozen=True)
class Reply:
    """An SMTP reply (RFC 5321 section 4.2): a code and its text lines."""

    code: int
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(line for line in self.lines if line)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        """4yz: transient negative completion (RFC 5321 section 4.2.1)."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status code of the reply, or one derived from the
        basic code (RFC 3463 section 3: x.0.0)."""
        m = _ENHANCED.match(self.lines[0] if self.lines else "")
        if m and m.group(1) == str(self.code)[0]:
            return ".".join(m.groups())
        return f"{str(self.code)[0]}.0.0"

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


@dataclass
class Extensions:
    """The EHLO keywords (RFC 5321 section 4.1.1.1), upper-cased, with params."""

    keywords: dict[str, str] = field(default_factory=dict)
    esmtp: bool = True

    @classmethod
    def parse(cls, reply: Reply) -> Extensions:
        found: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                found[keyword.upper()] = params.strip()
        return cls(found)

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.keywords

    @property
    def size_limit(self) -> int | None:
        """RFC 1870 SIZE: the server's limit, None if unknown or unlimited (0)."""
        value = self.keywords.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None


def crlf_lines(message: bytes) -> bytes:
    """``message`` with CRLF line ends (RFC 5322 section 2.1), ending in one:
    what the receiver stores, whether sent with DATA or BDAT."""
    data = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 section 4.5.2 transparency, CRLF line ends, and the final
    ``CRLF . CRLF``."""
    data = crlf_lines(message)
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@dataclass(frozen=True)
class TransactionResult:
    """Replies of one mail transaction: ``mail`` to MAIL FROM, ``rcpt`` per
    recipient, ``data`` to the end of data (None if DATA was not reached)."""

    mail: Reply
    rcpt: dict[str, Reply]
    data: Reply | None

    def outcome(self, recipient: str) -> Reply:
        """The reply that decides ``recipient``'s fate."""
        if not self.mail.positive:
            return self.mail
        rcpt = self.rcpt[recipient]
        if not rcpt.positive or self.data is None:
            return rcpt if not rcpt.positive else Reply(451, ("4.4.2 transaction aborted",))
        return self.data


class SmtpClient:
    """One SMTP connection to one server."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions = Extensions(esmtp=False)
        self.tls = False
        self.greeting: Reply | None = None

    @classmethod
    async def open(
        cls, address: str, port: int, *, connect_timeout: float, timeout: float
    ) -> SmtpClient:
        """Connects and reads the greeting (not checked: the caller decides)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address, port, limit=MAX_REPLY_LINE * 2),
                connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"connect to {address}:{port} failed: {exc}") from exc
        client = cls(reader, writer, timeout)
        # RFC 5321 section 4.5.3.2.1: initial 220 message, 5 minutes.
        client.greeting = await client.read_reply()
        return client

    async def read_reply(self) -> Reply:
        lines: list[str] = []
        code = 0
        while True:
            try:
                raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            except (TimeoutError, OSError, ValueError, ssl.SSLError) as exc:
                raise ConnectionLost(f"reading reply: {exc!r}") from exc
            if not raw:
                raise ConnectionLost("connection closed by server")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                raise ConnectionLost(f"malformed reply line {line[:80]!r}")
            code = int(line[:3])
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return Reply(code, tuple(lines))
            if len(lines) > MAX_REPLY_LINES:
                raise ConnectionLost("reply too long")

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            raise ConnectionLost(f"sending: {exc!r}") from exc

    async def command(self, line: str) -> Reply:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    async def ehlo(self, hostname: str) -> Reply:
        """EHLO, or HELO if the server refuses EHLO (RFC 5321 section 3.2)."""
        reply = await self.command(f"EHLO {hostname}")
        if reply.code == 250:
            self.extensions = Extensions.parse(reply)
            return reply
        if reply.permanent:
            reply = await self.command(f"HELO {hostname}")
            self.extensions = Extensions(esmtp=False)
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
        """RFC 3207: STARTTLS, handshake; the caller says EHLO again."""
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            return reply
        try:
            await asyncio.wait_for(
                self.writer.start_tls(context, server_hostname=server_hostname), self.timeout
            )
        except (TimeoutError, OSError, ssl.SSLError, ssl.CertificateError) as exc:
            raise TlsFailed(str(exc)) from exc
        self.tls = True
        # RFC 3207 section 4.2: forget what was learnt before TLS.
        self.extensions = Extensions(esmtp=False)
        return reply

    def peer_chain(self) -> list[bytes]:
        """The certificates the server presented, leaf first, DER (for DANE,
        RFC 7672 section 3.1.2); the leaf alone where the chain is not known."""
        sslobj = self.writer.get_extra_info("ssl_object")
        if sslobj is None:
            return []
        inner = getattr(sslobj, "_sslobj", None)  # Python < 3.13: the chain is private
        get_chain = getattr(sslobj, "get_unverified_chain", None) or getattr(
            inner, "get_unverified_chain", None
        )
        chain = get_chain() if get_chain is not None else None
        if chain:
            return [
                c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
                for c in chain
            ]
        leaf = sslobj.getpeercert(binary_form=True)
        return [leaf] if leaf else []

    async def transaction(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        mail_params: Sequence[str] = (),
        rcpt_params: Mapping[str, Sequence[str]] | None = None,
        *,
        reset_within: float | None = None,
    ) -> TransactionResult:
        """MAIL, RCPT for each recipient, DATA: pipelined when the server
        offers PIPELINING (RFC 2920 section 3.1: MAIL, RCPTs and DATA in one
        batch, replies read in order), one by one otherwise. ``rcpt_params``:
        each recipient's RCPT parameters (RFC 3461 NOTIFY, ORCPT).

        ``reset_within``: the session is a reused one, checked first with
        RSET (RFC 5321 section 4.1.1.5), whose 250 must come within that
        many seconds; else :class:`StaleSession` is raised and nothing of
        the message was sent. With PIPELINING the RSET opens the same batch
        (RFC 2920 section 3.1: RSET may appear anywhere in a pipelined
        group), saving its round trip; if it fails after MAIL, RCPT and
        DATA went out, the caller drops the connection before any message
        data is sent, so the server delivers nothing.

        A server that offers CHUNKING gets the message in one ``BDAT n
        LAST`` instead of DATA (RFC 3030 section 2): no dot-stuffing and no
        354 to wait for. It is sent only once a recipient was accepted,
        never pipelined behind the RCPTs: a server that refused the BDAT
        command without reading its chunk would otherwise take the
        message's lines for commands."""
        params = "".join(f" {p}" for p in mail_params)
        mail_line = f"MAIL FROM:<{sender}>{params}\r\n".encode()
        rcpt_lines = [
            f"RCPT TO:<{r}>{''.join(f' {p}' for p in (rcpt_params or {}).get(r, ()))}\r\n".encode()
            for r in recipients
        ]
        chunking = "CHUNKING" in self.extensions
        rcpt: dict[str, Reply] = {}
        data_go: Reply | None = None
        if "PIPELINING" in self.extensions:
            batch = mail_line + b"".join(rcpt_lines) + (b"" if chunking else b"DATA\r\n")
            if reset_within is not None:
                await self._checked_reset(b"RSET\r\n" + batch, reset_within)
            else:
                await self.send(batch)
            mail = await self.read_reply()
            for r in recipients:
                rcpt[r] = await self.read_reply()
            if not chunking:
                data_go = await self.read_reply()
        else:
            if reset_within is not None:
                await self._checked_reset(b"RSET\r\n", reset_within)
            await self.send(mail_line)
            mail = await self.read_reply()
            if not mail.positive:
                return TransactionResult(mail, {r: mail for r in recipients}, None)
            for r, line in zip(recipients, rcpt_lines, strict=True):
                await self.send(line)
                rcpt[r] = await self.read_reply()
            if not any(reply.positive for reply in rcpt.values()):
                await self.reset()
                return TransactionResult(mail, rcpt, None)
            if not chunking:
                data_go = await self.command("DATA")
        accepted = mail.positive and any(reply.positive for reply in rcpt.values())
        if chunking:
            if not accepted:
                await self.reset()
                return TransactionResult(mail, rcpt, None)
            data = crlf_lines(message)
            await self.send(b"BDAT %d LAST\r\n" % len(data) + data)
            return TransactionResult(mail, rcpt, await self.read_reply())
        assert data_go is not None
        if data_go.code != 354:
            # DATA refused: its reply decides for the recipients accepted.
            return TransactionResult(mail, rcpt, data_go if accepted else None)
        if not accepted:
            # RFC 2920 section 3.1: a server should refuse DATA when no RCPT
            # succeeded; this one did not. Send nothing: drop the connection.
            raise ConnectionLost("354 to DATA without recipients")
        await self.send(dot_stuff(message))
        final = await self.read_reply()
        return TransactionResult(mail, rcpt, final)

    async def _checked_reset(self, data: bytes, within: float) -> None:
        """Send ``data`` (RSET first) and read RSET's reply within
        ``within`` seconds; :class:`StaleSession` unless it is 250."""
        timeout, self.timeout = self.timeout, min(self.timeout, within)
        try:
            await self.send(data)
            reply = await self.read_reply()
        except ConnectionLost as exc:  # closed, or silent past the timeout
            raise StaleSession(f"cached session gone ({exc})") from exc
        finally:
            self.timeout = timeout
        if reply.code != 250:
            raise StaleSession(f"cached session answered RSET with {reply}")

    async def reset(self) -> None:
        await self.command("RSET")

    async def quit(self) -> None:
        """QUIT and close; never raises."""
        try:
            await asyncio.wait_for(self.command("QUIT"), min(self.timeout, 5))
        except Exception:
            pass
        self.abort()

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass


class TlsFailed(ConnectionLost):
    """The STARTTLS handshake or certificate verification failed."""

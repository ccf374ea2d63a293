"""Anti-virus through clamd: a small asyncio client and the check stage's check.

The wire protocol (clamd(8), "INSTREAM"): the client sends
``zINSTREAM\\0`` (the ``z`` asks for NUL-terminated replies), then the
message as chunks, each a 4-octet big-endian length and that many octets,
then a zero-length chunk. clamd answers one reply and closes:
``stream: OK``, ``stream: <signature> FOUND`` or ``<text> ERROR``. When the
stream passes clamd's StreamMaxLength it answers ``INSTREAM size limit
exceeded. ERROR`` and closes, possibly while we are still writing: that is
an error (the message was not scanned), never a pass.

The message is streamed from where it is: bytes through memoryview slices,
a spooled message as its prefix then its file read chunk by chunk in a
thread, so no second whole copy is made. Every scan has one deadline
(``timeout``) covering connect, send and reply, so a clamd that is slow,
stuck or hostile costs its caller at most that long and nobody else
anything. One connection per scan (clamd closes it after INSTREAM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from conf.settings import Settings
from delivery.checks import Action, Subject, Verdict
from delivery.spool import Message, Spooled

log = logging.getLogger("delivery.clamd")

COMMAND = b"zINSTREAM\0"
END_OF_STREAM = b"\0\0\0\0"
CHUNK_SIZE = 256 * 1024
REPLY_MAX = 4096  # a clamd reply is one short line
SIGNATURE_MAX = 200
_LENGTH = struct.Struct(">I")

# RFC 3463 section 3.8: X.7.1 delivery not authorized, message refused.
VIRUS_FOUND = (554, "5.7.1", "Message refused: virus found: {}")
SCANNER_UNAVAILABLE = (451, "4.7.1", "Virus scanner unavailable, try again later")


class ClamdError(Exception):
    """clamd could not give a verdict (unreachable, timed out, an ERROR or
    unexpected reply); ``str(err)`` is for the log."""


@dataclass(frozen=True)
class ClamdAddress:
    """A Unix socket ``path`` or a TCP ``host`` and ``port``."""

    path: str | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, value: str) -> ClamdAddress:
        """``/path/to/clamd.ctl``, ``host:port`` or ``[v6addr]:port``."""
        if value.startswith("/"):
            return cls(path=value)
        host, sep, port = value.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is neither an absolute socket path nor host:port")
        return cls(host=host, port=int(port))

    def __str__(self) -> str:
        return self.path or f"{self.host}:{self.port}"


async def message_chunks(message: Message, size: int) -> AsyncIterator[bytes | memoryview]:
    """``message`` in pieces of at most ``size`` octets, none empty; a
    spooled message's file is read in a worker thread, a piece at a time."""
    if isinstance(message, Spooled):
        head, offset, end = memoryview(message.prefix), message.offset, message.file_size
    else:
        head, offset, end = memoryview(message), 0, 0
    for start in range(0, len(head), size):
        yield head[start : start + size]
    if offset >= end or not isinstance(message, Spooled):
        return
    fh = await asyncio.to_thread(message.path.open, "rb")
    try:
        await asyncio.to_thread(fh.seek, offset)
        while offset < end:
            piece = await asyncio.to_thread(fh.read, min(size, end - offset))
            if not piece:
                raise ClamdError(f"spool file {message.path.name} ended early")
            offset += len(piece)
            yield piece
    finally:
        fh.close()


def parse_reply(raw: bytes) -> str | None:
    """The signature clamd found, or None for ``stream: OK``. ClamdError for
    an ERROR reply (the size limit among them) or anything unexpected."""
    text = raw.decode("utf-8", "replace").strip()
    if text.endswith("ERROR"):
        raise ClamdError(f"clamd: {text[:200]}")
    if text == "stream: OK":
        return None
    if text.startswith("stream: ") and text.endswith(" FOUND") and len(text) > 14:
        name = text[len("stream: ") : -len(" FOUND")].strip()
        if name:
            # Shown in an SMTP reply: printable ASCII only, no CR/LF.
            safe = "".join(ch if "!" <= ch <= "~" else "?" for ch in name)
            return safe[:SIGNATURE_MAX]
    raise ClamdError(f"unexpected clamd reply {text[:80]!r}")


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    """Up to the terminating NUL (or EOF); at most REPLY_MAX octets."""
    data = b""
    while len(data) <= REPLY_MAX:
        part = await reader.read(REPLY_MAX + 1 - len(data))
        if not part:
            return data
        data += part
        end = data.find(b"\0")
        if end >= 0:
            return data[:end]
    raise ClamdError("clamd reply too long")


class ClamdClient:
    """Scans messages with clamd at ``address`` (see the module docstring)."""

    def __init__(
        self, address: ClamdAddress | str, timeout: float, chunk_size: int = CHUNK_SIZE
    ) -> None:
        self.address = address if isinstance(address, ClamdAddress) else ClamdAddress.parse(address)
        self.timeout = timeout
        self.chunk_size = chunk_size

    async def scan(self, message: Message) -> str | None:
        """The signature found in ``message``, or None if clean. ClamdError
        when clamd gives no verdict within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._scan(message)
        except TimeoutError:
            raise ClamdError(
                f"clamd at {self.address} gave no answer in {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise ClamdError(f"clamd at {self.address}: {exc.strerror or exc}") from exc

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.address.path is not None:
            return await asyncio.open_unix_connection(self.address.path)
        return await asyncio.open_connection(self.address.host, self.address.port)

    async def _scan(self, message: Message) -> str | None:
        reader, writer = await self._connect()
        reply = asyncio.ensure_future(_read_reply(reader))
        complete = False
        try:
            writer.write(COMMAND)
            # clamd may answer early (its size limit) and close: stop
            # sending then, and read what it said.
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                async with contextlib.aclosing(message_chunks(message, self.chunk_size)) as chunks:
                    async for chunk in chunks:
                        if reply.done():
                            break
                        writer.write(_LENGTH.pack(len(chunk)))
                        writer.write(chunk)
                        await writer.drain()
                        # drain() yields only above the high-water mark: a
                        # turn of the loop lets an early answer reach ``reply``
                        # before the stream ends, however fast the socket is.
                        await asyncio.sleep(0)
                        await asyncio.sleep(0)
                    else:
                        writer.write(END_OF_STREAM)
                        await writer.drain()
                        complete = True
            raw = await reply
        finally:
            if not reply.done():
                reply.cancel()
            writer.transport.abort()  # clamd answers once; nothing left to say
        found = parse_reply(raw)
        if not complete:
            raise ClamdError(f"clamd answered before the end of the stream: {raw[:80]!r}")
        return found


class ClamdCheck:
    """The anti-virus check: REJECT (554 5.7.1 naming the signature) when
    clamd finds something, on every flow. When clamd gives no verdict,
    ``on_error`` decides: ``tempfail`` (451 4.7.1) or ``accept`` with an
    ``X-Virus-Scanned`` field saying the message was not scanned."""

    name = "antivirus"

    def __init__(self, client: ClamdClient, on_error: str, hostname: str) -> None:
        self.client = client
        self.on_error = on_error
        self.hostname = hostname

    @classmethod
    def from_settings(cls, settings: Settings) -> ClamdCheck:
        av = settings.antivirus
        client = ClamdClient(av.clamd_socket, av.timeout_seconds)
        return cls(client, av.on_error, settings.server.hostname)

    async def check(self, subject: Subject) -> Verdict:
        try:
            found = await self.client.scan(subject.message)
        except ClamdError as exc:
            log.warning("message from <%s> not scanned: %s", subject.mail_from, exc)
            if self.on_error == "accept":
                field = f"X-Virus-Scanned: no, scanner unavailable at {self.hostname}\r\n"
                return Verdict(Action.ACCEPT, headers=field.encode(), check=self.name)
            return Verdict(Action.TEMPFAIL, SCANNER_UNAVAILABLE, check=self.name)
        if found is None:
            return Verdict(check=self.name)
        log.info("%s flow: virus %s from <%s>", subject.flow.value, found, subject.mail_from)
        code, enhanced, text = VIRUS_FOUND
        return Verdict(Action.REJECT, (code, enhanced, text.format(found)), check=self.name)


__all__ = [
    "ClamdAddress",
    "ClamdCheck",
    "ClamdClient",
    "ClamdError",
    "message_chunks",
    "parse_reply",
]

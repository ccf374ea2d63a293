"""CATENATE (RFC 4469): an APPEND message assembled from TEXT literals and
URLs of messages (or parts) already stored in the same account.

:func:`assemble` turns a :class:`~imapd.imap.wire.commands.Catenate` into
what APPEND stores: bytes while the message is below
``imap.spool_threshold``, past it a spool file of the session (removed with
the command's other spool files on every path), so the assembled message is
never held whole in memory beyond what a plain APPEND literal is. URL parts
are read by the FETCH BODY.PEEK[section] ranges (fetch.section_source), in
chunks, byte for byte. The size limit applies to the whole assembled
message, checked before each part's octets are copied (RFC 4469 section 5,
[TOOBIG]); a URL that does not resolve is [BADURL url] (RFC 4469 section 5).
"""

from __future__ import annotations

import asyncio
import re

from delivery.spool import SpoolFile
from imapd.imap.commands.fetch import section_source
from imapd.imap.imapurl import parse_message_url
from imapd.imap.session import DEFAULT_SPOOL_THRESHOLD, Session
from imapd.imap.wire.commands import Catenate, Section
from storage.errors import ErrorKind, StorageError
from storage.model import StoredMessage, UidSet

_READ_CHUNK = 1024 * 1024
# RFC 4469 section 5: url-resp-text = 1*(%x01-09 / %x0B-0C / %x0E-5C / %x5E-7F)
_NOT_URL_RESP_TEXT = re.compile(r"[^\x01-\x09\x0b\x0c\x0e-\x5c\x5e-\x7f]")
_MAX_ECHOED_URL = 1024


class TooBig(Exception):
    """The assembled message would pass the size limit (RFC 4469 section 5)."""


class BadUrl(Exception):
    """A URL part that does not resolve (RFC 4469 section 5)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url

    @property
    def code(self) -> str:
        """The BADURL response code, the URL made fit for resp-text."""
        return "BADURL " + (_NOT_URL_RESP_TEXT.sub("", self.url)[:_MAX_ECHOED_URL] or "/")


class _Sink:
    """Memory up to ``spool_at`` octets, then a spool file of the session."""

    def __init__(self, s: Session, limit: int, spool_at: int) -> None:
        self.s = s
        self.limit = limit
        self.spool_at = spool_at
        self.size = 0
        self.buf = bytearray()
        self.spool: SpoolFile | None = None

    def reserve(self, octets: int) -> None:
        """Refuse, before copying, a part that takes the message past the limit."""
        if self.size + octets > self.limit:
            raise TooBig

    def write(self, data: bytes) -> None:
        self.reserve(len(data))
        self.size += len(data)
        if self.spool is None and self.size > self.spool_at:
            self.spool = self.s.new_spool()
            if self.spool is None:
                raise StorageError(ErrorKind.TEMPORARY, "no spool space for CATENATE")
            self.spool.write(bytes(self.buf))
            self.buf = bytearray()
        if self.spool is not None:
            self.spool.write(data)
        else:
            self.buf += data

    def result(self) -> bytes | SpoolFile:
        if self.spool is None:
            return bytes(self.buf)
        self.spool.close()
        return self.spool


def _part_size(part: object) -> int:
    if isinstance(part, SpoolFile):
        return part.size
    return len(part) if isinstance(part, bytes) else 0


async def _copy_spooled(part: SpoolFile, sink: _Sink) -> None:
    """A spooled TEXT literal into the sink, a chunk at a time (page cache
    reads, the event loop yielded between chunks)."""
    with part.path.open("rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            sink.write(chunk)
            await asyncio.sleep(0)


class _Resolver:
    """Resolves URL parts against the account, caching each message read."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.messages: dict[tuple[int, int], StoredMessage | None] = {}

    async def message(self, url: str) -> tuple[StoredMessage, Section, tuple | None]:
        s = self.s
        assert s.mail is not None and s.account is not None
        parsed = parse_message_url(url)
        if parsed is None:
            raise BadUrl(url)
        if parsed.mailbox is None:
            # RFC 5092 section 7.2: relative to the selected mailbox.
            if s.selected is None:
                raise BadUrl(url)
            box = s.selected.mailbox
        else:
            try:
                box = await s.mailbox_id_of(parsed.mailbox)
            except StorageError as err:
                if err.kind is ErrorKind.NOT_FOUND:
                    raise BadUrl(url) from None
                raise
        # RFC 5092 section 6: a URL with another UIDVALIDITY names no message here.
        if parsed.uidvalidity is not None and parsed.uidvalidity != box.uidvalidity:
            raise BadUrl(url)
        key = (box.id, parsed.uid)
        if key not in self.messages:
            found = await s.mail.fetch(s.account.id, box.id, UidSet.of([parsed.uid]))
            self.messages[key] = found[0] if found else None
        stored = self.messages[key]
        if stored is None:
            raise BadUrl(url)
        return stored, parsed.section or Section(), parsed.partial


async def assemble(s: Session, cat: Catenate) -> bytes | SpoolFile:
    """The message ``cat`` describes. Raises TooBig, BadUrl, or
    StorageError for a storage failure (a temporary NO)."""
    limit = s.ctx.max_literal
    if sum(_part_size(p) for p in cat.parts) > limit:
        raise TooBig  # known before any URL is read
    spool_at = int(s.ctx.setting("imap", "spool_threshold", DEFAULT_SPOOL_THRESHOLD))  # type: ignore[call-overload]
    sink = _Sink(s, limit, spool_at)
    resolver = _Resolver(s)
    for part in cat.parts:
        if isinstance(part, str):
            stored, section, partial = await resolver.message(part)
            source = await section_source(s, stored, section, partial)
            if source is None:
                raise BadUrl(part)  # a section the message does not have
            sink.reserve(source.size)
            async for chunk in source.chunks():
                sink.write(chunk)
        elif isinstance(part, SpoolFile):
            sink.reserve(part.size)
            await _copy_spooled(part, sink)
        elif isinstance(part, bytes):
            sink.write(part)
        else:
            raise TypeError(f"CATENATE part of type {type(part).__name__}")
    return sink.result()

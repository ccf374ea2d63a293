"""Reading a stored message for display, from its parsed body structure.

Ingest parsed the message once into a :class:`storage.model.BodyPart` tree
whose offsets index the raw blob; here that tree picks the text and HTML
bodies and the attachments, and only the needed byte ranges of the blob are
read and decoded (RFC 2045 section 6 transfer encodings, RFC 2046 charsets).
Attachments are numbered in depth-first order, the same order
:func:`message_parts` lists them in, so ``/attachments/{n}`` is stable.
"""

from __future__ import annotations

import binascii
import codecs
import email.errors
import email.header
import re
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

from storage.api import BlobStore
from storage.model import BodyPart

READ_CHUNK = 256 * 1024
_SAFE_FILENAME = re.compile(r'[\x00-\x1f\x7f"\\/]')


@dataclass(frozen=True)
class Attachment:
    index: int
    filename: str
    content_type: str
    size: int  # encoded octets in the message; see decoded_size for what a download holds
    part: BodyPart
    inline: bool
    content_id: str | None


@dataclass(frozen=True)
class MessageParts:
    text: BodyPart | None
    html: BodyPart | None
    attachments: tuple[Attachment, ...]


def _param(params: tuple[tuple[str, str], ...], name: str) -> str | None:
    """A MIME parameter, RFC 2231 extended form (``name*``) preferred."""
    lookup = {k.lower(): v for k, v in params}
    extended = lookup.get(name + "*")
    if extended is not None:
        charset, _, rest = extended.partition("'")
        _lang, _, encoded = rest.partition("'")
        if not _:
            return urllib.parse.unquote(extended)
        try:
            return urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="replace")
        except LookupError:
            return urllib.parse.unquote(encoded, errors="replace")
    value = lookup.get(name)
    if value is None:
        continuations = sorted(
            (int(k[len(name) + 1 :]), v) for k, v in lookup.items()
            if k.startswith(name + "*") and k[len(name) + 1 :].isdigit()
        )
        if not continuations:
            return None
        value = "".join(v for _, v in continuations)
    if "=?" in value:
        try:
            value = str(email.header.make_header(email.header.decode_header(value)))
        except (LookupError, ValueError, email.errors.HeaderParseError):
            pass
    return value


def _filename(part: BodyPart) -> str | None:
    name = None
    if part.disposition is not None:
        name = _param(part.disposition[1], "filename")
    if not name:
        name = _param(part.params, "name")
    return name


def message_parts(body: BodyPart) -> MessageParts:
    """The first text/plain and text/html body parts not marked as
    attachments (within multipart/alternative, the last of each kind wins,
    RFC 2046 section 5.1.4), and every other leaf as an attachment."""
    text: BodyPart | None = None
    html: BodyPart | None = None
    attachments: list[Attachment] = []

    def visit(part: BodyPart, in_alternative: bool) -> None:
        nonlocal text, html
        if part.type == "multipart":
            for child in part.children:
                visit(child, part.subtype == "alternative")
            return
        disposition = part.disposition[0].lower() if part.disposition else None
        name = _filename(part)
        if part.type == "text" and disposition != "attachment" and not name:
            if part.subtype == "plain" and (text is None or in_alternative):
                text = part
                return
            if part.subtype == "html" and (html is None or in_alternative):
                html = part
                return
        index = len(attachments)
        content_type = f"{part.type}/{part.subtype}"
        if not name:
            ext = "eml" if content_type == "message/rfc822" else "bin"
            name = f"part-{index + 1}.{ext}"
        attachments.append(Attachment(
            index=index,
            filename=name,
            content_type=content_type,
            size=max(0, part.end - part.body_start),
            part=part,
            inline=disposition == "inline",
            content_id=part.id.strip("<>") if part.id else None,
        ))

    visit(body, False)
    return MessageParts(text, html, tuple(attachments))


def charset_of(part: BodyPart) -> str:
    charset = (_param(part.params, "charset") or "us-ascii").strip().lower()
    try:
        codecs.lookup(charset)
    except LookupError:
        return "utf-8"
    if charset in ("us-ascii", "ascii"):
        return "utf-8"  # mislabelled 8-bit mail is common; utf-8 is a superset
    return charset


# RFC 2045 section 6.8: characters outside the base64 alphabet are ignored.
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_IGNORED = bytes(b for b in range(256) if b not in _B64_ALPHABET and b != ord("="))


class Base64Decoder:
    """Incremental base64 (RFC 2045 section 6.8) for bodies read in chunks.

    Contract: the concatenation of every :meth:`feed` result and the final
    :meth:`finish` equals the decoded body, however the input was split.
    Line breaks and junk are skipped; the first "=" ends the data (it is
    padding, which only appears at the end); a final group of two or three
    sextets still yields its one or two octets, as padded input would, and a
    lone sextet (no whole octet) is dropped. Linear in the input.
    """

    def __init__(self) -> None:
        self._pending = b""  # fewer than four alphabet characters
        self._ended = False

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        pad = chunk.find(b"=")
        if pad >= 0:
            chunk, self._ended = chunk[:pad], True
        clean = self._pending + chunk.translate(None, _B64_IGNORED)
        usable = len(clean) - len(clean) % 4
        self._pending = clean[usable:]
        return binascii.a2b_base64(clean[:usable]) if usable else b""

    def finish(self) -> bytes:
        rest, self._pending, self._ended = self._pending, b"", True
        if len(rest) < 2:
            return b""
        return binascii.a2b_base64(rest + b"=" * (4 - len(rest)))


class QuotedPrintableDecoder:
    """Incremental quoted-printable (RFC 2045 section 6.7) with the same
    contract as :class:`Base64Decoder`: input is held back only while an
    "=" escape or soft line break may be cut by the chunk boundary."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        # An escape is "=XX" or "=" CRLF: at most two more octets follow the "=".
        escape = data.rfind(b"=", max(0, len(data) - 2))
        cut = escape if escape >= 0 else len(data)
        data, self._pending = data[:cut], data[cut:]
        return binascii.a2b_qp(data)

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return binascii.a2b_qp(rest)


class IdentityDecoder:
    """7bit, 8bit, binary and unknown encodings: the body as stored."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""


Decoder = Base64Decoder | QuotedPrintableDecoder | IdentityDecoder


def transfer_decoder(encoding: str) -> Decoder:
    """The incremental decoder for a Content-Transfer-Encoding (RFC 2045 section 6)."""
    encoding = encoding.upper()
    if encoding == "BASE64":
        return Base64Decoder()
    if encoding == "QUOTED-PRINTABLE":
        return QuotedPrintableDecoder()
    return IdentityDecoder()


def decode_transfer(data: bytes, encoding: str) -> bytes:
    """RFC 2045 section 6: undo base64 / quoted-printable; others are identity."""
    decoder = transfer_decoder(encoding)
    return decoder.feed(data) + decoder.finish()


async def read_text(blobs: BlobStore, blob_key: str, part: BodyPart) -> str:
    raw = await blobs.get_range(blob_key, part.body_start, part.end)
    return decode_transfer(raw, part.encoding).decode(charset_of(part), errors="replace")


async def stream_decoded(blobs: BlobStore, blob_key: str, part: BodyPart) -> AsyncIterator[bytes]:
    """The part's decoded body in chunks, reading the blob range piecewise so
    a large attachment is never held in memory whole."""
    decoder = transfer_decoder(part.encoding)
    pos = part.body_start
    while pos < part.end:
        chunk = await blobs.get_range(blob_key, pos, min(part.end, pos + READ_CHUNK))
        if not chunk:
            break
        pos += len(chunk)
        out = decoder.feed(chunk)
        if out:
            yield out
    tail = decoder.finish()
    if tail:
        yield tail


async def decoded_size(blobs: BlobStore, blob_key: str, part: BodyPart) -> int:
    """Octets the part's body decodes to: what downloading it gives. Exact,
    so base64 and quoted-printable bodies are decoded piecewise (in C, one
    read chunk at a time) and counted; other encodings are their size."""
    if part.encoding.upper() not in ("BASE64", "QUOTED-PRINTABLE"):
        return max(0, part.end - part.body_start)
    return sum([len(chunk) async for chunk in stream_decoded(blobs, blob_key, part)])


def content_disposition(filename: str, inline: bool) -> str:
    """RFC 6266 header with an ASCII fallback and the RFC 5987 UTF-8 form."""
    fallback = _SAFE_FILENAME.sub("_", filename).encode("ascii", "replace").decode("ascii")
    fallback = fallback.replace("?", "_") or "attachment"
    quoted = urllib.parse.quote(filename, safe="")
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quoted}"

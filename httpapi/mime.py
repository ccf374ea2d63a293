"""Reading a stored message for display, from its parsed body structure.

Ingest parsed the message once into a :class:`storage.model.BodyPart` tree
whose offsets index the raw blob; here that tree picks the text and HTML
bodies and the attachments, and only the needed byte ranges of the blob are
read and decoded (RFC 2045 section 6 transfer encodings, RFC 2046 charsets).
Attachments are numbered in depth-first order, the same order
:func:`message_parts` lists them in, so ``/attachments/{n}`` is stable.
"""

from __future__ import annotations

import codecs
import contextlib
import email.errors
import email.header
import re
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

from storage.api import BlobStore
from storage.model import BodyPart
from storage.transfer_decode import decode_transfer, transfer_decoder

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
            (int(k[len(name) + 1 :]), v)
            for k, v in lookup.items()
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
        attachments.append(
            Attachment(
                index=index,
                filename=name,
                content_type=content_type,
                size=max(0, part.end - part.body_start),
                part=part,
                inline=disposition == "inline",
                content_id=part.id.strip("<>") if part.id else None,
            )
        )

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


async def read_text(blobs: BlobStore, blob_key: str, part: BodyPart) -> str:
    raw = await blobs.get_range(blob_key, part.body_start, part.end)
    return decode_transfer(raw, part.encoding).decode(charset_of(part), errors="replace")


async def stream_decoded(blobs: BlobStore, blob_key: str, part: BodyPart) -> AsyncIterator[bytes]:
    """The part's decoded body in chunks, its blob range read as one stream
    (``BlobStore.stream_range``: one GET per stored piece on S3) so a large
    attachment is never held in memory whole."""
    decoder = transfer_decoder(part.encoding)
    if part.end > part.body_start:
        chunks = blobs.stream_range(blob_key, part.body_start, part.end, READ_CHUNK)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
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

"""MIME parsing for ingest: raw RFC 5322 bytes in, a frozen ParsedMessage out.

The content API has three modules along its three jobs: this one parses
(header blocks, parameters, boundaries, the body structure), and
re-exports the other two, :mod:`storage.imapstruct` (ENVELOPE addresses,
the stored JSON form) and :mod:`storage.text` (charsets, encoded words,
HTML to text, the indexed body text).

The parse is pure and synchronous (callers run it in a thread) and never
raises on bad input: broken MIME is stored byte-exact by ingest and indexed
as far as it parses.

Offsets are computed by scanning the raw bytes (RFC 2046 section 5.1.1
boundaries) rather than taken from a re-serialised ``email.message``, so
IMAP FETCH BODY[section] can slice the blob directly. CRLF and bare-LF
line endings (even mixed) are both handled: a line ends at LF, and a CR
right before that LF belongs to the line ending.

Choices where the RFCs leave room, documented once here:

* Header bytes that are not valid UTF-8 are decoded per header field as
  UTF-8, falling back to latin-1 for the whole field when it is not valid
  UTF-8 (latin-1 maps every byte, so nothing is lost and nothing raises).
* The header block of an entity ends at the first empty line. A line
  without a colon inside it is skipped (it does not end the header, unlike
  the stdlib feed parser), so one garbage line does not turn the rest of
  the header into body. An entity whose first line is not a header field
  has no header at all: ``header_start == body_start``.
* A multipart whose boundary never appears (or that names none) gets one
  synthetic headerless text/plain child spanning its whole body, so its
  text stays readable and BODYSTRUCTURE keeps the 1*body RFC 3501 demands.
* NUL characters never reach stored strings (they become U+FFFD in the
  envelope and are dropped from derived text): PostgreSQL text and jsonb
  refuse them.
* ``size`` and ``lines`` count octets and lines as stored (bare LF counts
  one octet).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import mmap
import re
import urllib.parse
from dataclasses import dataclass

# Re-exported: callers import the whole content API from here.
from storage.imapstruct import (
    JSON_VERSION,
    addresses_text,
    envelope,
    parse_addresses,
    parsed_from_json,
    parsed_to_json,
)
from storage.model import BodyPart, Envelope, ParsedMessage
from storage.text import (
    MAX_BODY_TEXT,
    _body_text,
    _clean,
    _header_text,
    _is_attachment,
    _walk,
    decode_charset,
    decode_words,
    html_to_text,
)

__all__ = [
    "JSON_VERSION",
    "MAX_BODY_TEXT",
    "MAX_NESTING",
    "addresses_text",
    "decode_charset",
    "decode_words",
    "header_end",
    "html_to_text",
    "parse_addresses",
    "parse_message",
    "parsed_from_json",
    "parsed_to_json",
]

# Deeper nesting than this is treated as opaque data: stops recursion
# bombs (Dovecot's default message_max_nesting is 100 as well).
MAX_NESTING = 100
PREVIEW_CHARS = 200

_TEXT_PLAIN_DEFAULT: tuple[tuple[str, str], ...] = (("charset", "us-ascii"),)
_HEADER_LINE = re.compile(rb"[^\s:]+[ \t]*:")
_WSP = b" \t"
_BLANK_LINE = re.compile(rb"\n\r?\n")  # a line ending, then an empty line


# ---------------------------------------------------------------------------
# Header block.
# ---------------------------------------------------------------------------


@dataclass
class _Fields:
    """Header fields of one entity in order: (lower-case name, unfolded value)."""

    items: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        for k, v in self.items:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]


def _line_end(raw: bytes, pos: int, end: int) -> int:
    """Index just past the line starting at ``pos`` (its LF included)."""
    nl = raw.find(b"\n", pos, end)
    return end if nl < 0 else nl + 1


def _is_blank(line: bytes) -> bool:
    return line in (b"\n", b"\r\n")


def header_end(raw: bytes, start: int, end: int) -> int:
    """Return ``body_start`` of the entity at ``start``..``end``.

    RFC 5322 section 2.1: the header ends at the first empty line, which
    belongs to the header block. No empty line: the header runs to ``end``.
    """
    if start >= end:
        return end
    first = raw[start : _line_end(raw, start, end)]
    if _is_blank(first):
        return start + len(first)
    if not _HEADER_LINE.match(first) and not first.startswith(b"From "):
        return start  # no header at all: the entity is all body
    m = _BLANK_LINE.search(raw, start, end)
    return end if m is None else m.end()


def _parse_fields(block: bytes) -> _Fields:
    """Split a header block into unfolded fields (RFC 5322 section 2.2.3).

    Values are as sent: encoded-words kept, leading and trailing white space
    stripped. Lines without a colon are skipped.
    """
    items: list[tuple[str, str]] = []
    name: bytes | None = None
    value: list[bytes] = []

    def flush() -> None:
        if name is not None:
            v = b"".join(value).strip(b" \t\r\n")
            items.append((_header_text(name).lower(), _header_text(v)))

    # Split at LF only: a lone CR inside a value must not start a new field.
    for line in block.split(b"\n"):
        body = line[:-1] if line.endswith(b"\r") else line
        if not body:
            break
        if body[:1] in (b" ", b"\t"):
            if name is not None:
                value.append(body)  # unfold: drop the line ending, keep the WSP
            continue
        colon = body.find(b":")
        if colon <= 0:
            continue  # garbage line or mbox "From " line
        flush()
        name = body[:colon].rstrip(_WSP)
        value = [body[colon + 1 :]]
    flush()
    return _Fields(items)


# One piece of a parameter list: a quoted-string (RFC 2045 section 5.1; an
# unterminated one runs to the end), a run of other text, or a ";". The
# alternatives start on distinct characters: no backtracking, linear.
_PARAM_PIECE = re.compile(r'"(?:[^"\\]|\\.)*"?|[^;"]+|;', re.DOTALL)
# RFC 2231 section 3 and 4: name*, name*N, name*N*.
_RFC2231_NAME = re.compile(r"([^*]+)\*(?:([0-9]{1,4})(\*?))?")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", value[1:-1])
    return value


def _rfc2231_value(segments: list[tuple[int, str, bool]]) -> str:
    """Join RFC 2231 continuations in order; percent-decode the encoded
    ones and decode with the charset named by the first (section 4)."""
    data = bytearray()
    charset: str | None = None
    for k, (_num, value, encoded) in enumerate(sorted(segments, key=lambda seg: seg[0])):
        if encoded and k == 0 and value.count("'") >= 2:
            charset, _lang, value = value.split("'", 2)
        data += urllib.parse.unquote_to_bytes(value) if encoded else value.encode("utf-8")
    return decode_charset(bytes(data), charset or None)


def _params(value: str | None) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(value, params) of a structured header (RFC 2045 section 5.1), the
    value and attribute names lower-case, RFC 2231 values collapsed; the
    first occurrence of a repeated attribute wins. None when absent.

    Our own single pass: the stdlib's ``_parseparam`` is quadratic on many
    parameters or an unterminated quote. Never raises."""
    if value is None:
        return None
    items: list[str] = []
    current: list[str] = []
    for m in _PARAM_PIECE.finditer(value):
        if m.group() == ";":
            items.append("".join(current))
            current = []
        else:
            current.append(m.group())
    items.append("".join(current))
    plain: list[tuple[str, str]] = []
    continued: dict[str, list[tuple[int, str, bool]]] = {}
    for item in items[1:]:
        name, _eq, raw = item.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        raw = _unquote(raw.strip())
        m = _RFC2231_NAME.fullmatch(name)
        if m is None:
            plain.append((name, raw))
            continue
        num = int(m.group(2)) if m.group(2) else 0
        encoded = name.endswith("*")
        continued.setdefault(m.group(1), []).append((num, raw, encoded))
    # As the stdlib did: plain attributes first, then the RFC 2231 ones.
    joined = [(name, _rfc2231_value(segs)) for name, segs in continued.items()]
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for name, val in plain + joined:
        if name not in seen:
            seen.add(name)
            out.append((name, _clean(val)))
    return items[0].strip().lower(), tuple(out)


# ---------------------------------------------------------------------------
# Body structure.
# ---------------------------------------------------------------------------


def _count_lines(raw: bytes, start: int, end: int) -> int:
    """Lines of ``raw[start:end]``; a last line without LF counts too."""
    if end <= start:
        return 0
    if isinstance(raw, bytes):
        n = raw.count(b"\n", start, end)
    else:  # an mmap has no count(): count in bounded slices
        n = sum(raw[i : min(i + (1 << 20), end)].count(b"\n") for i in range(start, end, 1 << 20))
    return n if raw[end - 1 : end] == b"\n" else n + 1


def _find_delimiters(
    raw: bytes, boundary: bytes, start: int, end: int
) -> list[tuple[int, int, bool]]:
    """RFC 2046 section 5.1.1 delimiter lines in ``start``..``end``.

    Each is (line start, index past its line ending, is close-delimiter).
    A delimiter is "--" boundary at the start of a line, then optional "--",
    then only transport padding (white space) up to the line end. Scanning
    stops after the close-delimiter.
    """
    dash = b"--" + boundary
    out: list[tuple[int, int, bool]] = []
    pos = start
    while True:
        i = raw.find(dash, pos, end)
        if i < 0:
            break
        pos = i + len(dash)
        if i != start and raw[i - 1 : i] != b"\n":
            continue
        after = _line_end(raw, i, end)
        rest = raw[i + len(dash) : after]
        close = rest.startswith(b"--")
        if close:
            rest = rest[2:]
        if rest.strip(b" \t\r\n"):
            continue  # a longer boundary sharing our prefix, or junk
        out.append((i, after, close))
        if close:
            break
        pos = after
    return out


class _Parser:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def entity(
        self, start: int, end: int, digest_child: bool = False, depth: int = 0
    ) -> tuple[BodyPart, _Fields]:
        """The BodyPart of the entity at ``start``..``end`` and its header."""
        raw = self.raw
        body_start = header_end(raw, start, end)
        fields = _parse_fields(raw[start:body_start])
        ctype = _params(fields.get("content-type"))
        if ctype is None or ctype[0].count("/") != 1 or not all(ctype[0].split("/")):
            # RFC 2045 section 5.2 default; RFC 2046 section 5.1.5 in a digest.
            if digest_child:
                mtype, subtype, params = "message", "rfc822", ()
            else:
                mtype, subtype, params = "text", "plain", _TEXT_PLAIN_DEFAULT
        else:
            mtype, subtype = (x.strip() for x in ctype[0].split("/"))
            params = ctype[1]
        cte = fields.get("content-transfer-encoding")
        encoding = (cte.split(";")[0].strip().upper() if cte else "") or "7BIT"
        disp = _params(fields.get("content-disposition"))
        if disp is not None and not disp[0]:
            disp = None
        lang = fields.get("content-language")
        language = None
        if lang is not None:
            language = tuple(x for x in re.split(r"[\s,]+", lang) if x) or None

        children: tuple[BodyPart, ...] = ()
        m_env: Envelope | None = None
        m_body: BodyPart | None = None
        lines: int | None = None
        if mtype == "multipart" and depth >= MAX_NESTING:
            mtype, subtype = "application", "octet-stream"  # too deep: opaque
        if mtype == "multipart":
            children = self.multipart(params, subtype, body_start, end, depth)
        elif mtype == "message" and subtype == "rfc822":
            if depth < MAX_NESTING:
                m_body, inner = self.entity(body_start, end, depth=depth + 1)
                m_env = envelope(inner.get)
            else:
                mtype, subtype = "application", "octet-stream"
        if mtype == "text" or (mtype, subtype) == ("message", "rfc822"):
            lines = _count_lines(raw, body_start, end)

        def opt(name: str) -> str | None:
            v = fields.get(name)
            return v if v else None

        part = BodyPart(
            type=mtype.lower(),
            subtype=subtype.lower(),
            params=params,
            id=opt("content-id"),
            description=opt("content-description"),
            encoding=encoding,
            size=end - body_start,
            lines=lines,
            md5=opt("content-md5"),
            disposition=disp,
            language=language,
            location=opt("content-location"),
            header_start=start,
            body_start=body_start,
            end=end,
            children=children,
            message_envelope=m_env,
            message_body=m_body,
        )
        return part, fields

    def multipart(
        self,
        params: tuple[tuple[str, str], ...],
        subtype: str,
        body_start: int,
        end: int,
        depth: int,
    ) -> tuple[BodyPart, ...]:
        raw = self.raw
        boundary = dict(params).get("boundary", "")
        delims: list[tuple[int, int, bool]] = []
        if boundary:
            # Header bytes were read as UTF-8 or else latin-1: try both back.
            for codec in ("utf-8", "latin-1"):
                delims = _find_delimiters(raw, boundary.encode(codec, "replace"), body_start, end)
                if delims or boundary.isascii():
                    break
        children: list[BodyPart] = []
        digest = subtype.lower() == "digest"
        for k, (_line, after, close) in enumerate(delims):
            if close:
                break
            if k + 1 < len(delims):
                nxt = delims[k + 1][0]
                # The line ending before a delimiter belongs to it (5.1.1).
                stop = nxt - 2 if raw[nxt - 2 : nxt] == b"\r\n" else nxt - 1
                stop = max(after, stop)
            else:
                stop = end  # no close-delimiter: the last part runs to the end
            children.append(self.entity(after, stop, digest, depth + 1)[0])
        if not children:
            # Boundary never seen: one headerless text part keeps the body
            # readable and BODYSTRUCTURE valid (RFC 3501 wants 1*body).
            children.append(
                BodyPart(
                    type="text",
                    subtype="plain",
                    params=_TEXT_PLAIN_DEFAULT,
                    id=None,
                    description=None,
                    encoding="7BIT",
                    size=end - body_start,
                    lines=_count_lines(raw, body_start, end),
                    md5=None,
                    disposition=None,
                    language=None,
                    location=None,
                    header_start=body_start,
                    body_start=body_start,
                    end=end,
                )
            )
        return tuple(children)


_MSG_ID = re.compile(r"<[^<>\s]*>")


def _first_msg_id(value: str | None) -> str | None:
    if not value:
        return None
    m = _MSG_ID.search(value)
    return m.group(0) if m else (value.split() or [None])[0]


def _sent_date(value: str | None) -> dt.datetime | None:
    """RFC 5322 section 3.3 date, timezone-aware; a missing or "-0000" zone
    is taken as UTC; None if unparsable."""
    if not value:
        return None
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if d is None:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d


def parse_message(raw: bytes | mmap.mmap, *, with_text: bool = True) -> ParsedMessage:
    """Parse a raw RFC 5322 message. Pure, synchronous, never raises.

    Offsets in the returned body structure index ``raw`` itself:
    ``raw[part.body_start:part.end]`` is a part's body as stored. An
    ``mmap`` of a spooled file is parsed in place, so a large APPEND or DATA
    is never copied whole into memory (only text parts are decoded).
    ``with_text=False`` skips the body text (and so search and preview).
    """
    if not isinstance(raw, bytes | mmap.mmap):
        raw = bytes(raw)
    parser = _Parser(raw)
    body, fields = parser.entity(0, len(raw))
    env = envelope(fields.get)
    # Without text: the structure alone, when the full parse ran too long.
    text = _body_text(raw, body) if with_text else ""
    preview = " ".join(text[: PREVIEW_CHARS * 4].split())[:PREVIEW_CHARS]
    has_att = any(_is_attachment(p) for p in _walk(body) if p is not body) or any(
        p.type == "message" and p.subtype == "rfc822" for p in _walk(body) if p is not body
    )
    subject = fields.get("subject")
    return ParsedMessage(
        size=len(raw),
        envelope=env,
        body=body,
        subject=decode_words(subject).strip() if subject else "",
        from_text=addresses_text(env.from_),
        to_text=addresses_text(env.to),
        cc_text=addresses_text(env.cc),
        message_id=_first_msg_id(fields.get("message-id")),
        in_reply_to=_first_msg_id(fields.get("in-reply-to")),
        references=tuple(_MSG_ID.findall(fields.get("references") or "")),
        sent_date=_sent_date(fields.get("date")),
        body_text=text,
        preview=preview,
        has_attachments=has_att,
    )

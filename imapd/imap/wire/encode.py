"""Response encoding (RFC 3501 sections 4 and 7): strings, flags, dates,
ENVELOPE, BODY and BODYSTRUCTURE, sequence sets.

Pure functions returning bytes. ENVELOPE and BODYSTRUCTURE read the
duck-typed storage model values (``storage.model.Envelope`` /
``BodyPart``) without importing storage at run time.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from imapd.imap.wire.utf7 import encode_mailbox

if TYPE_CHECKING:
    from storage.model import Address, BodyPart, Envelope

NIL = b"NIL"
CRLF = b"\r\n"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# Longest value sent as a quoted string; longer ones go as literals.
MAX_QUOTED = 1024
# Bytes a quoted string cannot hold: CR, LF, other controls and 8-bit (a
# regex scan, far cheaper than a Python loop over the bytes).
_NOT_QUOTABLE = re.compile(rb"[^\x20-\x7e]")


def string(value: str | bytes) -> bytes:
    """A quoted string when it is short 7-bit text, else a literal
    (RFC 3501 section 4.3: quoted strings cannot hold CR, LF or 8-bit)."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _quoted_or_literal(data, _NOT_QUOTABLE)


def _quoted_or_literal(data: bytes, not_quotable: re.Pattern[bytes]) -> bytes:
    if len(data) <= MAX_QUOTED and not_quotable.search(data) is None:
        if b"\\" in data or b'"' in data:
            data = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return b'"' + data + b'"'
    return b"{%d}\r\n" % len(data) + data


def nstring(value: str | bytes | None) -> bytes:
    return NIL if value is None else string(value)


def mailbox(name: str, utf8: bool = False) -> bytes:
    """A mailbox name in modified UTF-7 (RFC 3501 section 5.1.3), or once
    the client enabled UTF8=ACCEPT as a UTF-8 quoted string (RFC 6855
    section 3: no modified UTF-7 any more)."""
    if not utf8:
        return string(encode_mailbox(name))
    return utf8_quoted(name)


# RFC 6855 section 3: what a UTF-8 quoted string cannot hold (CR, LF and
# other controls); UTF-8 itself it can.
_NOT_UTF8_QUOTABLE = re.compile(rb"[\x00-\x1f\x7f]")


def utf8_quoted(value: str) -> bytes:
    """RFC 6855 section 3 quoted = DQUOTE *uQUOTED-CHAR DQUOTE, for a
    client that enabled UTF8=ACCEPT; a literal when it cannot be one."""
    return _quoted_or_literal(value.encode("utf-8"), _NOT_UTF8_QUOTABLE)


def flags(values: Iterable[str]) -> bytes:
    """A flag list; keywords that are not valid atoms (set by other
    protocols) are left out rather than break the response."""
    return b"(" + " ".join(f for f in values if _is_flag(f)).encode("ascii") + b")"


def _is_flag(flag: str) -> bool:
    name = flag[1:] if flag.startswith("\\") else flag
    return bool(name) and all(33 <= ord(ch) < 127 and ch not in _ATOM_SPECIALS for ch in name)


_ATOM_SPECIALS = frozenset('(){%*"\\]')


def internal_date(when: dt.datetime) -> bytes:
    """RFC 3501 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz"."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    off = when.utcoffset() or dt.timedelta()
    minutes = int(off.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return (
        f'"{when.day:02d}-{_MONTHS[when.month - 1]}-{when.year:04d} '
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d} "
        f'{sign}{minutes // 60:02d}{minutes % 60:02d}"'
    ).encode("ascii")


def sequence_set(numbers: Sequence[int]) -> bytes:
    """Sorted numbers -> compact "1:3,7" (RFC 3501 sequence-set)."""
    if not numbers:
        return b""
    out: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:]:
        if n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = n
    out.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(out).encode("ascii")


def _address_list(addresses: Sequence[Address]) -> bytes:
    if not addresses:
        return NIL
    parts = [
        b"("
        + b" ".join((nstring(a.name), nstring(a.adl), nstring(a.mailbox), nstring(a.host)))
        + b")"
        for a in addresses
    ]
    return b"(" + b"".join(parts) + b")"


def envelope(env: Envelope) -> bytes:
    """RFC 3501 section 7.4.2 ENVELOPE. Empty Sender/Reply-To default to
    From, as the RFC requires of the server."""
    sender = env.sender or env.from_
    reply_to = env.reply_to or env.from_
    return (
        b"("
        + b" ".join(
            (
                nstring(env.date),
                nstring(env.subject),
                _address_list(env.from_),
                _address_list(sender),
                _address_list(reply_to),
                _address_list(env.to),
                _address_list(env.cc),
                _address_list(env.bcc),
                nstring(env.in_reply_to),
                nstring(env.message_id),
            )
        )
        + b")"
    )


def _params(params: Sequence[tuple[str, str]]) -> bytes:
    if not params:
        return NIL
    return b"(" + b" ".join(string(k.upper()) + b" " + string(v) for k, v in params) + b")"


def _disposition(disp: tuple[str, Sequence[tuple[str, str]]] | None) -> bytes:
    if disp is None:
        return NIL
    return b"(" + string(disp[0]) + b" " + _params(disp[1]) + b")"


def _language(lang: Sequence[str] | None) -> bytes:
    if not lang:
        return NIL
    if len(lang) == 1:
        return string(lang[0])
    return b"(" + b" ".join(string(x) for x in lang) + b")"


def body_structure(part: BodyPart, extended: bool = True) -> bytes:
    """RFC 3501 section 7.4.2 BODYSTRUCTURE (``extended``) or BODY (basic)."""
    if part.type == "multipart":
        kids = b"".join(body_structure(ch, extended) for ch in part.children)
        if not kids:  # a multipart with no parts: describe it as empty text
            kids = b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 0 0)'
        out = kids + b" " + string(part.subtype.upper())
        if extended:
            out += b" " + b" ".join(
                (
                    _params(part.params),
                    _disposition(part.disposition),
                    _language(part.language),
                    nstring(part.location),
                )
            )
        return b"(" + out + b")"
    fields = [
        string(part.type.upper()),
        string(part.subtype.upper()),
        _params(part.params),
        nstring(part.id),
        nstring(part.description),
        string(part.encoding.upper()),
        str(part.size).encode(),
    ]
    if (
        part.type == "message"
        and part.subtype == "rfc822"
        and part.message_envelope is not None
        and part.message_body is not None
    ):
        fields.append(envelope(part.message_envelope))
        fields.append(body_structure(part.message_body, extended))
        fields.append(str(part.lines or 0).encode())
    elif part.type == "text":
        fields.append(str(part.lines or 0).encode())
    if extended:
        fields += [
            nstring(part.md5),
            _disposition(part.disposition),
            _language(part.language),
            nstring(part.location),
        ]
    return b"(" + b" ".join(fields) + b")"


def capability_line(caps: Iterable[str]) -> bytes:
    return b"* CAPABILITY " + " ".join(caps).encode("ascii") + CRLF

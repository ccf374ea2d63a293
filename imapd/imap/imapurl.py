"""Relative IMAP URLs (RFC 5092) naming a message or a part of one, as
CATENATE takes them (RFC 4469 section 5).

Only the forms that stay inside the logged-in account are accepted:
``/mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=s][/;PARTIAL=o[.l]]`` (an
absolute path, RFC 5092 section 7.1) and ``;UID=n[...]`` relative to the
selected mailbox (RFC 5092 section 7.2 with the mailbox as base). A URL
with a scheme or server, or URLAUTH (RFC 4467), is not resolved here.
Parsing is one regex match without nested quantifiers: linear in the URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from imapd.imap.wire.commands import Section
from imapd.imap.wire.parser import parse_url_section

# RFC 5092 section 11: enc-mailbox, uidvalidity, iuid, isection, ipartial.
_URL = re.compile(
    r"(?:/(?P<box>[^;?#]+?)(?:;UIDVALIDITY=(?P<uv>[1-9]\d{0,9}))?/)?"
    r";UID=(?P<uid>[1-9]\d{0,9})"
    r"(?:/;SECTION=(?P<sec>[^/;?#]+))?"
    r"(?:/;PARTIAL=(?P<po>\d{1,10})(?:\.(?P<pl>[1-9]\d{0,9}))?)?",
    re.I,
)
_MAX_NUMBER = 2**32 - 1


@dataclass(frozen=True, slots=True)
class MessageUrl:
    """``mailbox`` None: the selected mailbox. ``section`` None: the whole
    message. ``partial``: (origin, octets or None for the rest)."""

    mailbox: str | None
    uidvalidity: int | None
    uid: int
    section: Section | None
    partial: tuple[int, int | None] | None


def _decode(text: str) -> str | None:
    """RFC 5092 section 3: percent-encoded UTF-8 (RFC 3986 section 2.1)."""
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_message_url(url: str) -> MessageUrl | None:
    """The message (part) ``url`` names, or None if it is not a relative
    IMAP URL of a message this server resolves."""
    m = _URL.fullmatch(url)
    if m is None:
        return None
    box = None
    if m["box"] is not None:
        box = _decode(m["box"])
        if not box:
            return None
    numbers = [int(x) for x in (m["uv"], m["uid"], m["po"], m["pl"]) if x is not None]
    if any(n > _MAX_NUMBER for n in numbers):
        return None
    section = None
    if m["sec"] is not None:
        text = _decode(m["sec"])
        section = parse_url_section(text) if text is not None else None
        if section is None:
            return None
    partial = None
    if m["po"] is not None:
        partial = (int(m["po"]), int(m["pl"]) if m["pl"] is not None else None)
    return MessageUrl(box, int(m["uv"]) if m["uv"] else None, int(m["uid"]), section, partial)

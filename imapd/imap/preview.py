"""PREVIEW (RFC 8970): a short plain-text view of a message for FETCH.

Contract: :func:`preview_part` picks the part the preview is made of and
:func:`preview_of` turns a prefix of that part's stored body into the
preview. Together they do bounded work whatever the message: the part
tree is walked at most :data:`MAX_PARTS` parts deep into it, at most
:data:`PLAIN_CAP` octets of a text/plain part (:data:`HTML_CAP` of an
HTML one) are read and decoded, and every step (base64, quoted-printable,
charset, HTML to text) is linear in those. Plain text costs about a
millisecond; HTML's tokenizer up to some 80 ms, so the FETCH handler runs
it in the content pool (:func:`needs_pool`).

Choices where RFC 8970 section 3.1 leaves them to the server:

* The preview is made of the first text part (text/plain or text/html,
  depth first, attachments and enclosed messages skipped): what a reader
  sees first. HTML is reduced to its visible text.
* Whitespace runs (line breaks included) and control characters become
  one space, leading and trailing ones go: a preview is one line.
* At most :data:`PREVIEW_CHARS` characters (section 3.1: no more than 200
  SHOULD be sent, and never more than 256).
* A message with no text part has the empty preview (section 3.1: a
  zero-length string when no meaningful preview can be made).
"""

from __future__ import annotations

import re

from storage.model import BodyPart
from storage.text import _decode_transfer, _is_attachment, decode_charset, html_to_text

PREVIEW_CHARS = 200  # RFC 8970 section 3.1
# Encoded octets of the part read at most. 200 characters of text take
# some 1,100 octets in base64 of 4-byte UTF-8 (8 KiB leaves room for
# leading blank lines); HTML spends most of its octets on markup, so its
# cap is larger. Both bound the work.
PLAIN_CAP = 8 * 1024
HTML_CAP = 32 * 1024
MAX_PARTS = 256  # parts looked at for the first text part
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff]+")


def preview_part(root: BodyPart) -> BodyPart | None:
    """The first inline text/plain or text/html part, depth first, among
    the first :data:`MAX_PARTS` parts; None if there is none. Parts of an
    enclosed message/rfc822 are not the message's own text."""
    stack = [root]
    seen = 0
    while stack and seen < MAX_PARTS:
        part = stack.pop()
        seen += 1
        if part.type == "multipart":
            stack.extend(reversed(part.children))
        elif part.type == "text" and part.subtype in ("plain", "html"):
            if not _is_attachment(part):
                return part
    return None


def preview_of(part: BodyPart, encoded: bytes, truncated: bool) -> str:
    """The preview of ``part`` from ``encoded``, the first octets of its
    stored body (``truncated``: the body goes on past them)."""
    data = _decode_transfer(encoded, part.encoding)
    text = decode_charset(data, dict(part.params).get("charset"))
    if truncated:
        # The prefix may end inside a multibyte character or a tag: that
        # last bit is not text.
        text = text.rstrip("\ufffd")
    if part.subtype == "html":
        text = html_to_text(text)
    # A one-line string: control characters and whitespace runs collapse
    # (over at most HTML_CAP characters: the decoded prefix is no longer).
    words = _CONTROL.sub(" ", text).split()
    return " ".join(words)[:PREVIEW_CHARS].rstrip()


def read_range(part: BodyPart) -> tuple[int, int, bool]:
    """The blob range to read for ``part``'s preview: (start, end,
    truncated)."""
    cap = HTML_CAP if part.subtype == "html" else PLAIN_CAP
    end = min(part.end, part.body_start + cap)
    return part.body_start, end, end < part.end


def needs_pool(part: BodyPart) -> bool:
    """Whether :func:`preview_of` may take long enough (HTML: up to some
    80 ms) to belong in the content pool rather than on the event loop."""
    return part.subtype == "html"

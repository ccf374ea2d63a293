"""A linear HTML tokenizer for mail bodies: text and tags, nothing else.

Contract: :func:`tokenize` turns any string into a stream of :class:`Text`,
:class:`StartTag` and :class:`EndTag` tokens in one pass, reading each
character a bounded number of times, so its time is linear in the input
whatever the input (a hostile mail cannot make it quadratic, which
``html.parser`` and backtracking regexes can be made). It never raises.
Comments, doctypes, CDATA and processing instructions are consumed and not
reported: nothing that shows them exists.

It follows the WHATWG HTML tokenizer (HTML Living Standard section 13.2.5)
closely enough that what it reports as text is what a browser shows:

* tag and attribute names are ASCII-lower-cased; a repeated attribute keeps
  its first value (section 13.2.5.33); an attribute without "=" has the
  value ``None``; entities are expanded in text and attribute values;
* ``<`` not followed by a letter, "/", "!" or "?" is text (13.2.5.6);
* a comment ends at "-->" or "--!>"; "<!-->" and "<!--->" are empty
  comments (13.2.5.43-46); "<!" anything else, "<?" and "</" followed by
  neither a letter nor ">" are bogus comments ending at the next ">"
  (13.2.5.41); an unterminated comment runs to the end of the input;
* the content of script, style, xmp, iframe, noembed and noframes is raw
  text, and that of title and textarea is text with entities, up to the
  matching end tag; plaintext makes the rest of the input text (13.2.6.2).
  noscript is parsed as markup: mail is shown with scripting disabled.

One deliberate difference: a tag left open at the end of the input
(``"a <b"`` or ``'<a href="x'``) is reported as text from its "<" on, where
a browser drops it, so nothing the sender wrote is lost from search.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Text:
    """Character data, entities expanded (raw-text element content verbatim)."""

    data: str


@dataclass(frozen=True, slots=True)
class StartTag:
    name: str
    attrs: tuple[tuple[str, str | None], ...]
    self_closing: bool


@dataclass(frozen=True, slots=True)
class EndTag:
    name: str


Token = Text | StartTag | EndTag

# Every pattern below is a single character class or a literal: none can
# backtrack, so each match costs the characters it consumes.
_TAG_NAME = re.compile(r"[^\t\n\f\r />]*")  # 13.2.5.8: anything but these
_GAP = re.compile(r"[\t\n\f\r /]*")  # 13.2.5.32: before attribute name
_ATTR_NAME = re.compile(r"[^\t\n\f\r />][^\t\n\f\r /=>]*")  # 13.2.5.33
_SPACE = re.compile(r"[\t\n\f\r ]*")
_UNQUOTED = re.compile(r"[^\t\n\f\r >]*")  # 13.2.5.38
_COMMENT_END = re.compile(r"--!?>")

# Elements whose content is not markup (13.2.6.2, "generic raw text" and
# "generic RCDATA element parsing algorithm"); True: entities are expanded.
_RAW_CONTENT = {
    "script": False,
    "style": False,
    "xmp": False,
    "iframe": False,
    "noembed": False,
    "noframes": False,
    "title": True,
    "textarea": True,
}
# The end of raw content: "</name" then white space, "/" or ">" (13.2.5.11).
_RAW_END = {
    name: re.compile(rf"</{name}(?=[\t\n\f\r />])", re.IGNORECASE) for name in _RAW_CONTENT
}


def _is_letter(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _tag(s: str, lt: int, start: bool) -> tuple[Token, int]:
    """The tag whose "<" is at ``lt``, and the index past its ">".

    Each step consumes at least one character or ends the tag. A tag that
    reaches the end of the input becomes the text it was.
    """
    n = len(s)
    i = lt + (1 if start else 2)
    m = _TAG_NAME.match(s, i)
    name, i = m.group().lower(), m.end()
    attrs: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    while True:
        gap = i
        i = _GAP.match(s, i).end()
        if i >= n:
            return Text(html.unescape(s[lt:])), n
        if s[i] == ">":
            if not start:
                return EndTag(name), i + 1
            # A "/" right before ">" is the self-closing flag (13.2.5.40).
            closing = i > gap and s[i - 1] == "/"
            return StartTag(name, tuple(attrs), closing), i + 1
        m = _ATTR_NAME.match(s, i)
        attr, i = m.group().lower(), m.end()
        i = _SPACE.match(s, i).end()
        value: str | None = None
        if i < n and s[i] == "=":
            i = _SPACE.match(s, i + 1).end()
            if i >= n:
                return Text(html.unescape(s[lt:])), n
            quote = s[i]
            if quote in "\"'":
                close = s.find(quote, i + 1)
                if close < 0:
                    return Text(html.unescape(s[lt:])), n
                value, i = html.unescape(s[i + 1 : close]), close + 1
            else:
                m = _UNQUOTED.match(s, i)
                value, i = html.unescape(m.group()), m.end()
        if attr not in seen:
            seen.add(attr)
            attrs.append((attr, value))


def _skip_comment(s: str, lt: int) -> int:
    """Index past the comment, doctype, CDATA or processing instruction at
    ``lt`` ("<!" or "<?" or a bogus "</"); the end of input if unterminated."""
    if s.startswith("<!--", lt):
        for empty in ("<!-->", "<!--->"):
            if s.startswith(empty, lt):
                return lt + len(empty)
        m = _COMMENT_END.search(s, lt + 4)
        return len(s) if m is None else m.end()
    gt = s.find(">", lt + 2)
    return len(s) if gt < 0 else gt + 1


def tokenize(markup: str) -> Iterator[Token]:
    """The tokens of ``markup``, in order (see the module contract)."""
    s, n = markup, len(markup)
    pos = text_from = 0
    while True:
        lt = s.find("<", pos)
        if lt < 0 or lt + 1 >= n:
            break  # no more markup: the rest is text
        c = s[lt + 1]
        if _is_letter(c) or (c == "/" and _is_letter(s[lt + 2 : lt + 3])):
            token, end = _tag(s, lt, start=c != "/")
        elif c in "!?" or (c == "/" and lt + 2 < n):
            token, end = None, lt + 3 if s.startswith("</>", lt) else _skip_comment(s, lt)
        else:
            pos = lt + 1  # a "<" that is text (13.2.5.6)
            continue
        if lt > text_from:
            yield Text(html.unescape(s[text_from:lt]))
        if token is not None:
            yield token
        pos = text_from = end
        if isinstance(token, StartTag) and token.name in _RAW_CONTENT:
            raw_end = _RAW_END[token.name].search(s, pos)
            stop = n if raw_end is None else raw_end.start()
            if stop > pos:
                data = s[pos:stop]
                yield Text(html.unescape(data) if _RAW_CONTENT[token.name] else data)
            pos = text_from = stop
        elif isinstance(token, StartTag) and token.name == "plaintext":
            if pos < n:
                yield Text(s[pos:])  # 13.2.5.7: the rest of the input is text
            return
    if text_from < n:
        yield Text(html.unescape(s[text_from:]))

"""An allow-list HTML sanitizer for displaying received mail in a browser.

Contract: :func:`sanitize_html` returns HTML that contains only the tags and
attributes listed below, with every text and attribute value re-escaped.
Script-bearing elements (script, style, iframe, object, embed, ...) are
dropped together with their content; event handler attributes (``on*``),
``style`` and any URL whose scheme is not http, https, mailto (or, for
images, inline ``data:image/``) are removed. The output is well nested: end
tags are only emitted for open elements, and open elements are closed at
the end. Comments, doctypes, processing instructions and CDATA are dropped:
conditional comments can smuggle markup into old engines. A pure function
over :func:`storage.markup.tokenize`, linear in its input (``html.parser``
is quadratic on hostile mail such as ``"</" * n``); CPU-bound, so callers on
the event loop run large bodies off the loop.

The webmail page additionally renders the result in a sandboxed iframe
under a Content-Security-Policy: this is one layer, not the only one.
"""

from __future__ import annotations

import html
import re
from collections import Counter

from storage.markup import StartTag, Text, tokenize

ALLOWED_TAGS = frozenset(
    "a abbr address b bdi bdo big blockquote br caption center cite code col colgroup dd del "
    "details dfn div dl dt em font h1 h2 h3 h4 h5 h6 hr i img ins kbd li mark ol p pre q s samp "
    "small span strike strong sub summary sup table tbody td tfoot th thead tr tt u ul var".split()
)
VOID_TAGS = frozenset({"br", "col", "hr", "img"})
# Dropped elements that have no end tag: never wait for one.
VOID_DROPPED = frozenset({"embed", "frame", "param", "source", "track", "base", "meta", "link"})
# Elements dropped with everything inside them.
DROP_CONTENT_TAGS = frozenset(
    "script style iframe frame frameset object embed applet noscript template head title "
    "base meta link param source track "
    "textarea select svg math noembed noframes xmp plaintext".split()
)
FOREIGN_TAGS = frozenset({"svg", "math"})
GLOBAL_ATTRS = frozenset({"title", "dir", "lang", "align", "valign"})
TAG_ATTRS: dict[str, frozenset[str]] = {
    "a": frozenset({"href", "name"}),
    "img": frozenset({"src", "alt", "width", "height"}),
    "td": frozenset({"colspan", "rowspan", "width", "height", "bgcolor"}),
    "th": frozenset({"colspan", "rowspan", "width", "height", "bgcolor"}),
    "table": frozenset({"width", "border", "cellpadding", "cellspacing", "bgcolor"}),
    "font": frozenset({"color", "size", "face"}),
    "col": frozenset({"span", "width"}),
    "colgroup": frozenset({"span", "width"}),
    "ol": frozenset({"start", "type"}),
    "li": frozenset({"value"}),
    "q": frozenset({"cite"}),
    "blockquote": frozenset({"cite"}),
}
URL_ATTRS = frozenset({"href", "src", "cite"})
LINK_SCHEMES = ("http:", "https:", "mailto:")
IMAGE_DATA_PREFIX = "data:image/"
# Characters browsers ignore inside a URL scheme ("java\tscript:").
_URL_JUNK = re.compile(r"[\x00-\x20\x7f]+")


def safe_url(value: str, attr: str) -> str | None:
    """The URL if its scheme is allowed for ``attr``; relative URLs and
    fragments pass; anything else (javascript:, vbscript:, data:text/html) is None."""
    compact = _URL_JUNK.sub("", html.unescape(value)).lower()
    if attr == "src" and compact.startswith(IMAGE_DATA_PREFIX) and "svg" not in compact[:20]:
        return value.strip()
    scheme_end = compact.find(":")
    if scheme_end == -1 or "/" in compact[:scheme_end] or "?" in compact[:scheme_end] or (
        "#" in compact[:scheme_end]
    ):
        return value.strip()  # no scheme: relative reference
    if compact.startswith(LINK_SCHEMES):
        return value.strip()
    return None


class _Sanitizer:
    """Re-emits allowed tokens. Open and dropped elements are stacks with
    counts beside them, so a stray end tag costs O(1), not a stack scan
    (``"<b>"*n + "</i>"*n`` would otherwise be quadratic)."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.open: list[str] = []
        self.open_count: Counter[str] = Counter()
        self.dropping: list[str] = []  # stack of dropped elements we are inside
        self.drop_count: Counter[str] = Counter()

    def start(self, tag: StartTag) -> None:
        name = tag.name
        if name in DROP_CONTENT_TAGS or self.dropping:
            # "/>" closes only foreign (svg, math) elements; on an HTML
            # element it is ignored (HTML Living Standard 13.2.6.1).
            closed = tag.self_closing and name in FOREIGN_TAGS
            if name in DROP_CONTENT_TAGS and name not in VOID_DROPPED and not closed:
                self.dropping.append(name)
                self.drop_count[name] += 1
            return
        if name not in ALLOWED_TAGS:
            return  # unknown wrapper (html, body, form...): keep its content only
        allowed = GLOBAL_ATTRS | TAG_ATTRS.get(name, frozenset())
        parts = [name]
        for attr, value in tag.attrs:
            if attr not in allowed or value is None:
                continue
            if attr in URL_ATTRS:
                cleaned = safe_url(value, attr)
                if cleaned is None:
                    continue
                value = cleaned
            parts.append(f'{attr}="{html.escape(value, quote=True)}"')
        if name == "a":
            parts.append('rel="noopener noreferrer nofollow" target="_blank"')
        self.out.append("<" + " ".join(parts) + ">")
        if name not in VOID_TAGS:  # "<p/>" opens a p, as in a browser
            self.open.append(name)
            self.open_count[name] += 1

    def end(self, name: str) -> None:
        if self.dropping:
            if self.drop_count[name]:  # also closes dropped elements left open inside
                while True:
                    top = self.dropping.pop()
                    self.drop_count[top] -= 1
                    if top == name:
                        break
            return
        if not self.open_count[name]:
            return  # stray end tag
        while self.open:
            top = self.open.pop()
            self.open_count[top] -= 1
            self.out.append(f"</{top}>")
            if top == name:
                break

    def text(self, data: str) -> None:
        if not self.dropping:
            self.out.append(html.escape(data, quote=False))

    def result(self) -> str:
        self.out.extend(f"</{tag}>" for tag in reversed(self.open))
        self.open.clear()
        return "".join(self.out)


def sanitize_html(markup: str) -> str:
    """Allow-listed, re-escaped HTML safe to place in a page (see module doc).

    Linear in ``len(markup)`` whatever the markup; never raises."""
    sanitizer = _Sanitizer()
    for token in tokenize(markup):
        if isinstance(token, Text):
            sanitizer.text(token.data)
        elif isinstance(token, StartTag):
            sanitizer.start(token)
        else:
            sanitizer.end(token.name)
    return sanitizer.result()

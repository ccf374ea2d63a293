"""An allow-list HTML sanitizer for displaying received mail in a browser.

Contract: :func:`sanitize_html` returns HTML that contains only the tags and
attributes listed below, with every text and attribute value re-escaped.
Script-bearing elements (script, style, iframe, object, embed, ...) are
dropped together with their content; event handler attributes (``on*``),
``style`` and any URL whose scheme is not http, https, mailto (or, for
images, inline ``data:image/``) are removed. The output is well nested: end
tags are only emitted for open elements, and open elements are closed at
the end. Pure function over ``html.parser``; CPU-bound, so callers on the
event loop run large bodies in a thread.

The webmail page additionally renders the result in a sandboxed iframe
under a Content-Security-Policy: this is one layer, not the only one.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

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


class _Sanitizer(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.open: list[str] = []
        self.dropping: list[str] = []  # stack of dropped elements we are inside

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, self_closing=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, self_closing=True)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], self_closing: bool) -> None:
        tag = tag.lower()
        if tag in DROP_CONTENT_TAGS or self.dropping:
            if tag in DROP_CONTENT_TAGS and tag not in VOID_DROPPED and not self_closing:
                self.dropping.append(tag)
            return
        if tag not in ALLOWED_TAGS:
            return  # unknown wrapper (html, body, form...): keep its content only
        allowed = GLOBAL_ATTRS | TAG_ATTRS.get(tag, frozenset())
        parts = [tag]
        for name, value in attrs:
            name = name.lower()
            if name not in allowed or value is None:
                continue
            if name in URL_ATTRS:
                cleaned = safe_url(value, name)
                if cleaned is None:
                    continue
                value = cleaned
            parts.append(f'{name}="{html.escape(value, quote=True)}"')
        if tag == "a":
            parts.append('rel="noopener noreferrer nofollow" target="_blank"')
        self.out.append("<" + " ".join(parts) + ">")
        if tag not in VOID_TAGS and not self_closing:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        tag = tag.lower()
        if self.dropping:
            if tag in self.dropping:  # also closes dropped elements left open inside
                while self.dropping.pop() != tag:
                    pass
            return
        if tag not in self.open:
            return  # stray end tag
        while self.open:
            top = self.open.pop()
            self.out.append(f"</{top}>")
            if top == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self.dropping:
            self.out.append(html.escape(data, quote=False))

    # Comments, doctypes, processing instructions and CDATA are dropped:
    # conditional comments can smuggle markup into old engines.
    def handle_comment(self, data: str) -> None:
        return

    def handle_decl(self, decl: str) -> None:
        return

    def handle_pi(self, data: str) -> None:
        return

    def unknown_decl(self, data: str) -> None:
        return

    def result(self) -> str:
        self.close()
        self.out.extend(f"</{tag}>" for tag in reversed(self.open))
        self.open.clear()
        return "".join(self.out)


def sanitize_html(markup: str) -> str:
    """Allow-listed, re-escaped HTML safe to place in a page (see module doc)."""
    parser = _Sanitizer()
    parser.feed(markup)
    return parser.result()

"""Content work on client input is linear: no mail can freeze the server.

An unauthenticated sender controls every byte that HTML-to-text, the
webmail sanitizer and the MIME parser read, and pure-Python CPU work holds
the GIL for every protocol. So each adversarial shape below is timed at
size n and 8n (``tests.linearity``: a linear parser takes about 8 times
longer, a quadratic one 64 times), and an absolute bound at about 1 MB
catches a linear but far too slow parser.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable

import pytest

from httpapi.sanitize import sanitize_html
from storage.mime import html_to_text, parse_message
from tests.linearity import GROWTH_FACTOR, MAX_RATIO, best_time

# Large enough that a quadratic parser is plainly visible (seconds at n).
N = 128_000
MAX_SECONDS_AT_8N = 3.0
# Below this a timing is mostly timer and cache noise (a 1 MB input no
# longer fits the CPU cache): floor the baseline. A quadratic parser takes
# seconds at n, far above it.
NOISE_FLOOR = 0.02


def assert_linear(parse: Callable[[object], object], build: Callable[[int], object]) -> None:
    """``parse(build(n))`` grows linearly from n to 8n, and stays fast."""
    n = N + random.randrange(1, 4096)  # not a round size
    small, large = build(n), build(GROWTH_FACTOR * n)
    t_small = best_time(lambda: parse(small))
    # Fail fast on a quadratic parser rather than wait minutes for 8n.
    assert t_small < MAX_SECONDS_AT_8N / 2, f"{t_small:.2f}s at {len(small)} chars"
    t_large = best_time(lambda: parse(large), repeat=2)
    assert t_large < MAX_SECONDS_AT_8N, f"{t_large:.2f}s at {len(large)} chars"
    ratio = t_large / max(t_small, NOISE_FLOOR)
    assert ratio < MAX_RATIO, f"time grew {ratio:.1f}x for {GROWTH_FACTOR}x the input"


# Shapes that defeat backtracking regexes and html.parser: an unterminated
# tag, comment, declaration or quote, runs of "<" and "</", many attributes.
HTML_SHAPES: dict[str, Callable[[int], str]] = {
    "lt-then-name": lambda n: "<" + "a" * n,
    "end-tag-starts": lambda n: "</" * (n // 2),
    "comment-starts": lambda n: "<!--" * (n // 4),
    "declarations": lambda n: "<!" * (n // 2),
    "processing": lambda n: "<?" * (n // 2),
    "lt-run": lambda n: "<" * n,
    "many-attributes": lambda n: "<a " + "b=c " * (n // 4),
    "long-attribute-name": lambda n: "<a " + "b" * n,
    "unterminated-quotes": lambda n: '<a b="' * (n // 6),
    "quote-per-tag": lambda n: "<a b='x>" * (n // 8),
    "nested-tags": lambda n: "<div><b>" * (n // 16) + "</b></div>" * (n // 20),
    "unclosed-script": lambda n: "<script>" + "</scrip" * (n // 7),
    "entities": lambda n: "&amp" * (n // 4),
    "tag-with-lt-name": lambda n: "<a<" * (n // 3),
    # Deep stacks: stray end tags must not scan the open or dropped elements.
    "stray-end-tags": lambda n: "<b>" * (n // 8) + "</i>" * (n // 8),
    "stray-ends-in-dropped": lambda n: "<svg>" * (n // 10) + "</b>" * (n // 8),
}


@pytest.mark.parametrize("shape", sorted(HTML_SHAPES))
def test_html_to_text_is_linear(shape: str) -> None:
    assert_linear(html_to_text, HTML_SHAPES[shape])


@pytest.mark.parametrize("shape", sorted(HTML_SHAPES))
def test_sanitize_html_is_linear(shape: str) -> None:
    assert_linear(sanitize_html, HTML_SHAPES[shape])


def _message(header: bytes, body: bytes = b"x\r\n") -> bytes:
    return header + b"\r\n\r\n" + body


def _nested_multiparts(n: int) -> bytes:
    # Deeper than MAX_NESTING: the parser must stop descending, not rescan.
    level = b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n"
    depth = n // len(level % (0, 0))
    return b"".join(level % (i, i) for i in range(depth)) + b"\r\ndeep\r\n"


def _many_parts(n: int) -> bytes:
    part = b"--b\r\nContent-Type: text/plain\r\n\r\n" + random.randbytes(7).hex().encode()
    count = n // (len(part) + 2)
    head = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    return head + b"\r\n".join([part] * count) + b"\r\n--b--\r\n"


MIME_SHAPES: dict[str, Callable[[int], bytes]] = {
    "long-header-line": lambda n: _message(b"X-Long: " + b"a" * n),
    "many-fields": lambda n: _message(b"X: a\r\n" * (n // 6)),
    "folded-field": lambda n: _message(b"Subject: a" + b"\r\n b" * (n // 4)),
    "no-header": lambda n: random.randbytes(n).replace(b":", b"").replace(b"\n", b""),
    "content-type-params": lambda n: _message(b"Content-Type: text/plain" + b";a=b" * (n // 4)),
    "content-type-open-quote": lambda n: _message(b'Content-Type: text/plain; a="' + b";" * n),
    "content-type-quote-params": lambda n: _message(
        b'Content-Type: text/plain; a="x' + b";b" * (n // 2)
    ),
    "rfc2231-continuations": lambda n: _message(
        b"Content-Disposition: attachment" + b";filename*0*=a" * (n // 15)
    ),
    "encoded-word-starts": lambda n: _message(b"Subject: " + b"=?a" * (n // 3)),
    "encoded-words": lambda n: _message(b"Subject: " + b"=?utf-8?q?a?= " * (n // 14)),
    "address-list": lambda n: _message(b"To: " + b"a@b, " * (n // 5)),
    "angle-brackets": lambda n: _message(b"From: " + b"<a" * (n // 2)),
    "group-starts": lambda n: _message(b"From: " + b"g:" * (n // 2)),
    "open-comments": lambda n: _message(b"From: " + b"(" * n),
    "references": lambda n: _message(b"References: " + b"<a" * (n // 2)),
    "message-id-starts": lambda n: _message(b"Message-ID: " + b"<" * n),
    "date-tokens": lambda n: _message(b"Date: " + b"1 " * (n // 2)),
    "language-list": lambda n: _message(b"Content-Language: " + b"en, " * (n // 4)),
    "many-parts": _many_parts,
    "deep-nesting": _nested_multiparts,
    "nested-messages": lambda n: b"Content-Type: message/rfc822\r\n\r\n" * (n // 32),
    "boundary-lookalikes": lambda n: (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--bx\r\n" * (n // 6)
    ),
    "html-body": lambda n: _message(
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64",
        base64.encodebytes(b"<" + b"a" * n),
    ),
    "punycode-body": lambda n: _message(
        b"Content-Type: text/plain; charset=punycode", b"a" * (n // 2) + b"-" + b"b" * (n // 2)
    ),
}


@pytest.mark.parametrize("shape", sorted(MIME_SHAPES))
def test_mime_parse_is_linear(shape: str) -> None:
    assert_linear(parse_message, MIME_SHAPES[shape])

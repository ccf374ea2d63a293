"""RFC 8970 PREVIEW text (imapd.imap.preview) from real parsed messages:
which part it comes from, how it is decoded and cut, and that its work is
bounded on hostile mail (huge base64, deep or wide multiparts)."""

from __future__ import annotations

import base64
import quopri
import random
import string
import time

from imapd.imap import preview
from storage.mime import parse_message
from tests.linearity import assert_linear, best_time


def _make(raw: bytes) -> str:
    """The preview the FETCH handler makes of ``raw``."""
    part = preview.preview_part(parse_message(raw).body)
    if part is None:
        return ""
    start, end, truncated = preview.read_range(part)
    return preview.preview_of(part, raw[start:end], truncated)


def _mime(ctype: str, body: bytes, cte: str = "8bit", extra: str = "") -> bytes:
    return (
        f"Subject: t\r\nMIME-Version: 1.0\r\nContent-Type: {ctype}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n{extra}\r\n"
    ).encode() + body


def _words(rng: random.Random, n: int) -> str:
    alphabet = string.ascii_letters + "äöüßéèçøåæ中文字пример"
    return " ".join(
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(n)
    )


def test_plain_text_collapsed_and_cut_at_200() -> None:
    rng = random.Random()
    text = _words(rng, 200)
    # Line breaks, tabs and runs of spaces between the words.
    body = "".join(w + rng.choice([" ", "\r\n", "\t ", "   \r\n\r\n"]) for w in text.split())
    got = _make(_mime("text/plain; charset=utf-8", body.encode()))
    assert got == " ".join(text.split())[:200].rstrip()
    assert len(got) <= 200 and "\n" not in got and "  " not in got


def test_transfer_encodings_and_charsets_are_undone() -> None:
    rng = random.Random()
    text = _words(rng, rng.randint(3, 20))
    b64 = base64.encodebytes(text.encode("utf-8")).replace(b"\n", b"\r\n")
    assert _make(_mime("text/plain; charset=utf-8", b64, "base64")) == text[:200].rstrip()
    latin = "Grüße aus Köln, ça va?"
    qp = quopri.encodestring(latin.encode("latin-1"))
    assert _make(_mime("text/plain; charset=iso-8859-1", qp, "quoted-printable")) == latin


def test_html_reduced_to_visible_text() -> None:
    html = (
        b"<html><head><style>p { color: red }</style><script>var x = 1;</script></head>"
        b"<body><p>Hello&nbsp;<b>there</b></p><p>second&amp;last</p></body></html>"
    )
    assert _make(_mime("text/html; charset=utf-8", html)) == "Hello there second&last"


def test_first_text_part_skipping_attachments_and_enclosed_messages() -> None:
    raw = (
        b"Subject: t\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=A\r\n\r\n"
        b"--A\r\nContent-Type: text/plain; name=a.txt\r\n"
        b"Content-Disposition: attachment; filename=a.txt\r\n\r\nattached text\r\n"
        b"--A\r\nContent-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\ninner text\r\n"
        b"--A\r\nContent-Type: multipart/alternative; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nthe plain one\r\n"
        b"--B\r\nContent-Type: text/html\r\n\r\n<p>the html one</p>\r\n--B--\r\n"
        b"--A--\r\n"
    )
    assert _make(raw) == "the plain one"
    # No text part at all: the empty string (RFC 8970 section 3.1).
    image = _mime("image/png", base64.encodebytes(random.randbytes(300)), "base64")
    assert _make(image) == ""


def test_cut_inside_a_character_leaves_no_replacement_char() -> None:
    text = "€" * (preview.PLAIN_CAP // 3 + 50)  # 3 octets each: the cap splits one
    got = _make(_mime("text/plain; charset=utf-8", text.encode()))
    assert got == "€" * 200


def test_control_characters_never_reach_the_client() -> None:
    raw = _mime("text/plain; charset=utf-8", b"a\x00b\x1bc\x7fd\r\ne\xe2\x80\xa8f")
    assert _make(raw) == "a b c d e f"


def test_huge_base64_part_costs_what_a_small_one_does() -> None:
    """Only PLAIN_CAP octets are read and decoded: 8x the body, the same time."""
    rng = random.Random()

    def raw_of(n: int) -> bytes:
        data = base64.encodebytes(_words(rng, 50).encode() * n).replace(b"\n", b"\r\n")
        return _mime("text/plain; charset=utf-8", data, "base64")

    parsed = {n: (raw, parse_message(raw).body) for n in (2_000, 16_000) for raw in [raw_of(n)]}

    def work(n: int) -> None:
        raw, body = parsed[n]
        part = preview.preview_part(body)
        assert part is not None
        start, end, truncated = preview.read_range(part)
        assert truncated and end - start == preview.PLAIN_CAP
        preview.preview_of(part, raw[start:end], truncated)

    assert_linear(work, 2_000)
    big = best_time(lambda: work(16_000))
    assert big < 0.05, f"a {len(parsed[16_000][0])}-octet part took {big:.3f}s"


def test_hostile_shapes_stay_bounded() -> None:
    """Deeply nested multiparts, thousands of non-text parts before the
    text, and an HTML part of nothing but tags: linear, and fast."""

    def nested(n: int) -> bytes:
        head = b"".join(
            b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
            for i in range(n)
        )
        return (
            b"Subject: t\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
            + head
            + b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % n
        )

    def wide(n: int) -> bytes:
        parts = b"".join(b"--w\r\nContent-Type: image/gif\r\n\r\nGIF89a\r\n" for _ in range(n))
        return (
            b"Subject: t\r\nContent-Type: multipart/mixed; boundary=w\r\n\r\n"
            + parts
            + b"--w\r\nContent-Type: text/plain\r\n\r\nlate text\r\n--w--\r\n"
        )

    def tags(n: int) -> bytes:
        return _mime("text/html", b"<div><span a='1'>" * n)

    for build, n in ((nested, 40), (wide, 500), (tags, 500)):
        messages = {k: (raw, parse_message(raw).body) for k in (n, 8 * n) for raw in [build(k)]}

        def work(k: int, messages=messages) -> None:
            raw, body = messages[k]
            part = preview.preview_part(body)
            if part is not None:
                start, end, truncated = preview.read_range(part)
                preview.preview_of(part, raw[start:end], truncated)

        assert_linear(work, n)
        start = time.process_time()
        work(8 * n)
        assert time.process_time() - start < 0.5
    # Past MAX_PARTS parts the text is not looked for: the empty preview.
    assert _make(wide(preview.MAX_PARTS + 10)) == ""
    assert _make(wide(5)) == "late text"


async def test_html_preview_runs_in_a_worker_process() -> None:
    """What the FETCH handler hands the content pool for an HTML part
    (``preview.needs_pool``) crosses to a spawned worker and back."""
    from storage.contentpool import ContentPool

    raw = _mime("text/html; charset=utf-8", b"<p>Gr\xc3\xbc\xc3\x9fe <i>from</i> a worker</p>")
    part = preview.preview_part(parse_message(raw).body)
    assert part is not None and preview.needs_pool(part)
    start, end, truncated = preview.read_range(part)
    pool = ContentPool(1, time_limit=30.0)
    try:
        got = await pool.run(preview.preview_of, part, raw[start:end], truncated)
    finally:
        pool.close()
    assert got == "Grüße from a worker" == _make(raw)

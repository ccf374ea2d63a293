"""Hostile CATENATE input (RFC 4469) costs linear work: many TEXT parts,
long URLs (RFC 5092), deep parentheses; each refused with a clear error
where it is malformed, never an exception."""

from __future__ import annotations

from imapd.imap.imapurl import parse_message_url
from imapd.imap.wire.commands import Append, Catenate, ParseError
from imapd.imap.wire.parser import parse_line
from tests.linearity import assert_linear


def _many_parts(n: int) -> bytes:
    return (
        b"a APPEND INBOX CATENATE ("
        + b" ".join(b"TEXT {1+}\r\nx" if i % 2 else b'URL "/INBOX/;UID=1"' for i in range(n))
        + b")"
    )


def test_many_parts_parse_in_linear_time() -> None:
    got = parse_line(_many_parts(2000))
    assert isinstance(got, Append) and isinstance(got.message, Catenate)
    assert len(got.message.parts) == 2000
    assert got.message.parts[:2] == ("/INBOX/;UID=1", b"x")
    assert_linear(lambda n: parse_line(_many_parts(n)), 2000)


def test_long_urls_parse_in_linear_time() -> None:
    def valid(n: int) -> object:
        url = "/" + "a/" * n + "b;UIDVALIDITY=7/;UID=3/;SECTION=" + ".".join(["1"] * 50) + ".MIME"
        got = parse_message_url(url)
        assert got is not None and got.mailbox == "a/" * n + "b" and got.uid == 3
        return got

    def no_uid(n: int) -> object:  # backtracking bait: many "/", never ";UID="
        assert parse_message_url("/" + "a/;" * n + "/;UIDX") is None
        return parse_message_url("/" + "%2F/" * n)

    def encoded(n: int) -> object:
        got = parse_message_url("/" + "%C3%A9" * n + "/;UID=1")
        assert got is not None and got.mailbox == "é" * n
        return got

    for work in (valid, no_uid, encoded):
        assert_linear(work, 20_000)


def test_malformed_urls_are_refused() -> None:
    for url in [
        "",
        "/INBOX",
        "/INBOX/;UID=0",
        "/INBOX/;UID=99999999999",
        "/INBOX;UIDVALIDITY=0/;UID=1",
        "/INBOX/;UID=1/;SECTION=0",
        "/INBOX/;UID=1/;SECTION=1.x",
        "/INBOX/;UID=1/;SECTION=HEADER.FIELDS%20()",
        "/%FF/;UID=1",
        "imap://user@host/INBOX/;UID=1",
        "/INBOX/;UID=1;URLAUTH=anonymous:internal:00",
    ]:
        assert parse_message_url(url) is None, url


def test_deep_parentheses_are_bad_in_linear_time() -> None:
    def deep(n: int) -> object:
        got = parse_line(b"a APPEND INBOX CATENATE " + b"(" * n + b"TEXT {1+}\r\nx" + b")" * n)
        assert isinstance(got, ParseError)
        return got

    assert_linear(deep, 20_000)


def test_catenate_syntax_errors_are_parse_errors() -> None:
    for line in [
        b"a APPEND INBOX CATENATE ()",
        b"a APPEND INBOX CATENATE",
        b"a APPEND INBOX CATENATE (TEXT x)",
        b"a APPEND INBOX CATENATE (URL)",
        b"a APPEND INBOX CATENATE (URL x",
        b"a APPEND INBOX CATENATE (URL x) extra",
        b"a APPEND INBOX CATENATE (TEXT {1+}\r\nx  URL y)",
    ]:
        assert isinstance(parse_line(line), ParseError), line


def test_text_takes_a_literal8_of_binary_octets() -> None:
    """RFC 4469 section 5 with RFC 3516 section 4.4: TEXT ~{n} keeps NUL octets."""
    got = parse_line(b'a APPEND INBOX CATENATE (TEXT ~{3+}\r\na\x00b URL ";UID=2")')
    assert isinstance(got, Append) and isinstance(got.message, Catenate)
    assert got.message.parts == (b"a\x00b", ";UID=2")

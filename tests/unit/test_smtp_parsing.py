"""Pure parts of mtad: paths, the DATA reader, header fields, reply codes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery.address import PathSyntaxError, parse_path
from delivery.headers import (
    from_domains,
    iter_fields,
    protocol_name,
    received_field,
    strip_forged_results,
)
from mtad import replies as R
from mtad.data import DataReader, DataVerdict

# -- paths (RFC 5321 section 4.1.2) ----------------------------------------


@pytest.mark.parametrize(
    ("arg", "address", "params"),
    [
        ("FROM:<a@b.example>", "a@b.example", {}),
        ("from:<a@B.Example>", "a@b.example", {}),
        ("FROM: <a@b.example>", "a@b.example", {}),
        ("FROM:<>", "", {}),
        ("FROM:<a@b.example> SIZE=100 BODY=8BITMIME", "a@b.example",
         {"SIZE": "100", "BODY": "8BITMIME"}),
        ("FROM:<a@b.example> smtputf8", "a@b.example", {"SMTPUTF8": None}),
        ("FROM:<@relay.example,@r2.example:a@b.example>", "a@b.example", {}),
        ('FROM:<"odd > name"@b.example>', '"odd > name"@b.example', {}),
        ("FROM:<j\u00fcrgen@b.example>", "j\u00fcrgen@b.example", {}),
        ("FROM:<a@m\u00fcnchen.example>", "a@xn--mnchen-3ya.example", {}),
        ("FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", {}),
    ],
)
def test_parse_path(arg: str, address: str, params: dict) -> None:
    path = parse_path("FROM:", arg, allow_null=True)
    assert path.address == address
    assert path.params == params


@pytest.mark.parametrize(
    "arg",
    [
        None,
        "FROM:a@b.example",
        "FROM:<a@b.example",
        "FROM:<a@b.example>SIZE=1",
        "FROM:<a b@c.example>",
        "FROM:<@b.example>",
        "FROM:<a@>",
        "FROM:<a@-bad-.example>",
        "FROM:<" + "x" * 65 + "@b.example>",
        "FROM:<a@b.example> SIZE=",
        "FROM:<a@b.example> SIZE=1 SIZE=2",
        "TO:<a@b.example>",
    ],
)
def test_parse_path_rejects(arg: str | None) -> None:
    with pytest.raises(PathSyntaxError):
        parse_path("FROM:", arg, allow_null=True)


def test_null_path_only_where_allowed() -> None:
    with pytest.raises(PathSyntaxError):
        parse_path("TO:", "TO:<>", allow_null=False)


@given(st.text(max_size=80))
def test_parse_path_never_crashes(arg: str) -> None:
    try:
        parse_path("FROM:", "FROM:" + arg, allow_null=True)
    except PathSyntaxError:
        pass


# -- DATA (RFC 5321 sections 4.1.1.4, 4.5.2, 2.3.8) -----------------------


def feed(reader: DataReader, data: bytes) -> bool:
    """Feed ``data`` as the session would: split after each CRLF."""
    ended = False
    for part in data.split(b"\r\n")[:-1]:
        if reader.feed(part + b"\r\n"):
            ended = True
            break
    return ended


def test_data_unstuffs_and_ends_on_dot_line() -> None:
    reader = DataReader(1000)
    assert feed(reader, b"Subject: x\r\n\r\n..dot\r\nplain\r\n.\r\n")
    assert reader.verdict is DataVerdict.OK
    assert reader.content == b"Subject: x\r\n\r\n.dot\r\nplain\r\n"


SMUGGLES = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r.\r", b"\r\n.\r", b"\n.\r",
            b"\r.\n"]


@pytest.mark.parametrize("normalize", [False, True], ids=["reject", "normalize"])
@pytest.mark.parametrize("smuggle", SMUGGLES)
def test_data_dot_line_not_ended_by_crlf_never_ends_and_refuses(
    smuggle: bytes, normalize: bool
) -> None:
    """RFC 5321 section 4.1.1.4: only CRLF.CRLF ends the data; a "." line
    with a bare CR or LF beside it is refused whatever the bare-LF policy."""
    reader = DataReader(10_000, normalize_bare=normalize)
    ended = feed(reader, b"a" + smuggle + b"MAIL FROM:<x@y>\r\n")
    assert not ended
    assert reader.verdict is DataVerdict.SMUGGLING
    assert feed(reader, b".\r\n")
    assert reader.content == b""


@pytest.mark.parametrize("text", [b"x\rx", b"a\nb", b"a\n..b", b"\n\n", b"a.\nb"])
def test_data_other_bare_line_ends_refused_or_normalised(text: bytes) -> None:
    reject, normalize = DataReader(10_000), DataReader(10_000, normalize_bare=True)
    for reader in (reject, normalize):
        assert feed(reader, b"Subject: s\r\n\r\n" + text + b"\r\n.\r\n")
    assert reject.verdict is DataVerdict.BARE_LINE_ENDING
    assert normalize.verdict is DataVerdict.OK
    expected = text.replace(b"\r", b"\n").replace(b"\n", b"\r\n")  # each bare end -> CRLF
    assert normalize.content == b"Subject: s\r\n\r\n" + expected + b"\r\n"


def test_data_size_limit_stops_buffering_but_reads_to_end() -> None:
    reader = DataReader(100)
    assert not feed(reader, b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n")
    assert reader.verdict is DataVerdict.TOO_BIG
    assert reader.content == b""  # nothing held past the limit
    assert not feed(reader, b"z" * 60 + b"\r\n")
    assert reader.held == 0 and reader.content == b""
    assert feed(reader, b".\r\n")


def test_data_line_limit_counts_crlf_and_allows_stuffed_dot() -> None:
    reader = DataReader(10_000, max_line=1000)
    feed(reader, b"." + b"a" * 998 + b"\r\n")  # a 1000-octet line, dot-stuffed
    assert reader.verdict is DataVerdict.OK
    feed(reader, b"b" * 999 + b"\r\n")
    assert reader.verdict is DataVerdict.LINE_TOO_LONG


def test_data_fragment_of_long_line_is_not_end() -> None:
    reader = DataReader(10_000, max_line=10)
    reader.fragment(b"aaaaaaaaaaaaaaaaaaaa")
    assert not reader.feed(b".\r\n")  # the tail of the long line, not end of data
    assert reader.verdict is DataVerdict.LINE_TOO_LONG
    assert reader.feed(b".\r\n")


def feed_in_runs(reader: DataReader, stream: bytes) -> bool:
    """As the session's fast path: runs up to each ".CRLF" to
    ``feed_lines``; True once the data ended (what is left is unread)."""
    while (end := stream.find(b".\r\n")) >= 0:
        block, stream = stream[: end + 3], stream[end + 3 :]
        if reader.feed_lines(block):
            return True
    return False


_DATA_PIECES = st.sampled_from(
    [b"a", b"text.", b".", b"..", b"\r\n", b"\n", b"\r", b".\r\n", b"\r\n.\r\n", b" ", b"x" * 40]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_DATA_PIECES, max_size=40))
def test_data_runs_of_lines_match_line_by_line(pieces: list[bytes]) -> None:
    """The session reads whole runs of lines up to each ".CRLF" when it can:
    DataReader must come to the same end, verdict and content as when fed
    the same bytes one line at a time (smuggling attempts included)."""
    stream = b"".join(pieces) + b"\r\n.\r\n"
    by_line = DataReader(200, max_line=30)
    in_runs = DataReader(200, max_line=30)
    ended = feed(by_line, stream)
    assert feed_in_runs(in_runs, stream) == ended
    assert (in_runs.verdict, in_runs.size) == (by_line.verdict, by_line.size)
    if by_line.verdict is DataVerdict.OK:
        assert in_runs.content == by_line.content


# -- header fields ----------------------------------------------------------


RAW = (
    b"Authentication-Results: mail.test; spf=pass\r\n"
    b"Authentication-Results: other.example;\r\n dkim=pass\r\n"
    b"From: \"A, B\" <a@Sender.Example>\r\n"
    b"Subject: folded\r\n  subject\r\n"
    b"\r\n"
    b"Authentication-Results: mail.test; in the body\r\n"
)


def test_iter_fields_unfolds_and_stops_at_body() -> None:
    names = [(name, value) for name, value, _, _ in iter_fields(RAW)]
    assert names[1] == ("authentication-results", b"other.example; dkim=pass")
    assert names[3] == ("subject", b"folded  subject")
    assert len(names) == 4


def test_strip_forged_results_keeps_others_and_body() -> None:
    out = strip_forged_results(RAW, "mail.test")
    assert out.startswith(b"Authentication-Results: other.example;")
    assert out.endswith(b"Authentication-Results: mail.test; in the body\r\n")


def test_from_domains() -> None:
    assert from_domains(RAW) == ["sender.example"]
    assert from_domains(b"From: a@x.example, b@y.example\r\n\r\n") == ["x.example", "y.example"]
    assert from_domains(b"Subject: none\r\n\r\n") == []


def test_received_field_shape() -> None:
    field = received_field(
        helo="client (evil); x",
        client_ip="192.0.2.7",
        hostname="mail.test",
        protocol=protocol_name(esmtp=True, tls=True, auth=True, utf8=False),
        queue_id="ABC",
        tls="version=TLSv1.3 cipher=X",
        recipient="a@b.example",
        when=0,
    )
    text = field.decode()
    assert text.startswith("Received: from client??evil???x ([192.0.2.7])\r\n\tby mail.test")
    assert "with ESMTPSA id ABC" in text
    # RFC 5322 section 3.3: "-0000" would say the local time zone is unknown.
    assert "for <a@b.example>;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n" in text
    assert all(len(line) < 998 for line in field.split(b"\r\n"))


@given(st.floats(min_value=0, max_value=4_102_444_800))  # up to 2100
def test_received_date_is_utc_with_plus_zero(when: float) -> None:
    import email.utils

    field = received_field(helo="c", client_ip="::1", hostname="h", protocol="ESMTP",
                           queue_id="Q", when=when)
    date = field.decode().rsplit(";", 1)[1].strip()
    assert date.endswith(" +0000")
    assert email.utils.parsedate_to_datetime(date).timestamp() == int(when)


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        ({"esmtp": False, "tls": False, "auth": False, "utf8": False}, "SMTP"),
        ({"esmtp": True, "tls": False, "auth": False, "utf8": False}, "ESMTP"),
        ({"esmtp": True, "tls": True, "auth": False, "utf8": False}, "ESMTPS"),
        ({"esmtp": True, "tls": False, "auth": True, "utf8": False}, "ESMTPA"),
        ({"esmtp": True, "tls": True, "auth": True, "utf8": True}, "UTF8SMTPSA"),
    ],
)
def test_protocol_names(flags: dict, name: str) -> None:
    assert protocol_name(**flags) == name


# -- replies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("500 Error: bad syntax", "500 5.5.2 bad syntax"),
        ("503 Error: need RCPT command", "503 5.5.1 need RCPT command"),
        ("250-SIZE 100", "250-2.0.0 SIZE 100"),
        ("550 5.1.1 No such user", "550 5.1.1 No such user"),
        ("354 End data", "354 End data"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
    ],
)
def test_with_enhanced_code(line: str, expected: str) -> None:
    assert R.with_enhanced_code(line) == expected


def test_named_replies_carry_enhanced_codes() -> None:
    for name in dir(R):
        value = getattr(R, name)
        if isinstance(value, R.Reply):
            assert str(value)[4] == str(value.code)[0], name
            assert R.with_enhanced_code(str(value)) == str(value)


def test_queue_ids_are_unique_hex_and_differ_in_a_forked_child() -> None:
    import os
    import re

    from delivery.headers import new_queue_id

    ids = [new_queue_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9A-F]{16}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_queue_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    parent = new_queue_id()
    # The child drew its own prefix, so it does not continue the parent's run.
    assert child[:4] != parent[:4] or abs(int(child, 16) - int(parent, 16)) > 10_000


# -- invalid input in paths (issue #18) ---------------------------------------


def _wire(raw: bytes) -> str:
    """A command argument as aiosmtpd hands it over: UTF-8, surrogate-escaped."""
    return raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    "raw",
    [
        b"FROM:<\xff@b.example>",  # not UTF-8 at all
        b"FROM:<a@b\xc3.example>",  # truncated sequence
        b"FROM:<\xed\xa0\x80@b.example>",  # an encoded surrogate (RFC 3629 section 3)
        b"FROM:<a@b.example> SIZE=\xff",  # in a parameter value
        b"FROM:<\"\xfe\"@b.example>",  # in a quoted local part
    ],
)
def test_invalid_utf8_is_a_syntax_error(raw: bytes) -> None:
    with pytest.raises(PathSyntaxError, match="UTF-8"):
        parse_path("FROM:", _wire(raw), allow_null=True)


@pytest.mark.parametrize(
    "literal",
    ["[1<2]", "[<1]", "[300.1.1.1]", "[1.2.3]", "[IPv6:1::2::3]", "[foo:bar]",
     "[IPv6:192.0.2.1]", "[192.0.2.1 ]"],
)
def test_address_literal_grammar(literal: str) -> None:
    """RFC 5321 section 4.1.3: an IPv4 or IPv6 literal (the only registered
    Standardized-tag); anything else, "<" and ">" included, is refused."""
    with pytest.raises(PathSyntaxError, match="address literal"):
        parse_path("TO:", f"TO:<u@{literal}>", allow_null=False)


@pytest.mark.parametrize("literal", ["[1>2]", "[<>]"])
def test_address_literal_with_closing_angle(literal: str) -> None:
    with pytest.raises(PathSyntaxError):  # ">" ends the path: what follows is junk
        parse_path("TO:", f"TO:<u@{literal}>", allow_null=False)


@pytest.mark.parametrize(
    ("literal", "normalised"),
    [("[192.0.2.1]", "[192.0.2.1]"), ("[IPv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
     ("[ipv6:::1]", "[IPv6:::1]")],
)
def test_address_literal_accepted(literal: str, normalised: str) -> None:
    assert parse_path("TO:", f"TO:<u@{literal}>", allow_null=False).address == f"u@{normalised}"

"""The pure POP3 wire format: command parsing, replies, byte-stuffing, TOP cutting."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapd.pop3.session import STATE_COMMANDS, State, TopCutter
from imapd.pop3.wire import (
    Command,
    DotStuffer,
    WireError,
    decode_sasl_plain,
    dot_stuff,
    err,
    multiline,
    ok,
    parse_command,
    parse_line_count,
    parse_msg_number,
)

PARSE_CASES = [
    (b"QUIT\r\n", Command("QUIT", (), "")),
    (b"quit\r\n", Command("QUIT", (), "")),
    (b"LIST 1\r\n", Command("LIST", ("1",), "1")),
    (b"TOP 1 10\n", Command("TOP", ("1", "10"), "1 10")),
    (b"PASS two words \r\n", Command("PASS", ("two", "words"), "two words ")),
    (b"USER j\xc3\xb6rg@ex.org\r\n", Command("USER", ("jörg@ex.org",), "jörg@ex.org")),
]


@pytest.mark.parametrize(("line", "command"), PARSE_CASES)
def test_parse_command(line, command):
    assert parse_command(line) == command


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"\r\n", "empty command line"),
        (b"  \r\n", "empty command line"),
        (b"QU\r\n", "unknown command"),
        (b"QUITS\r\n", "unknown command"),
        (b"QU1T\r\n", "unknown command"),
        (b" QUIT\r\n", "unknown command"),
        (b"USER \xff\r\n", "command line is not UTF-8"),
        (b"USER a\x00b\r\n", "control characters in command line"),
        (b"USER " + b"a" * 256 + b"\r\n", "argument too long"),
    ],
)
def test_parse_command_errors(line, message):
    with pytest.raises(WireError, match=message):
        parse_command(line)


@pytest.mark.parametrize("arg", ["0", "-1", "+1", "x", "1.5", "", "1" * 10, "١"])
def test_bad_message_numbers(arg):
    with pytest.raises(WireError):
        parse_msg_number(arg)


def test_numbers():
    assert parse_msg_number("42") == 42
    assert parse_line_count("0") == 0
    with pytest.raises(WireError):
        parse_line_count("-3")


def test_replies():
    assert ok() == b"+OK\r\n"
    assert ok("2 320") == b"+OK 2 320\r\n"
    assert err("no such message") == b"-ERR no such message\r\n"
    assert err("locked", "IN-USE") == b"-ERR [IN-USE] locked\r\n"
    assert multiline(ok("x"), ["a", ".b"]) == b"+OK x\r\na\r\n..b\r\n.\r\n"


def test_sasl_plain():
    assert decode_sasl_plain(base64.b64encode(b"\0u\0p w").decode()) == ("", "u", "p w")
    assert decode_sasl_plain(base64.b64encode(b"z\0u\0p").decode()) == ("z", "u", "p")
    for bad in ["=", "!!", base64.b64encode(b"u\0p").decode(), base64.b64encode(b"\0\0p").decode()]:
        with pytest.raises(WireError):
            decode_sasl_plain(bad)


@pytest.mark.parametrize(
    ("stored", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
        (b"a\nb", b"a\r\nb\r\n.\r\n"),  # final line ending added
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\n.b\n..c\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
        (b"x.y\r\n", b"x.y\r\n.\r\n"),  # a dot inside a line is left alone
        (b"a\rb\r\n", b"a\rb\r\n.\r\n"),  # bare CR is not a line ending
    ],
)
def test_dot_stuff(stored, wire):
    assert dot_stuff(stored) == wire


@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20))
def test_dot_stuffing_ignores_chunk_boundaries(data, cuts):
    stuffer, out, pos = DotStuffer(), [], 0
    for size in cuts:
        out.append(stuffer.feed(data[pos : pos + size]))
        pos += size
    out.append(stuffer.feed(data[pos:]))
    out.append(stuffer.finish())
    assert b"".join(out) == dot_stuff(data)


def cut(message: bytes, lines: int, chunk: int) -> bytes:
    cutter, out = TopCutter(lines), []
    for i in range(0, len(message), chunk):
        part, done = cutter.feed(message[i : i + chunk])
        out.append(part)
        if done:
            break
    return b"".join(out)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize(
    ("message", "lines", "top"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nx\r\ny\r\n", 0, b"A: 1\r\nB: 2\r\n\r\n"),
        (b"A: 1\r\nB: 2\r\n\r\nx\r\ny\r\n", 1, b"A: 1\r\nB: 2\r\n\r\nx\r\n"),
        (b"A: 1\nB: 2\n\nx\ny\n", 5, b"A: 1\nB: 2\n\nx\ny\n"),
        (b"A: 1\n\n\nx\n", 1, b"A: 1\n\n\n"),  # an empty body line counts
        (b"A: 1\nB: 2", 3, b"A: 1\nB: 2"),  # header only
        (b"\r\nbody\r\nmore\r\n", 1, b"\r\nbody\r\n"),  # empty header
    ],
)
def test_top_cutter(message, lines, top, chunk):
    assert cut(message, lines, chunk) == top


def test_state_table_is_the_rfc():
    assert STATE_COMMANDS[State.UPDATE] == frozenset()
    assert "QUIT" in STATE_COMMANDS[State.AUTHORIZATION] & STATE_COMMANDS[State.TRANSACTION]
    assert not {"USER", "PASS", "APOP", "AUTH", "STLS"} & STATE_COMMANDS[State.TRANSACTION]
    assert not {"STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL", "NOOP"} & (
        STATE_COMMANDS[State.AUTHORIZATION]
    )

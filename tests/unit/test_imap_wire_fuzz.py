"""Property tests for the IMAP wire layer: whatever bytes a client sends,
framing and parsing give commands or the parser's own ParseError (a tagged
BAD), never an exception (which the session answers with BYE), and never
take long. Inputs are random, or valid commands from
``tests/fixtures/fuzz/imap/`` with bytes changed, cut, repeated or spliced."""

from __future__ import annotations

import random
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imapd.imap.wire import commands as c
from imapd.imap.wire.framing import FrameError, Framer, LiteralBegin, LiteralChunk, TextSegment
from imapd.imap.wire.parser import parse_command

CORPUS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "fuzz" / "imap"
CORPUS = [p.read_bytes() for p in sorted(CORPUS_DIR.glob("*.imap"))]

# Bytes with a meaning somewhere in the grammar, so mutations reach deep paths.
TOKENS = [
    b" ", b"(", b")", b"[", b"]", b"<", b">", b".", b'"', b"\\", b"{", b"}", b"+", b"*",
    b"%", b"&", b"-", b",", b":", b"$", b"\r\n", b"\n", b"\x00", b"\xff", b"\xc3\xa9",
    b"{0}\r\n", b"{5+}\r\n", b"{99999999999999999999}\r\n", b"NIL", b"UID ", b"0", b"1",
    b"4294967296", b"9" * 30, b"&AOk-", b"&-", b"&Jjo", b'"a\\"b"', b"RETURN (", b"CHARSET ",
    b"BODY[", b"HEADER.FIELDS (", b"<0.", b"(CHANGEDSINCE ", b"(UNCHANGEDSINCE ", b"NOT ",
    b"OR ", b"MODSEQ ", b'" 5-Mar-2021 10:11:12 +0100"', b'"31-Feb-2021 10:11:12 +0100"',
]

DEFENSIVE_FALLBACK = "Malformed command ("  # what parse_command says for an unforeseen error


def commands_of(data: bytes) -> list[c.Command | c.ParseError]:
    """Frame ``data`` as the server does (accepting every literal) and parse
    each complete command."""
    framer = Framer(max_line_length=8192)
    framer.feed(data)
    out: list[c.Command | c.ParseError] = []
    segments: list[bytes] = []
    literals: list[object] = []
    current = bytearray()
    while (ev := framer.next_event()) is not None:
        if isinstance(ev, TextSegment):
            segments.append(ev.data)
            if ev.final:
                out.append(parse_command(segments, literals))
                segments, literals = [], []
        elif isinstance(ev, LiteralBegin):
            framer.accept()
            current = bytearray()
        elif isinstance(ev, LiteralChunk):
            current += ev.data
            if ev.last:
                literals.append(bytes(current))
        elif isinstance(ev, FrameError):
            segments, literals = [], []
    return out


def assert_well_formed(results: list[c.Command | c.ParseError]) -> None:
    for result in results:
        assert isinstance(result, c.Command | c.ParseError), result
        if isinstance(result, c.ParseError):
            assert result.message and not result.message.startswith(DEFENSIVE_FALLBACK), result
            assert result.tag and " " not in result.tag


def test_corpus_commands_parse() -> None:
    assert len(CORPUS) >= 20
    for raw in CORPUS:
        results = commands_of(raw)
        assert len(results) == 1 and isinstance(results[0], c.Command), (raw, results)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "cut", "splice", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "insert":
            data[at:at] = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif op == "splice":
            other = draw(st.sampled_from(CORPUS))
            data[at:] = other[draw(st.integers(0, len(other))) :]
        elif op == "repeat":
            data[at:at] = draw(st.sampled_from(TOKENS)) * draw(st.integers(2, 200))
    return bytes(data)


FUZZ = settings(
    max_examples=400,
    deadline=timedelta(seconds=2),  # generous: 2 cores shared; the bound is tested below
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(mutated())
def test_mutated_commands_give_commands_or_parse_errors(data: bytes) -> None:
    # The issue's case ends a command inside a quoted date: d APPEND INBOX "
    assert_well_formed(commands_of(data))
    assert_well_formed(commands_of(data + b"\r\n"))


@FUZZ
@given(st.lists(st.sampled_from(TOKENS) | st.binary(max_size=12), max_size=40))
def test_random_token_soup_gives_commands_or_parse_errors(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert_well_formed(commands_of(b"t1 " + data + b"\r\n"))
    assert_well_formed(commands_of(data + b"\r\n"))


@pytest.mark.parametrize(
    "line",
    [
        b'd APPEND INBOX "',
        b'd APPEND INBOX "5-Mar-2021',
        b"d APPEND INBOX () ",
        b"d FETCH 1 (FLAGS) (CHANGEDSINCE " + b"9" * 5000 + b")",
        b"d STORE " + b"1" * 5000 + b" FLAGS x",
        b"d SEARCH LARGER " + b"7" * 5000,
    ],
)
def test_truncated_and_oversized_arguments_are_bad(line: bytes) -> None:
    result = parse_command([line])
    assert isinstance(result, c.ParseError) and result.tag == "d", result
    assert not result.message.startswith(DEFENSIVE_FALLBACK), result


def test_time_per_input_is_bounded_for_long_lines() -> None:
    """A line at the framer's limit made of any one token parses fast."""
    rng = random.Random()
    worst = 0.0
    for token in TOKENS:
        body = token * (8000 // len(token))
        line = b"t1 " + rng.choice([b"SEARCH ", b"FETCH 1 ", b"LIST ", b"APPEND x ", b""]) + body
        start = time.process_time()  # CPU: another process's load is not ours
        assert_well_formed(commands_of(line[:8190] + b"\r\n"))
        worst = max(worst, time.process_time() - start)
    assert worst < 0.5  # linear parsing takes a few milliseconds here

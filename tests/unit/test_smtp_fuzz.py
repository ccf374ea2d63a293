"""Fuzzing the SMTP command-line parsers (issue #18).

Input goes in as the wire delivers it: raw octets of one command line, its
ending checked by :func:`mtad.session.check_command_line`, its argument
decoded as aiosmtpd does (UTF-8 with surrogateescape) and parsed by
:func:`delivery.address.parse_path`. Only the parsers' own error types may
escape (anything else would reach the client as 451 and a traceback), and
work stays linear in the input: the same input grown to 64 KiB still parses
in a fraction of a second, which no quadratic scan or backtracking regex
would manage. The seeds in ``tests/fixtures/fuzz/smtp/`` are real and
hostile command lines; hypothesis mutates and splices them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from delivery.address import PathSyntaxError, parse_mailbox, parse_path
from mtad.session import CommandLineEnding, check_command_line

CORPUS_DIR = Path(__file__).parent.parent / "fixtures" / "fuzz" / "smtp"
CORPUS = sorted(p.read_bytes() for p in CORPUS_DIR.glob("*.line"))
# Growing an input to this size must not cost more than LINEAR_BUDGET seconds;
# a quadratic step would take minutes at this size.
GROWN_SIZE = 64 * 1024
LINEAR_BUDGET = 0.5


def parse_command_line(line: bytes) -> object:
    """What the session does with one line up to MAIL/RCPT's path parser."""
    check_command_line(line)
    verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
    text = arg.strip().decode("utf-8", "surrogateescape")
    keyword = "FROM:" if verb.upper() == b"MAIL" else "TO:"
    return parse_path(keyword, text, allow_null=keyword == "FROM:")


def survive(line: bytes) -> None:
    try:
        parse_command_line(line)
    except (PathSyntaxError, CommandLineEnding):
        pass


def mutate(seed: bytes, cuts: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(seed)
    for pos, insert in cuts:
        pos %= len(out) + 1
        out[pos : pos + len(insert) // 2] = insert  # overwrite some, insert the rest
    return bytes(out)


_CUTS = st.lists(st.tuples(st.integers(0, 600), st.binary(min_size=1, max_size=12)), max_size=6)
_TOKENS = st.sampled_from(
    [b"<", b">", b"@", b".", b'"', b"\\", b"[", b"]", b":", b",", b"=", b" ", b"\r", b"\n",
     b"\xff", b"\xc3", b"\xed\xa0\x80", "ü".encode(), b"IPv6:", b"SMTPUTF8", b"SIZE="]
)


@pytest.mark.parametrize("seed", CORPUS, ids=lambda s: s[:24].decode("ascii", "replace"))
def test_corpus_seed_parses_or_refuses(seed: bytes) -> None:
    survive(seed)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), _CUTS)
def test_mutated_seeds_raise_only_parser_errors(seed: bytes, cuts: list) -> None:
    survive(mutate(seed, cuts))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
@example(b"MAIL FROM:<\xed\xb2\x80@x>\r\n")
def test_random_octets_raise_only_parser_errors(line: bytes) -> None:
    survive(b"MAIL FROM:" + line)
    survive(b"RCPT TO:" + line + b"\r\n")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_any_string_mailbox_raises_only_syntax_errors(text: str) -> None:
    """parse_mailbox also takes HTTP JSON input, which may hold lone surrogates."""
    try:
        parse_mailbox(text)
    except PathSyntaxError:
        pass


def _grown(line: bytes, filler: bytes) -> bytes:
    """``line`` with ``filler`` repeated inside its path up to GROWN_SIZE."""
    head, sep, tail = line.partition(b"@")
    times = GROWN_SIZE // max(len(filler), 1)
    return head + filler * times + sep + tail if sep else line + filler * times


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), st.lists(_TOKENS, min_size=1, max_size=5))
def test_work_is_linear_in_the_input(seed: bytes, tokens: list[bytes]) -> None:
    line = _grown(seed, b"".join(tokens))
    started = time.process_time()  # CPU: another process's load is not ours
    survive(line)
    elapsed = time.process_time() - started
    assert elapsed < LINEAR_BUDGET, f"{len(line)} octets took {elapsed:.2f}s"

"""Fuzzing the POP3 wire parser (issue #18): whatever line a client sends,
only :class:`WireError` escapes, and the work is linear in the line's length.

Seeds are the corpus in ``tests/fixtures/fuzz/pop3/`` (one client line per
file); hypothesis mutates them and mixes in bytes that matter to the grammar.
The example count bounds the time this takes in CI.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imapd.pop3.wire import (
    TERMINATOR,
    DotStuffer,
    WireError,
    decode_sasl_plain,
    parse_command,
    parse_line_count,
    parse_msg_number,
)
from tests.linearity import assert_linear

CORPUS = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "fuzz" / "pop3").glob("*"))
SEEDS = [p.read_bytes() for p in CORPUS]
TOKENS = [b" ", b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b"\xc3", b"=", b"9" * 12, b"-1", b"\t"]


def _mutated() -> st.SearchStrategy[bytes]:
    """A corpus line cut at random points with random tokens spliced in."""
    pieces = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=16)), max_size=8)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        seed = draw(st.sampled_from(SEEDS))
        cut = draw(st.integers(0, len(seed)))
        return seed[:cut] + b"".join(draw(pieces)) + seed[cut:]

    return build()


def _parse_all(line: bytes) -> None:
    """Everything a session does with a client line, as the session does it."""
    try:
        command = parse_command(line)
    except WireError:
        return
    for arg in command.args:
        for parse in (parse_msg_number, parse_line_count, decode_sasl_plain):
            try:
                parse(arg)
            except WireError:
                pass


def test_the_corpus_is_there() -> None:
    assert len(SEEDS) >= 8
    assert all(parse_command(seed).name for seed in SEEDS)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_mutated(), st.binary(max_size=600)))
def test_only_wire_errors_escape(line: bytes) -> None:
    _parse_all(line)


@given(st.binary(max_size=2000).map(lambda b: b.replace(b"\r", b"")), st.integers(1, 64))
@settings(max_examples=200, deadline=None)
def test_dot_stuffing_round_trips_in_any_chunking(body: bytes, chunk: int) -> None:
    """RFC 1939 section 3: the multi-line body, un-stuffed, is the message
    with CRLF line endings, whatever chunks the store hands over."""
    stuffer = DotStuffer()
    out = b"".join(stuffer.feed(body[i : i + chunk]) for i in range(0, len(body), chunk))
    out += stuffer.finish()
    assert out.endswith(TERMINATOR)
    lines = out[: -len(TERMINATOR)].split(b"\r\n")
    assert lines[-1] == b""
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines[:-1])
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    expected = body.replace(b"\n", b"\r\n")
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuffed == expected


def test_long_lines_cost_linear_time() -> None:
    assert_linear(lambda n: _parse_all(b"USER " + b"a " * n + b"\r\n"), 20_000)
    assert_linear(lambda n: _parse_all(b"AUTH PLAIN " + b"A" * n + b"\r\n"), 50_000)
    assert_linear(lambda n: _parse_all(b"\xff" * n), 50_000)

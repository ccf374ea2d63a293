"""BDAT's argument (RFC 3030 section 2 ABNF) and the chunked message buffer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mtad.chunks import BdatArgs, BdatSyntaxError, ChunkedMessage, ChunkVerdict, parse_bdat
from tests.linearity import assert_linear


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [
        ("0", BdatArgs(0, False)),
        ("0 LAST", BdatArgs(0, True)),
        ("86 LAST", BdatArgs(86, True)),
        ("986", BdatArgs(986, False)),
        ("42 last", BdatArgs(42, True)),  # keywords are case-blind (RFC 5321 2.4)
        ("000123", BdatArgs(123, False)),
        ("9" * 20, BdatArgs(int("9" * 20), False)),
        ("9" * 21, BdatArgs(None, False)),
        ("1" + "0" * 999 + " LAST", BdatArgs(None, True)),
        ("0" * 1000 + "7", BdatArgs(7, False)),
    ],
)
def test_parse(arg: str, parsed: BdatArgs) -> None:
    assert parse_bdat(arg) == parsed


@pytest.mark.parametrize(
    "arg",
    [
        None,
        "",
        " ",
        "-1",
        "+1",
        "1.5",
        "0x10",
        "12x",
        "LAST",
        "10 FIRST",
        "10  LAST",
        "10 LAST x",
        "\u0661\u0662",
        "\uff11",
        "1_000",
    ],
)
def test_parse_refuses(arg: str | None) -> None:
    with pytest.raises(BdatSyntaxError):
        parse_bdat(arg)


def test_parse_is_linear_in_the_digits() -> None:
    """A long size (a 1000-digit one, and far longer) costs time linear in
    its length: never an int conversion of it."""
    assert_linear(lambda n: [parse_bdat("7" * n + " LAST") for _ in range(20)], 20_000)
    assert_linear(lambda n: [parse_bdat("0" * n + "5") for _ in range(20)], 20_000)


def test_chunks_spool_past_the_threshold_and_come_back_whole(tmp_path: Path) -> None:
    rng = random.Random()
    data = rng.randbytes(rng.randrange(50_000, 90_000))
    message = ChunkedMessage(100_000, spool_at=16_384, spool_dir=tmp_path)
    try:
        pos = 0
        while pos < len(data):
            step = rng.randrange(1, 9_000)
            message.feed(data[pos : pos + step])
            pos += step
            assert message.held <= 16_384 + 9_000
        assert message.verdict is ChunkVerdict.OK
        whole = message.message()
        assert isinstance(whole, Path) and whole.read_bytes() == data
    finally:
        message.discard()
    assert list(tmp_path.iterdir()) == []


def test_chunks_past_the_limit_hold_nothing(tmp_path: Path) -> None:
    message = ChunkedMessage(1_000, spool_at=100, spool_dir=tmp_path)
    message.feed(b"x" * 600)
    message.feed(b"y" * 401)
    assert message.verdict is ChunkVerdict.TOO_BIG
    assert message.held == 0 and list(tmp_path.iterdir()) == []
    message.feed(b"z" * 10_000)  # the rest of the chunk: counted, not kept
    assert message.size == 11_001 and message.held == 0


@pytest.mark.parametrize("declared", [None, 1_001, 10**15])
def test_a_chunk_announced_past_the_limit_is_never_held(tmp_path: Path, declared) -> None:
    """RFC 3030 section 2: a chunk whose declared size takes the message past
    the limit is refused before its first octet, so none is kept while it is
    read and discarded; an earlier verdict is not overwritten."""
    rng = random.Random()
    message = ChunkedMessage(1_000, spool_at=100, spool_dir=tmp_path)
    message.announce(0)
    assert message.verdict is ChunkVerdict.OK
    message.announce(declared)
    assert message.verdict is ChunkVerdict.TOO_BIG
    for _ in range(rng.randrange(1, 20)):
        message.feed(rng.randbytes(rng.randrange(1, 500)))
        assert message.held == 0 and list(tmp_path.iterdir()) == []
    message.announce(1)
    assert message.verdict is ChunkVerdict.TOO_BIG

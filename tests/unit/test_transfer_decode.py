"""storage.transfer_decode and imapd.imap.binary's streamed BINARY pieces:
incremental decoders fed random splits of random-size input give what the
standard library's decoders (base64, quopri, email) give for the whole, and
the measure / window of a stream match the decoded bytes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import itertools
import quopri
import random
from collections.abc import AsyncIterator

import pytest

from imapd.imap import binary
from storage.transfer_decode import (
    Base64Decoder,
    QuotedPrintableDecoder,
    decode_transfer,
    transfer_decoder,
)


def _size(rng: random.Random, high: int) -> int:
    n = rng.randint(0, high)
    return n + 1 if n % 3 == 0 else n  # base64 padding always exercised


def _splits(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random places: sometimes one octet at a time."""
    out, at = [], 0
    while at < len(data):
        step = rng.choice([1, 2, 3, rng.randint(1, 100), rng.randint(1, 70_000)])
        out.append(data[at : at + step])
        at += step
    return out


def _fed(decoder: object, pieces: list[bytes]) -> bytes:
    return b"".join(decoder.feed(p) for p in pieces) + decoder.finish()  # type: ignore[attr-defined]


def test_base64_in_pieces_is_the_standard_librarys() -> None:
    rng = random.Random()
    for _ in range(60):
        data = rng.randbytes(_size(rng, 200_000))
        width = rng.choice([60, 64, 76, 1000])
        text = base64.b64encode(data)
        lines = b"\r\n".join(text[i : i + width] for i in range(0, len(text), width))
        assert _fed(Base64Decoder(), _splits(rng, lines)) == data == base64.b64decode(text)


def test_quoted_printable_in_pieces_is_the_standard_librarys() -> None:
    rng = random.Random()
    for _ in range(60):
        data = rng.randbytes(_size(rng, 60_000))
        if rng.random() < 0.5:  # text lines: line breaks kept as CRLF
            data = data.replace(b"\r", b"").replace(b"\n", b"\r\n")
        encoded = quopri.encodestring(data, quotetabs=rng.random() < 0.5)
        expect = quopri.decodestring(encoded)
        assert _fed(QuotedPrintableDecoder(), _splits(rng, encoded)) == expect
        message = email.message_from_bytes(
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
        )
        assert message.get_payload(decode=True) == expect


def test_damaged_quoted_printable_in_pieces_is_a2b_qp_of_the_whole() -> None:
    """Escapes, soft breaks ("=" CR ... LF skips to the LF), "==" and stray
    "=" cut anywhere: the same bytes as decoding all at once."""
    rng = random.Random()
    alphabet = b"=\r\nA0f \tx"
    for _ in range(20_000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        pieces = [data[a:b] for a, b in _cuts(rng, len(data))]
        assert _fed(QuotedPrintableDecoder(), pieces) == binascii.a2b_qp(data), data


def _cuts(rng: random.Random, n: int) -> list[tuple[int, int]]:
    points = sorted({0, n, *(rng.randint(0, n) for _ in range(rng.randint(0, 6)))})
    return list(itertools.pairwise(points))


def test_a_long_quoted_printable_line_is_not_held_whole() -> None:
    """A 2 MB line with no line break: decoded as it comes, a few octets held."""
    rng = random.Random()
    data = bytes(b for b in rng.randbytes(2_000_000) if b not in b"\r\n")
    encoded = binascii.b2a_qp(data, istext=False).replace(b"=\n", b"")  # one line
    decoder = QuotedPrintableDecoder()
    out = []
    for piece in _splits(rng, encoded):
        out.append(decoder.feed(piece))
        assert len(decoder._pending) <= 8
    assert b"".join(out) + decoder.finish() == data


def test_other_encodings_are_the_identity() -> None:
    data = random.randbytes(1000)
    for encoding in ("7bit", "8BIT", "binary", ""):
        assert decode_transfer(data, encoding) == data
        assert transfer_decoder(encoding).feed(data) == data


async def _stream(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for p in pieces:
        await asyncio.sleep(0)
        yield p


@pytest.mark.parametrize("encoding", ["base64", "quoted-printable", "8bit"])
async def test_measure_and_window_match_the_decoded_bytes(encoding: str) -> None:
    rng = random.Random()
    for _ in range(20):
        data = rng.randbytes(_size(rng, 300_000))
        if rng.random() < 0.5:
            data = data.replace(b"\0", b"")  # no NUL: a plain literal, not literal8
        encoded = {
            "base64": lambda d: base64.encodebytes(d).replace(b"\n", b"\r\n"),
            "quoted-printable": quopri.encodestring,
            "8bit": lambda d: d,
        }[encoding](data)
        if encoding == "quoted-printable":
            data = quopri.decodestring(encoded)  # QP of raw line breaks is lossy
        windows = [(rng.randint(0, len(data) + 5), rng.randint(0, len(data) + 5)) for _ in "abc"]
        key = f"{rng.getrandbits(256):064x}"
        measured, flags = await binary.measure(
            key, 0, len(encoded), encoding, _stream(_splits(rng, encoded)), windows
        )
        first = data.find(b"\0")
        assert measured == binary.Measure(len(data), first, data.rfind(b"\0"))
        assert binary.remembered(key, 0, len(encoded), encoding.upper()) == measured
        for (origin, octets), nul in zip(windows, flags, strict=True):
            start, length = measured.window(origin, octets)
            expect = data[origin : origin + octets]
            assert length == len(expect)
            assert nul == (b"\0" in expect)
            assert measured.nul_in(start, length) in (None, nul)
            got = binary.decoded_window(_stream(_splits(rng, encoded)), encoding, start, length)
            assert b"".join([c async for c in got]) == expect


def test_an_unknown_encoding_is_refused_before_reading() -> None:
    with pytest.raises(binary.UnknownCte):
        asyncio.run(binary.measure("0" * 64, 0, 1, "x-uuencode", _stream([b"x"]), []))

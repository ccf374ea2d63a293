"""The HTTP API's incremental transfer decoders (RFC 2045 section 6)."""

from __future__ import annotations

import base64
import binascii
import random

import pytest

from storage.transfer_decode import Base64Decoder, QuotedPrintableDecoder, decode_transfer


def b64_lines(data: bytes, width: int) -> bytes:
    encoded = base64.b64encode(data)
    return b"\r\n".join(encoded[i : i + width] for i in range(0, len(encoded), width))


@pytest.mark.parametrize("decoder", [Base64Decoder, QuotedPrintableDecoder])
def test_decoders_give_the_same_bytes_however_the_input_is_split(decoder: type) -> None:
    rng = random.Random()
    for _ in range(200):
        data = rng.randbytes(rng.randrange(0, 3000))
        if decoder is Base64Decoder:
            encoded = b64_lines(data, rng.choice([76, 61, 4, 1]))
        else:
            encoded = binascii.b2a_qp(data, istext=False)
        cuts = sorted(rng.sample(range(len(encoded) + 1), min(len(encoded) + 1, 5)))
        pieces = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)], strict=True)]
        instance = decoder()
        out = b"".join(instance.feed(piece) for piece in pieces) + instance.finish()
        assert out == data


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        # RFC 2045 section 6.8: junk is ignored, "=" ends the data.
        (b"R3L!DvM\x00Of ZQ==", "Grüße".encode()),
        (b"R3LDvMOfZQ==\r\nignored after padding", "Grüße".encode()),
        (b"R3LDvMOfZQ", "Grüße".encode()),  # padding missing: the octets are still there
        (b"R3LDvMOfZ", "Grüß".encode()),  # a lone sextet carries no octet
    ],
)
def test_base64_tolerates_junk_but_keeps_padding_semantics(encoded: bytes, decoded: bytes) -> None:
    decoder = Base64Decoder()
    assert decoder.feed(encoded) + decoder.finish() == decoded


def test_whole_body_decode_keeps_the_last_group() -> None:
    # The report of issue #17: "Viele Grüße" lost its last group.
    text = "Viele Grüße"
    encoded = base64.b64encode(text.encode())
    assert encoded.endswith(b"=")
    assert decode_transfer(encoded + b"\r\n", "base64").decode() == text

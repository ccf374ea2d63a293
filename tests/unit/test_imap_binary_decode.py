"""imapd.imap.binary: content-transfer decoding for FETCH BINARY (RFC 3516)."""

from __future__ import annotations

import base64
import quopri
import random
import time

import pytest

from imapd.imap import binary


def test_decodes_as_the_standard_library() -> None:
    rng = random.Random()
    for _ in range(50):
        data = rng.randbytes(rng.randint(0, 3000))
        text = base64.encodebytes(data).replace(b"\n", b"\r\n")
        assert binary.decode("Base64", text) == data
        qp = quopri.encodestring(data.replace(b"\r", b"").replace(b"\n", b""))
        assert binary.decode(" quoted-printable ", qp) == quopri.decodestring(qp)
        assert binary.decode("8bit", data) == data
        assert binary.decode("BINARY", data) == data


def test_unknown_encoding_raises() -> None:
    with pytest.raises(binary.UnknownCte):
        binary.decode("x-uuencode", b"begin 644 f\r\n")
    with pytest.raises(binary.UnknownCte):
        binary.check("x-uuencode")
    binary.check("7BIT")


def test_damaged_base64_keeps_what_it_can() -> None:
    rng = random.Random()
    data = rng.randbytes(rng.randint(10, 2000))
    text = base64.b64encode(data)
    # Padding then more text: what follows the padding is not decoded.
    assert binary.decode("base64", text + b"==QUJD") == data
    # A lone trailing sextet is dropped, the whole octets before it kept.
    cut = base64.b64encode(data[: len(data) // 3 * 3])
    assert binary.decode("base64", cut + b"Q") == data[: len(data) // 3 * 3]


def _cpu(fn: object, arg: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        fn(arg)  # type: ignore[operator]
        best = min(best, time.process_time() - start)
    return best


@pytest.mark.parametrize(
    ("encoding", "unit"),
    [("base64", b"QU*J!D\x00"), ("base64", b"="), ("quoted-printable", b"=Z=\r=4")],
)
def test_malformed_input_decodes_in_linear_time(encoding: str, unit: bytes) -> None:
    """10 MB of hostile input: twice the input costs about twice the work
    (n vs 2n, best of three each), never the square."""
    n = 10 * 1024 * 1024 // len(unit)
    small = _cpu(lambda d: binary.decode(encoding, d), unit * n)
    large = _cpu(lambda d: binary.decode(encoding, d), unit * (2 * n))
    assert large < 3.5 * max(small, 1e-3), (small, large)

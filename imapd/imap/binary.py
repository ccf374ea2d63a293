"""Content-transfer decoding for FETCH BINARY (RFC 3516).

:func:`decode` undoes a part's Content-Transfer-Encoding (RFC 2045
section 6). It is linear in the input and lenient as Dovecot is with
damaged input, never an error: base64 skips characters outside the
alphabet and stops at the padding (RFC 2045 section 6.8: "Any characters
outside of the base64 alphabet are to be ignored"), quoted-printable keeps
an "=" not followed by two hex digits as it stands (RFC 2045 section 6.7
note (2)). An encoding outside RFC 2045's set is :class:`UnknownCte`: the
command fails with NO [UNKNOWN-CTE] (RFC 3516 section 4.3).

Both decoders are binascii's C loops (one pass each). Large parts are
decoded in the content pool's worker processes (:func:`decode_off_loop`)
so a 25 MB attachment does not hold the event loop.
"""

from __future__ import annotations

import binascii

from storage.contentpool import content_pool

# Identity encodings (RFC 2045 section 6.2) and the two we decode.
_IDENTITY = frozenset({"7BIT", "8BIT", "BINARY", ""})
_DECODED = frozenset({"BASE64", "QUOTED-PRINTABLE"})
# Parts up to this size are decoded on the event loop (about a millisecond).
INLINE_BYTES = 512 * 1024
# RFC 2045 section 6.8: octets outside the base64 alphabet and "=" padding
# (deleted with bytes.translate: one C pass).
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_B64 = bytes(b for b in range(256) if b not in _ALPHABET)


class UnknownCte(Exception):
    """An encoding we cannot undo (RFC 3516 section 4.3: NO [UNKNOWN-CTE])."""


def check(encoding: str) -> None:
    """Raise :class:`UnknownCte` unless ``encoding`` can be decoded."""
    enc = encoding.strip().upper()
    if enc not in _IDENTITY and enc not in _DECODED:
        raise UnknownCte(encoding)


def decode(encoding: str, data: bytes) -> bytes:
    """``data`` with its transfer encoding undone (see the module doc)."""
    enc = encoding.strip().upper()
    if enc in _IDENTITY:
        return data
    if enc == "BASE64":
        return _base64(data)
    if enc == "QUOTED-PRINTABLE":
        return binascii.a2b_qp(data)
    raise UnknownCte(encoding)


def _base64(data: bytes) -> bytes:
    clean = data.translate(None, _NOT_B64)
    pad = clean.find(b"=")
    if pad >= 0:
        clean = clean[:pad]  # data after the padding is not part of it
    if len(clean) % 4 == 1:
        clean = clean[:-1]  # one lone sextet carries no whole octet
    clean += b"=" * (-len(clean) % 4)
    try:
        return binascii.a2b_base64(clean)
    except binascii.Error:  # cannot happen after the cleaning; stay lenient anyway
        return b""


async def decode_off_loop(encoding: str, data: bytes) -> bytes:
    """:func:`decode`, in the content pool for a large part (may raise
    ContentTimeout past the pool's time limit)."""
    enc = encoding.strip().upper()
    if enc in _IDENTITY or len(data) <= INLINE_BYTES:
        return decode(encoding, data)
    return await content_pool().run(decode, encoding, data)

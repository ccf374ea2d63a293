"""Incremental Content-Transfer-Encoding decoders (RFC 2045 section 6).

Shared by every reader that decodes a stored part in chunks: IMAP FETCH
BINARY (RFC 3516, imapd/imap/binary.py) and the API's attachment
downloads (httpapi/mime.py). A part is read from the blob store in bounded
chunks and each chunk is decoded as it arrives, so a 25 MB attachment is
never held whole.

Contract of every decoder: the concatenation of each :meth:`feed` result
and the final :meth:`finish` is the same, however the input was split, as
decoding the whole input at once; at most a few octets (base64: fewer than
four alphabet characters; quoted-printable: the current line's unfinished
tail) are held between calls. Both decoders are lenient as Dovecot is,
never an error: base64 skips characters outside the alphabet and stops at
the padding (RFC 2045 section 6.8: "Any characters outside of the base64
alphabet are to be ignored"); quoted-printable keeps an "=" not followed
by two hex digits as it stands (RFC 2045 section 6.7 note (2)). The work
is binascii's C loops, linear in the input.
"""

from __future__ import annotations

import binascii

# RFC 2045 section 6.8: characters outside the base64 alphabet are ignored;
# "=" is kept to find the padding.
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_IGNORED = bytes(b for b in range(256) if b not in _B64_ALPHABET and b != ord("="))
# Quoted-printable: how many "=" at the end of a long line's tail are looked
# past before the tail is held whole until its line break.
_QP_ESCAPE_STEPS = 4


class Base64Decoder:
    """Incremental base64 (RFC 2045 section 6.8) for bodies read in chunks.

    Line breaks and junk are skipped; the first "=" ends the data (it is
    padding, which only appears at the end); a final group of two or three
    sextets still yields its one or two octets, as padded input would, and a
    lone sextet (no whole octet) is dropped.
    """

    def __init__(self) -> None:
        self._pending = b""  # fewer than four alphabet characters
        self._ended = False

    def feed(self, chunk: bytes) -> bytes:
        if self._ended:
            return b""
        pad = chunk.find(b"=")
        if pad >= 0:
            chunk, self._ended = chunk[:pad], True
        clean = self._pending + chunk.translate(None, _B64_IGNORED)
        usable = len(clean) - len(clean) % 4
        self._pending = clean[usable:]
        return binascii.a2b_base64(clean[:usable]) if usable else b""

    def finish(self) -> bytes:
        rest, self._pending, self._ended = self._pending, b"", True
        if len(rest) < 2:
            return b""
        return binascii.a2b_base64(rest + b"=" * (4 - len(rest)))


def _qp_cut(data: bytes) -> int:
    """Where ``data`` can be cut so that ``a2b_qp`` of the two pieces equals
    ``a2b_qp`` of the whole.

    Right after a line feed decoding always starts afresh: no escape ("=XX",
    "=" LF, "==") or soft line break ("=" CR ... LF) reaches past it. Past
    the last line feed, a cut is safe where no "=" is among the two octets
    before it (an escape there would look beyond the cut) and no "=" CR
    (which skips up to the next LF, maybe in a later chunk) precedes it.
    """
    line = data.rfind(b"\n") + 1
    if data.find(b"=\r", line) >= 0:
        return line
    cut = len(data)
    for _ in range(_QP_ESCAPE_STEPS):
        escape = data.rfind(b"=", max(line, cut - 2), cut)
        if escape < 0:
            return cut
        cut = escape
    return line


class QuotedPrintableDecoder:
    """Incremental quoted-printable (RFC 2045 section 6.7), binascii's
    ``a2b_qp`` cut only where it decodes the same (:func:`_qp_cut`): at
    most the current line's unfinished tail is held back."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        cut = _qp_cut(data)
        data, self._pending = data[:cut], data[cut:]
        return binascii.a2b_qp(data) if data else b""

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return binascii.a2b_qp(rest) if rest else b""


class IdentityDecoder:
    """7bit, 8bit, binary and unknown encodings: the body as stored."""

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""


Decoder = Base64Decoder | QuotedPrintableDecoder | IdentityDecoder


def transfer_decoder(encoding: str) -> Decoder:
    """The incremental decoder for a Content-Transfer-Encoding (RFC 2045
    section 6); anything but base64 and quoted-printable is the identity."""
    encoding = encoding.strip().upper()
    if encoding == "BASE64":
        return Base64Decoder()
    if encoding == "QUOTED-PRINTABLE":
        return QuotedPrintableDecoder()
    return IdentityDecoder()


def decode_transfer(data: bytes, encoding: str) -> bytes:
    """RFC 2045 section 6: ``data`` with base64 / quoted-printable undone;
    other encodings as they are."""
    decoder = transfer_decoder(encoding)
    return decoder.feed(data) + decoder.finish()

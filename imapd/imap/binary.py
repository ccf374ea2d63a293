"""Content-transfer decoding for FETCH BINARY (RFC 3516), streamed.

:func:`decode` undoes a part's Content-Transfer-Encoding (RFC 2045
section 6) with the shared incremental decoders of
``storage/transfer_decode.py``: linear in the input and lenient as Dovecot
is with damaged input, never an error. An encoding outside RFC 2045's set
is :class:`UnknownCte`: the command fails with NO [UNKNOWN-CTE] (RFC 3516
section 4.3).

A part is never decoded whole: its encoded bytes arrive as a stream of
chunks (``BlobStore.stream_range``) and each chunk is decoded as it comes
(binascii's C loops, about a millisecond per 256 KiB chunk, so the event
loop is never held long). A BINARY literal announces its length, and is a
literal8 exactly when its octets hold a NUL (RFC 3516 section 4.2), before
any octet is sent: :func:`measure` finds both in a first decoding pass that
keeps only counts, remembered per blob range (:func:`remembered`; blobs are
content-addressed, so a range always decodes to the same octets), and
:func:`decoded_window` decodes the stream again to send it.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from storage.transfer_decode import Decoder, transfer_decoder

# Identity encodings (RFC 2045 section 6.2) and the two we decode.
_IDENTITY = frozenset({"7BIT", "8BIT", "BINARY", ""})
_DECODED = frozenset({"BASE64", "QUOTED-PRINTABLE"})
_REMEMBERED = 4096  # measured blob ranges kept (a few dozen bytes each)
_measured: collections.OrderedDict[tuple[str, int, int, str], Measure] = collections.OrderedDict()


class UnknownCte(Exception):
    """An encoding we cannot undo (RFC 3516 section 4.3: NO [UNKNOWN-CTE])."""


def check(encoding: str) -> None:
    """Raise :class:`UnknownCte` unless ``encoding`` can be decoded."""
    enc = encoding.strip().upper()
    if enc not in _IDENTITY and enc not in _DECODED:
        raise UnknownCte(encoding)


def _decoder(encoding: str) -> Decoder:
    check(encoding)
    return transfer_decoder(encoding)


def decode(encoding: str, data: bytes) -> bytes:
    """``data`` with its transfer encoding undone (see the module doc)."""
    decoder = _decoder(encoding)
    return decoder.feed(data) + decoder.finish()


def is_identity(encoding: str) -> bool:
    """Whether the decoded octets are the stored ones."""
    return encoding.strip().upper() in _IDENTITY


@dataclass(frozen=True, slots=True)
class Measure:
    """What a part decodes to, as counts: its length and the offsets of its
    first and last NUL octets (-1: none)."""

    size: int
    first_nul: int
    last_nul: int

    def window(self, origin: int, octets: int | None) -> tuple[int, int]:
        """The decoded octets a partial ``<origin.octets>`` (None: all)
        sends, as (start, length), clipped to the part (RFC 3516 section 4.1)."""
        start = min(origin, self.size)
        stop = self.size if octets is None else min(self.size, origin + octets)
        return start, max(0, stop - start)

    def nul_in(self, start: int, length: int) -> bool | None:
        """Whether decoded octets ``start`` .. ``start + length`` hold a NUL;
        None where the first and last NUL alone cannot tell."""
        stop = start + length
        if length <= 0 or self.first_nul < 0:
            return False
        if start <= self.first_nul < stop or start <= self.last_nul < stop:
            return True
        if stop <= self.first_nul or start > self.last_nul:
            return False
        return None


def remembered(key: str, start: int, end: int, encoding: str) -> Measure | None:
    """The measure of blob ``key``'s bytes ``start`` .. ``end`` decoded, if
    this process measured it before."""
    found = _measured.get((key, start, end, encoding.strip().upper()))
    if found is not None:
        _measured.move_to_end((key, start, end, encoding.strip().upper()))
    return found


async def measure(
    key: str,
    start: int,
    end: int,
    encoding: str,
    chunks: AsyncIterator[bytes],
    windows: list[tuple[int, int]],
) -> tuple[Measure, list[bool]]:
    """Decodes ``chunks`` (blob ``key``'s bytes ``start`` .. ``end``) keeping
    only counts: the :class:`Measure`, remembered, and for each decoded
    window (start, length) whether it holds a NUL. :class:`UnknownCte`
    before anything is read for an encoding we cannot undo."""
    decoder = _decoder(encoding)
    pos, first, last = 0, -1, -1
    flags = [False] * len(windows)

    def note(out: bytes) -> None:
        nonlocal pos, first, last
        if out.find(b"\0") >= 0:
            first = pos + out.find(b"\0") if first < 0 else first
            last = pos + out.rfind(b"\0")
            for n, (w_start, w_length) in enumerate(windows):
                lo, hi = max(w_start, pos) - pos, min(w_start + w_length, pos + len(out)) - pos
                if not flags[n] and lo < hi and out.find(b"\0", lo, hi) >= 0:
                    flags[n] = True
        pos += len(out)

    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            note(decoder.feed(chunk))
    note(decoder.finish())
    found = Measure(pos, first, last)
    _measured[(key, start, end, encoding.strip().upper())] = found
    if len(_measured) > _REMEMBERED:
        _measured.popitem(last=False)
    return found, flags


async def decoded_window(
    chunks: AsyncIterator[bytes], encoding: str, start: int, length: int
) -> AsyncIterator[bytes]:
    """The decoded octets ``start`` .. ``start + length`` of ``chunks`` (a
    part's encoded bytes), decoded a chunk at a time; reading stops once
    they are out."""
    decoder = _decoder(encoding)
    pos, stop = 0, start + length
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            out = decoder.feed(chunk)
            if pos + len(out) > start and pos < stop:
                yield out[max(0, start - pos) : stop - pos]
            pos += len(out)
            if pos >= stop:
                return
    out = decoder.finish()
    if pos + len(out) > start and pos < stop:
        yield out[max(0, start - pos) : stop - pos]

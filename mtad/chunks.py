"""BDAT (RFC 3030 CHUNKING): the command's argument and the chunks of one message.

A BDAT chunk is exactly ``chunk-size`` octets after the command line
(RFC 3030 section 2): no dot-stuffing, no end-of-data line, no line
parsing. So none of the DATA phase's line rules (mtad/data.py: bare LF or
CR, ``<LF>.<LF>`` smuggling, line length) apply to chunk content: with no
terminator to hide, there is nothing to smuggle, and BINARYMIME content
(RFC 3030 section 3) is arbitrary octets.

:func:`parse_bdat` reads the argument without ever converting a long digit
string (a hostile size costs time linear in the command line and no
allocation of that size). :class:`ChunkedMessage` collects the chunks of a
transaction, holding at most ``spool_at`` octets in memory before moving to
a spool file as DATA does, and counts every octet against the message size
limit as it arrives: past the limit (or as soon as a chunk's declared size
would pass it) nothing more is kept, the rest of the chunk is still read
and discarded (RFC 3030 section 2; the session stays in sync) and the
verdict is TOO_BIG.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from delivery.spool import SpoolBuffer

# More digits than this cannot be a chunk size anyone sends (10**20 octets):
# taken as "too big" without converting the digits to an int.
MAX_SIZE_DIGITS = 20


class ChunkVerdict(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"  # 552 5.3.4 (RFC 3030 section 2, RFC 1870 section 6.1)
    SPOOL_FAILED = "spool write failed"  # 451 4.3.0: the disk, not the client


@dataclass(frozen=True)
class BdatArgs:
    """A parsed ``BDAT chunk-size [LAST]``: ``size`` is None when the digits
    are too many to be real (the caller refuses it as too big)."""

    size: int | None
    last: bool


class BdatSyntaxError(ValueError):
    """The argument is not ``chunk-size [LAST]`` (RFC 3030 section 2 ABNF:
    ``bdat-cmd ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF``,
    ``chunk-size ::= 1*DIGIT``, ``end-marker ::= "LAST"``)."""


def parse_bdat(arg: str | None) -> BdatArgs:
    """The chunk size and LAST flag of a BDAT argument; BdatSyntaxError for
    anything else (a sign, a non-digit, a missing size, an unknown word).
    Linear in ``len(arg)``; digits past :data:`MAX_SIZE_DIGITS` are never
    converted."""
    words = (arg or "").split(" ")
    if not 1 <= len(words) <= 2 or not words[0]:
        raise BdatSyntaxError("Syntax: BDAT chunk-size [LAST]")
    digits = words[0]
    # str.isdigit admits other scripts' digits; RFC 3030's DIGIT is 0-9 only.
    if not (digits.isascii() and digits.isdigit()):
        raise BdatSyntaxError("BDAT chunk-size must be digits 0-9")
    last = len(words) == 2
    if last and words[1].upper() != "LAST":
        raise BdatSyntaxError("Syntax: BDAT chunk-size [LAST]")
    stripped = digits.lstrip("0")
    if len(stripped) > MAX_SIZE_DIGITS:
        return BdatArgs(None, last)
    return BdatArgs(int(stripped or "0"), last)


class ChunkedMessage:
    """The octets of one message sent in BDAT chunks, in order.

    :meth:`feed` takes each block as it is read; the caller must call
    :meth:`discard` on every path (it removes the spool file), and
    :meth:`message` hands the text over (verdict OK)."""

    __slots__ = ("_text", "max_size", "size", "spool_dir", "verdict")

    def __init__(self, max_size: int, *, spool_at: int | None, spool_dir: Path | None) -> None:
        self.max_size = max_size
        self.spool_dir = spool_dir
        self.size = 0  # octets received, kept or not
        self.verdict = ChunkVerdict.OK
        self._text = SpoolBuffer(spool_at, spool_dir)

    @property
    def held(self) -> int:
        """Octets held in memory."""
        return self._text.held

    def announce(self, size: int | None) -> None:
        """A chunk of ``size`` octets follows (None: more than any limit).
        If it would take the message past ``max_size`` the verdict is
        TOO_BIG at once, so none of its octets are held (RFC 3030 section
        2: they are still read, and discarded, before the reply)."""
        if size is None or self.size + size > self.max_size:
            self._refuse(ChunkVerdict.TOO_BIG)

    def feed(self, block: bytes) -> None:
        """Append ``block`` (part of a chunk) unless the message is already
        refused; past ``max_size`` the verdict becomes TOO_BIG and what was
        held is dropped."""
        self.size += len(block)
        if self.verdict is not ChunkVerdict.OK:
            return
        if self.size > self.max_size:
            self._refuse(ChunkVerdict.TOO_BIG)
            return
        try:
            self._text.write(block)
        except OSError:
            self._refuse(ChunkVerdict.SPOOL_FAILED)

    def _refuse(self, verdict: ChunkVerdict) -> None:
        """The message is refused (the first verdict stays): drop what is held."""
        if self.verdict is ChunkVerdict.OK:
            self.verdict = verdict
        self.discard()

    def discard(self) -> None:
        """Drop what is held: the chunks in memory and the spool file."""
        self._text.discard()

    def message(self) -> bytes | Path:
        """The whole message (verdict OK): bytes, or the closed spool file,
        which stays this object's until :meth:`discard`."""
        return self._text.result()

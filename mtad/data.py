"""The DATA phase as a pure line consumer (RFC 5321 sections 4.1.1.4, 4.5.2).

The session reads CRLF-terminated lines (``readuntil(b"\\r\\n")``) and feeds
them here. Only ``.CRLF`` after a CRLF ends the data (RFC 5321 section
4.1.1.4), so ``\\n.\\n``, ``\\r\\n.\\n``, ``\\n.\\r\\n``, ``\\r.\\r`` never end it:
such a "." line beside a bare LF or CR is how SMTP smuggling hides a second
message from a server that ends data there, so the message is refused and
whatever follows it (a smuggled ``MAIL FROM``) stays its text. Any other
bare LF or CR (RFC 5321 section 2.3.8) is refused, or with
``normalize_bare`` made a CRLF as Postfix does (mail from curl or scripts
with LF line ends); dot-unstuffing applies after a CRLF only.

Limits are checked while reading and the verdict is given only at the end
of the data, as RFC 5321 section 4.2.5 implies: after the size limit is
exceeded nothing more is kept in memory, but the data is still read up to
its end so the session stays in sync.

Memory stays bounded whatever the client sends: once more than
``spool_at`` octets are held, the text goes to a spool file as it arrives
(:class:`delivery.spool.SpoolFile`) and the session delivers from that file.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

from delivery.spool import SpoolBuffer

# A line of just "." with a bare CR or LF on either side: a lone "." line
# ends the data only between CRLFs (RFC 5321 section 4.1.1.4); another
# server in the path might end it here, so such a message is refused.
_SMUGGLING = re.compile(rb"[\r\n]\.[\r\n]")
_LINE_END = re.compile(rb"\r|\n")

# The largest header a spooled message may have: it is read into memory to
# drop forged trace fields. A message under the spool threshold is in
# memory anyway.
HEADER_MAX = 1024 * 1024


class DataVerdict(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"  # 552 5.3.4 (RFC 1870 section 6.1)
    LINE_TOO_LONG = "line too long"  # 500 (RFC 5321 section 4.5.3.1.6 / 4.5.3.1.10)
    BARE_LINE_ENDING = "bare LF or CR"  # 550 5.6.0 (RFC 5321 section 2.3.8)
    SMUGGLING = "dot line not ended by CRLF"  # 550 5.6.0 (RFC 5321 section 4.1.1.4)
    SPOOL_FAILED = "spool write failed"  # 451 4.3.0: the disk, not the client


class DataReader:
    """Accumulates dot-unstuffed message text up to ``max_size`` octets.

    ``max_line`` is the longest text line including CRLF (1000 per RFC 5321
    section 4.5.3.1.6); a dot-stuffed line may be one octet longer.
    Call :meth:`feed` with each line (ending in CRLF, or a fragment of an
    over-long line without it); it returns True once the end-of-data line
    has been seen.

    With ``spool_at`` set, at most that many octets (plus the block being
    fed) are held in memory; beyond it the message goes to a file in
    ``spool_dir``. The caller must call :meth:`discard` on every path (it
    removes the file); :meth:`message` hands the text over.
    """

    __slots__ = (
        "_at_line_start",
        "_open",
        "_tail",
        "_text",
        "max_line",
        "max_size",
        "normalize_bare",
        "size",
        "spool_at",
        "spool_dir",
        "verdict",
    )

    def __init__(
        self,
        max_size: int,
        max_line: int = 1000,
        *,
        spool_at: int | None = None,
        spool_dir: Path | None = None,
        normalize_bare: bool = False,
    ) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.normalize_bare = normalize_bare
        self._open = 0  # octets of the current line so far (over-long lines come in pieces)
        self._tail = b""  # the last octets of the previous piece
        self.spool_at = spool_at
        self.spool_dir = spool_dir
        self.size = 0
        self.verdict = DataVerdict.OK
        self._text = SpoolBuffer(spool_at, spool_dir)
        self._at_line_start = True

    @property
    def held(self) -> int:
        """Octets held in memory."""
        return self._text.held

    def _keep(self, text: bytes) -> None:
        try:
            self._text.write(text)
        except OSError:
            # A full or unwritable disk: read on to the end, then a 451.
            self.verdict = DataVerdict.SPOOL_FAILED
            self.discard()

    def discard(self) -> None:
        """Drop what is held: the chunks in memory and the spool file."""
        self._text.discard()

    def feed(self, line: bytes) -> bool:
        raw = line
        if self._at_line_start:
            if line == b".\r\n":
                return True
            if line[:1] == b".":
                line = line[1:]  # RFC 5321 section 4.5.2 transparency
        n = len(line)
        complete = line.endswith(b"\r\n")
        # What came just before ``raw``: a line end, or a piece's last octets.
        after_piece = not self._at_line_start
        before = self._tail if after_piece else b"\n"
        self._tail = b"" if complete else (before + raw)[-2:]
        self._at_line_start = complete
        if self.verdict is DataVerdict.OK:
            # A CR or LF other than the final CRLF is bare (without copying the line).
            if complete:
                bare = line.find(b"\r") != n - 2 or line.find(b"\n") != n - 1
            else:
                bare = b"\n" in line or b"\r" in line
            if bare or after_piece:
                line = self._bare(before + raw, line, complete)
                n = len(line)
            elif self._open + n + (0 if complete else 2) > self.max_line:
                self.verdict = DataVerdict.LINE_TOO_LONG
            else:
                self._open = 0 if complete else self._open + n
        self.size += n
        if self.verdict is DataVerdict.OK:
            if self.size > self.max_size:
                self.verdict = DataVerdict.TOO_BIG
                self.discard()
            else:
                self._keep(line)
        elif not self._text.empty:
            self.discard()  # stop holding what will be refused
        return False

    def _bare(self, seen: bytes, line: bytes, complete: bool) -> bytes:
        """A line holding bare CR or LF, or a piece of one too long for the
        stream reader: the smuggling check (on ``seen``: the line as sent,
        after what preceded it), then refusal or normalisation. Returns the
        text to keep (CRLF line ends when normalising)."""
        if _SMUGGLING.search(seen):
            self.verdict = DataVerdict.SMUGGLING
            return line
        body = line[:-2] if complete else line
        if (b"\r" in body or b"\n" in body) and not self.normalize_bare:
            self.verdict = DataVerdict.BARE_LINE_ENDING
            return line
        # Line lengths count from any line end (RFC 5321 section 4.5.3.1.6).
        pieces = _LINE_END.split(body)
        first = self._open + len(pieces[0])
        longest = max(first, *(len(p) for p in pieces[1:])) if len(pieces) > 1 else first
        if longest + 2 > self.max_line:
            self.verdict = DataVerdict.LINE_TOO_LONG
            return line
        self._open = 0 if complete else (len(pieces[-1]) if len(pieces) > 1 else first)
        if len(pieces) == 1:
            return line
        # Postfix's way: each bare CR or LF becomes CRLF.
        return b"\r\n".join(pieces) + (b"\r\n" if complete else b"")

    def feed_lines(self, block: bytes) -> bool:
        """:meth:`feed` for each CRLF-terminated line of ``block``, which
        ends in CRLF; True once the end-of-data line has been seen.

        The usual block (every CR and LF in a CRLF pair, no line over the
        limit, within the size limit) is taken whole: the same checks and
        dot-unstuffing as line by line, made on the block at once. Any
        other block goes line by line, so refusals come out the same."""
        if self._at_line_start and self.verdict is DataVerdict.OK:
            crlf = block.count(b"\r\n")
            if block.count(b"\r") == crlf and block.count(b"\n") == crlf:
                before = block.rfind(b"\r\n", 0, len(block) - 2)
                last = before + 2 if before >= 0 else 0  # where the last line starts
                ended = block[last:] == b".\r\n"
                text = block[:last] if ended else block
                if text[:1] == b"." or b"\r\n." in text:
                    # RFC 5321 section 4.5.2: a line's leading dot goes.
                    text = (b"\r\n" + text).replace(b"\r\n.", b"\r\n")[2:]
                longest = max(map(len, text.split(b"\r\n"))) + 2 if text else 0
                if longest <= self.max_line and self.size + len(text) <= self.max_size:
                    self.size += len(text)
                    self._keep(text)
                    return ended
        lines = block.split(b"\r\n")
        lines.pop()  # what follows the final CRLF: nothing
        feed = self.feed
        for line in lines:
            if feed(line + b"\r\n"):
                return True
        return False

    def fragment(self, part: bytes) -> None:
        """A piece of an over-long line (the reader's limit was overrun)."""
        self.feed(part)

    @property
    def content(self) -> bytes:
        """The message held in memory, valid only when ``verdict`` is OK and
        nothing was spooled."""
        return self._text.content

    def message(self) -> bytes | Path:
        """The message (``verdict`` OK): bytes, or the closed spool file,
        which stays the reader's until :meth:`discard`."""
        return self._text.result()

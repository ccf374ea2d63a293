"""The DATA phase as a pure line consumer (RFC 5321 sections 4.1.1.4, 4.5.2).

The session reads CRLF-terminated lines (``readuntil(b"\\r\\n")``) and feeds
them here. Only ``.CRLF`` after a CRLF ends the data: a bare LF or CR
anywhere marks the message as refused (RFC 5321 section 2.3.8), so
``\\n.\\n``, ``\\r\\n.\\n`` and ``\\n.\\r\\n`` never end it and whatever follows
them (a smuggled ``MAIL FROM``) stays message text of a refused message.

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
from pathlib import Path

from delivery.spool import SpoolFile

# The largest header a spooled message may have: it is read into memory to
# drop forged trace fields. A message under the spool threshold is in
# memory anyway.
HEADER_MAX = 1024 * 1024


class DataVerdict(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"  # 552 5.3.4 (RFC 1870 section 6.1)
    LINE_TOO_LONG = "line too long"  # 500 (RFC 5321 section 4.5.3.1.6 / 4.5.3.1.10)
    BARE_LINE_ENDING = "bare LF or CR"  # 550 5.6.0 (RFC 5321 section 2.3.8)
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
        "_chunks",
        "_spool",
        "held",
        "max_line",
        "max_size",
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
    ) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.spool_at = spool_at
        self.spool_dir = spool_dir
        self.size = 0
        self.held = 0  # octets in memory
        self.verdict = DataVerdict.OK
        self._chunks: list[bytes] = []
        self._spool: SpoolFile | None = None
        self._at_line_start = True

    def _keep(self, text: bytes) -> None:
        try:
            if self._spool is not None:
                self._spool.write(text)
                return
            self._chunks.append(text)
            self.held += len(text)
            if self.spool_at is not None and self.held > self.spool_at:
                self._spool = SpoolFile(self.spool_dir or Path("."))
                for chunk in self._chunks:
                    self._spool.write(chunk)
                self._chunks = []
                self.held = 0
        except OSError:
            # A full or unwritable disk: read on to the end, then a 451.
            self.verdict = DataVerdict.SPOOL_FAILED
            self.discard()

    def discard(self) -> None:
        """Drop what is held: the chunks in memory and the spool file."""
        self._chunks = []
        self.held = 0
        if self._spool is not None:
            self._spool.remove()
            self._spool = None

    def feed(self, line: bytes) -> bool:
        if self._at_line_start:
            if line == b".\r\n":
                return True
            if line[:1] == b".":
                line = line[1:]  # RFC 5321 section 4.5.2 transparency
        n = len(line)
        complete = line.endswith(b"\r\n")
        self._at_line_start = complete
        if self.verdict is DataVerdict.OK:
            # A CR or LF other than the final CRLF is bare (without copying the line).
            if complete:
                bare = line.find(b"\r") != n - 2 or line.find(b"\n") != n - 1
            else:
                bare = b"\n" in line or b"\r" in line
            if bare:
                self.verdict = DataVerdict.BARE_LINE_ENDING
            elif not complete or n > self.max_line:
                self.verdict = DataVerdict.LINE_TOO_LONG
        self.size += n
        if self.verdict is DataVerdict.OK:
            if self.size > self.max_size:
                self.verdict = DataVerdict.TOO_BIG
                self.discard()
            else:
                self._keep(line)
        elif self._chunks or self._spool is not None:
            self.discard()  # stop holding what will be refused
        return False

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
        return b"".join(self._chunks)

    def message(self) -> bytes | Path:
        """The message (``verdict`` OK): bytes, or the closed spool file,
        which stays the reader's until :meth:`discard`."""
        if self._spool is None:
            return self.content
        return self._spool.close()

"""Resumable framing of the client byte stream into command pieces.

RFC 3501 section 2.2: a command is a line ending in CRLF, except that a
line ending in a literal marker ``{n}`` (or ``{n+}``, RFC 7888 LITERAL+)
continues after ``n`` octets of literal data. The framer turns arbitrary
chunks of bytes into a stream of events:

* :class:`TextSegment` -- text up to a CRLF (``final`` False when it ends
  with a literal marker, which stays in the text for the parser);
* :class:`LiteralBegin` -- a literal of ``size`` octets follows; the caller
  must call :meth:`Framer.accept` (sending "+ " first for a synchronizing
  literal) or :meth:`Framer.reject` before asking for more events;
* :class:`LiteralChunk` -- literal data, in order, never more than ``size``;
* :class:`FrameError` -- the current command broke a limit and was dropped.

The framer does no I/O and holds at most one line plus one read chunk, so a
50 MiB APPEND streams through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 7888 section 3: literal marker at the end of a line, "+" for non-synchronizing.
_LITERAL_MARKER = re.compile(rb"\{(\d{1,20})(\+?)\}\r?$")
_TAG = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\+]{1,64}")


@dataclass(frozen=True, slots=True)
class TextSegment:
    data: bytes  # without the CRLF
    final: bool  # True: the command ends here


@dataclass(frozen=True, slots=True)
class LiteralBegin:
    size: int
    synchronizing: bool


@dataclass(frozen=True, slots=True)
class LiteralChunk:
    data: bytes
    last: bool  # the literal is complete after this chunk


@dataclass(frozen=True, slots=True)
class FrameError:
    tag: str | None  # the command's tag if it could be read, for a tagged BAD
    reason: str


FrameEvent = TextSegment | LiteralBegin | LiteralChunk | FrameError

_LINE, _WAIT, _LITERAL, _DISCARD_LITERAL, _SKIP_LINE, _ANNOUNCE = range(6)


def guess_tag(data: bytes) -> str | None:
    m = _TAG.match(data)
    return m.group().decode("ascii", "replace") if m else None


class Framer:
    """Splits client bytes into events. ``feed`` adds bytes; ``next_event``
    returns the next complete event or None when more bytes are needed."""

    def __init__(self, max_line_length: int = 65536, max_command_text: int | None = None) -> None:
        self.max_line_length = max_line_length
        # Text of one command across all its lines (literals excluded).
        self.max_command_text = max_command_text or max_line_length * 4
        self._buf = bytearray()
        self._state = _LINE
        self._remaining = 0  # octets left in the current literal
        self._command_text = 0  # text octets seen in the current command
        self._command_tag: str | None = None
        self._pending = LiteralBegin(0, True)

    @property
    def buffered(self) -> int:
        """Octets received but not yet returned as events."""
        return len(self._buf)

    @property
    def in_command(self) -> bool:
        """True between the first segment of a command and its final one."""
        return self._command_text > 0 or self._state != _LINE

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take_buffered(self) -> bytes:
        """Remove and return the bytes fed but not yet framed (RFC 4978
        section 3: what a client sent after COMPRESS's CRLF is compressed)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def clear(self) -> None:
        """Drop everything buffered (STARTTLS: RFC 3501 section 6.2.1 forbids
        acting on plaintext sent before the TLS handshake)."""
        self._buf.clear()
        self._state = _LINE
        self._remaining = 0
        self._command_text = 0
        self._command_tag = None

    def accept(self) -> None:
        """Receive the literal announced by the last :class:`LiteralBegin`."""
        if self._state != _WAIT:
            raise RuntimeError("no literal is waiting")
        self._state = _LITERAL

    def reject(self, synchronizing: bool) -> None:
        """Refuse the announced literal: a synchronizing one is never sent by
        the client (RFC 3501 section 7.5: it waits for "+"), a
        non-synchronizing one is read and thrown away with the rest of its
        command (RFC 7888 section 4)."""
        if self._state != _WAIT:
            raise RuntimeError("no literal is waiting")
        self._command_text = 0
        self._command_tag = None
        if synchronizing:
            self._state = _LINE
        else:
            self._state = _DISCARD_LITERAL

    def next_event(self) -> FrameEvent | None:
        while True:
            state = self._state
            if state == _LINE:
                return self._line()
            if state == _ANNOUNCE:
                self._state = _WAIT
                return self._pending
            if state == _WAIT:
                return None
            if state == _LITERAL:
                if not self._buf and self._remaining:
                    return None
                take = min(self._remaining, len(self._buf))
                chunk = bytes(self._buf[:take])
                del self._buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _LINE
                return LiteralChunk(chunk, self._remaining == 0)
            if state == _DISCARD_LITERAL:
                take = min(self._remaining, len(self._buf))
                del self._buf[:take]
                self._remaining -= take
                if self._remaining:
                    return None
                self._state = _SKIP_LINE
                continue
            # _SKIP_LINE: throw away the rest of a dropped command.
            nl = self._buf.find(b"\n")
            if nl < 0:
                self._buf.clear()
                return None
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            m = _LITERAL_MARKER.search(line)
            if m and m.group(2) == b"+":
                self._remaining = int(m.group(1))
                self._state = _DISCARD_LITERAL
                continue
            self._state = _LINE

    def _line(self) -> FrameEvent | None:
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > self.max_line_length:
                tag = self._command_tag or guess_tag(bytes(self._buf[:64]))
                self._buf.clear()
                self._state = _SKIP_LINE
                self._command_text = 0
                self._command_tag = None
                # RFC 7162 section 4 asks servers to take at least 8192-octet lines.
                return FrameError(tag, "Command line too long")
            return None
        end = nl - 1 if nl and self._buf[nl - 1] == 0x0D else nl
        line = bytes(self._buf[:end])
        del self._buf[: nl + 1]
        if self._command_text == 0:
            self._command_tag = guess_tag(line[:64])
        self._command_text += len(line) + 2
        if len(line) > self.max_line_length or self._command_text > self.max_command_text:
            tag = self._command_tag
            self._command_text = 0
            self._command_tag = None
            m = _LITERAL_MARKER.search(line)
            if m and m.group(2) == b"+":
                self._remaining = int(m.group(1))
                self._state = _DISCARD_LITERAL
            return FrameError(tag, "Command line too long")
        m = _LITERAL_MARKER.search(line) if line.endswith(b"}") else None
        if m is None:
            self._command_text = 0
            self._command_tag = None
            return TextSegment(line, True)
        self._remaining = int(m.group(1))
        self._state = _ANNOUNCE
        self._pending = LiteralBegin(self._remaining, m.group(2) != b"+")
        return TextSegment(line, False)

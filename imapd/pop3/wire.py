"""The POP3 wire format, kept pure: bytes in, frozen values out, no I/O, no storage.

* :func:`parse_command` turns one client line into a :class:`Command`.
* :func:`ok`, :func:`err` and :func:`multiline` build replies.
* :class:`DotStuffer` turns a stored message, chunk by chunk, into the
  RFC 1939 section 3 multi-line body: CRLF line endings whatever the stored
  form, and every line that starts with "." gets one more.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass

CRLF = b"\r\n"
# RFC 1939 section 3: a multi-line response ends with a line holding one ".".
TERMINATOR = b".\r\n"

# RFC 2449 section 4: keywords are 3 or 4 printable characters...
_KEYWORD = re.compile(r"[A-Za-z]{3,4}\Z")
# ...and each argument is at most 40 characters (RFC 2449 raises it to 255).
MAX_ARGUMENT_LENGTH = 255
# RFC 1939 message numbers are decimal; anything longer than this is no message of ours.
_MAX_MSG_DIGITS = 9


class WireError(ValueError):
    """A line that is not a POP3 command. ``str(err)`` is the -ERR text."""


@dataclass(frozen=True)
class Command:
    """One client command. ``name`` is upper-case; ``args`` the space-separated
    arguments; ``rest`` everything after the first space, verbatim (RFC 1939
    section 7: a PASS argument may itself contain spaces)."""

    name: str
    args: tuple[str, ...]
    rest: str


def parse_command(line: bytes) -> Command:
    """Parse one client line (its CRLF or bare LF already removed or not).

    Raises :class:`WireError` for an empty line, a malformed keyword, text
    that is not UTF-8, or an argument over :data:`MAX_ARGUMENT_LENGTH`.
    """
    line = line.rstrip(b"\r\n")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("command line is not UTF-8") from None
    if not text.strip():
        raise WireError("empty command line")
    if any(c in text for c in "\r\n\x00"):
        raise WireError("control characters in command line")
    keyword, _, rest = text.partition(" ")
    if not _KEYWORD.match(keyword):
        raise WireError("unknown command")
    args = tuple(a for a in rest.split(" ") if a) if rest else ()
    if any(len(a) > MAX_ARGUMENT_LENGTH for a in args):
        raise WireError("argument too long")  # RFC 2449 section 4
    return Command(keyword.upper(), args, rest)


def parse_msg_number(arg: str) -> int:
    """An RFC 1939 message number: decimal digits, >= 1. Raises WireError."""
    if not arg.isascii() or not arg.isdigit() or len(arg) > _MAX_MSG_DIGITS or int(arg) < 1:
        raise WireError("invalid message number")
    return int(arg)


def parse_line_count(arg: str) -> int:
    """The TOP line count (RFC 1939 section 7): a non-negative decimal number."""
    if not arg.isascii() or not arg.isdigit() or len(arg) > _MAX_MSG_DIGITS:
        raise WireError("invalid line count")
    return int(arg)


def decode_sasl_plain(b64: str) -> tuple[str, str, str]:
    """RFC 4616 PLAIN message, base64 (RFC 5034 section 4): returns
    (authzid, authcid, password). "=" is an empty initial response. Raises WireError."""
    if b64 == "=":
        raw = b""
    else:
        try:
            raw = base64.b64decode(b64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise WireError("invalid base64 in SASL response") from None
    parts = raw.split(b"\x00")
    if len(parts) != 3:
        raise WireError("malformed PLAIN response")
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise WireError("PLAIN response is not UTF-8") from None
    if not authcid:
        raise WireError("malformed PLAIN response")
    return authzid, authcid, password


def ok(text: str = "") -> bytes:
    """A positive status line."""
    return b"+OK " + text.encode() + CRLF if text else b"+OK" + CRLF


def err(text: str, code: str | None = None) -> bytes:
    """A negative status line, with an RFC 2449 section 8 response code if given."""
    prefix = f"[{code}] " if code else ""
    return b"-ERR " + (prefix + text).encode() + CRLF


def multiline(first: bytes, lines: Iterable[str]) -> bytes:
    """A status line, dot-stuffed text lines, and the terminator."""
    out = [first]
    for line in lines:
        data = line.encode()
        out.append(b"." + data + CRLF if data.startswith(b".") else data + CRLF)
    out.append(TERMINATOR)
    return b"".join(out)


class DotStuffer:
    """Stateful converter of a stored message into a multi-line response body.

    Feed chunks in order with :meth:`feed`; :meth:`finish` returns what
    remains plus the terminating ".". Bare LF becomes CRLF; a CR split from
    its LF across chunks is held back one chunk. A final line without a line
    ending is closed with CRLF so the terminator is on its own line.
    """

    __slots__ = ("_at_line_start", "_carry", "_wrote")

    def __init__(self) -> None:
        self._carry = b""
        self._at_line_start = True
        self._wrote = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk if self._carry else chunk
        if data.endswith(b"\r"):
            self._carry, data = b"\r", data[:-1]
        else:
            self._carry = b""
        return self._convert(data)

    def _convert(self, data: bytes) -> bytes:
        if not data:
            return b""
        # Normalise every line ending to CRLF (RFC 1939 section 3).
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        # Byte-stuff lines starting with the termination octet (RFC 1939 section 3).
        data = data.replace(b"\n.", b"\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        self._wrote = True
        return data

    def finish(self) -> bytes:
        tail = self._convert(self._carry)
        self._carry = b""
        if self._wrote and not self._at_line_start:
            tail += CRLF
        return tail + TERMINATOR


def dot_stuff(message: bytes) -> bytes:
    """The whole multi-line body of ``message`` at once (tests and small replies)."""
    stuffer = DotStuffer()
    return stuffer.feed(message) + stuffer.finish()

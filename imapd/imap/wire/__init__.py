"""The pure IMAP wire layer: no I/O, no storage import.

``framing`` splits bytes into command pieces, ``parser`` turns them into
``commands`` dataclasses, ``encode`` writes responses, ``utf7`` converts
mailbox names.
"""

from imapd.imap.wire.framing import (
    FrameError,
    Framer,
    LiteralBegin,
    LiteralChunk,
    TextSegment,
)
from imapd.imap.wire.parser import parse_command, parse_line, parse_sequence_set

__all__ = [
    "FrameError",
    "Framer",
    "LiteralBegin",
    "LiteralChunk",
    "TextSegment",
    "parse_command",
    "parse_line",
    "parse_sequence_set",
]

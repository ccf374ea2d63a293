"""COMPRESS=DEFLATE (RFC 4978): the session's both directions become raw
DEFLATE after the tagged OK. The transport does the work
(:meth:`imapd.imap.server.ImapConnection.start_compress`): it deflates each
batch of responses with a sync flush and inflates input a bounded chunk at a
time, so the framer's line and literal limits apply to the inflated stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imapd.imap.session import Reply, bad, no, ok

if TYPE_CHECKING:
    from imapd.imap.session import Session
    from imapd.imap.wire.commands import Compress


async def handle_compress(s: Session, cmd: Compress) -> Reply | None:
    if cmd.mechanism != "DEFLATE":
        # RFC 4978 section 3: BAD for an unknown mechanism.
        return bad("Unknown compression mechanism")
    if s.conn.compressing:
        # RFC 4978 section 3/4: NO [COMPRESSIONACTIVE] when compression is on
        # (TLS-level compression is never on here: Python's ssl disables it).
        return no("Compression is already active", "COMPRESSIONACTIVE")
    s.tagged(cmd.tag, ok("DEFLATE active"))
    s.conn.start_compress()  # the OK above goes out uncompressed
    return None

# ruff: noqa: E501  (protocol transcripts read best unwrapped)
"""PREVIEW (RFC 8970) as scripts of client lines and the replies the RFC
requires (the format of :mod:`test_imap_scripts`), and a UTF-8 preview of
a random message compared with its text."""

from __future__ import annotations

import base64
import random

import pytest

from tests.protocol.imap.conftest import ImapEnv
from tests.protocol.imap.messages import FORWARD, MULTIPART, PLAIN
from tests.protocol.imap.test_imap_scripts import Script, _inbox, play

_HTML = (
    b"Subject: html\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><style>body{}</style><p>Say "hi" \\ <i>there</i></p>\r\n\r\n<p>bye</p></html>\r\n'
)

# fmt: off
SCRIPTS: dict[str, Script] = {
    # Section 2: the capability; 3.1: the text of the first text part, one
    # line; \Seen is not set; an attachment alone gives "".
    "preview_fetch": Script(messages=_inbox(PLAIN, MULTIPART, FORWARD, _HTML), steps=[
        ("a CAPABILITY", [r"\* CAPABILITY .* PREVIEW( .*|)", "a OK .*"]),
        ("b SELECT INBOX", ["...", "b OK .*"]),
        ("c FETCH 1:4 (PREVIEW)", [
            '=* 1 FETCH (PREVIEW "Shall we meet at noon?")',
            '=* 2 FETCH (PREVIEW "See the quarterly numbers.")',
            '=* 3 FETCH (PREVIEW "Forwarding this.")',
            '=* 4 FETCH (PREVIEW "Say \\"hi\\" \\\\ there bye")',
            "=c OK FETCH completed"]),
        ("d FETCH 1 (FLAGS)", ["=* 1 FETCH (FLAGS (\\Recent))", "d OK .*"]),
        # Section 3.2: LAZY, where the preview is at hand, is the preview.
        ("e FETCH 2 (PREVIEW (LAZY) UID)", ['=* 2 FETCH (PREVIEW "See the quarterly numbers." UID 2)', "e OK .*"]),
        ("f FETCH 2 PREVIEW (LAZY)", ['=* 2 FETCH (PREVIEW "See the quarterly numbers.")', "f OK .*"]),
        ("g UID FETCH 3 PREVIEW", ['=* 3 FETCH (UID 3 PREVIEW "Forwarding this.")', "g OK .*"]),
        ("h FETCH 1 (PREVIEW (FUZZY))", ["h BAD .*"]),
        ("i FETCH 1 (PREVIEW ())", ["i BAD .*"]),
        ("j FETCH 1 (PREVIEW.PEEK)", ["j BAD .*"]),
        ("k FETCH 1 (FLAGS)", ["=* 1 FETCH (FLAGS (\\Recent))", "k OK .*"]),
    ]),
    # No text part at all: the zero-length string (section 3.1).
    "preview_no_text": Script(messages=_inbox(
        b"Subject: pic\r\nMIME-Version: 1.0\r\nContent-Type: image/gif\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nR0lGODlhAQABAAAAACw=\r\n"), steps=[
        ("a SELECT INBOX", ["...", "a OK .*"]),
        ("b FETCH 1 (PREVIEW)", ['=* 1 FETCH (PREVIEW "")', "b OK .*"]),
    ]),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_preview_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])


async def test_utf8_preview_of_a_large_base64_message(imap_env: ImapEnv) -> None:
    """A 1-3 MB base64 UTF-8 body: the preview is its first 200 characters,
    whitespace collapsed, as a literal (8-bit text is no quoted string,
    RFC 3501 section 4.3)."""
    rng = random.Random()
    alphabet = "abcdefghijklmnopqrstuvwxyzäöüßéø中文пример"
    words = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        for _ in range(rng.randint(100_000, 300_000))
    ]
    text = "\r\n".join(" \t ".join(words[i : i + 7]) for i in range(0, len(words), 7))
    body = base64.encodebytes(text.encode()).replace(b"\n", b"\r\n")
    raw = (
        b"Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body
    )
    await imap_env.deliver(raw)
    c = await imap_env.client(login=True)
    await c.ok("EXAMINE INBOX")
    lines = await c.ok("FETCH 1 (PREVIEW)")
    want = " ".join(words)[:200].rstrip().encode()
    assert lines[0] == b"* 1 FETCH (PREVIEW {%d}\r\n" % len(want) + want + b")"
    await c.close()

# ruff: noqa: E501  (protocol transcripts read best unwrapped)
"""METADATA (RFC 5464) as scripts of client lines and the replies the RFC
requires (the format of :mod:`test_imap_scripts`), mostly its own
examples; then the limits, binary values, and entries following RENAME
and DELETE."""

from __future__ import annotations

import random
import re

import pytest

from imapd.imap.commands.metadata import MAX_ENTRIES, MAX_VALUE
from imapd.imap.wire.parser import parse_line
from tests.linearity import assert_linear
from tests.protocol.imap.conftest import ImapEnv
from tests.protocol.imap.test_imap_scripts import Script, play

_TWO_LINES = b"My new comment across\r\ntwo lines."

# fmt: off
SCRIPTS: dict[str, Script] = {
    # Section 1: both capabilities; 4.3 and 4.2 with their examples' entries.
    "metadata_set_and_get": Script(steps=[
        ("a CAPABILITY", [r"\* CAPABILITY .* METADATA METADATA-SERVER( .*|)", "a OK .*"]),
        ('b SETMETADATA "" (/shared/comment "Shared comment")', ["=b OK SETMETADATA completed"]),
        ('c GETMETADATA "" /shared/comment', ['=* METADATA "" (/shared/comment "Shared comment")', "=c OK GETMETADATA completed"]),
        ('d SETMETADATA INBOX (/private/comment "My own comment" /shared/comment "Shared comment")', ["d OK .*"]),
        ('e GETMETADATA "INBOX" /private/comment', ['=* METADATA "INBOX" (/private/comment "My own comment")', "e OK .*"]),
        ('f GETMETADATA "INBOX" (/shared/comment /private/comment)', ['=* METADATA "INBOX" (/shared/comment "Shared comment" /private/comment "My own comment")', "f OK .*"]),
        # Section 4.3: a multi-line value as a literal; NIL removes.
        (f"g SETMETADATA INBOX (/private/comment {{{len(_TWO_LINES)}}}", [r"\+ .*"]),
        (_TWO_LINES + b")", ["=g OK SETMETADATA completed"]),
        ("h GETMETADATA INBOX /private/comment", [f'=* METADATA "INBOX" (/private/comment {{{len(_TWO_LINES)}}}\r\n{_TWO_LINES.decode()})', "h OK .*"]),
        ("i SETMETADATA INBOX (/private/comment NIL)", ["=i OK SETMETADATA completed"]),
        ("j GETMETADATA INBOX /private/comment", ['=* METADATA "INBOX" (/private/comment NIL)', "j OK .*"]),
        # Entry names are case-insensitive (section 3.2).
        ("k GETMETADATA INBOX /Shared/COMMENT", ['=* METADATA "INBOX" (/shared/comment "Shared comment")', "k OK .*"]),
        # The server's entries are not INBOX's.
        ('l GETMETADATA "" /private/comment', ['=* METADATA "" (/private/comment NIL)', "l OK .*"]),
    ]),
    # Section 4.2.1 MAXSIZE and 4.2.2 DEPTH.
    "metadata_maxsize_depth": Script(steps=[
        ('a SETMETADATA INBOX (/private/filters/values/small "SMALLER THAN 10K" /private/filters/values/boss "FROM \\"boss@example.com\\"" /private/filters/values/boss/deeper "x" /private/filters/other "y")', ["a OK .*"]),
        ("b GETMETADATA (DEPTH 1) INBOX (/private/filters/values)", ['=* METADATA "INBOX" (/private/filters/values/boss "FROM \\"boss@example.com\\"" /private/filters/values/small "SMALLER THAN 10K")', "b OK .*"]),
        ("c GETMETADATA (DEPTH infinity) INBOX /private/filters", ['=* METADATA "INBOX" (/private/filters/other "y" /private/filters/values/boss "FROM \\"boss@example.com\\"" /private/filters/values/boss/deeper "x" /private/filters/values/small "SMALLER THAN 10K")', "c OK .*"]),
        ("d GETMETADATA (MAXSIZE 10 DEPTH infinity) INBOX /private", ['=* METADATA "INBOX" (/private/filters/other "y" /private/filters/values/boss/deeper "x")', "=d OK [METADATA LONGENTRIES 23] GETMETADATA completed"]),
        ("e GETMETADATA (DEPTH 1) INBOX /private/nothing", ["=e OK GETMETADATA completed"]),
        ("f GETMETADATA (MAXSIZE 1) INBOX /private/filters/values/small", ["=f OK [METADATA LONGENTRIES 16] GETMETADATA completed"]),
    ]),
    # Section 3.2.1 entry syntax, section 4 errors.
    "metadata_errors": Script(steps=[
        ("a GETMETADATA INBOX /vendor/x", ["a BAD .*"]),
        ("b SETMETADATA INBOX (/private NIL)", ["b BAD .*"]),
        ('c SETMETADATA INBOX ("/private/a*b" NIL)', ["c BAD .*"]),
        ("d SETMETADATA INBOX (/private//x NIL)", ["d BAD .*"]),
        ("e SETMETADATA INBOX (/shared/x/ NIL)", ["e BAD .*"]),
        ("f GETMETADATA (DEPTH 2) INBOX /private", ["f BAD .*"]),
        ("g GETMETADATA (MAXSIZE 1 MAXSIZE 2) INBOX /private", ["g BAD .*"]),
        ("h SETMETADATA Nowhere (/private/x NIL)", ["h NO \\[NONEXISTENT\\] .*"]),
        ("i GETMETADATA Nowhere /private/x", ["i NO \\[NONEXISTENT\\] .*"]),
        ("j SETMETADATA INBOX ()", ["j BAD .*"]),
        ("k NOOP", ["=k OK NOOP completed"]),
    ]),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_metadata_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])


async def test_binary_values_come_back_byte_for_byte(imap_env: ImapEnv) -> None:
    """Values are octets (section 5: value = nstring / literal8): random
    bytes, NUL included, sent as literal8, come back the same."""
    c = await imap_env.client(login=True)
    values = [random.randbytes(random.randint(1, MAX_VALUE)) + b"\0" for _ in range(3)]
    values.append(b"plain ascii")
    for i, v in enumerate(values):
        await c.ok(b"SETMETADATA INBOX (/private/v%d ~{%d+}\r\n" % (i, len(v)) + v + b")")
    lines = await c.ok("GETMETADATA (DEPTH 1) INBOX /private")
    got = lines[0]
    assert got.startswith(b'* METADATA "INBOX" (')
    for i, v in enumerate(values):
        shown = (b"~{%d}\r\n" % len(v) + v) if b"\0" in v else b'"' + v + b'"'
        assert b"/private/v%d " % i + shown in got
    await c.close()


async def test_limits_answer_maxsize_and_toomany(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    big = b"x" * (MAX_VALUE + 1)
    lines = await c.command(b"SETMETADATA INBOX (/private/big {%d+}\r\n" % len(big) + big + b")")
    assert lines[-1].endswith(b"NO [METADATA MAXSIZE %d] Metadata value too large" % MAX_VALUE)
    # A literal past the argument cap is refused outright; the session goes on.
    lines = await c.command(b"SETMETADATA INBOX (/private/big {70000}")
    assert b" BAD " in lines[-1]
    await c.ok("NOOP")
    half = MAX_ENTRIES // 2
    await c.ok('SETMETADATA "" (' + " ".join(f'/private/s{i} "{i}"' for i in range(half)) + ")")
    rest = MAX_ENTRIES - half
    await c.ok("SETMETADATA INBOX (" + " ".join(f'/shared/m{i} "x"' for i in range(rest)) + ")")
    lines = await c.command('SETMETADATA Sent (/private/one "more")')
    assert re.fullmatch(rb"t\d+ NO \[METADATA TOOMANY\] .*", lines[-1]), lines
    # All or none: nothing of a refused command is stored.
    lines = await c.command('SETMETADATA Sent (/private/a "1" /private/b "2")')
    assert b"TOOMANY" in lines[-1]
    assert (await c.ok("GETMETADATA (DEPTH infinity) Sent /private"))[0].startswith(b"t")
    # Replacing and removing need no room.
    await c.ok('SETMETADATA "" (/private/s0 "changed" /private/s1 NIL)')
    await c.ok('SETMETADATA Sent (/private/one "more")')
    await c.close()


async def test_entries_follow_rename_and_go_with_delete(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    await c.ok("CREATE Work")
    await c.ok('SETMETADATA Work (/shared/comment "team folder")')
    await c.ok("RENAME Work Play")
    lines = await c.ok("GETMETADATA Play /shared/comment")
    assert lines[0] == b'* METADATA "Play" (/shared/comment "team folder")'
    await c.ok("DELETE Play")
    await c.ok("CREATE Play")
    lines = await c.ok("GETMETADATA Play /shared/comment")
    assert lines[0] == b'* METADATA "Play" (/shared/comment NIL)'
    await c.close()


def test_metadata_commands_parse_in_linear_time() -> None:
    """Hostile sizes: many entries, long names and values, parse in time
    linear in the command (tests/linearity.py)."""

    def setting(n: int) -> None:
        pairs = " ".join(f'/private/{"a" * (n % 50 + 1)}/{i} "{"v" * 20}"' for i in range(n))
        parse_line(f"t SETMETADATA INBOX ({pairs})".encode())

    def getting(n: int) -> None:
        parse_line(f"t GETMETADATA (DEPTH 1) INBOX /private/{'b/' * n}c".encode())

    assert_linear(setting, 25)  # 25 and 200 entries (the cap)
    assert_linear(getting, 2000)

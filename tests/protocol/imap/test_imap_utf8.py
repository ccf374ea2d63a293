# ruff: noqa: E501  (protocol transcripts read best unwrapped)
"""UTF8=ACCEPT (RFC 6855) as scripts of client lines and the replies the
RFC requires (the format of :mod:`test_imap_scripts`): mailbox names in
UTF-8 both ways once enabled, modified UTF-7 before and for other
sessions, APPEND UTF8 (...) only when enabled."""

from __future__ import annotations

import random

import pytest

from imapd.imap.wire.parser import parse_line
from imapd.imap.wire.utf7 import encode_mailbox
from tests.linearity import assert_linear
from tests.protocol.imap.conftest import ImapEnv
from tests.protocol.imap.test_imap_scripts import Script, play

_MSG = "From: Jörg <jörg@example.org>\r\nSubject: Grüße aus Köln\r\n\r\nHallo.\r\n".encode()

# fmt: off
SCRIPTS: dict[str, Script] = {
    # Section 3: ENABLE, then UTF-8 names in and out; "&" is no escape.
    "utf8_mailbox_names": Script(steps=[
        ("a CAPABILITY", [r"\* CAPABILITY .* UTF8=ACCEPT( .*|)", "a OK .*"]),
        ("b CREATE Entw&APw-rfe", ["b OK .*"]),
        ('c LIST "" Entw*', ['=* LIST (\\HasNoChildren) "/" "Entw&APw-rfe"', "c OK .*"]),
        ("d ENABLE UTF8=ACCEPT", ["=* ENABLED UTF8=ACCEPT", "=d OK ENABLE completed"]),
        ('e LIST "" Entw*', ['=* LIST (\\HasNoChildren) "/" "Entwürfe"', "e OK .*"]),
        ('f CREATE "Déjà vu/日本語"', ["f OK .*"]),
        ('g LIST "" "Déjà*"', ['=* LIST (\\HasChildren) "/" "Déjà vu"', '=* LIST (\\HasNoChildren) "/" "Déjà vu/日本語"', "g OK .*"]),
        ("h CREATE A&B", ["h OK .*"]),
        ('i LIST "" A&*', ['=* LIST (\\HasNoChildren) "/" "A&B"', "i OK .*"]),
        ('j STATUS "Entwürfe" (MESSAGES)', ['=* STATUS "Entwürfe" (MESSAGES 0)', "j OK .*"]),
        # Net-Unicode (RFC 5198 section 2): no C1 control, no line separator.
        ('k CREATE "a\u0085b"', ["k BAD .*"]),
        ('l CREATE "a\u2028b"', ["l BAD .*"]),
        ('m RENAME "Déjà vu" "Ünïcödé"', ["m OK .*"]),
        ('n LIST "" "*/日本語"', ['=* LIST (\\HasNoChildren) "/" "Ünïcödé/日本語"', "n OK .*"]),
        ("o ENABLE UTF8=ACCEPT", ["=* ENABLED", "o OK .*"]),
        # Unicode normalization form C: "e" and U+0301 are "é".
        ('p SELECT "Déjà vu"', ["p NO .*"]),
        ('q CREATE "Cafe\u0301"', ["q OK .*"]),
        ('r LIST "" Caf*', ['=* LIST (\\HasNoChildren) "/" "Café"', "r OK .*"]),
    ]),
    # Section 4: APPEND UTF8 (literal8), 8-bit headers stored as sent.
    "utf8_append": Script(steps=[
        (f"a APPEND INBOX UTF8 (~{{{len(_MSG)}+}}\r\n".encode() + _MSG + b")", ["a BAD .*ENABLE UTF8=ACCEPT.*"]),
        ("b ENABLE UTF8=ACCEPT", ["=* ENABLED UTF8=ACCEPT", "b OK .*"]),
        ('c CREATE "Ablage/Köln"', ["c OK .*"]),
        (f'd APPEND "Ablage/Köln" (\\Seen) UTF8 (~{{{len(_MSG)}+}}\r\n'.encode() + _MSG + b")", [r"d OK \[APPENDUID \d+ 1\] APPEND completed"]),
        ('e SELECT "Ablage/Köln"', ["...", "=* 1 EXISTS", "...", "e OK .*"]),
        ("f FETCH 1 (BODY.PEEK[] FLAGS)", [f"=* 1 FETCH (BODY[] {{{len(_MSG)}}}\r\n{_MSG.decode()} FLAGS (\\Seen \\Recent))", "f OK .*"]),
        # MULTIAPPEND (RFC 3502) of two UTF8 messages.
        (f"g APPEND INBOX UTF8 (~{{{len(_MSG)}+}}\r\n".encode() + _MSG + f") UTF8 (~{{{len(_MSG)}+}}\r\n".encode() + _MSG + b")", [r"g OK \[APPENDUID \d+ 1:2\] APPEND completed"]),
        ("h APPEND INBOX UTF8 ({3+}\r\nabc)", ["h BAD .*literal8.*"]),
    ]),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_utf8_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])


async def test_other_sessions_keep_modified_utf7(imap_env: ImapEnv) -> None:
    """Enabling is per connection (RFC 5161 section 3.1): a session that did
    not enable sees the same mailbox in modified UTF-7."""
    rng = random.Random()
    name = "".join(rng.choice("aéø中ü &") for _ in range(rng.randint(3, 12))).strip() or "x"
    a = await imap_env.client(login=True)
    await a.ok("ENABLE UTF8=ACCEPT")
    await a.ok(b'CREATE "' + name.encode() + b'"')
    b = await imap_env.client(login=True)
    lines = await b.ok('LIST "" *')
    assert b'"' + encode_mailbox(name).encode() + b'"' in b"\n".join(lines)
    lines = await a.ok('LIST "" *')
    assert any(ln.endswith(b'"' + name.encode() + b'"') for ln in lines)
    await a.close()
    await b.close()


def test_utf8_names_parse_in_linear_time() -> None:
    def work(n: int) -> None:
        parse_line(('t CREATE "' + "é中/" * n + 'x"').encode(), utf8=True)

    assert_linear(work, 2000)

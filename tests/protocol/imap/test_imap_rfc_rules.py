"""IMAP rules from the RFCs, each a script of client lines and the replies
the RFC requires (the format of :mod:`test_imap_scripts`): mailbox
patterns, parser errors, mailbox names, subscriptions, MOVE, CONDSTORE."""

from __future__ import annotations

import time

import pytest

from tests.protocol.imap.conftest import ImapEnv
from tests.protocol.imap.test_imap_scripts import Script, play

SCRIPTS: dict[str, Script] = {
    # RFC 3501 section 6.3.8: "*" and "%" wildcards, matched in linear time.
    "list_wildcards": Script(steps=[
        ("a CREATE a/b/c", ["a OK .*"]),
        ("b CREATE x.y", ["b OK .*"]),
        ('c LIST "" "a/%"', [r'=* LIST (\HasChildren) "/" "a/b"', "c OK .*"]),
        ('d LIST "" "a/*"', [r'=* LIST (\HasChildren) "/" "a/b"',
                             r'=* LIST (\HasNoChildren) "/" "a/b/c"', "d OK .*"]),
        ('e LIST "" "%/%/%"', [r'=* LIST (\HasNoChildren) "/" "a/b/c"', "e OK .*"]),
        ('f LIST "" "x?y"', ["=f OK LIST completed"]),
        ('g LIST "" "x.*"', [r'=* LIST (\HasNoChildren) "/" "x.y"', "g OK .*"]),
        ('h LIST "a/" "%"', [r'=* LIST (\HasChildren) "/" "a/b"', "h OK .*"]),
        ('i LIST "" "' + "*" * 60 + 'x"', ["=i OK LIST completed"]),
        ('j LIST "" "' + "%" * 5000 + '*c"', [r'=* LIST (\HasNoChildren) "/" "a/b/c"', "j OK .*"]),
        ('k LIST "" (' + " ".join(["z%"] * 101) + ")", ["k NO \\[LIMIT\\] .*"]),
        ("l NOOP", ["=l OK NOOP completed"]),
    ]),
    # RFC 3501 section 7.1.5: a command the parser cannot take is BAD, and
    # the connection carries on (it was BYE Internal server error).
    "parser_errors_are_bad": Script(login=False, steps=[
        ('d APPEND INBOX "', ["d BAD .*"]),
        ('e APPEND INBOX "5-Mar-2021', ["e BAD .*"]),
        ("f STATUS INBOX (UIDNEXT) " + "9" * 3000, ["f BAD .*"]),
        ("g NOOP", ["=g OK NOOP completed"]),
    ]),
    # RFC 3501 section 5.1.3: one name, one encoding; any other is refused.
    "utf7_names_only_canonical": Script(steps=[
        ("a CREATE &ZZZ-", ["a BAD .*padding.*"]),
        ("b CREATE &AOP-x", ["b BAD .*padding.*"]),
        ('c CREATE "&AOk-&AOk-"', ["c BAD .*adjacent.*"]),
        ("d CREATE &AGEA6Q-", ["d BAD .*printable.*"]),
        ("e CREATE &AOkA6Q-", ["=e OK CREATE completed"]),
        ('f LIST "" "*"', ["...", r'=* LIST (\HasNoChildren) "/" "&AOkA6Q-"', "...", "f OK .*"]),
        ("g SELECT &AOkA6Q-&-", ["g NO \\[NONEXISTENT\\] .*"]),
        ("h STATUS &AOkA6Q- (MESSAGES)", ['=* STATUS "&AOkA6Q-" (MESSAGES 0)', "h OK .*"]),
    ]),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])


async def test_hostile_list_patterns_answer_at_once(imap_env: ImapEnv) -> None:
    """Patterns made to backtrack a regex are answered at once against many
    mailboxes (RFC 3501 section 6.3.8); before, one held the loop for minutes."""
    client = await imap_env.client(login=True)
    try:
        for i in range(1, 41):
            await client.ok(f"CREATE {'ab' * i}/{'a/' * (i % 7)}y")
        start = time.perf_counter()
        for pattern in ("*" * 60 + "x", "%*" * 3000 + "x", "a%" * 3000, "*a" * 60 + "x"):
            lines = await client.command(f'LIST "" "{pattern}"')
            assert lines == [lines[-1]] and lines[-1].endswith(b"OK LIST completed"), lines
        assert time.perf_counter() - start < 2
    finally:
        await client.close()

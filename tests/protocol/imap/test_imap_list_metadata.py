# ruff: noqa: E501  (protocol transcripts read best unwrapped)
"""LIST-METADATA (RFC 9590): LIST ... RETURN (METADATA (entries)) as
scripts of client lines and the replies the RFC requires (the format of
:mod:`test_imap_scripts`), its section 4 examples first (with this
server's delimiter "/"); then the limits a hostile client meets, the one
storage read per LIST, values byte for byte, another account's mailboxes,
and a real client (imapclient)."""

from __future__ import annotations

import asyncio
import imaplib
import random
import re
import ssl

import imapclient
import pytest
from imapclient.response_parser import parse_response

from imapd.imap.commands.metadata import MAX_ENTRIES
from imapd.imap.wire.parser import MAX_ENTRY_NAME, MAX_METADATA_ENTRIES, parse_line
from tests.linearity import assert_linear
from tests.protocol.imap.conftest import OTHER, PASSWORD, USER, ImapEnv
from tests.protocol.imap.test_imap_scripts import Script, play, run_script

COLOR = "/shared/vendor/cmu/cyrus-imapd/color"

# fmt: off
SCRIPTS: dict[str, Script] = {
    # Section 4, first example: INBOX's colour set, foo's not (NIL), bar a
    # level with children but no mailbox itself: listed, no METADATA.
    "rfc9590_example_1": Script(steps=[
        ("a CAPABILITY", [r"\* CAPABILITY .* LIST-EXTENDED .*LIST-METADATA .*METADATA .*", "a OK .*"]),
        (f'b SETMETADATA INBOX ({COLOR} "#b71c1c")', ["b OK .*"]),
        ("c CREATE foo", ["c OK .*"]),
        ("d CREATE bar/baz", ["d OK .*"]),
        ("e DELETE bar", ["e OK .*"]),
        (f'f LIST "" (INBOX foo bar) RETURN (METADATA ("{COLOR}"))', [
            '=* LIST (\\HasNoChildren) "/" "INBOX"',
            f'=* METADATA "INBOX" ({COLOR} "#b71c1c")',
            '=* LIST (\\Noselect \\HasChildren) "/" "bar"',
            '=* LIST (\\HasNoChildren) "/" "foo"',
            f'=* METADATA "foo" ({COLOR} NIL)',
            "=f OK LIST completed"]),
    ]),
    # Section 4, second example: foo listed for its subscribed child only
    # (RFC 5258 CHILDINFO) does not match the selection: no METADATA.
    "rfc9590_example_2": Script(steps=[
        (f'a SETMETADATA INBOX ({COLOR} "#b71c1c")', ["a OK .*"]),
        ("b SUBSCRIBE INBOX", ["b OK .*"]),
        ("c CREATE foo/sub", ["c OK .*"]),
        ("d SUBSCRIBE foo/sub", ["d OK .*"]),
        (f'e SETMETADATA foo ({COLOR} "#000000")', ["e OK .*"]),
        (f'f LIST (SUBSCRIBED RECURSIVEMATCH) "" (INBOX foo) RETURN (METADATA ("{COLOR}"))', [
            '=* LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"',
            f'=* METADATA "INBOX" ({COLOR} "#b71c1c")',
            '=* LIST (\\HasChildren) "/" "foo" ("CHILDINFO" ("SUBSCRIBED"))',
            "=f OK LIST completed"]),
    ]),
    # Section 3: the same answer GETMETADATA gives (RFC 5464 section
    # 4.4.1), for each listed mailbox after its LIST (and its STATUS,
    # RFC 5819); entry names case-insensitive (RFC 5464 section 3.2).
    "several_entries_with_status": Script(steps=[
        ('a SETMETADATA INBOX (/private/comment "My own comment" /shared/comment "Shared comment")', ["a OK .*"]),
        ('b SETMETADATA "" (/shared/comment "the server\'s")', ["b OK .*"]),
        ("c CREATE Work", ["c OK .*"]),
        ('d SETMETADATA Work (/shared/comment "Work comment")', ["d OK .*"]),
        ('e LIST "" (INBOX Work) RETURN (STATUS (MESSAGES) METADATA (/Shared/Comment /private/comment))', [
            '=* LIST (\\HasNoChildren) "/" "INBOX"',
            '=* STATUS "INBOX" (MESSAGES 0)',
            '=* METADATA "INBOX" (/shared/comment "Shared comment" /private/comment "My own comment")',
            '=* LIST (\\HasNoChildren) "/" "Work"',
            '=* STATUS "Work" (MESSAGES 0)',
            '=* METADATA "Work" (/shared/comment "Work comment" /private/comment NIL)',
            "=e OK LIST completed"]),
        ('f GETMETADATA Work (/shared/comment /private/comment)', ['=* METADATA "Work" (/shared/comment "Work comment" /private/comment NIL)', "f OK .*"]),
        # Other return options keep their meaning beside it.
        ('g LIST "" Work RETURN (METADATA (/shared/comment) SUBSCRIBED)', [
            '=* LIST (\\HasNoChildren) "/" "Work"', '=* METADATA "Work" (/shared/comment "Work comment")', "g OK .*"]),
        # A subscribed name that is no mailbox (RFC 5258 \NonExistent): none.
        ("h SUBSCRIBE Gone", ["h OK .*"]),
        ('i LIST (SUBSCRIBED) "" Gone RETURN (METADATA (/shared/comment))', ['=* LIST (\\NonExistent \\Subscribed) "/" "Gone"', "=i OK LIST completed"]),
        # LSUB and a plain LIST are as they were.
        ('j LIST "" Work', ['=* LIST (\\HasNoChildren) "/" "Work"', "=j OK LIST completed"]),
    ]),
    # This server's MAXSIZE after the entries (RFC 5464 section 4.2.1 for
    # every mailbox listed): longer values left out, the longest told.
    "maxsize": Script(steps=[
        ('a SETMETADATA INBOX (/private/comment "0123456789" /shared/comment "short")', ["a OK .*"]),
        ("b CREATE Work", ["b OK .*"]),
        ('c SETMETADATA Work (/private/comment "01234567890123456789")', ["c OK .*"]),
        ('d LIST "" (INBOX Work) RETURN (METADATA (/private/comment /shared/comment) MAXSIZE 5)', [
            '=* LIST (\\HasNoChildren) "/" "INBOX"',
            '=* METADATA "INBOX" (/shared/comment "short")',
            '=* LIST (\\HasNoChildren) "/" "Work"',
            '=* METADATA "Work" (/shared/comment NIL)',
            "=d OK [METADATA LONGENTRIES 20] LIST completed"]),
        ('e LIST "" Work RETURN (METADATA (/private/comment) MAXSIZE 3)', [
            '=* LIST (\\HasNoChildren) "/" "Work"', "=e OK [METADATA LONGENTRIES 20] LIST completed"]),
        ('f LIST "" Work RETURN (METADATA (/private/comment) MAXSIZE 20)', [
            '=* LIST (\\HasNoChildren) "/" "Work"', '=* METADATA "Work" (/private/comment "01234567890123456789")', "=f OK LIST completed"]),
    ]),
    # Section 5's grammar, and RFC 5464 section 3.2.1's entry names: BAD.
    "errors": Script(steps=[
        ('a LIST "" % RETURN (METADATA ())', ["a BAD .*"]),
        ('b LIST "" % RETURN (METADATA)', ["b BAD .*"]),
        ('c LIST "" % RETURN (METADATA /shared/comment)', ["c BAD .*"]),
        ('d LIST "" % RETURN (METADATA (/vendor/x))', ["d BAD .*"]),
        ('e LIST "" % RETURN (METADATA (/private//x))', ["e BAD .*"]),
        ('f LIST "" % RETURN (METADATA (/private/x) METADATA (/private/y))', ["f BAD .*"]),
        ('g LIST "" % RETURN (METADATA (/private/x) MAXSIZE 4294967296)', ["g BAD .*"]),
        ('h LIST "" % RETURN (METADATA (/private/x) MAXSIZE -1)', ["h BAD .*"]),
        ('i LIST "" % RETURN (METADATA (/private/x) MAXSIZE)', ["i BAD .*"]),
        ('j LIST "" % RETURN (MAXSIZE 5)', ["j BAD .*"]),
        ('k LIST "" % RETURN (METADATA (/private/x) MAXSIZE 1 MAXSIZE 2)', ["k BAD .*"]),
        ('l LSUB "" % RETURN (METADATA (/private/x))', ["l BAD .*"]),
        ('m LIST "" % RETURN (METADATA ("/private/a*b"))', ["m BAD .*"]),
        ("n NOOP", ["=n OK NOOP completed"]),
    ]),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_list_metadata_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])


async def test_too_many_and_too_long_entry_names_are_bad(imap_env: ImapEnv) -> None:
    """At most MAX_METADATA_ENTRIES names (GETMETADATA's cap), each at most
    MAX_ENTRY_NAME octets; past either the command is BAD and the session
    goes on."""
    c = await imap_env.client(login=True)
    many = " ".join(f"/private/e{i}" for i in range(MAX_METADATA_ENTRIES + 1))
    lines = await c.command(f'LIST "" % RETURN (METADATA ({many}))', "a")
    assert lines[-1].startswith(b"a BAD "), lines
    enough = " ".join(f"/private/e{i}" for i in range(MAX_METADATA_ENTRIES))
    lines = await c.command(f'LIST "" INBOX RETURN (METADATA ({enough}))', "b")
    assert lines[-1] == b"b OK LIST completed", lines[-1]
    assert (
        lines[1].startswith(b'* METADATA "INBOX" (/private/e0 NIL ')
        and lines[1].count(b" NIL") == MAX_METADATA_ENTRIES
    )
    long = "/private/" + "x" * (MAX_ENTRY_NAME - len("/private/") + 1)
    lines = await c.command(f'LIST "" % RETURN (METADATA ({long}))', "c")
    assert lines[-1].startswith(b"c BAD "), lines
    await c.ok("NOOP")
    await c.close()


async def test_one_storage_read_for_every_mailbox_listed(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of mailboxes, many with their own value of random bytes
    (NUL too: literal8, RFC 5464 section 5): one LIST, one read of the entries
    (never one per mailbox), and each value back byte for byte after its
    own mailbox's LIST line."""
    from storage.sql.metadata import MetadataStore

    rng = random.Random()
    count = rng.randint(250, 400)
    # MAX_ENTRIES caps the account's entries: some mailboxes have none.
    with_value = set(rng.sample(range(count), rng.randint(50, MAX_ENTRIES)))
    c = await imap_env.client(login=True)
    values: dict[str, bytes] = {}
    for i in range(count):
        name = f"Box{i:04d}"
        await c.ok(f"CREATE {name}")
        if i in with_value:
            value = rng.randbytes(rng.randint(1, 300)) + (b"\0" if rng.random() < 0.5 else b"")
            values[name] = value
            await c.ok(
                b"SETMETADATA %s (/private/tag ~{%d+}\r\n" % (name.encode(), len(value))
                + value
                + b")"
            )
    reads: list[int] = []
    real = MetadataStore.mailboxes_metadata
    single = MetadataStore.metadata

    async def counted(self, account_id, names):  # type: ignore[no-untyped-def]
        reads.append(len(names))
        return await real(self, account_id, names)

    async def per_mailbox(self, account_id, mailbox_id):  # type: ignore[no-untyped-def]
        reads.append(-1)
        return await single(self, account_id, mailbox_id)

    monkeypatch.setattr(MetadataStore, "mailboxes_metadata", counted)
    monkeypatch.setattr(MetadataStore, "metadata", per_mailbox)
    lines = await c.ok('LIST "" "Box*" RETURN (METADATA (/private/tag /shared/none))')
    assert reads == [2], reads
    lines = lines[:-1]
    assert len(lines) == 2 * count
    for i in range(count):
        name = f"Box{i:04d}"
        assert lines[2 * i] == b'* LIST (\\HasNoChildren) "/" "%s"' % name.encode()
        head = b'* METADATA "%s" (/private/tag ' % name.encode()
        line = lines[2 * i + 1]
        assert line.startswith(head) and line.endswith(b" /shared/none NIL)"), line[:200]
        got = _nstring(line[len(head) : -len(b" /shared/none NIL)")])
        assert got == values.get(name), (name, line[:200])
        if b"\0" in (got or b""):
            assert line[len(head) :].startswith(b"~{"), line[:200]  # NUL: literal8 only
    await c.close()


def _nstring(raw: bytes) -> bytes | None:
    """The octets of one RFC 5464 value as sent: NIL, a quoted string, a
    literal or a literal8 (RFC 3516), whichever form the server chose."""
    if raw == b"NIL":
        return None
    m = re.fullmatch(rb"~?\{(\d+)\}\r\n(.*)", raw, re.DOTALL)
    if m:
        assert len(m.group(2)) == int(m.group(1)), raw[:80]
        return m.group(2)
    assert raw[:1] == b'"' and raw[-1:] == b'"', raw[:80]
    return re.sub(rb"\\(.)", rb"\1", raw[1:-1])


async def test_another_accounts_mailbox_lists_what_getmetadata_gives(imap_env: ImapEnv) -> None:
    """Bob sees alice's Team (RFC 4314): with "l" and "r" (RFC 5464 section
    3.3) LIST RETURN (METADATA) gives Team's /shared entries and bob's own
    /private ones, exactly as GETMETADATA does, never alice's /private
    values nor bob's entries of his own mailboxes (ids are per shard);
    SETMETADATA of a /private entry is his alone, of a /shared one the
    mailbox's. With "l" alone: no METADATA line, GETMETADATA NO [NOPERM]."""
    alice = await imap_env.client(login=True)
    secret = random.randbytes(random.randint(1, 300)).hex()
    await alice.ok("CREATE Team")
    await alice.ok(f'SETMETADATA Team (/shared/comment "alice\'s" /private/comment "{secret}")')
    await alice.ok(f"SETACL Team {OTHER} lr")
    bob = await imap_env.client()
    await bob.ok(f"LOGIN {OTHER} {PASSWORD}")
    team = f"Other Users/{USER}/Team"
    for i in range(5):  # ids are per shard: some of bob's share numbers with alice's
        await bob.ok(f"CREATE Mine{i}")
        await bob.ok(f'SETMETADATA Mine{i} (/shared/comment "bob {i}" /private/comment "p{i}")')
    mine = random.randbytes(random.randint(1, 300)).hex()
    entries = "/shared/comment /private/comment"
    script = Script(
        steps=[
            (
                f'a LIST "" ("{team}" Mine0) RETURN (METADATA ({entries}))',
                [
                    '=* LIST (\\HasNoChildren) "/" "Mine0"',
                    '=* METADATA "Mine0" (/shared/comment "bob 0" /private/comment "p0")',
                    f'=* LIST (\\HasNoChildren) "/" "{team}"',
                    f'=* METADATA "{team}" (/shared/comment "alice\'s" /private/comment NIL)',
                    "=a OK LIST completed",
                ],
            ),
            (f'b SETMETADATA "{team}" (/private/comment "{mine}")', ["=b OK SETMETADATA completed"]),
            (f'c SETMETADATA "{team}" (/shared/comment "from bob")', ["=c OK SETMETADATA completed"]),
            (
                f'd GETMETADATA "{team}" ({entries})',
                [
                    f'=* METADATA "{team}" (/shared/comment "from bob" /private/comment "{mine}")',
                    "=d OK GETMETADATA completed",
                ],
            ),
            (
                f'e LIST "" "{team}" RETURN (METADATA ({entries}))',
                [
                    f'=* LIST (\\HasNoChildren) "/" "{team}"',
                    f'=* METADATA "{team}" (/shared/comment "from bob" /private/comment "{mine}")',
                    "=e OK LIST completed",
                ],
            ),
            # Bob's server entries are untouched by what he set on Team.
            ('f GETMETADATA "" /private/comment', ['=* METADATA "" (/private/comment NIL)', "=f OK GETMETADATA completed"]),
        ]
    )
    try:
        await run_script(bob, script)
        # Alice's /private value is still hers; the /shared one is Team's.
        got = await alice.ok(f"GETMETADATA Team ({entries})")
        assert got[0] == f'* METADATA "Team" (/shared/comment "from bob" /private/comment "{secret}")'.encode(), got
        await alice.ok(f"SETACL Team {OTHER} l")
        listed = await bob.ok(f'LIST "" "{team}" RETURN (METADATA ({entries}))')
        assert not any(b"METADATA" in line for line in listed[:-1]), listed
        reply = (await bob.command(f'GETMETADATA "{team}" /private/comment'))[-1]
        assert b"NO [NOPERM]" in reply, reply
        reply = (await bob.command(f'SETMETADATA "{team}" (/private/comment NIL)'))[-1]
        assert b"NO [NOPERM]" in reply, reply
        await alice.ok(f"DELETEACL Team {OTHER}")
        reply = (await bob.command(f'GETMETADATA "{team}" /private/comment'))[-1]
        assert b"NO [NONEXISTENT]" in reply, reply
    finally:
        await bob.close()
        await alice.close()


def test_list_metadata_parses_in_linear_time() -> None:
    """Hostile sizes: many entry names, long names, parse in time linear
    in the command (tests/linearity.py)."""

    def many(n: int) -> None:
        names = " ".join(f"/private/{'a' * (n % 40 + 1)}/{i}" for i in range(n))
        parse_line(f't LIST "" % RETURN (METADATA ({names}) MAXSIZE 10)'.encode())

    def long(n: int) -> None:
        parse_line(f't LIST "" % RETURN (METADATA (/private/{"b/" * n}c))'.encode())

    assert_linear(many, 25)  # 25 and 200 names (the cap)
    assert_linear(long, 60)  # up to MAX_ENTRY_NAME octets


def _with_imapclient(port: int, ctx: ssl.SSLContext) -> tuple[bool, list[tuple[object, ...]]]:
    """A real client: imapclient checks the capability, sets entries with
    SETMETADATA and asks LIST RETURN (METADATA); imapclient's own parser
    reads the METADATA responses."""
    with imapclient.IMAPClient("127.0.0.1", port=port, ssl=True, ssl_context=ctx) as c:
        c.login(USER, PASSWORD)
        has = c.has_capability("LIST-METADATA")
        c.create_folder("Projects")
        # imaplib knows no SETMETADATA: registered as imapclient registers its extensions.
        imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
        for args in (
            ('"Projects"', f'({COLOR} "#1e88e5")'),
            ("INBOX", '(/private/comment "abc def")'),
        ):
            typ, data = c._imap._simple_command("SETMETADATA", *args)
            assert typ == "OK", (typ, data)
        typ, data = c._imap._simple_command(
            "LIST", '""', "(INBOX Projects)", "RETURN", f"(METADATA ({COLOR} /private/comment))"
        )
        assert typ == "OK", (typ, data)
        _, raw = c._imap._untagged_response(typ, data, "METADATA")
        folders = c.list_folders()
        c.logout()
    assert any(f[2] == "Projects" for f in folders)
    return has, [tuple(parse_response([line])) for line in raw]


async def test_imapclient_lists_with_metadata(imap_env: ImapEnv) -> None:
    has, parsed = await asyncio.to_thread(_with_imapclient, imap_env.tls_port, imap_env.client_tls)
    assert has
    assert parsed == [
        (b"INBOX", (COLOR.encode(), None, b"/private/comment", b"abc def")),
        (b"Projects", (COLOR.encode(), b"#1e88e5", b"/private/comment", None)),
    ], parsed

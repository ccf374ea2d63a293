# ruff: noqa: E501  (protocol transcripts read best unwrapped)
"""ACL (RFC 4314) and the Other Users namespace (RFC 2342) as tables of
client lines and the replies the RFCs require: the section 3 commands
on the owner's side (section 3's examples, with this server's
identifiers), then RFC 4314 section 4's table of which command needs
which right, played by a grantee against another account's mailbox.
Runs on SQLite, and on PostgreSQL with SHARDMAIL_TEST_BACKEND=postgresql."""

from __future__ import annotations

import asyncio
import random
import ssl
from pathlib import Path

import pytest

from tests.protocol.imap.conftest import OTHER, PASSWORD, USER, ImapClient, ImapEnv, message
from tests.protocol.imap.test_imap_scripts import Script, run_script

ALICE, BOB = USER, OTHER
TEAM = f"Other Users/{ALICE}/Team"

# fmt: off
OWNER_SCRIPTS: dict[str, Script] = {
    # Section 2.2: the capabilities; RFC 2342 section 5: three namespaces.
    "capabilities_and_namespace": Script(steps=[
        ("a CAPABILITY", [r"\* CAPABILITY .* ACL RIGHTS=texk( .*|)", "a OK .*"]),
        ("b NAMESPACE", ['=* NAMESPACE (("" "/")) (("Other Users/" "/")) NIL', "=b OK NAMESPACE completed"]),
    ]),
    # Sections 3.1, 3.3, 3.5: the owner holds every right, implicitly.
    "setacl_getacl_myrights": Script(steps=[
        ("a GETACL INBOX", [f'=* ACL "INBOX" {ALICE} lrswipkxtea', "=a OK GETACL completed"]),
        ("b MYRIGHTS INBOX", ['=* MYRIGHTS "INBOX" lrswipkxtea', "=b OK MYRIGHTS completed"]),
        (f"c SETACL INBOX {BOB} lrswi", ["=c OK SETACL completed"]),
        ("d GETACL INBOX", [f'=* ACL "INBOX" {ALICE} lrswipkxtea {BOB} lrswi', "d OK .*"]),
        # Section 3.1: "+" adds, "-" removes, a plain list replaces.
        (f"e SETACL INBOX {BOB} +te", ["e OK .*"]),
        (f"f SETACL INBOX {BOB} -w", ["f OK .*"]),
        ("g GETACL INBOX", [f'=* ACL "INBOX" {ALICE} lrswipkxtea {BOB} lrsite', "g OK .*"]),
        (f"h SETACL INBOX {BOB} lr", ["h OK .*"]),
        ("i SETACL INBOX anyone l", ["i OK .*"]),
        ("j GETACL INBOX", [f'=* ACL "INBOX" {ALICE} lrswipkxtea anyone l {BOB} lr', "j OK .*"]),
        # Section 3.2: DELETEACL drops the identifier's entry.
        (f"k DELETEACL INBOX {BOB}", ["=k OK DELETEACL completed"]),
        ("l DELETEACL INBOX anyone", ["l OK .*"]),
        ("m GETACL INBOX", [f'=* ACL "INBOX" {ALICE} lrswipkxtea', "m OK .*"]),
    ]),
    # Section 2.1.1: the obsolete "c" and "d" stand for "k" and "xte".
    "obsolete_rights": Script(steps=[
        (f"a SETACL INBOX {BOB} lrcd", ["a OK .*"]),
        ("b GETACL INBOX", [f'=* ACL "INBOX" {ALICE} lrswipkxtea {BOB} lrkxte', "b OK .*"]),
    ]),
    # Section 3.4: LISTRIGHTS, the owner's fixed, any other's all optional.
    "listrights": Script(steps=[
        (f"a LISTRIGHTS INBOX {BOB}", [f'=* LISTRIGHTS "INBOX" {BOB} "" l r s w i p k x t e a', "=a OK LISTRIGHTS completed"]),
        (f"b LISTRIGHTS INBOX {ALICE}", [f'=* LISTRIGHTS "INBOX" {ALICE} lrswipkxtea', "b OK .*"]),
    ]),
    # Section 3.1: an unknown right is BAD; an unknown mailbox or user NO.
    "errors": Script(steps=[
        (f"a SETACL INBOX {BOB} lrz", ["a BAD .*"]),
        ("b SETACL INBOX nobody@example.org lr", ["b NO \\[NONEXISTENT\\] .*"]),
        (f"c SETACL Nowhere {BOB} lr", ["c NO \\[NONEXISTENT\\] .*"]),
        (f"d SETACL INBOX {ALICE} lr", ["d NO \\[CANNOT\\] .*"]),
        ("e SETACL INBOX -bob@example.org lr", ["e NO \\[CANNOT\\] .*"]),
        ("f GETACL", ["f BAD .*"]),
        ("g SETACL INBOX", ["g BAD .*"]),
        ("h NOOP", ["=h OK NOOP completed"]),
    ]),
    # RFC 2342 section 3: names under Other Users are not the user's own.
    "other_users_not_personal": Script(steps=[
        ('a CREATE "Other Users/x"', ["a NO \\[NOPERM\\] .*"]),
        ('b RENAME Drafts "Other Users/Drafts"', ["b NO \\[NOPERM\\] .*"]),
        (f'c SELECT "Other Users/{BOB}/INBOX"', ["c NO \\[NONEXISTENT\\] .*"]),
    ]),
}


# RFC 4314 section 4: rights bob holds on alice's "Team", what he sends,
# what comes back. "Team" holds one unseen message, UID 1.
RIGHTS_TABLE: list[tuple[str, list[tuple[str, list[str]]]]] = [
    # No right at all: the mailbox is as good as absent (LIST, SELECT).
    ("", [('a LIST "" "Other*"', ["=a OK LIST completed"]),
          (f'b SELECT "{TEAM}"', ["b NO \\[NONEXISTENT\\] .*"]),
          (f'c MYRIGHTS "{TEAM}"', ["c NO \\[NONEXISTENT\\] .*"])]),
    # "l": listed, with its parents; not readable.
    ("l", [('a LIST "" "Other*"', ['=* LIST (\\Noselect \\HasChildren) "/" "Other Users"', f'=* LIST (\\Noselect \\HasChildren) "/" "Other Users/{ALICE}"', f'=* LIST (\\HasNoChildren) "/" "{TEAM}"', "=a OK LIST completed"]),
           (f'b SELECT "{TEAM}"', ["b NO \\[NOPERM\\] .*"]),
           (f'c STATUS "{TEAM}" (MESSAGES)', ["c NO \\[NOPERM\\] .*"]),
           (f'd MYRIGHTS "{TEAM}"', [f'=* MYRIGHTS "{TEAM}" l', "d OK .*"]),
           (f'e GETACL "{TEAM}"', ["e NO \\[NOPERM\\] .*"]),
           (f'f APPEND "{TEAM}" {{5+}}\r\nHello', ["f NO \\[NOPERM\\] .*"])]),
    # RFC 3501 section 6.3.9 LSUB, RFC 5258 LIST (SUBSCRIBED): a shared
    # mailbox is subscribed by its Other Users name like any other.
    ("l", [(f'a SUBSCRIBE "{TEAM}"', ["a OK .*"]),
           ('b LSUB "" "Other Users/*"', [f'=* LSUB (\\HasNoChildren) "/" "{TEAM}"', "b OK .*"]),
           ('c LIST (SUBSCRIBED) "" "Other*"', [f'=* LIST (\\HasNoChildren \\Subscribed) "/" "{TEAM}"', "c OK .*"]),
           ('d LIST "" "Other Users/%"', [f'=* LIST (\\Noselect \\HasChildren) "/" "Other Users/{ALICE}"', "d OK .*"])]),
    # "r": STATUS, SELECT, FETCH, SEARCH, COPY out; nothing written.
    ("lr", [(f'a STATUS "{TEAM}" (MESSAGES UNSEEN)', [f'=* STATUS "{TEAM}" (MESSAGES 1 UNSEEN 1)', "a OK .*"]),
            ('b LIST "" "Other Users/%/%" RETURN (STATUS (MESSAGES))', [f'=* LIST (\\HasNoChildren) "/" "{TEAM}"', f'=* STATUS "{TEAM}" (MESSAGES 1)', "b OK .*"]),
            (f'c SELECT "{TEAM}"', ["...", "=* 1 EXISTS", "...", "c OK \\[READ-WRITE\\] SELECT completed"]),
            ("d FETCH 1 (BODY[HEADER.FIELDS (SUBJECT)])", ["...", "d OK .*"]),
            ("e UID SEARCH UNSEEN", ["=* SEARCH 1", "e OK .*"]),
            # FETCH BODY[] sets \Seen only with "s": still unseen afterwards.
            ("f FETCH 1 BODY[]", ["...", "f OK .*"]),
            ("g FETCH 1 FLAGS", ["=* 1 FETCH (FLAGS (\\Recent))", "g OK .*"]),
            ("h STORE 1 +FLAGS (\\Seen)", ["h NO \\[NOPERM\\] .*"]),
            ("i STORE 1 +FLAGS (\\Flagged)", ["i NO \\[NOPERM\\] .*"]),
            ("j EXPUNGE", ["j NO \\[NOPERM\\] .*"]),
            ("k COPY 1 INBOX", ["k OK \\[COPYUID \\d+ 1 1\\] COPY completed"]),
            (f'l APPEND "{TEAM}" {{5+}}\r\nHello', ["l NO \\[NOPERM\\] .*"]),
            (f'm COPY 1 "{TEAM}"', ["m NO \\[NOPERM\\] .*"]),
            ("n MOVE 1 INBOX", ["n NO \\[NOPERM\\] .*"])]),
    # "s": \Seen only; a STORE naming other flags too changes \Seen alone.
    ("lrs", [(f'a SELECT "{TEAM}"', ["...", "a OK .*"]),
             ("b STORE 1 +FLAGS (\\Seen \\Flagged)", ["=* 1 FETCH (FLAGS (\\Seen \\Recent))", "b OK .*"]),
             ("c STORE 1 FLAGS (\\Flagged)", ["=* 1 FETCH (FLAGS (\\Recent))", "c OK .*"])]),
    # "w": flags but \Seen and \Deleted, keywords too.
    ("lrw", [(f'a SELECT "{TEAM}"', ["...", "a OK .*"]),
             ("b STORE 1 +FLAGS (\\Flagged $Team)", ["...", "=* 1 FETCH (FLAGS ($Team \\Flagged \\Recent))", "b OK .*"]),
             ("c STORE 1 +FLAGS (\\Deleted)", ["c NO \\[NOPERM\\] .*"])]),
    # "t" sets \Deleted; "e" expunges.
    ("lrt", [(f'a SELECT "{TEAM}"', ["...", "a OK .*"]),
             ("b STORE 1 +FLAGS (\\Deleted)", ["=* 1 FETCH (FLAGS (\\Deleted \\Recent))", "b OK .*"]),
             ("c EXPUNGE", ["c NO \\[NOPERM\\] .*"])]),
    ("lrte", [(f'a SELECT "{TEAM}"', ["...", "a OK .*"]),
              ("b STORE 1 +FLAGS.SILENT (\\Deleted)", ["=b OK STORE completed"]),
              ("c EXPUNGE", ["=* 1 EXPUNGE", "c OK .*"])]),
    # "i": APPEND and COPY into it; flags without their right are dropped.
    ("lri", [(f'a SELECT "{TEAM}"', ["...", "a OK .*"]),
             (f'b APPEND "{TEAM}" (\\Seen \\Flagged) {{5+}}\r\nHello', ["=* 2 EXISTS", "...", "b OK \\[APPENDUID \\d+ 2\\] APPEND completed"]),
             ("c FETCH 2 FLAGS", ["=* 2 FETCH (FLAGS (\\Recent))", "c OK .*"]),
             (f'd COPY 1 "{TEAM}"', ["...", "d OK \\[COPYUID \\d+ 1 3\\] COPY completed"]),
             ("e FETCH 3 FLAGS", ["=* 3 FETCH (FLAGS (\\Recent))", "e OK .*"])]),
    ("lrswi", [(f'a SELECT "{TEAM}"', ["...", "a OK .*"]),
               (f'b APPEND "{TEAM}" (\\Seen \\Flagged) {{5+}}\r\nHello', ["...", "b OK .*"]),
               ("c FETCH 2 FLAGS", ["=* 2 FETCH (FLAGS (\\Flagged \\Seen \\Recent))", "c OK .*"])]),
    # MOVE out needs "t" and "e" as well (RFC 6851 section 3.1).
    ("lrte", [(f'a SELECT "{TEAM}"', ["...", "a OK .*"]),
              ("b MOVE 1 INBOX", ["\\* OK \\[COPYUID \\d+ 1 1\\] Moved", "=* 1 EXPUNGE", "b OK .*"]),
              ('c STATUS INBOX (MESSAGES)', ['=* STATUS "INBOX" (MESSAGES 1)', "c OK .*"])]),
    # "k" creates below it (the child takes its ACL), "x" deletes it.
    ("lr", [(f'a CREATE "{TEAM}/Sub"', ["a NO \\[NOPERM\\] .*"]),
            (f'b DELETE "{TEAM}"', ["b NO \\[NOPERM\\] .*"]),
            (f'c CREATE "Other Users/{ALICE}/Mine"', ["c NO \\[NOPERM\\] .*"])]),
    ("lrk", [(f'a CREATE "{TEAM}/Sub"', ["a OK \\[MAILBOXID \\(.*\\)\\] CREATE completed"]),
             (f'b MYRIGHTS "{TEAM}/Sub"', [f'=* MYRIGHTS "{TEAM}/Sub" lrk', "b OK .*"]),
             ('c LIST "" "Other Users/*"', ["...", f'=* LIST (\\HasChildren) "/" "{TEAM}"', f'=* LIST (\\HasNoChildren) "/" "{TEAM}/Sub"', "c OK .*"])]),
    ("lrx", [(f'a SELECT "{TEAM}"', ["...", "a OK .*"]),
             (f'b DELETE "{TEAM}"', ["=* OK [CLOSED] Mailbox deleted", "=b OK DELETE completed"]),
             (f'c SELECT "{TEAM}"', ["c NO \\[NONEXISTENT\\] .*"])]),
    # RENAME within alice's account: "x" on it, "k" on the new parent.
    ("lrkx", [(f'a CREATE "{TEAM}/Old"', ["a OK .*"]),
              (f'b RENAME "{TEAM}/Old" "{TEAM}/New"', ["=b OK RENAME completed"]),
              (f'c MYRIGHTS "{TEAM}/New"', [f'=* MYRIGHTS "{TEAM}/New" lrkx', "c OK .*"]),
              (f'd RENAME "{TEAM}/New" "Other Users/{ALICE}/Top"', ["d NO \\[NOPERM\\] .*"]),
              (f'e RENAME "{TEAM}/New" "Mine"', ["e NO \\[NOPERM\\] .*"])]),
    ("lrk", [(f'a CREATE "{TEAM}/Old"', ["a OK .*"]),
             (f'b RENAME "{TEAM}/Old" "{TEAM}/New"', ["b NO \\[NOPERM\\] .*"])]),
    # "a": the grantee administers the ACL too.
    ("lra", [(f'a GETACL "{TEAM}"', [f'=* ACL "{TEAM}" {ALICE} lrswipkxtea {BOB} lra', "a OK .*"]),
             (f'b SETACL "{TEAM}" anyone lr', ["b OK .*"]),
             (f'c LISTRIGHTS "{TEAM}" anyone', [f'=* LISTRIGHTS "{TEAM}" anyone "" l r s w i p k x t e a', "c OK .*"]),
             (f'd GETACL "{TEAM}"', [f'=* ACL "{TEAM}" {ALICE} lrswipkxtea anyone lr {BOB} lra', "d OK .*"])]),
]

# RFC 3501 section 7.1 PERMANENTFLAGS and RFC 4314 section 4 STORE: bob
# is told only the flags his rights let him change, and a STORE changes
# only those, REPLACE too: "Team"'s one message carries \Flagged,
# \Deleted and $Team, set by alice.
FLAG_RIGHTS_TABLE: list[tuple[str, list[tuple[str, list[str]]]]] = [
    ("lr", [(f'a SELECT "{TEAM}"', ["=* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Team)", "=* OK [PERMANENTFLAGS ()] Flags permitted", "...", "a OK \\[READ-WRITE\\] .*"]),
            ("b STORE 1 FLAGS (\\Seen)", ["b NO \\[NOPERM\\] .*"]),
            ("c STORE 1 FLAGS ()", ["c NO \\[NOPERM\\] .*"]),
            ("d STORE 1 -FLAGS ($Team)", ["d NO \\[NOPERM\\] .*"]),
            ("e FETCH 1 FLAGS", ["=* 1 FETCH (FLAGS ($Team \\Deleted \\Flagged \\Recent))", "e OK .*"])]),
    ("lrs", [(f'a SELECT "{TEAM}"', ["...", "=* OK [PERMANENTFLAGS (\\Seen)] Flags permitted", "...", "a OK .*"]),
             ("b STORE 1 FLAGS (\\Seen)", ["=* 1 FETCH (FLAGS ($Team \\Deleted \\Flagged \\Seen \\Recent))", "b OK .*"]),
             ("c STORE 1 FLAGS ($Other \\Draft)", ["=* 1 FETCH (FLAGS ($Team \\Deleted \\Flagged \\Recent))", "c OK .*"]),
             ("d STORE 1 -FLAGS (\\Flagged \\Deleted $Team)", ["d NO \\[NOPERM\\] .*"])]),
    ("lrt", [(f'a SELECT "{TEAM}"', ["...", "=* OK [PERMANENTFLAGS (\\Deleted)] Flags permitted", "...", "a OK .*"]),
             ("b STORE 1 FLAGS (\\Seen)", ["=* 1 FETCH (FLAGS ($Team \\Flagged \\Recent))", "b OK .*"]),
             ("c STORE 1 -FLAGS (\\Flagged $Team)", ["c NO \\[NOPERM\\] .*"]),
             ("d STORE 1 +FLAGS (\\Deleted \\Seen \\Answered)", ["=* 1 FETCH (FLAGS ($Team \\Deleted \\Flagged \\Recent))", "d OK .*"])]),
    ("lrw", [(f'a SELECT "{TEAM}"', ["...", "=* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Draft $Team \\*)] Flags permitted", "...", "a OK .*"]),
             ("b STORE 1 FLAGS (\\Seen \\Answered $New)", ["=* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $New $Team)", "=* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Draft $New $Team \\*)] Flags permitted", "=* 1 FETCH (FLAGS ($New \\Answered \\Deleted \\Recent))", "b OK .*"]),
             ("c STORE 1 -FLAGS (\\Deleted $New)", ["=* 1 FETCH (FLAGS (\\Answered \\Deleted \\Recent))", "c OK .*"])]),
    ("lrstw", [(f'a SELECT "{TEAM}"', ["...", "=* OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Team \\*)] Flags permitted", "...", "a OK .*"]),
               ("b STORE 1 FLAGS (\\Seen)", ["=* 1 FETCH (FLAGS (\\Seen \\Recent))", "b OK .*"])]),
    # EXAMINE: read-only, nothing to change whatever the rights.
    ("lrstw", [(f'a EXAMINE "{TEAM}"', ["...", "=* OK [PERMANENTFLAGS ()] Read-only mailbox", "...", "a OK \\[READ-ONLY\\] .*"])]),
]
# fmt: on


async def test_permanentflags_follow_a_rights_change(imap_env: ImapEnv) -> None:
    """Rights changed while bob has Team selected: his next command tells
    him the flags he may change now (RFC 3501 section 7.1), and STORE
    follows them at once."""
    await _team(imap_env, "lrs", TEAM_FLAGS)
    bob = await _login(imap_env, BOB)
    alice = await _login(imap_env, ALICE)
    try:
        lines = await bob.ok(f'SELECT "{TEAM}"')
        assert b"* OK [PERMANENTFLAGS (\\Seen)] Flags permitted" in lines, lines
        await alice.ok(f"SETACL Team {BOB} +w")
        told: list[bytes] = []
        for _ in range(50):  # the ACL event's way to bob's session
            told += await bob.ok("NOOP")
            if any(b"PERMANENTFLAGS" in x for x in told):
                break
            await asyncio.sleep(0.05)
        want = (
            b"* OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Draft $Team \\*)] Flags permitted"
        )
        assert want in told, told
        lines = await bob.ok("NOOP")
        assert not any(b"PERMANENTFLAGS" in x for x in lines), lines  # told once
        lines = await bob.ok("STORE 1 FLAGS (\\Seen)")
        assert lines[0] == b"* 1 FETCH (FLAGS (\\Deleted \\Seen \\Recent))", lines
        await alice.ok(f"SETACL Team {BOB} -sw")
        await asyncio.sleep(0.2)
        lines = await bob.command("STORE 1 +FLAGS (\\Flagged)")
        assert lines[0] == b"* OK [PERMANENTFLAGS ()] Flags permitted", lines
        assert b"NO [NOPERM]" in lines[-1], lines
    finally:
        await alice.close()
        await bob.close()


async def _login(env: ImapEnv, user: str) -> ImapClient:
    c = await env.client()
    await c.ok(f"LOGIN {user} {PASSWORD}")
    return c


@pytest.mark.parametrize("name", sorted(OWNER_SCRIPTS))
async def test_owner_script(imap_env: ImapEnv, name: str) -> None:
    c = await _login(imap_env, ALICE)
    try:
        await run_script(c, OWNER_SCRIPTS[name])
    finally:
        await c.close()


# Team's message: no flag (RIGHTS_TABLE), or these (FLAG_RIGHTS_TABLE).
TEAM_FLAGS = ("\\Flagged", "\\Deleted", "$Team")
GRANTEE_CASES = [(r, steps, ()) for r, steps in RIGHTS_TABLE] + [
    (r, steps, TEAM_FLAGS) for r, steps in FLAG_RIGHTS_TABLE
]


async def _team(env: ImapEnv, rights: str, flags: tuple[str, ...] = ()) -> None:
    """Alice's Team with one unseen message of random bytes carrying
    ``flags``; bob granted ``rights`` on it (none if empty)."""
    alice = await _login(env, ALICE)
    await alice.ok("CREATE Team")
    body = f"{random.randbytes(random.randint(8, 2000)).hex()}\r\n"
    await env.deliver(message("Team news", body), "Team", flags=flags)
    if rights:
        await alice.ok(f"SETACL Team {BOB} {rights}")
    await alice.close()


@pytest.mark.parametrize(
    ("rights", "steps", "flags"),
    GRANTEE_CASES,
    ids=[
        f"{r or 'none'}{'-flagged' if f else ''}-{i}" for i, (r, _, f) in enumerate(GRANTEE_CASES)
    ],
)
async def test_grantee_rights(
    imap_env: ImapEnv, rights: str, steps: list[tuple[str, list[str]]], flags: tuple[str, ...]
) -> None:
    """Bob, granted ``rights`` on alice's Team, plays ``steps``."""
    await _team(imap_env, rights, flags)
    bob = await _login(imap_env, BOB)
    try:
        await run_script(bob, Script(steps=steps))  # type: ignore[arg-type]
    finally:
        await bob.close()


async def _idle_until(client: ImapClient, wanted: bytes, timeout: float = 5.0) -> list[bytes]:
    """Lines heard while idling, up to the one starting with ``wanted``."""
    seen = []
    while True:
        line = await client.line(timeout)
        seen.append(line)
        if line.startswith(wanted):
            return seen


async def test_grantee_idling_hears_the_owners_changes(imap_env: ImapEnv) -> None:
    """The event bus is keyed by account: a session on alice's Team hears
    of alice's writes there (RFC 2177 IDLE, RFC 3501 section 7.4.1) with
    no poll, new mail, flags and expunges; and a revocation holds from
    the next command on, without a new SELECT."""
    alice = await _login(imap_env, ALICE)
    await alice.ok("CREATE Team")
    await imap_env.deliver(message("first", f"{random.randbytes(8).hex()}\r\n"), "Team")
    await alice.ok(f"SETACL Team {BOB} lrs")
    bob = await _login(imap_env, BOB)
    try:
        await bob.ok(f'SELECT "{TEAM}"')
        await bob.send(b"i1 IDLE\r\n")
        assert (await bob.line()).startswith(b"+ ")
        await imap_env.deliver(message("second", f"{random.randbytes(8).hex()}\r\n"), "Team")
        assert b"* 2 EXISTS" in await _idle_until(bob, b"* 2 EXISTS")
        await alice.ok("SELECT Team")
        await alice.ok("STORE 1 +FLAGS (\\Flagged)")
        heard = await _idle_until(bob, b"* 1 FETCH")
        assert b"\\Flagged" in heard[-1], heard
        await alice.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        await alice.ok("EXPUNGE")
        assert (await _idle_until(bob, b"* 2 EXPUNGE"))[-1] == b"* 2 EXPUNGE"
        await bob.send(b"DONE\r\n")
        assert (await bob.until("i1"))[-1].startswith(b"i1 OK")
        # Revoked while selected: the next read is refused.
        await bob.ok("FETCH 1 FLAGS")
        await alice.ok(f"DELETEACL Team {BOB}")
        await asyncio.sleep(0.2)  # the event's way to bob's session
        reply = (await bob.command("FETCH 1 BODY.PEEK[]"))[-1]
        assert b"NO [NOPERM]" in reply, reply
        reply = (await bob.command(f'SELECT "{TEAM}"'))[-1]
        assert b"NO [NONEXISTENT]" in reply, reply
    finally:
        await bob.close()
        await alice.close()


async def test_owner_on_another_shard(tmp_path: Path, tls_context: ssl.SSLContext) -> None:
    """Alice lives on shard "default", bob on "east" (two SQLite files): bob
    reaches alice's Team through her shard, reads her bytes, appends into
    it, and hears her new mail; mail to his own mailbox that has Team's
    row id in his shard (ids are per shard) is not taken for Team's."""
    from argon2 import PasswordHasher, profiles

    from imapd.imap.server import start_imap
    from storage.backend import open_storage_from_url
    from storage.ingest import Delivery, ingest
    from tests.conftest import make_settings

    data = tmp_path / "data"
    storage = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'default.db'}",
        tmp_path / "blobs",
        {"east": f"sqlite+aiosqlite:///{tmp_path / 'east.db'}"},
        password_hasher=PasswordHasher.from_parameters(profiles.CHEAPEST),
    )
    settings = make_settings(data, auth={"allow_plaintext": True}, imap={"listen": ["127.0.0.1:0"]})
    servers = await start_imap(settings, storage, tls_context)
    try:
        await storage.directory.add_domain("example.org")
        alice = await storage.directory.add_account(ALICE, PASSWORD, shard="default")
        bob = await storage.directory.add_account(BOB, PASSWORD, shard="east")
        team = await storage.mail(alice).create_mailbox(alice.id, "Team")
        while True:  # a mailbox of bob's with Team's id in his shard
            twin = await storage.mail(bob).create_mailbox(bob.id, f"Twin{random.randrange(10**6)}")
            if twin.id >= team.id:
                break
        first = message("on default", random.randbytes(random.randint(10, 5000)).hex() + "\r\n")
        await ingest(storage, [Delivery(alice, team.id)], first)
        await storage.mail(alice).set_acl(alice.id, team.id, bob.id, "lri")
        port = servers[0].sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = ImapClient(reader, writer)
        await client.line()
        await client.ok(f"LOGIN {BOB} {PASSWORD}")
        await client.ok(f'SELECT "{TEAM}"')
        fetched = await client.ok("FETCH 1 BODY.PEEK[]")
        assert fetched[0].endswith(first + b")"), fetched[0][-80:]
        await client.ok(f'APPEND "{TEAM}" {{5+}}\r\nHello')
        await client.send(b"i1 IDLE\r\n")
        assert (await client.line()).startswith(b"+ ")
        same_id = await storage.mail(bob).get_mailbox_by_id(bob.id, team.id)
        await ingest(storage, [Delivery(bob, same_id.id)], message("to bob's own"))
        await ingest(storage, [Delivery(alice, team.id)], message("second on default"))
        heard = await _idle_until(client, b"* 3 EXISTS")
        assert not any(b"EXISTS" in line for line in heard[:-1]), heard
        await client.send(b"DONE\r\n")
        await client.until("i1")
        await client.close()
    finally:
        for server in servers:
            server.close()
        await storage.close()


async def test_list_reads_grants_only_when_a_pattern_reaches_them(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LIST whose patterns cannot match a name under "Other Users" costs
    no read of every shard's grants (clients LIST "INBOX" often)."""
    from imapd.imap.commands import mailbox

    calls: list[int] = []
    real = mailbox.grants_to

    async def counted(storage, account):  # type: ignore[no-untyped-def]
        calls.append(account.id)
        return await real(storage, account)

    monkeypatch.setattr(mailbox, "grants_to", counted)
    bob = await _login(imap_env, BOB)
    try:
        for line in ('LIST "" INBOX', 'LIST "" "Sent/%"', 'LSUB "" "Drafts"'):
            await bob.ok(line)
        assert calls == []
        for line in ('LIST "" "*"', 'LIST "" "%"', 'LIST "" "Other Users/%"', 'LIST "O" "%"'):
            await bob.ok(line)
        assert len(calls) == 4
    finally:
        await bob.close()

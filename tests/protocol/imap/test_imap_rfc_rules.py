"""IMAP rules from the RFCs, each a script of client lines and the replies
the RFC requires (the format of :mod:`test_imap_scripts`): mailbox
patterns, parser errors, mailbox names, subscriptions, MOVE, CONDSTORE."""

from __future__ import annotations

import time

import pytest

from tests.protocol.imap.conftest import ImapEnv
from tests.protocol.imap.messages import FORWARD, MULTIPART, PLAIN
from tests.protocol.imap.test_imap_scripts import Script, _inbox, play

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
        ("e CREATE &AOkA6Q-", [r"e OK \[MAILBOXID \(F[0-9a-f]{16}\)\] CREATE completed"]),
        ('f LIST "" "*"', ["...", r'=* LIST (\HasNoChildren) "/" "&AOkA6Q-"', "...", "f OK .*"]),
        ("g SELECT &AOkA6Q-&-", ["g NO \\[NONEXISTENT\\] .*"]),
        ("h STATUS &AOkA6Q- (MESSAGES)", ['=* STATUS "&AOkA6Q-" (MESSAGES 0)', "h OK .*"]),
    ]),
    # RFC 3501 sections 6.3.6, 6.3.7, 6.3.9: the subscription list is a list of
    # names, apart from the mailboxes; CREATE does not add to it.
    "subscriptions_are_names": Script(steps=[
        ("a CREATE Lists", ["a OK .*"]),
        ('b LSUB "" "Lists"', ["=b OK LSUB completed"]),
        ('c LIST (SUBSCRIBED) "" "Lists"', ["=c OK LIST completed"]),
        ("d SUBSCRIBE Later/Maybe", ["=d OK SUBSCRIBE completed"]),
        ('e LSUB "" "Later/*"', [r'=* LSUB (\Noselect) "/" "Later/Maybe"', "e OK .*"]),
        ("f SUBSCRIBE Lists", ["f OK .*"]),
        ("g DELETE Lists", ["g OK .*"]),
        ('h LSUB "" "Lists"', [r'=* LSUB (\Noselect) "/" "Lists"', "h OK .*"]),
        ("i UNSUBSCRIBE Lists", ["=i OK UNSUBSCRIBE completed"]),
        ('j LSUB "" "Lists"', ["=j OK LSUB completed"]),
        ("k UNSUBSCRIBE Lists", ["=k OK UNSUBSCRIBE completed"]),
        ("l CREATE Later/Maybe", ["l OK .*"]),
        ('m LSUB "" "Later/*"', [r'=* LSUB (\HasNoChildren) "/" "Later/Maybe"', "m OK .*"]),
    ]),
    # RFC 3501 section 6.3.9: "%" in LSUB gives the unsubscribed level above a
    # subscribed name, flagged \Noselect.
    "lsub_percent_gives_parent_noselect": Script(steps=[
        ("a CREATE a/b/c", ["a OK .*"]),
        ("b SUBSCRIBE a/b/c", ["b OK .*"]),
        ('c LSUB "" a/%', [r'=* LSUB (\Noselect) "/" "a/b"', "c OK .*"]),
        ('d LSUB "" %', [r'=* LSUB (\HasNoChildren) "/" "INBOX"', "...",
                         r'=* LSUB (\Noselect) "/" "a"', "d OK .*"]),
        ('e LSUB "" a/*', [r'=* LSUB (\HasNoChildren) "/" "a/b/c"', "e OK .*"]),
        ('f LSUB "" a/b/%', [r'=* LSUB (\HasNoChildren) "/" "a/b/c"', "f OK .*"]),
    ]),
    # RFC 6851 section 3.3: MOVE into the selected mailbox itself gives the
    # messages new UIDs: COPYUID, then EXPUNGE of the old, EXISTS of the new.
    "move_into_selected_mailbox": Script(messages=_inbox(PLAIN, MULTIPART, FORWARD), steps=[
        ("a SELECT INBOX", ["...", r"a OK \[READ-WRITE\] .*"]),
        ("b STORE 2 +FLAGS.SILENT (\\Flagged)", ["b OK .*"]),
        ("c MOVE 2 INBOX", [r"\* OK \[COPYUID \d+ 2 4\] .*", "=* 2 EXPUNGE", "=* 3 EXISTS",
                            r"\* \d+ RECENT", "c OK .*"]),
        ("d FETCH 1:* (UID FLAGS)", [r"=* 1 FETCH (UID 1 FLAGS (\Recent))",
                                     r"=* 2 FETCH (UID 3 FLAGS (\Recent))",
                                     r"=* 3 FETCH (UID 4 FLAGS (\Flagged \Recent))", "d OK .*"]),
        ("e UID MOVE 1,3 INBOX", [r"\* OK \[COPYUID \d+ 1,3 5:6\] .*", "=* 2 EXPUNGE",
                                  "=* 1 EXPUNGE", "=* 3 EXISTS", r"\* \d+ RECENT", "e OK .*"]),
        ("f UID FETCH 1:* UID", ["=* 1 FETCH (UID 4)", "=* 2 FETCH (UID 5)", "=* 3 FETCH (UID 6)",
                                 "f OK .*"]),
        ("g STATUS INBOX (MESSAGES UIDNEXT)", ['=* STATUS "INBOX" (MESSAGES 3 UIDNEXT 7)',
                                               "g OK .*"]),
    ]),
    # RFC 7162 section 3.1.5 with RFC 4731: MIN or MAX alone report the
    # mod-sequence of the messages they return; with ALL or COUNT, of all.
    "search_modseq_of_min_max": Script(messages=_inbox(PLAIN, MULTIPART, FORWARD), steps=[
        ("a SELECT INBOX (CONDSTORE)", ["...", "a OK .*"]),
        ("b STORE 2 +FLAGS.SILENT (\\Seen)", ["...", "b OK .*"]),
        ("c FETCH 1:* MODSEQ", [r"\* 1 FETCH \(MODSEQ \((?P<m1>\d+)\)\)",
                                r"\* 2 FETCH \(MODSEQ \((?P<m2>\d+)\)\)",
                                r"\* 3 FETCH \(MODSEQ \((?P<m3>\d+)\)\)", "c OK .*"]),
        ("d SEARCH RETURN (MIN) MODSEQ 1", ['=* ESEARCH (TAG "d") MIN 1 MODSEQ <<m1>>', "d OK .*"]),
        ("e SEARCH RETURN (MAX) MODSEQ 1", ['=* ESEARCH (TAG "e") MAX 3 MODSEQ <<m3>>', "e OK .*"]),
        ("f UID SEARCH RETURN (MIN MAX) UNSEEN MODSEQ 1",
         ['=* ESEARCH (TAG "f") UID MIN 1 MAX 3 MODSEQ <<m3>>', "f OK .*"]),
        ("g SEARCH RETURN (MIN COUNT) MODSEQ 1",
         ['=* ESEARCH (TAG "g") MIN 1 COUNT 3 MODSEQ <<m2>>', "g OK .*"]),
        ("h SEARCH RETURN (MAX ALL) MODSEQ 1",
         ['=* ESEARCH (TAG "h") MAX 3 ALL 1:3 MODSEQ <<m2>>', "h OK .*"]),
        ("i SEARCH RETURN (MIN) SEEN MODSEQ 1", ['=* ESEARCH (TAG "i") MIN 2 MODSEQ <<m2>>',
                                                  "i OK .*"]),
        ("j SEARCH RETURN (MIN) KEYWORD $None MODSEQ 1", ['=* ESEARCH (TAG "j")', "j OK .*"]),
    ]),
    # RFC 5258 sections 3.1, 3.4, 3.5: LIST-EXTENDED selection options.
    "list_extended_subscribed": Script(steps=[
        ("a CREATE Foo/Bar", ["a OK .*"]),
        ("b CREATE Fruit", ["b OK .*"]),
        ("c SUBSCRIBE Foo/Bar", ["c OK .*"]),
        ("d SUBSCRIBE Fruit", ["d OK .*"]),
        ("e SUBSCRIBE Gone", ["e OK .*"]),
        ('f LIST (SUBSCRIBED) "" "*"', [
            # A new account's mailboxes are subscribed; "Foo" is not.
            r'=* LIST (\HasNoChildren \Subscribed) "/" "INBOX"', "...",
            r'=* LIST (\HasNoChildren \Drafts \Subscribed) "/" "Drafts"',
            r'=* LIST (\HasNoChildren \Subscribed) "/" "Foo/Bar"',
            r'=* LIST (\HasNoChildren \Subscribed) "/" "Fruit"',
            r'=* LIST (\NonExistent \Subscribed) "/" "Gone"', "...", "f OK .*"]),
        ('g LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"', [
            r'=* LIST (\HasNoChildren \Subscribed) "/" "INBOX"', "...",
            r'=* LIST (\HasChildren) "/" "Foo" ("CHILDINFO" ("SUBSCRIBED"))',
            r'=* LIST (\HasNoChildren \Subscribed) "/" "Fruit"',
            r'=* LIST (\NonExistent \Subscribed) "/" "Gone"', "...", "g OK .*"]),
        ('h LIST (SUBSCRIBED RECURSIVEMATCH) "" "F*"', [
            r'=* LIST (\HasNoChildren \Subscribed) "/" "Foo/Bar"',
            r'=* LIST (\HasNoChildren \Subscribed) "/" "Fruit"', "h OK .*"]),
        ('i LIST (RECURSIVEMATCH SUBSCRIBED) "" "Fo%"', [
            r'=* LIST (\HasChildren) "/" "Foo" ("CHILDINFO" ("SUBSCRIBED"))', "i OK .*"]),
        ('j LIST (RECURSIVEMATCH) "" "*"', ["j BAD .*"]),
        ('k LIST (REMOTE RECURSIVEMATCH) "" "*"', ["k BAD .*"]),
        ('l LIST (BOGUS) "" "*"', ["l BAD .*"]),
        ('m LIST (REMOTE) "" "Fruit"', [r'=* LIST (\HasNoChildren) "/" "Fruit"', "m OK .*"]),
        ('n LIST "" "Fruit" RETURN (BOGUS)', ["n BAD .*"]),
        # CHILDINFO names the criterion that matched: SUBSCRIBED only when selected.
        ("n1 CREATE Archive/2024", ["n1 OK .*"]),
        ("n2 SUBSCRIBE Archive/2024", ["n2 OK .*"]),
        ('n3 LIST (SPECIAL-USE RECURSIVEMATCH) "" "%" RETURN (SUBSCRIBED)', [
            r'=* LIST (\HasChildren \Archive \Subscribed) "/" "Archive"', "...",
            r'=* LIST (\HasNoChildren \Trash \Subscribed) "/" "Trash"', "n3 OK .*"]),
        ('o LIST "" "%" RETURN (SUBSCRIBED)', [
            r'=* LIST (\HasNoChildren \Subscribed) "/" "INBOX"', "...",
            r'=* LIST (\HasChildren) "/" "Foo"',
            r'=* LIST (\HasNoChildren \Subscribed) "/" "Fruit"', "...", "o OK .*"]),
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


# Names the grammar allows (RFC 3501 section 9: astring, "]" and "}"
# included) that name no mailbox here; some cannot name one at all.
UNUSUAL_NAMES = [
    *("a" + ch + "b" for ch in map(chr, range(0x21, 0x7F)) if ch not in '(){%*"\\&'),
    "]", "INBOX]", "[Gmail]/All", "-", "&-", "a&-b", "&AOk-", "#news", "~x", "..",
    # No mailbox can have these names (storage refuses to create them).
    "/a", "a//b", "a/", "INBOX/", "x" * 1001,
]
LOOKUPS = ["SELECT {}", "EXAMINE {}", "STATUS {} (MESSAGES)", "DELETE {}", "RENAME {} Elsewhere"]
DELIVERIES = ["COPY 1 {}", "MOVE 1 {}", "APPEND {} {{5+}}\r\nhello"]


async def test_unknown_unusual_names_are_nonexistent(imap_env: ImapEnv) -> None:
    """RFC 5530 section 3: NONEXISTENT for a mailbox that does not exist,
    whatever characters its name has (TRYCREATE where RFC 3501 sections
    6.3.11 and 6.4.7 ask for it); BAD is only for broken syntax."""
    await imap_env.deliver(PLAIN)
    client = await imap_env.client(login=True)
    try:
        for name in UNUSUAL_NAMES:
            for verb in LOOKUPS:
                lines = await client.command(verb.format(name))
                assert b" NO [NONEXISTENT] " in lines[-1], (verb, name, lines)
            for verb in DELIVERIES:
                await client.ok("SELECT INBOX")
                lines = await client.command(verb.format(name))
                assert b" NO [TRYCREATE] " in lines[-1], (verb, name, lines)
    finally:
        await client.close()


# RFC 7162 section 3.1: the first CONDSTORE enabling command with a mailbox
# selected is answered with an untagged OK [HIGHESTMODSEQ] (section 3.1.2.1),
# once; later ones and those without a selected mailbox add nothing.
ENABLING = [
    ("FETCH 1 MODSEQ", r"\* 1 FETCH \(MODSEQ \(\d+\)\)"),
    ("FETCH 1:* (FLAGS) (CHANGEDSINCE 1)", r"\* 1 FETCH \(FLAGS \(.*\) MODSEQ \(\d+\)\)"),
    ("SEARCH MODSEQ 1", r"\* SEARCH 1 2 \(MODSEQ \d+\)"),
    ("STORE 1 (UNCHANGEDSINCE 1) +FLAGS.SILENT (\\Seen)", None),
    ("STATUS INBOX (HIGHESTMODSEQ)", r'\* STATUS "INBOX" \(HIGHESTMODSEQ \d+\)'),
]


@pytest.mark.parametrize(("command", "reply"), ENABLING)
async def test_condstore_enabling_command_announces_highestmodseq(
    imap_env: ImapEnv, command: str, reply: str | None
) -> None:
    await play(imap_env, Script(messages=_inbox(PLAIN, MULTIPART), steps=[
        ("b SELECT INBOX", ["...", r"\* OK \[HIGHESTMODSEQ (?P<hms>\d+)\] .*", "b OK .*"]),
        ("c NOOP", ["=c OK NOOP completed"]),
        (f"d {command}", [r"=* OK [HIGHESTMODSEQ <<hms>>] Highest", "...", "d OK .*"]),
        (f"e {command}", [*([] if reply is None else [reply]), "...", "e OK .*"]),
    ]))


async def test_condstore_enabled_without_a_mailbox_announces_nothing(imap_env: ImapEnv) -> None:
    await play(imap_env, Script(messages=_inbox(PLAIN), steps=[
        ("a STATUS INBOX (HIGHESTMODSEQ)", [r'\* STATUS "INBOX" \(HIGHESTMODSEQ \d+\)', "a OK .*"]),
        ("b SELECT INBOX", ["...", "b OK .*"]),
        ("c FETCH 1 MODSEQ", [r"\* 1 FETCH \(MODSEQ \(\d+\)\)", "c OK .*"]),
        ("d STORE 1 +FLAGS (\\Seen)", [r"\* 1 FETCH \(FLAGS \(\\Seen \\Recent\) MODSEQ \(\d+\)\)",
                                       "d OK .*"]),
    ]))

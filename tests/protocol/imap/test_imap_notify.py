# ruff: noqa: E501  (protocol transcripts read best unwrapped)
"""NOTIFY (RFC 5465): its rules as a table of commands and the answers the
RFC requires, its examples, and the notifications themselves between two
sessions on a real server: STATUS for mailboxes not selected, EXISTS /
FETCH / EXPUNGE for the selected one, LIST for names and subscriptions,
METADATA; while idle between commands and in IDLE; the overflow of
section 5.8; hostile NOTIFY lines; and Python's imaplib as the client."""

from __future__ import annotations

import asyncio
import imaplib
import random
import re
import time

import pytest

from imapd.imap import notify
from imapd.imap.wire.notify_syntax import MAX_MAILBOXES
from tests.protocol.imap.conftest import PASSWORD, USER, ImapClient, ImapEnv, message
from tests.protocol.imap.test_imap_scripts import Script, play

_BADEVENT = r"\[BADEVENT \(MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange MailboxMetadataChange ServerMetadataChange\)\]"

# (command, expected tagged status, why): each row one rule of RFC 5465.
# fmt: off
RULES: list[tuple[str, str, str]] = [
    ("NOTIFY NONE", "OK", "section 3: NONE turns notifications off"),
    ("NOTIFY SET (selected (MessageNew MessageExpunge))", "OK", "section 6.1"),
    ("NOTIFY SET STATUS (personal (MessageNew MessageExpunge FlagChange))", "OK", "section 3.1 STATUS indicator"),
    ("NOTIFY SET (inboxes (MessageNew MessageExpunge)) (subscribed (MailboxName SubscriptionChange))", "OK", "section 6"),
    ("NOTIFY SET (subtree (Lists INBOX) (MessageNew MessageExpunge)) (mailboxes misc (MessageNew MessageExpunge))", "OK", "section 6 SUBTREE, MAILBOXES"),
    ("notify set (Selected-Delayed (messagenew messageexpunge flagchange)) (PERSONAL none)", "OK", "keywords are case-insensitive"),
    ("NOTIFY SET (selected (MessageNew (UID BODY.PEEK[HEADER.FIELDS (From To Subject)] PREVIEW) MessageExpunge))", "OK", "section 5.2 fetch attributes"),
    ("NOTIFY SET (personal (MailboxMetadataChange)) (personal (ServerMetadataChange))", "OK", "sections 5.6, 5.7"),
    ("NOTIFY", "BAD", "section 8: SET or NONE"),
    ("NOTIFY NONE extra", "BAD", "NONE takes nothing"),
    ("NOTIFY SET", "BAD", "an event group is required"),
    ("NOTIFY SET STATUS", "BAD", "STATUS alone"),
    ("NOTIFY SET ()", "BAD", "an empty group"),
    ("NOTIFY SET (personal ())", "BAD", "events = ( event *(SP event) ) / NONE"),
    ("NOTIFY SET (personal MessageNew)", "BAD", "the event list needs parentheses (erratum 1804)"),
    ("NOTIFY SET (elsewhere (MessageNew MessageExpunge))", "BAD", "unknown filter"),
    ("NOTIFY SET (subtree (MessageNew MessageExpunge))", "BAD", "SUBTREE needs mailboxes"),
    ("NOTIFY SET (mailboxes () (MessageNew MessageExpunge))", "BAD", "one-or-more-mailbox"),
    ("NOTIFY SET (personal (MessageNew MessageExpunge)) ", "BAD", "trailing space"),
    ("NOTIFY SET (selected (MessageNew))", "BAD", "section 5: MessageNew needs MessageExpunge"),
    ("NOTIFY SET (personal (MessageExpunge))", "BAD", "section 5: and MessageExpunge needs MessageNew"),
    ("NOTIFY SET (personal (FlagChange))", "BAD", "section 5: FlagChange needs MessageNew and MessageExpunge"),
    ("NOTIFY SET (selected (MailboxName))", "BAD", "section 6.1: message events only for SELECTED"),
    ("NOTIFY SET (selected (MessageNew MessageExpunge)) (selected-delayed (MessageNew MessageExpunge))", "BAD", "section 6.1: one SELECTED filter"),
    ("NOTIFY SET (selected (MessageNew (NOSUCH) MessageExpunge))", "BAD", "a fetch-att"),
    ("NOTIFY SET (selected (MessageNew (RFC822) MessageExpunge))", "BAD", "a notification may not set \\Seen"),
    ("NOTIFY SET (personal (MessageNew MessageExpunge AnnotationChange))", "NO " + _BADEVENT, "section 6 BADEVENT: no ANNOTATE here"),
    ("NOTIFY SET (personal (MessageNew MessageExpunge Mystery))", "NO " + _BADEVENT, "section 6 BADEVENT: event-ext"),
]
# fmt: on


@pytest.mark.parametrize(("command", "status", "why"), RULES, ids=[r[2] for r in RULES])
async def test_notify_rules(imap_env: ImapEnv, command: str, status: str, why: str) -> None:
    """Each rule answered as the RFC says, and the session usable after."""
    c = await imap_env.client(login=True)
    try:
        await c.ok("NOTIFY NONE")  # the command exists: a BAD below is the rule's
        lines = await c.command(command, tag="n")
        assert re.fullmatch(rf"n {status} .*", lines[-1].decode()), (why, lines)
        await c.ok("NOOP")
    finally:
        await c.close()


# fmt: off
SCRIPTS: dict[str, Script] = {
    "capability": Script(steps=[
        ("a CAPABILITY", [r"\* CAPABILITY IMAP4rev1 .* NOTIFY( .*|)", "a OK .*"]),
    ]),
    # Section 3.1's example (with erratum 1804's parentheses, and
    # MessageExpunge beside MessageNew as section 5 requires): STATUS for
    # Lists (the parent CREATE made) and each mailbox under it, and misc;
    # none for the selected INBOX.
    "status_indicator": Script(
        messages=[(message("one"), ()), (message("two"), ("\\Seen",))],
        steps=[
            ("a CREATE Lists/imap", ["a OK .*"]),
            ("b CREATE Lists/lemonade", ["b OK .*"]),
            ("c CREATE misc", ["c OK .*"]),
            ("d SELECT INBOX", ["...", "d OK .*"]),
            ("e NOTIFY SET STATUS (selected (MessageNew (uid body.peek[header.fields (from to subject)]) MessageExpunge)) (subtree Lists (MessageNew MessageExpunge)) (mailboxes misc (MessageNew MessageExpunge))",
             [r"\* STATUS \"Lists\" \(MESSAGES 0 UIDNEXT 1 UIDVALIDITY \d+ UNSEEN 0\)",
              r"\* STATUS \"Lists/imap\" \(MESSAGES 0 UIDNEXT 1 UIDVALIDITY \d+ UNSEEN 0\)",
              r"\* STATUS \"Lists/lemonade\" \(MESSAGES 0 UIDNEXT 1 UIDVALIDITY \d+ UNSEEN 0\)",
              r"\* STATUS \"misc\" \(MESSAGES 0 UIDNEXT 1 UIDVALIDITY \d+ UNSEEN 0\)",
              "=e OK NOTIFY completed"]),
            ("f UNSELECT", ["f OK .*"]),
            ("g NOTIFY SET STATUS (personal (MessageNew MessageExpunge))",
             [r"\* STATUS \"INBOX\" \(MESSAGES 2 UIDNEXT 3 UIDVALIDITY \d+ UNSEEN 1\)",
              "...", "=g OK NOTIFY completed"]),
            ("h NOTIFY NONE", ["=h OK NOTIFY completed"]),
        ]),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_notify_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])


# ------------------------------------------------------------ two sessions
async def _expect(c: ImapClient, *patterns: str, timeout: float = 5.0) -> list[str]:
    """Reads unsolicited lines (no command sent) until each pattern matched
    one, in order; other lines in between fail the test."""
    got: list[str] = []
    for pattern in patterns:
        line = (await c.line(timeout)).decode()
        got.append(line)
        assert re.fullmatch(pattern, line, re.DOTALL), (pattern, got)
    return got


async def _silent(c: ImapClient, wait: float = 0.4) -> None:
    """Nothing unsolicited comes within ``wait`` seconds."""
    with pytest.raises(TimeoutError):
        line = await c.line(wait)
        pytest.fail(f"unexpected {line!r}")


# What session B does, and the notification A (NOTIFY as in
# test_two_sessions, INBOX selected, message 1 there, 1 in Work) then
# gets with no command of its own; None: B's step has nothing to tell.
# fmt: off
B_CHANGES_A_HEARS: list[tuple[str, str | None]] = [
    # Section 5.1 FlagChange: selected -> FETCH FLAGS; elsewhere STATUS.
    ("SELECT INBOX", None),
    ("UID STORE 1 +FLAGS (\\Flagged)", r"\* 1 FETCH \(FLAGS \(\\Flagged( \\Recent)?\)\)"),
    ("SELECT Work", None),
    ("UID STORE 1 +FLAGS (\\Seen)", r'\* STATUS "Work" \(UIDVALIDITY \d+ UNSEEN 0\)'),
    # Section 5.3 MessageExpunge, selected (SELECTED: at once, between
    # commands) and not.
    ("SELECT INBOX", None),
    ("UID STORE 1 +FLAGS (\\Deleted)", r"\* 1 FETCH .*"),
    ("EXPUNGE", r"\* 1 EXPUNGE"),
    ("SELECT Work", None),
    ("UID STORE 1 +FLAGS (\\Deleted)", r'\* STATUS "Work" \(UIDVALIDITY \d+ UNSEEN 0\)'),
    ("EXPUNGE", r'\* STATUS "Work" \(MESSAGES 0 UIDNEXT 2 UNSEEN 0\)'),
    ("UNSELECT", None),
    # Section 5.4 MailboxName: LIST for create, rename (OLDNAME), delete.
    ("CREATE Play", r'\* LIST \(\) "/" "Play"'),
    ("RENAME Play Games", r'\* LIST \(\) "/" "Games" \("OLDNAME" \("Play"\)\)'),
    ("DELETE Games", r'\* LIST \(\\NonExistent\) "/" "Games"'),
    # Section 5.5 SubscriptionChange.
    ("SUBSCRIBE Work", r'\* LIST \(\\Subscribed\) "/" "Work"'),
    ("UNSUBSCRIBE Work", r'\* LIST \(\) "/" "Work"'),
    # Sections 5.6 and 5.7: METADATA with the entries that changed.
    ('SETMETADATA Work (/private/comment "hello")', r'\* METADATA "Work" /private/comment'),
    ('SETMETADATA "" (/shared/admin "x")', r'\* METADATA "" /shared/admin'),
]
# fmt: on


async def test_two_sessions(imap_env: ImapEnv) -> None:
    """Session A sets NOTIFY for PERSONAL and SELECTED and sends no
    command; B (and delivery, the path SMTP takes) change the account: A
    hears each change as it happens, in the responses RFC 5465 section 5
    names."""
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    try:
        await b.ok("CREATE Work")
        await a.ok("SELECT INBOX")
        await a.ok(
            "NOTIFY SET (selected (MessageNew (UID FLAGS BODY.PEEK[HEADER.FIELDS (Subject)]) MessageExpunge FlagChange)) "
            "(personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange MailboxMetadataChange ServerMetadataChange))"
        )
        # Section 5.2: new mail in a mailbox not selected is a STATUS.
        body = random.randbytes(random.randint(200, 2000)).hex().encode()
        raw = message("to work", body.decode() + "\r\n")
        await b.ok(f"APPEND Work {{{len(raw)}+}}\r\n".encode() + raw)
        await _expect(a, r'\* STATUS "Work" \(MESSAGES 1 UIDNEXT 2 UNSEEN 1\)')
        # Delivery into the selected INBOX: EXISTS, then FETCH with the
        # attributes asked for (section 5.2), the header as stored.
        subject = f"s{random.randint(0, 10**9)}"
        await imap_env.deliver(message(subject))
        got = await _expect(a, r"\* 1 EXISTS", r"\* 1 RECENT|\* 1 FETCH .*")
        if got[-1].endswith("RECENT"):
            got += await _expect(a, r"\* 1 FETCH .*")
        assert f"Subject: {subject}" in got[-1] and "UID 1" in got[-1], got
        for command, expected in B_CHANGES_A_HEARS:
            await b.ok(command)
            if expected is not None:
                await _expect(a, expected)
        # Still a working session, and NOTIFY NONE ends it all.
        await a.ok("NOOP")
        await a.ok("NOTIFY NONE")
        await b.ok("CREATE Quiet")
        await b.ok(f"APPEND Work {{{len(raw)}+}}\r\n".encode() + raw)
        await _silent(a)
    finally:
        await a.close()
        await b.close()


async def test_filters_and_idle(imap_env: ImapEnv) -> None:
    """Section 6: a SUBTREE filter hears its mailboxes only, the first
    matching group decides (NONE stops the search), and IDLE carries the
    notifications; SELECTED-DELAYED keeps EXPUNGE for a command's end."""
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    try:
        for name in ("Lists", "Lists/a", "Other", "Lists/quiet"):
            await b.ok(f"CREATE {name}")
        await a.ok(
            "NOTIFY SET (mailboxes Lists/quiet NONE) (subtree Lists (MessageNew MessageExpunge))"
        )
        raw = message("x")
        for box in ("Other", "Lists/quiet", "Lists/a"):
            await b.ok(f"APPEND {box} {{{len(raw)}+}}\r\n".encode() + raw)
        await _expect(a, r'\* STATUS "Lists/a" \(MESSAGES 1 UIDNEXT 2 UNSEEN 1\)')
        await _silent(a)
        # IDLE: the same notifications come while idling.
        await a.send("i IDLE\r\n")
        await _expect(a, r"\+ .*")
        await b.ok(f"APPEND Lists {{{len(raw)}+}}\r\n".encode() + raw)
        await _expect(a, r'\* STATUS "Lists" \(MESSAGES 1 UIDNEXT 2 UNSEEN 1\)')
        await a.send("DONE\r\n")
        await _expect(a, "i OK IDLE terminated")
        # SELECTED-DELAYED: new mail between commands, EXPUNGE only at a
        # command's end (RFC 3501 section 7.4.1).
        await a.ok("SELECT Lists")
        await a.ok("NOTIFY SET (selected-delayed (MessageNew MessageExpunge FlagChange))")
        await b.ok("SELECT Lists")
        await b.ok("UID STORE 1 +FLAGS (\\Deleted)")
        await _expect(a, r"\* 1 FETCH \(FLAGS \(\\Deleted( \\Recent)?\)\)")
        await b.ok("EXPUNGE")
        await _silent(a)
        lines = await a.command("NOOP")
        assert lines[0] == b"* 1 EXPUNGE", lines
    finally:
        await a.close()
        await b.close()


async def test_overflow(imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Section 5.8: past the queue's cap the session drops what waits,
    says OK [NOTIFICATIONOVERFLOW] and behaves as after NOTIFY NONE.
    Session A is held in the middle of an APPEND (its literal not yet
    sent), where no notification may go, while B makes more changes than
    the cap."""
    monkeypatch.setattr(notify, "MAX_QUEUED", 5)
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    try:
        await a.ok("NOTIFY SET (personal (MailboxName MessageNew MessageExpunge))")
        raw = message("held")
        await a.send(f"h APPEND INBOX {{{len(raw)}}}\r\n")
        await _expect(a, r"\+ .*")
        for i in range(8):
            await b.ok(f"CREATE Box{i}")
        await asyncio.sleep(0.2)  # the bus hands them to A's watcher
        await a.send(raw + b"\r\n")
        await _expect(a, r"\* OK \[NOTIFICATIONOVERFLOW\] .*", r"h OK \[APPENDUID \d+ 1\] .*")
        await b.ok("CREATE After")
        await b.ok(f"APPEND Box1 {{{len(raw)}+}}\r\n".encode() + raw)
        await _silent(a)
        lines = await a.command("NOOP")
        assert len(lines) == 1, lines  # nothing was kept for later either
        # A new NOTIFY SET works again.
        await a.ok("NOTIFY SET (personal (MailboxName))")
        await b.ok("CREATE Again")
        await _expect(a, r'\* LIST \(\) "/" "Again"')
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------ hostile input
_HOSTILE = {
    "many mailboxes": "NOTIFY SET (mailboxes ("
    + " ".join(f"m{i}" for i in range(MAX_MAILBOXES * 10))
    + ") (MessageNew MessageExpunge))",
    "many groups": "NOTIFY SET " + " ".join(["(personal NONE)"] * 3000),
    "deep parentheses": "NOTIFY SET " + "(" * 30000,
    "many events": "NOTIFY SET (personal (" + " ".join(["MailboxName"] * 5000) + "))",
    "many fetch atts": "NOTIFY SET (selected (MessageNew ("
    + " ".join(["UID"] * 5000)
    + ") MessageExpunge))",
    "unterminated": "NOTIFY SET (subtree (a b c",
    "binary junk": "NOTIFY SET (\x01\x02 (MessageNew))",
}


@pytest.mark.parametrize("name", sorted(_HOSTILE))
async def test_hostile_notify_is_bad_quickly(imap_env: ImapEnv, name: str) -> None:
    """Malformed or oversized NOTIFY lines (up to ~60 KiB) are answered BAD
    at once, and another session is not stalled meanwhile."""
    line = _HOSTILE[name]
    assert len(line) < 65000
    c = await imap_env.client(login=True)
    other = await imap_env.client(login=True)
    try:
        await c.ok("NOTIFY NONE")  # the command exists: the BAD below is the input's
        start = time.perf_counter()
        lines = await c.command(line, tag="h")
        elapsed = time.perf_counter() - start
        assert lines[-1].startswith(b"h BAD "), lines[-1][:200]
        assert elapsed < 0.5, elapsed
        start = time.perf_counter()
        await other.ok("NOOP")
        assert time.perf_counter() - start < 0.5
        await c.ok("NOOP")
    finally:
        await c.close()
        await other.close()


async def test_many_mailboxes_cost_a_lookup(imap_env: ImapEnv) -> None:
    """With NOTIFY over 1000 named mailboxes, a change costs a set look-up:
    a burst of changes elsewhere is told in time (no per-mailbox work)."""
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    try:
        names = " ".join(f"n{i}" for i in range(MAX_MAILBOXES - 1))
        await a.ok(f"NOTIFY SET (mailboxes ({names} hot) (MessageNew MessageExpunge))")
        await b.ok("CREATE hot")
        raw = message("hot")
        start = time.perf_counter()
        for _ in range(3):
            await b.ok(f"APPEND hot {{{len(raw)}+}}\r\n".encode() + raw)
        got = [(await a.line()).decode() for _ in range(1)]
        while not got[-1].startswith('* STATUS "hot" (MESSAGES 3 '):
            got.append((await a.line()).decode())
        assert time.perf_counter() - start < 3.0
        assert all(g.startswith('* STATUS "hot"') for g in got), got
    finally:
        await a.close()
        await b.close()


# --------------------------------------------------------------- real client
def _imaplib_notify(
    port: int, ready: asyncio.Event, loop: asyncio.AbstractEventLoop
) -> list[bytes]:
    """What a Python program does: imaplib with NOTIFY as a raw command,
    then NOOPs until the STATUS notification is in its untagged responses."""
    imaplib.Commands.setdefault("NOTIFY", ("AUTH", "SELECTED"))
    with imaplib.IMAP4("127.0.0.1", port) as m:
        m.login(USER, PASSWORD)
        typ, caps = m.capability()
        assert b"NOTIFY" in caps[0].split(), caps
        typ, data = m._simple_command("NOTIFY", "SET", "(personal (MessageNew MessageExpunge))")
        assert typ == "OK", data
        loop.call_soon_threadsafe(ready.set)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            m.noop()
            typ, status = m.response("STATUS")
            if status and status[0] is not None:
                return status
            time.sleep(0.05)
        return []


async def test_imaplib_client(imap_env: ImapEnv) -> None:
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(asyncio.to_thread(_imaplib_notify, imap_env.port, ready, loop))
    await asyncio.wait_for(ready.wait(), 5)
    await imap_env.deliver(message("for imaplib"), mailbox="Junk")
    status = await asyncio.wait_for(task, 10)
    assert status == [b'"Junk" (MESSAGES 1 UIDNEXT 2 UNSEEN 1)'], status

# ruff: noqa: E501  (protocol transcripts read best unwrapped)
"""RFC 3501 \\Recent across sessions, table-driven: STATUS RECENT (section
6.3.10), LIST-STATUS (RFC 5819) and EXAMINE (section 6.3.2) report the
\\Recent count without claiming it; only SELECT claims (section 2.3.2).

A script is a list of ``(session, client line, expected lines)``; sessions
are separate logged-in connections, named by letter ("+" delivers a
message instead). Expected lines follow test_imap_scripts: regular
expressions, "=" for exact, "..." skips lines.
"""

from __future__ import annotations

import pytest

from tests.protocol.imap.conftest import ImapClient, ImapEnv, message
from tests.protocol.imap.messages import MULTIPART, PLAIN
from tests.protocol.imap.test_imap_scripts import LOGIN, Script, run_script

PLAIN_3 = message("Third")

Step = tuple[str, str, list[str]]

SCRIPTS: dict[str, list[Step]] = {
    "status_recent_does_not_claim": [
        ("b", "s1 STATUS INBOX (MESSAGES RECENT)", ['=* STATUS "INBOX" (MESSAGES 2 RECENT 2)', "=s1 OK STATUS completed"]),
        ("b", "s2 STATUS INBOX (RECENT)", ['=* STATUS "INBOX" (RECENT 2)', "s2 OK .*"]),
        ("a", "s3 SELECT INBOX", ["...", "=* 2 EXISTS", "=* 2 RECENT", "...", "s3 OK \\[READ-WRITE\\] .*"]),
        ("a", "s4 FETCH 1:* FLAGS", [r"\* 1 FETCH \(FLAGS \(\\Recent\)\)", r"\* 2 FETCH \(FLAGS \(\\Recent\)\)", "s4 OK .*"]),
        # The selecting session keeps its \Recent; everyone else now sees none.
        ("a", "s5 STATUS INBOX (RECENT)", ['=* STATUS "INBOX" (RECENT 2)', "s5 OK .*"]),
        ("b", "s6 STATUS INBOX (RECENT MESSAGES)", ['=* STATUS "INBOX" (RECENT 0 MESSAGES 2)', "s6 OK .*"]),
    ],
    "examine_reports_without_claiming": [
        ("a", "e1 EXAMINE INBOX", ["...", "=* 2 EXISTS", "=* 2 RECENT", "...", "=e1 OK [READ-ONLY] EXAMINE completed"]),
        # Section 2.3.2: a read-only session sees \Recent, later sessions too.
        ("a", "e2 FETCH 1:* FLAGS", [r"\* 1 FETCH \(FLAGS \(\\Recent\)\)", r"\* 2 FETCH \(FLAGS \(\\Recent\)\)", "e2 OK .*"]),
        ("a", "e3 SEARCH RECENT", ["=* SEARCH 1 2", "e3 OK .*"]),
        ("c", "e4 STATUS INBOX (RECENT)", ['=* STATUS "INBOX" (RECENT 2)', "e4 OK .*"]),
        ("b", "e5 SELECT INBOX", ["...", "=* 2 EXISTS", "=* 2 RECENT", "...", "e5 OK \\[READ-WRITE\\] .*"]),
        ("c", "e6 STATUS INBOX (RECENT)", ['=* STATUS "INBOX" (RECENT 0)', "e6 OK .*"]),
        ("c", "e7 EXAMINE INBOX", ["...", "=* 2 EXISTS", "=* 0 RECENT", "...", "e7 OK .*"]),
    ],
    "examine_sees_new_mail_recent": [
        ("a", "n1 EXAMINE INBOX", ["...", "=* 2 RECENT", "...", "n1 OK .*"]),
        ("+", "", []),  # a third message arrives
        ("a", "n2 NOOP", ["...", "=* 3 EXISTS", "=* 3 RECENT", "...", "n2 OK .*"]),
        ("a", "n3 FETCH 3 FLAGS", [r"\* 3 FETCH \(FLAGS \(\\Recent\)\)", "n3 OK .*"]),
        ("b", "n4 SELECT INBOX", ["...", "=* 3 RECENT", "...", "n4 OK .*"]),
    ],
    "append_to_selected_claims_with_its_delivery": [
        ("a", "p1 SELECT INBOX", ["...", "=* 2 RECENT", "...", "p1 OK .*"]),
        ("+", "", []),  # message 3 arrives; nobody has claimed it yet
        ("b", "p2 STATUS INBOX (RECENT)", ['=* STATUS "INBOX" (RECENT 1)', "p2 OK .*"]),
        # The APPEND's own transaction claims 3 and 4 for session a.
        ("a", "p3 APPEND INBOX {21+}\r\nSubject: new\r\n\r\nbody4", ["...", "=* 4 EXISTS", "=* 4 RECENT", r"p3 OK \[APPENDUID \d+ 4\] .*"]),
        ("a", "p4 FETCH 3:4 FLAGS", [r"\* 3 FETCH \(FLAGS \(\\Recent\)\)", r"\* 4 FETCH \(FLAGS \(\\Recent\)\)", "p4 OK .*"]),
        ("b", "p5 STATUS INBOX (RECENT MESSAGES)", ['=* STATUS "INBOX" (RECENT 0 MESSAGES 4)', "p5 OK .*"]),
        ("c", "p6 SELECT INBOX", ["...", "=* 4 EXISTS", "=* 0 RECENT", "...", "p6 OK .*"]),
    ],
    "append_to_examined_claims_nothing": [
        ("a", "q1 EXAMINE INBOX", ["...", "=* 2 RECENT", "...", "q1 OK .*"]),
        ("a", "q2 APPEND INBOX {21+}\r\nSubject: new\r\n\r\nbody3", ["...", "=* 3 EXISTS", "=* 3 RECENT", r"q2 OK \[APPENDUID \d+ 3\] .*"]),
        ("b", "q3 STATUS INBOX (RECENT)", ['=* STATUS "INBOX" (RECENT 3)', "q3 OK .*"]),
    ],
    "list_status_recent_does_not_claim": [
        ("b", 'l1 LIST "" "INBOX" RETURN (STATUS (RECENT))', ['=* LIST (\\HasNoChildren) "/" "INBOX"', '=* STATUS "INBOX" (RECENT 2)', "l1 OK .*"]),
        ("a", "l2 SELECT INBOX", ["...", "=* 2 RECENT", "...", "l2 OK .*"]),
        ("b", 'l3 LIST "" "INBOX" RETURN (STATUS (RECENT))', ['=* LIST (\\HasNoChildren) "/" "INBOX"', '=* STATUS "INBOX" (RECENT 0)', "l3 OK .*"]),
    ],
}


def _count_claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The mailbox ids of every claim_recent (a write) from now on."""
    from storage.sql.mailstore import SqlMailStore

    claims: list[int] = []
    real = SqlMailStore.claim_recent

    async def counting(self: SqlMailStore, account_id: int, mailbox_id: int) -> int:
        claims.append(mailbox_id)
        return await real(self, account_id, mailbox_id)

    monkeypatch.setattr(SqlMailStore, "claim_recent", counting)
    return claims


async def test_append_to_the_selected_mailbox_claims_without_a_write_of_its_own(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims = _count_claims(monkeypatch)
    client = await imap_env.client()
    try:
        await run_script(client, Script([LOGIN]))
        await run_script(client, Script([("s SELECT INBOX", ["...", "s OK .*"])]))
        assert len(claims) == 1
        append = "a APPEND INBOX {21+}\r\nSubject: new\r\n\r\nbody1"
        await run_script(client, Script([(append, ["=* 1 EXISTS", "=* 1 RECENT", "a OK .*"])]))
        assert len(claims) == 1  # taken inside the delivery
        await imap_env.deliver(PLAIN)  # mail the session did not append...
        await run_script(client, Script([("n NOOP", ["=* 2 EXISTS", "=* 2 RECENT", "n OK .*"])]))
        assert len(claims) == 2  # ...is claimed as before
    finally:
        await client.close()


async def test_mail_another_session_claimed_costs_no_claim(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session b APPENDs to the INBOX both have selected: b's delivery takes
    \\Recent (RFC 3501 section 2.3.2), so a, hearing of it, has nothing to
    claim and writes nothing (the floor read with the news is above it);
    mail nobody claimed yet is still claimed by a, with \\Recent."""
    claims = _count_claims(monkeypatch)
    a, b = await imap_env.client(), await imap_env.client()
    try:
        for c in (a, b):
            await run_script(c, Script([LOGIN, ("s SELECT INBOX", ["...", "s OK .*"])]))
        claims.clear()
        append = "p APPEND INBOX {21+}\r\nSubject: new\r\n\r\nbody1"
        await run_script(b, Script([(append, ["=* 1 EXISTS", "=* 1 RECENT", "p OK .*"])]))
        await run_script(a, Script([("n NOOP", ["=* 1 EXISTS", "=* 0 RECENT", "n OK .*"])]))
        await run_script(a, Script([("f FETCH 1 FLAGS", [r"=* 1 FETCH (FLAGS ())", "f OK .*"])]))
        assert claims == []
        await imap_env.deliver(PLAIN)  # nobody's claim yet: a takes it
        await run_script(a, Script([("m NOOP", ["=* 2 EXISTS", "=* 1 RECENT", "m OK .*"])]))
        assert len(claims) == 1
        await run_script(b, Script([("o NOOP", ["=* 2 EXISTS", "=* 1 RECENT", "o OK .*"])]))
        assert len(claims) == 1  # b claimed its own APPEND; a the delivery
    finally:
        await a.close()
        await b.close()


async def test_append_to_the_selected_mailbox_is_announced_without_reading_it_back(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The APPEND's own entry is announced as stored (RFC 3501 section
    6.3.11: EXISTS before the tagged OK) with no read of the mailbox, and
    FETCH then gives what a session reading storage sees. Mail from
    elsewhere in between still makes the session read."""
    from tests.protocol.imap.test_imap_shared_view import _count_reads

    reads = _count_reads(monkeypatch)
    a, b = await imap_env.client(), await imap_env.client()
    fetch = "UID FETCH 1:* (FLAGS INTERNALDATE RFC822.SIZE MODSEQ)"
    try:
        await run_script(a, Script([LOGIN, ("s SELECT INBOX (CONDSTORE)", ["...", "s OK .*"])]))
        reads.clear()
        append = 'a APPEND INBOX (\\Flagged $Work) "01-Feb-2025 10:20:30 +0100" {21+}\r\nSubject: new\r\n\r\nbody1'
        # RFC 3501 section 7.2.6: $Work is new to the mailbox, so FLAGS first.
        await run_script(a, Script([(append, [
            r"=* FLAGS (\Seen \Answered \Flagged \Deleted \Draft $Work)", r"\* OK \[PERMANENTFLAGS .*",
            "=* 1 EXISTS", "=* 1 RECENT", "a OK .*"])]))
        assert reads == []
        ours = [x for x in await a.command(fetch) if x.startswith(b"* ")]
        await run_script(b, Script([LOGIN, ("e EXAMINE INBOX", ["...", "e OK .*"])]))
        # b's FETCH MODSEQ is its first CONDSTORE-enabling command: it also gets
        # OK [HIGHESTMODSEQ] first (RFC 7162 section 3.1.2.1); compare the FETCHes.
        theirs = [x for x in await b.command(fetch) if x.startswith(b"* ") and b" FETCH " in x]
        # The same message: flags (less \\Recent), date, size and modseq.
        assert len(ours) == 1 and b"$Work" in ours[0] and b"01-Feb-2025 10:20:30 +0100" in ours[0]
        assert [x.replace(b" \\Recent", b"") for x in ours] == theirs
        await imap_env.deliver(PLAIN)  # another delivery: the next APPEND reads
        append2 = "a2 APPEND INBOX {21+}\r\nSubject: new\r\n\r\nbody3"
        await run_script(a, Script([(append2, ["=* 3 EXISTS", "=* 3 RECENT", "a2 OK .*"])]))
        assert reads != []
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_recent_script(imap_env: ImapEnv, name: str) -> None:
    # Two messages arrive before any session looks at the mailbox.
    await imap_env.deliver(PLAIN)
    await imap_env.deliver(MULTIPART)
    clients: dict[str, ImapClient] = {}
    try:
        for who, send, expected in SCRIPTS[name]:
            if who == "+":  # a delivery between commands
                await imap_env.deliver(PLAIN_3)
                continue
            client = clients.get(who)
            if client is None:
                client = clients[who] = await imap_env.client()
                await run_script(client, Script([LOGIN]))
            await run_script(client, Script([(send, expected)]))
    finally:
        for client in clients.values():
            await client.close()

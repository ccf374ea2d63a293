"""OBJECTID (RFC 8474): MAILBOXID on SELECT/EXAMINE, CREATE and STATUS;
EMAILID and THREADID as FETCH items and SEARCH keys."""

from __future__ import annotations

import random
import re

from tests.protocol.imap.conftest import ImapEnv, message

_OBJECTID = rb"[A-Za-z0-9_-]{1,255}"  # RFC 8474 section 7


def _one(pattern: bytes, lines: list[bytes]) -> bytes:
    found = [m.group(1) for ln in lines if (m := re.search(pattern, ln))]
    assert len(found) == 1, (pattern, lines)
    return found[0]


async def test_mailboxid_stable_across_rename_and_never_reused(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    assert b" OBJECTID" in (await c.ok("CAPABILITY"))[0]
    created = _one(rb"OK \[MAILBOXID \((" + _OBJECTID + rb")\)\] CREATE", await c.ok("CREATE Work"))
    lines = await c.ok("STATUS Work (MAILBOXID)")
    status = _one(rb"\(MAILBOXID \((" + _OBJECTID + rb")\)\)", lines)
    selected = _one(rb"\* OK \[MAILBOXID \((" + _OBJECTID + rb")\)\]", await c.ok("EXAMINE Work"))
    assert created == status == selected
    inbox = _one(rb"\* OK \[MAILBOXID \((" + _OBJECTID + rb")\)\]", await c.ok("SELECT INBOX"))
    assert inbox != created
    # RFC 8474 section 4.2: RENAME keeps it; a new mailbox of the old name gets a new one.
    await c.ok("RENAME Work Play")
    lines = await c.ok("STATUS Play (MESSAGES MAILBOXID)")
    assert lines[0] == b'* STATUS "Play" (MESSAGES 0 MAILBOXID (' + created + b"))"
    again = _one(rb"OK \[MAILBOXID \((" + _OBJECTID + rb")\)\] CREATE", await c.ok("CREATE Work"))
    assert again not in (created, inbox)
    await c.ok("DELETE Play")
    newer = _one(rb"OK \[MAILBOXID \((" + _OBJECTID + rb")\)\] CREATE", await c.ok("CREATE Play"))
    assert newer not in (created, inbox, again)
    await c.close()


async def test_emailid_kept_by_move_and_searchable(imap_env: ImapEnv) -> None:
    rng = random.Random()
    n = rng.randint(3, 9)
    for i in range(n):
        await imap_env.deliver(message(f"s{i}", "x" * rng.randint(1, 500) + "\r\n"))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    lines = await c.ok("FETCH 1:* (UID EMAILID THREADID)")
    ids = {}
    for ln in lines[:-1]:
        shape = rb"\* \d+ FETCH \(UID (\d+) EMAILID \((" + _OBJECTID + rb")\) THREADID NIL\)"
        m = re.fullmatch(shape, ln)
        assert m, ln
        ids[int(m.group(1))] = m.group(2)
    assert len(ids) == n and len(set(ids.values())) == n  # distinct per message
    uid = rng.choice(sorted(ids))
    lines = await c.ok(b"UID SEARCH EMAILID " + ids[uid])
    assert lines[0] == b"* SEARCH %d" % uid
    other = rng.choice([u for u in ids if u != uid])
    lines = await c.ok(b"UID SEARCH OR EMAILID " + ids[uid] + b" EMAILID " + ids[other])
    assert lines[0] == b"* SEARCH " + b" ".join(b"%d" % u for u in sorted({uid, other}))
    assert (await c.ok(b"SEARCH THREADID T1"))[0] == b"* SEARCH"
    assert (await c.ok(b"SEARCH EMAILID Mnot-one-of-ours"))[0] == b"* SEARCH"
    lines = await c.command(b"SEARCH EMAILID (bad)", "b")
    assert lines[-1].startswith(b"b BAD"), lines
    # RFC 8474 section 5.1: MOVE keeps the EMAILID.
    await c.ok("CREATE Kept")
    await c.ok(f"UID MOVE {uid} Kept")
    await c.ok("SELECT Kept")
    lines = await c.ok("FETCH 1 (EMAILID)")
    assert lines[0] == b"* 1 FETCH (EMAILID (" + ids[uid] + b"))"
    assert (await c.ok(b"UID SEARCH EMAILID " + ids[uid]))[0].startswith(b"* SEARCH ")
    await c.close()


async def test_ids_do_not_reveal_other_accounts(imap_env: ImapEnv) -> None:
    """Consecutive messages of two accounts: ids are not counters a client
    can read the site's traffic from, and one account's id finds nothing
    in another's mailbox."""
    from tests.protocol.imap.conftest import OTHER, PASSWORD

    await imap_env.deliver(message("mine", "a\r\n"))
    await imap_env.deliver(message("theirs", "b\r\n"), account=imap_env.other)
    await imap_env.deliver(message("mine2", "c\r\n"))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    mine = [_one(rb"EMAILID \((" + _OBJECTID + rb")\)", [ln])
            for ln in (await c.ok("FETCH 1:2 (EMAILID)"))[:-1]]
    await c.close()
    d = await imap_env.client()
    await d.ok(f"LOGIN {OTHER} {PASSWORD}")
    await d.ok("SELECT INBOX")
    theirs = _one(rb"EMAILID \((" + _OBJECTID + rb")\)", await d.ok("FETCH 1 (EMAILID)"))
    for emailid in mine:
        assert (await d.ok(b"SEARCH EMAILID " + emailid))[0] == b"* SEARCH"
        assert not re.fullmatch(rb"[A-Za-z]*0*[1-9]", emailid)  # not a bare row number
    assert theirs not in mine
    await d.close()


async def test_huge_emailid_search_is_answered(imap_env: ImapEnv) -> None:
    """A thousand or more EMAILID keys in one SEARCH: one mailbox read, one lookup each."""
    rng = random.Random()
    await imap_env.deliver(message("only", "z\r\n"))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    real = _one(rb"EMAILID \((" + _OBJECTID + rb")\)", await c.ok("FETCH 1 (EMAILID)"))
    # Under the 64 KiB line limit.
    keys = [b"M%016x" % rng.getrandbits(64) for _ in range(rng.randint(1000, 2000))]
    text = b" ".join(b"NOT EMAILID " + k for k in keys) + b" EMAILID " + real
    lines = await c.command(b"SEARCH " + text, "h")
    assert lines == [b"* SEARCH 1", b"h OK SEARCH completed"], lines[-1]
    await c.close()

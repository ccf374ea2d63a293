"""IMAP4rev2 (RFC 9051) beside IMAP4rev1: after ENABLE IMAP4rev2 a session
gets rev2's answers (no \\Recent, no RECENT or [UNSEEN], SEARCH as ESEARCH);
a rev1 session's answers stay as they were."""

from __future__ import annotations

import random
import re

from imapd.imap.wire.encode import sequence_set
from tests.protocol.imap.conftest import ImapEnv, message


async def test_rev2_session_beside_a_rev1_session(imap_env: ImapEnv) -> None:
    rng = random.Random()
    n = rng.randint(3, 12)
    for i in range(n):
        flags = ("\\Seen",) if rng.random() < 0.5 else ()
        await imap_env.deliver(message(f"s{i}", "x" * rng.randint(1, 300) + "\r\n"), flags=flags)
    await imap_env.deliver(message("unseen", "u\r\n"))
    n += 1
    old = await imap_env.client(login=True)
    new = await imap_env.client(login=True)
    caps = (await new.ok("CAPABILITY"))[0].split()
    assert b"IMAP4rev1" in caps and b"IMAP4rev2" in caps  # RFC 9051 section 7.2.2
    assert (await new.ok("ENABLE IMAP4rev2"))[0] == b"* ENABLED IMAP4rev2"

    # RFC 9051 Appendix E: SELECT answers without RECENT and [UNSEEN].
    await new.ok("CREATE INBOX/Sub")
    lines = await new.ok("EXAMINE INBOX")
    assert b"* %d EXISTS" % n in lines
    # RFC 9051 section 6.3.2: LIST with the name and accurate attributes.
    assert b'* LIST (\\HasChildren) "/" "INBOX"' in lines, lines
    assert not any(ln.endswith(b" RECENT") or b"[UNSEEN " in ln for ln in lines), lines
    lines = await old.ok("EXAMINE INBOX")
    assert not any(ln.startswith(b"* LIST ") for ln in lines), lines
    assert b"* %d RECENT" % n in lines  # rev1: every message is new to the mailbox
    assert any(b"OK [UNSEEN " in ln for ln in lines), lines

    # No \Recent in FETCH FLAGS for rev2 (RFC 9051 Appendix E item 5).
    flags2 = [ln for ln in await new.ok("FETCH 1:* FLAGS") if ln.startswith(b"* ")]
    flags1 = [ln for ln in await old.ok("FETCH 1:* FLAGS") if ln.startswith(b"* ")]
    assert len(flags1) == len(flags2) == n
    assert all(b"\\Recent" in ln for ln in flags1)
    assert not any(b"\\Recent" in ln for ln in flags2)
    assert [ln.replace(b" \\Recent", b"").replace(b"(\\Recent)", b"()") for ln in flags1] == flags2

    # SEARCH: rev1 "* SEARCH", rev2 ESEARCH with ALL (RFC 9051 section 6.4.4).
    lines = await old.ok("SEARCH UNSEEN")
    unseen = [int(x) for x in lines[0].split()[2:]]
    assert unseen, lines
    lines = await new.command("SEARCH UNSEEN", tag="r1")
    assert lines[0] == b'* ESEARCH (TAG "r1") ALL ' + sequence_set(unseen), lines
    lines = await new.command("UID SEARCH ALL", tag="r2")
    assert lines[0] == b'* ESEARCH (TAG "r2") UID ALL 1:%d' % n, lines
    lines = await new.command("SEARCH SUBJECT no-such-subject", tag="r3")
    assert lines[0] == b'* ESEARCH (TAG "r3")', lines  # no ALL for an empty result

    # New mail: EXISTS without RECENT for rev2, with it for rev1.
    await imap_env.deliver(message("late", "late\r\n"))
    lines2 = await new.ok("NOOP")
    lines1 = await old.ok("NOOP")
    assert b"* %d EXISTS" % (n + 1) in lines2 and b"* %d EXISTS" % (n + 1) in lines1
    assert not any(re.fullmatch(rb"\* \d+ RECENT", ln) for ln in lines2), lines2
    assert any(re.fullmatch(rb"\* \d+ RECENT", ln) for ln in lines1), lines1
    await old.close()
    await new.close()

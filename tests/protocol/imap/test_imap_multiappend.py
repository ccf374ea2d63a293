"""MULTIAPPEND (RFC 3502): several messages in one APPEND, all or none, with
APPENDUID's UID set (RFC 4315 section 3)."""

from __future__ import annotations

import asyncio
import random
import re

import imapclient

from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv, message


def _messages(rng: random.Random, n: int) -> list[bytes]:
    return [
        message(f"m{i}-{rng.random()}", "".join(rng.choices("ab \r\n", k=rng.randint(1, 3000))))
        + b"\r\n"
        for i in range(n)
    ]


def _multiappend(raws: list[bytes | None]) -> bytes:
    """One APPEND of every message, LITERAL+ (RFC 7888); None is an empty literal."""
    out = b"a1 APPEND INBOX"
    for i, raw in enumerate(raws):
        flags = b" (\\Seen)" if i % 2 else b""
        body = raw or b""
        out += flags + b" {%d+}\r\n" % len(body) + body
    return out + b"\r\n"


async def _status(c: object) -> bytes:
    lines = await c.ok("STATUS INBOX (MESSAGES UIDNEXT)")  # type: ignore[attr-defined]
    return lines[0]


async def test_multiappend_stores_all_in_order_with_uid_set(imap_env: ImapEnv) -> None:
    rng = random.Random()
    raws = _messages(rng, rng.randint(2, 9))
    c = await imap_env.client(login=True)
    assert b" MULTIAPPEND" in (await c.ok("CAPABILITY"))[0]
    await c.send(_multiappend(raws))  # type: ignore[arg-type]
    lines = await c.until("a1")
    m = re.fullmatch(rb"a1 OK \[APPENDUID (\d+) 1:(\d+)\] .*", lines[-1])
    assert m and int(m.group(2)) == len(raws), lines
    await c.ok("SELECT INBOX")
    for uid, raw in enumerate(raws, 1):
        lines = await c.ok(f"UID FETCH {uid} (FLAGS BODY.PEEK[])")
        assert lines[0].endswith(b"{%d}\r\n" % len(raw) + raw + b")"), (uid, lines[0][:200])
        assert (b"\\Seen" in lines[0]) == bool((uid - 1) % 2)
    await c.close()


async def test_multiappend_with_a_bad_message_stores_nothing(imap_env: ImapEnv) -> None:
    rng = random.Random()
    raws: list[bytes | None] = list(_messages(rng, rng.randint(3, 9)))
    raws[rng.randrange(1, len(raws) - 1)] = None  # an empty message in the middle
    c = await imap_env.client(login=True)
    before = await _status(c)
    await c.send(_multiappend(raws))
    lines = await c.until("a1")
    assert lines[-1].startswith(b"a1 NO "), lines
    assert await _status(c) == before  # not even a UID was taken
    await c.close()


async def test_multiappend_failing_while_storing_leaves_the_mailbox_as_it_was(
    imap_env: ImapEnv,
) -> None:
    """Over quota at a random message: nothing stored, not even a UID taken,
    and a session watching the mailbox sees nothing come and go."""
    rng = random.Random()
    raws = _messages(rng, rng.randint(3, 9))
    cut = rng.randrange(1, len(raws))
    await imap_env.storage.directory.set_quota(  # type: ignore[attr-defined]
        USER, sum(len(r) for r in raws[:cut]) + len(raws[cut]) // 2
    )
    c = await imap_env.client(login=True)
    watcher = await imap_env.client(login=True)
    await watcher.ok("SELECT INBOX")
    before = await _status(c)
    await c.send(_multiappend(raws))  # type: ignore[arg-type]
    lines = await c.until("a1")
    assert re.fullmatch(rb"a1 NO \[OVERQUOTA\] .*", lines[-1]), lines
    assert await _status(c) == before  # MESSAGES 0, UIDNEXT as it was
    lines = await watcher.ok("NOOP")
    assert not [line for line in lines if b"EXISTS" in line or b"EXPUNGE" in line], lines
    lines = await watcher.ok("UID SEARCH ALL")
    assert lines[0] == b"* SEARCH", lines
    await c.close()
    await watcher.close()


def _imapclient_multiappend(port: int, msgs: list[bytes]) -> tuple[object, list[bytes]]:
    with imapclient.IMAPClient("127.0.0.1", port=port, ssl=False) as c:
        c.login(USER, PASSWORD)
        assert b"MULTIAPPEND" in c.capabilities()
        reply = c.multiappend("INBOX", msgs)
        c.select_folder("INBOX", readonly=True)
        fetched = c.fetch(c.search(), ["BODY.PEEK[]"])
        return reply, [fetched[u][b"BODY[]"] for u in sorted(fetched)]


async def test_imapclient_multiappend(imap_env: ImapEnv) -> None:
    rng = random.Random()
    raws = _messages(rng, rng.randint(2, 6))
    reply, stored = await asyncio.to_thread(_imapclient_multiappend, imap_env.port, raws)
    typ, data = reply  # type: ignore[misc]
    assert typ == "OK" and re.match(rb"\[APPENDUID \d+ 1:%d\] " % len(raws), data[0]), reply
    assert stored == raws


async def test_multiappend_to_the_selected_mailbox_claims_recent(imap_env: ImapEnv) -> None:
    """RFC 3501 section 2.3.2: messages this session appends to its selected
    mailbox are \\Recent for it, and for no other session."""
    rng = random.Random()
    raws = _messages(rng, rng.randint(2, 6))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    await c.send(_multiappend(raws))  # type: ignore[arg-type]
    lines = await c.until("a1")
    assert lines[-1].startswith(b"a1 OK "), lines
    assert b"* %d EXISTS" % len(raws) in lines, lines
    assert b"* %d RECENT" % len(raws) in lines, lines
    other = await imap_env.client(login=True)
    lines = await other.ok("SELECT INBOX")
    assert b"* 0 RECENT" in lines, lines
    await c.close()
    await other.close()

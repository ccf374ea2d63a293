"""Two sessions on one mailbox: what one session caches about a message
never answers for another message (issue #17)."""

from __future__ import annotations

import random
import re

from tests.protocol.imap.conftest import ImapEnv, message

_SUBJECT = re.compile(rb'ENVELOPE \("[^"]*" "([^"]*)"')


def _subjects(lines: list[bytes]) -> dict[int, bytes]:
    """UID -> envelope subject of every FETCH response in ``lines``."""
    out = {}
    for line in lines:
        uid = re.search(rb"\* \d+ FETCH \(.*?UID (\d+)", line)
        subject = _SUBJECT.search(line)
        if uid and subject:
            out[int(uid.group(1))] = subject.group(1)
    return out


def _literals(line: bytes) -> list[bytes]:
    out = []
    for m in re.finditer(rb"\{(\d+)\}\r\n", line):
        out.append(line[m.end() : m.end() + int(m.group(1))])
    return out


async def test_reused_message_row_never_shows_the_old_content(imap_env: ImapEnv) -> None:
    """A FETCHes a message; B expunges it and APPENDs another, which SQLite
    stores under the same (reused) message row id; A must see the new one."""
    rng = random.Random()
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    await a.ok("SELECT INBOX")
    await b.ok("SELECT INBOX")
    old_subject = f"first {rng.random()}"
    first = message(old_subject, "x" * rng.randint(1, 4000) + "\r\n")
    await a.ok(f"APPEND INBOX {{{len(first)}+}}\r\n".encode() + first)
    seen = _subjects(await a.ok("UID FETCH 1:* (UID ENVELOPE BODY.PEEK[])"))
    assert list(seen.values()) == [old_subject.encode()]
    old_uid = next(iter(seen))

    await b.ok("NOOP")
    await b.ok(f"UID STORE {old_uid} +FLAGS.SILENT (\\Deleted)")
    await b.ok("EXPUNGE")
    subject = f"second {rng.random()}"
    second = message(subject, "y" * rng.randint(1, 4000) + "\r\n")
    await b.ok(f"APPEND INBOX {{{len(second)}+}}\r\n".encode() + second)

    await a.ok("NOOP")
    lines = await a.ok("UID FETCH 1:* (UID ENVELOPE BODY.PEEK[])")
    fetched = _subjects(lines)
    assert list(fetched.values()) == [subject.encode()], lines
    assert next(iter(fetched)) > old_uid
    bodies = [body for line in lines for body in _literals(line)]
    assert bodies == [second]

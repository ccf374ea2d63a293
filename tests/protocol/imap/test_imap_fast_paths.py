"""The fast paths behave as the general ones do.

FETCH of top-level sections answered from the raw bytes alone (no parsed
form loaded) must match what the parsed body structure gives (RFC 3501
section 6.4.5 BODY[], BODY[HEADER], BODY[TEXT], HEADER.FIELDS, RFC822.*);
APPEND re-reads the selected mailbox only when it wrote there; the
autologout timer follows the client's activity.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.protocol.imap.conftest import ImapEnv

MESSAGES = {
    "plain": b"Subject: hi\r\nFrom: a@example.org\r\n\r\nbody line\r\n",
    "bare_lf": b"Subject: lf\nFrom: a@example.org\n\nbody\nmore\n",
    "no_blank_line": b"Subject: only header\r\nFrom: a@example.org\r\n",
    "headerless": b"just some text\r\nwithout a header\r\n",
    "blank_first": b"\r\nbody after an empty header\r\n",
    "folded": b"Subject: a\r\n folded subject\r\nX-A: 1\r\n\r\nbody\r\n",
    "multipart": (
        b"Subject: mp\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\none\r\n--b1--\r\n"
    ),
}
ITEMS = (
    "BODY.PEEK[] BODY.PEEK[HEADER] BODY.PEEK[TEXT] "
    "BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[HEADER.FIELDS.NOT (SUBJECT)] "
    "BODY.PEEK[]<2.5> RFC822.HEADER"
)


def _sections(line: bytes) -> list[bytes]:
    """Every literal of a FETCH response line, in order."""
    out = []
    for m in re.finditer(rb"\{(\d+)\}\r\n", line):
        start = m.end()
        out.append(line[start : start + int(m.group(1))])
    return out


@pytest.mark.parametrize("name", sorted(MESSAGES))
async def test_raw_sections_match_parsed(imap_env: ImapEnv, name: str) -> None:
    raw = MESSAGES[name]
    await imap_env.deliver(raw)
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    # Raw path: only top-level sections are asked for.
    fast = await c.ok(f"FETCH 1 ({ITEMS})")
    # Parsed path: ENVELOPE makes the server load the parsed form.
    slow = await c.ok(f"FETCH 1 (ENVELOPE {ITEMS})")
    fast_parts = _sections(fast[0])
    slow_parts = _sections(slow[0])
    assert fast_parts[0] == raw  # BODY[] is the message as stored
    assert fast_parts[0] + fast_parts[1] != b""
    assert len(fast_parts) == 7
    # ENVELOPE may hold literals itself; the section literals are the last 7.
    assert fast_parts == slow_parts[-7:]
    assert fast_parts[1] + fast_parts[2] == raw  # HEADER + TEXT is the whole message
    assert fast_parts[1] == fast_parts[6]  # RFC822.HEADER is BODY[HEADER]
    assert fast_parts[5] == raw[2:7]
    await c.close()


async def test_body_fetch_sets_seen_without_parsed_form(imap_env: ImapEnv) -> None:
    await imap_env.deliver(MESSAGES["plain"])
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    lines = await c.ok("FETCH 1 (BODY[HEADER])")
    assert b"\\Seen" in lines[0]  # RFC 3501 section 6.4.5: BODY[] sets \Seen
    assert _sections(lines[0]) == [b"Subject: hi\r\nFrom: a@example.org\r\n\r\n"]
    await c.close()


async def test_append_elsewhere_announces_nothing_append_here_announces_exists(
    imap_env: ImapEnv,
) -> None:
    """RFC 3501 section 6.3.11: EXISTS follows an APPEND to the selected
    mailbox; an APPEND to another mailbox says nothing about this one."""
    await imap_env.deliver(MESSAGES["plain"])
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    raw = MESSAGES["folded"]
    await c.send(b"a1 APPEND Sent {%d+}\r\n" % len(raw) + raw + b"\r\n")
    lines = await c.until("a1")
    assert lines[-1].startswith(b"a1 OK [APPENDUID")
    assert not any(b"EXISTS" in line for line in lines)
    await c.send(b"a2 APPEND INBOX {%d+}\r\n" % len(raw) + raw + b"\r\n")
    lines = await c.until("a2")
    assert b"* 2 EXISTS" in lines
    assert lines[-1].startswith(b"a2 OK [APPENDUID")
    await c.close()


async def test_autologout_counts_from_the_last_command(imap_factory) -> None:  # type: ignore[no-untyped-def]
    """RFC 3501 section 5.4: the inactivity timer restarts with each command."""
    env = await imap_factory(imap={"autologout_seconds": 1})
    c = await env.client(login=True)
    for _ in range(4):  # 2 s of activity, longer than the timeout
        await asyncio.sleep(0.5)
        await c.ok("NOOP")
    bye = await c.line(timeout=3)
    assert bye.startswith(b"* BYE"), bye
    await c.close()

"""A keyword new to the mailbox is announced in FLAGS (and PERMANENTFLAGS)
before any FETCH shows it: RFC 3501 section 7.2.6, in the session that
stored it and in every other session with the mailbox selected."""

from __future__ import annotations

import random

import pytest

from bench.imap_churn import fetch_items, parse_response
from tests.protocol.imap.conftest import ImapClient, ImapEnv, message

KNOWN = "$Known"
NEW = "$New"  # replaced by a random keyword in each case

# (case, who runs the change, the change, what the observer then sends,
#  observer is read-only (EXAMINE), whether the observer must be told of NEW)
CASES = [
    ("own STORE", "a", "STORE 1 +FLAGS ($New)", None, False, True),
    ("own STORE.SILENT", "a", "STORE 1 +FLAGS.SILENT ($New)", "FETCH 1:* (FLAGS)", False, True),
    ("own UID STORE of two", "a", "UID STORE 1:* +FLAGS ($New \\Seen)", None, False, True),
    ("own FLAGS replaced", "a", "STORE 2 FLAGS ($New)", "FETCH 2 (FLAGS)", False, True),
    ("other's STORE, NOOP", "b", "STORE 1 +FLAGS ($New)", "NOOP", False, True),
    ("other's STORE, FETCH", "b", "STORE 1 +FLAGS ($New)", "FETCH 1:* (FLAGS)", False, True),
    ("other's STORE, STORE", "b", "STORE 1 +FLAGS ($New)", "STORE 2 +FLAGS (\\Seen)", False, True),
    ("other's STORE, read-only", "b", "STORE 1 +FLAGS ($New)", "FETCH 1 (FLAGS)", True, True),
    ("other's APPEND, FETCH", "b", "APPEND", "FETCH 1:* (FLAGS)", False, True),
    ("a keyword already known", "b", "STORE 2 +FLAGS ($Known)", "NOOP", False, False),
]


class Observer:
    """A session's responses, checked as a client reads them: every keyword
    a FETCH shows must have been in the last FLAGS response."""

    def __init__(self, client: ImapClient) -> None:
        self.c = client
        self.keywords: set[str] = set()
        self.permanent = ""
        self.told: list[str] = []

    async def run(self, line: str | bytes) -> list[bytes]:
        lines = await self.c.ok(line)
        for raw in lines:
            tokens = parse_response(raw + b"\r\n")
            if tokens[:2] == [b"*", b"FLAGS"]:
                self.keywords = {f.decode() for f in tokens[2] if not f.startswith(b"\\")}
                self.told.append(raw.decode())
            elif tokens[:3] == [b"*", b"OK", b"[PERMANENTFLAGS"] or b"[PERMANENTFLAGS" in raw:
                self.permanent = raw.decode()
            elif len(tokens) > 2 and tokens[2] == b"FETCH":
                flags = fetch_items(tokens).get(b"FLAGS")
                if isinstance(flags, list):
                    shown = {f.decode() for f in flags if not f.startswith(b"\\")}
                    assert shown <= self.keywords, (raw, self.keywords)
        return lines


@pytest.mark.parametrize(("case", "actor", "change", "then", "read_only", "told"), CASES,
                         ids=[c[0] for c in CASES])
async def test_new_keyword_is_in_flags_before_fetch_shows_it(
    imap_env: ImapEnv, case: str, actor: str, change: str, then: str | None,
    read_only: bool, told: bool,
) -> None:
    keyword = f"$New{random.randrange(10**9)}"
    await imap_env.deliver(message(f"one {keyword}"))
    await imap_env.deliver(message(f"two {keyword}"), flags=(KNOWN,))
    a = Observer(await imap_env.client(login=True))
    b = Observer(await imap_env.client(login=True))
    await a.run("EXAMINE INBOX" if read_only else "SELECT INBOX")
    await b.run("SELECT INBOX")
    assert a.keywords == {KNOWN} and len(a.told) == 1
    change = change.replace(NEW, keyword)
    if change == "APPEND":
        raw = message(f"three {keyword}")
        change = f"APPEND INBOX ({keyword}) {{{len(raw)}+}}\r\n" + raw.decode()
    runner = a if actor == "a" else b
    await runner.run(change)
    if then is not None:
        await a.run(then)
    assert (keyword in a.keywords) == told, a.told
    assert len(a.told) == (2 if told else 1), a.told
    if told and not read_only:
        assert keyword in a.permanent and "\\*" in a.permanent, a.permanent
    if told and read_only:
        assert "PERMANENTFLAGS ()" in a.permanent
    # The other session learns it too, before its next FETCH shows it.
    await b.run("FETCH 1:* (FLAGS)")
    assert keyword in b.keywords or not told

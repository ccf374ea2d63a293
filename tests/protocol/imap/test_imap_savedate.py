# ruff: noqa: E501  (protocol transcripts read best unwrapped)
"""SAVEDATE (RFC 8514): the FETCH item and the SEARCH keys, as scripts of
client lines and the replies the RFC requires (the format of
:mod:`test_imap_scripts`), then COPY and MOVE against save dates set in
the past through storage, so that "saved now" and "saved then" differ."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import update

from storage.sql.schema import mailbox_entries as E
from tests.protocol.imap.conftest import ImapEnv
from tests.protocol.imap.messages import MULTIPART, PLAIN
from tests.protocol.imap.test_imap_scripts import Script, _inbox, play

# RFC 8514 section 3: msg-att-static =/ "SAVEDATE" SP (date-time / nil); ours in UTC.
_DATE_TIME = r'"[ \d]\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d \+0000"'
_OLD = '"02-Jan-2001 03:04:05 -0500"'
_MSG = b"Subject: saved\r\n\r\nsaved body\r\n"

# fmt: off
SCRIPTS: dict[str, Script] = {
    # Section 2: the capability; section 3: the FETCH item, apart from INTERNALDATE.
    "savedate_fetch": Script(messages=_inbox(PLAIN, MULTIPART), steps=[
        ("a CAPABILITY", [r"\* CAPABILITY .* SAVEDATE( .*|)", "a OK .*"]),
        ("b SELECT INBOX", ["...", "b OK .*"]),
        ("c FETCH 1:* (SAVEDATE)", [f"\\* 1 FETCH \\(SAVEDATE {_DATE_TIME}\\)", f"\\* 2 FETCH \\(SAVEDATE {_DATE_TIME}\\)", "=c OK FETCH completed"]),
        (f"d APPEND INBOX {_OLD} {{{len(_MSG)}+}}\r\n".encode() + _MSG, ["=* 3 EXISTS", "...", r"d OK \[APPENDUID \d+ 3\] APPEND completed"]),
        # The client's date is the INTERNALDATE, the save date is now.
        ("f UID FETCH 3 (INTERNALDATE SAVEDATE)", [f"\\* 3 FETCH \\(UID 3 INTERNALDATE {_OLD} SAVEDATE (?P<saved>{_DATE_TIME})\\)", "f OK .*"]),
        ("g FETCH 3 (UID SAVEDATE FLAGS)", ["=* 3 FETCH (UID 3 SAVEDATE <<saved>> FLAGS (\\Recent))", "g OK .*"]),
        ("h FETCH 1 SAVEDATE", [f"\\* 1 FETCH \\(SAVEDATE {_DATE_TIME}\\)", "h OK .*"]),
        ("i FETCH 1 (SAVEDATE.PEEK)", ["i BAD .*"]),
    ]),
    # Section 4: SAVEDBEFORE / SAVEDON / SAVEDSINCE by day, SAVEDATESUPPORTED.
    "savedate_search": Script(messages=_inbox(PLAIN), steps=[
        ("a SELECT INBOX", ["...", "a OK .*"]),
        (f"b APPEND INBOX {_OLD} {{{len(_MSG)}+}}\r\n".encode() + _MSG, ["...", "b OK .*"]),
        ("d SEARCH SAVEDATESUPPORTED", ["=* SEARCH 1 2", "d OK .*"]),
        ("e SEARCH SAVEDSINCE 1-Jan-2002", ["=* SEARCH 1 2", "e OK .*"]),
        ("f SEARCH SAVEDBEFORE 1-Jan-2002", ["=* SEARCH", "f OK .*"]),
        ("g SEARCH SAVEDON 2-Jan-2001", ["=* SEARCH", "g OK .*"]),
        # The internal date says 2001: BEFORE finds what SAVEDBEFORE does not.
        ("h SEARCH BEFORE 1-Jan-2002", ["=* SEARCH 2", "h OK .*"]),
        ('i UID SEARCH SAVEDSINCE "1-Jan-2002" NOT SAVEDBEFORE 1-Jan-2002', ["=* SEARCH 1 2", "i OK .*"]),
        ("j SEARCH RETURN (COUNT) SAVEDATESUPPORTED", ['=* ESEARCH (TAG "j") COUNT 2', "j OK .*"]),
        ("k SEARCH SAVEDON 31-Feb-2020", ["k BAD .*"]),
        ("l SEARCH SAVEDSINCE", ["l BAD .*"]),
        ("m SEARCH SAVEDATESUPPORTED 1", ["=* SEARCH 1", "m OK .*"]),
    ]),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_savedate_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])


async def _set_saved(env: ImapEnv, mailbox: str, when: dt.datetime | None) -> None:
    """Every entry of ``mailbox`` as saved at ``when`` (None: as stored
    before save dates were kept)."""
    mail = env.storage.mail(env.account)  # type: ignore[attr-defined]
    box = await mail.get_mailbox(env.account.id, mailbox)  # type: ignore[attr-defined]
    micros = None if when is None else int(when.timestamp() * 1_000_000)
    async with mail.db.write() as conn:
        await conn.execute(update(E).where(E.c.mailbox_id == box.id).values(saved_at=micros))
    mail._stored_cache.clear()


def _saved_of(lines: list[bytes]) -> dict[int, str]:
    out = {}
    for ln in lines:
        m = re.search(rb"UID (\d+) SAVEDATE (\"[^\"]+\")", ln)
        if m:
            out[int(m.group(1))] = m.group(2).decode()
    return out


async def test_copy_and_move_are_saves(imap_env: ImapEnv) -> None:
    """RFC 8514 section 1: the save date is when the message was saved in
    this mailbox: COPY and MOVE make new ones, the source keeps its own."""
    for i in range(3):
        await imap_env.deliver(PLAIN.replace(b"Subject:", b"X-N: %d\r\nSubject:" % i))
    long_ago = dt.datetime(2010, 6, 7, 8, 9, 10, tzinfo=dt.UTC)
    await _set_saved(imap_env, "INBOX", long_ago)
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    lines = await c.ok("UID FETCH 1:* (SAVEDATE)")
    assert set(_saved_of(lines).values()) == {'"07-Jun-2010 08:09:10 +0000"'}
    assert (await c.ok("SEARCH SAVEDON 7-Jun-2010"))[0] == b"* SEARCH 1 2 3"
    await c.ok("UID COPY 1 Archive")
    await c.ok("UID MOVE 2 Archive")
    await c.ok("SELECT Archive")
    copies = _saved_of(await c.ok("UID FETCH 1:* (SAVEDATE)"))
    assert len(copies) == 2 and '"07-Jun-2010 08:09:10 +0000"' not in copies.values()
    assert (await c.ok("SEARCH SAVEDBEFORE 8-Jun-2010"))[0] == b"* SEARCH"
    assert (await c.ok("SEARCH SAVEDSINCE 8-Jun-2010"))[0] == b"* SEARCH 1 2"
    await c.ok("SELECT INBOX")
    assert _saved_of(await c.ok("UID FETCH 1:* (SAVEDATE)")) == {
        1: '"07-Jun-2010 08:09:10 +0000"',
        3: '"07-Jun-2010 08:09:10 +0000"',
    }
    await c.close()


async def test_entries_before_save_dates_report_internal_date(imap_env: ImapEnv) -> None:
    """An entry stored before the schema kept save dates: its save date is
    its internal date, in UTC (never NIL, so SAVEDATESUPPORTED holds)."""
    await imap_env.deliver(PLAIN)
    c = await imap_env.client(login=True)
    raw = b"Subject: old\r\n\r\nold\r\n"
    await c.ok(b'APPEND INBOX "04-Mar-2015 23:30:00 -0200" {%d+}\r\n' % len(raw) + raw)
    await _set_saved(imap_env, "INBOX", None)
    await c.ok("SELECT INBOX")
    lines = await c.ok("UID FETCH 2 (SAVEDATE)")
    assert lines[0] == b'* 2 FETCH (UID 2 SAVEDATE "05-Mar-2015 01:30:00 +0000")'
    assert (await c.ok("SEARCH SAVEDON 5-Mar-2015"))[0] == b"* SEARCH 2"
    assert (await c.ok("SEARCH SAVEDATESUPPORTED"))[0] == b"* SEARCH 1 2"
    await c.close()

"""SORT and THREAD from the keys stored with each entry at ingest
(``imapd/imap/commands/sort.py`` STORED_KEYS_ROWS, storage.sortkeys),
against the server with imapclient and raw lines.

Here every SORT and THREAD takes the stored-key path (STORED_KEYS_ROWS 0;
the storage calls are counted, and ``sort_rows``, the in-memory path's
read, must not be called):

- the answers equal the independent RFC 5256 reference of
  test_imap_sort_thread (random mailboxes, every criterion, REVERSE, a
  search narrowing what is sorted, THREAD's hand-made RFC cases);
- on random mailboxes of hostile headers (RFC 2047 subjects, broken and
  missing dates, quoted and invalid Message-IDs, group syntax) every SORT
  and THREAD answer, UID and sequence numbers, with a search criterion or
  ALL, after an EXPUNGE, is byte-for-byte the in-memory path's answer;
- a THREAD repeated is answered from the kept answer (no read), one after
  an EXPUNGE or APPEND is threaded again;
- entries without stored keys (written by an older process) send the
  command to the in-memory path, with the same answer.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator

import imapclient
import pytest
from sqlalchemy import update

from imapd.imap import thread_cache
from imapd.imap.commands import sort
from storage.sortkeys import KEY_COLUMNS
from storage.sql.mailstore import SqlMailStore
from storage.sql.schema import mailbox_entries as E
from tests.contract.test_sort_keys import _raw as hostile_message
from tests.protocol.imap import test_imap_sort_thread as ref
from tests.protocol.imap.conftest import ImapEnv


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The stored-key path for every command; the storage calls made."""
    monkeypatch.setattr(sort, "STORED_KEYS_ROWS", 0)
    thread_cache.clear()  # answers of other tests' databases
    made: list[str] = []
    for name in ("sorted_uids", "thread_rows", "sort_rows"):
        real = getattr(SqlMailStore, name)

        def counted(self, *args, _real=real, _name=name):  # type: ignore[no-untyped-def]
            made.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(SqlMailStore, name, counted)
    yield made


async def test_stored_sort_matches_the_reference(imap_env: ImapEnv, calls: list[str]) -> None:
    await asyncio.to_thread(ref._sort_session, imap_env, random.randrange(1 << 30))
    assert "sorted_uids" in calls and "sort_rows" not in calls


async def test_stored_thread_matches_the_reference(imap_env: ImapEnv, calls: list[str]) -> None:
    await asyncio.to_thread(ref._thread_session, imap_env, random.randrange(1 << 30))
    got = await asyncio.to_thread(ref._raw_thread, imap_env)
    assert got == [want for _, want in ref.REFERENCE_CASES]
    assert "thread_rows" in calls and "sort_rows" not in calls


_COMMANDS = [
    "SORT (DATE) UTF-8 ALL",
    "SORT (REVERSE DATE) UTF-8 ALL",
    "SORT (ARRIVAL) UTF-8 ALL",
    "SORT (REVERSE ARRIVAL) UTF-8 UNSEEN",
    "SORT (SUBJECT) UTF-8 ALL",
    "SORT (REVERSE SUBJECT DATE) UTF-8 ALL",
    "SORT (FROM) UTF-8 ALL",
    "SORT (REVERSE FROM SIZE) UTF-8 SEEN",
    "SORT (SIZE) UTF-8 ALL",
    "SORT (REVERSE SIZE) US-ASCII ALL",
    "SORT (TO CC) UTF-8 ALL",
    "SORT (DISPLAYFROM) UTF-8 ALL",
    "SORT (REVERSE DISPLAYTO ARRIVAL) UTF-8 ALL",
    "SORT (SUBJECT SUBJECT REVERSE DATE) UTF-8 UNSEEN",
    "SORT RETURN (MIN MAX COUNT) (DATE) UTF-8 ALL",
    "THREAD REFERENCES UTF-8 ALL",
    "THREAD REFERENCES UTF-8 UNSEEN",
    "THREAD ORDEREDSUBJECT UTF-8 ALL",
    "THREAD ORDEREDSUBJECT UTF-8 SEEN",
]


def _answers(env: ImapEnv, folder: str) -> list[bytes]:
    """Every command of _COMMANDS, as UID and sequence-number commands:
    the raw untagged lines of each."""
    out: list[bytes] = []
    with ref._client(env) as c:
        c.select_folder(folder)
        imap = c._imap
        for command in _COMMANDS:
            for prefix in ([], ["UID"]):
                parts = [*prefix, *command.split(" ")]
                typ, data = imap._simple_command(*parts)
                assert typ == "OK", (parts, data)
                kind = "ESEARCH" if "RETURN" in command else command.split(" ")[0]
                _, lines = imap._untagged_response(typ, data, kind)
                text = b"|".join(x for x in lines if x is not None) or b"-"
                out.append(re.sub(rb'^\(TAG "[^"]*"\) ', b"", text))  # RFC 4731 tag: the command's
    return out


def _fill_hostile(env: ImapEnv, rng: random.Random, folder: str) -> None:
    with ref._client(env) as c:
        c.create_folder(folder)
        for i in range(rng.randint(40, 80)):
            flags = [imapclient.SEEN] if rng.random() < 0.5 else []
            c.append(folder, hostile_message(rng, i), flags=flags)
        c.select_folder(folder)
        uids = c.search("ALL")
        c.add_flags(rng.sample(uids, len(uids) // 5), [imapclient.DELETED])
        c.expunge()


async def test_stored_and_in_memory_answers_are_identical(
    imap_env: ImapEnv, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random()
    await asyncio.to_thread(_fill_hostile, imap_env, rng, "Hostile")
    stored = await asyncio.to_thread(_answers, imap_env, "Hostile")
    assert "sort_rows" not in calls and "sorted_uids" in calls and "thread_rows" in calls
    monkeypatch.setattr(sort, "STORED_KEYS_ROWS", 1 << 60)  # never: the in-memory path
    calls.clear()
    in_memory = await asyncio.to_thread(_answers, imap_env, "Hostile")
    assert "sorted_uids" not in calls and "thread_rows" not in calls and "sort_rows" in calls
    assert stored == in_memory
    assert any(len(a) > 40 for a in stored)  # the mailbox was sorted, not empty
    # Twice the same THREAD: the second from the kept answer
    # (imapd.imap.thread_cache), no read.
    monkeypatch.setattr(sort, "STORED_KEYS_ROWS", 0)
    calls.clear()
    first, again = await asyncio.to_thread(_thread_twice, imap_env, "Hostile")
    assert first == again and first in stored
    assert calls.count("thread_rows") == 1
    # After an EXPUNGE (numbers shift) and an APPEND, not the kept answers.
    await asyncio.to_thread(_expunge_and_append, imap_env, rng, "Hostile")
    stored = await asyncio.to_thread(_answers, imap_env, "Hostile")
    assert "thread_rows" in calls
    monkeypatch.setattr(sort, "STORED_KEYS_ROWS", 1 << 60)
    assert await asyncio.to_thread(_answers, imap_env, "Hostile") == stored


def _thread_twice(env: ImapEnv, folder: str) -> list[bytes]:
    with ref._client(env) as c:
        c.select_folder(folder)
        out = []
        for _ in range(2):
            typ, data = c._imap._simple_command("THREAD", "REFERENCES", "UTF-8", "ALL")
            assert typ == "OK"
            out.append(c._imap._untagged_response(typ, data, "THREAD")[1][0])
        return out


def _expunge_and_append(env: ImapEnv, rng: random.Random, folder: str) -> None:
    with ref._client(env) as c:
        c.select_folder(folder)
        c.add_flags(rng.sample(c.search("ALL"), 3), [imapclient.DELETED])
        c.expunge()
        c.append(folder, hostile_message(rng, 99))


async def test_entries_without_keys_take_the_in_memory_path(
    imap_env: ImapEnv, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random()
    await asyncio.to_thread(_fill_hostile, imap_env, rng, "Old")
    monkeypatch.setattr(sort, "STORED_KEYS_ROWS", 1 << 60)
    want = await asyncio.to_thread(_answers, imap_env, "Old")
    monkeypatch.setattr(sort, "STORED_KEYS_ROWS", 0)
    # As an older process would have written them: one entry without keys.
    engine = imap_env.storage.databases["default"].engine  # type: ignore[attr-defined]
    async with engine.begin() as conn:
        await conn.execute(update(E).where(E.c.uid == E.c.uid).values(dict.fromkeys(KEY_COLUMNS)))
    calls.clear()
    got = await asyncio.to_thread(_answers, imap_env, "Old")
    assert got == want
    assert "sort_rows" in calls  # asked for stored keys, found none, sorted in memory


async def test_a_sort_update_context_from_stored_keys(imap_env: ImapEnv, calls: list[str]) -> None:
    """RFC 5267 section 4.3 on the stored-key path: the SORT answer comes
    from ``sorted_uids``, the context keeps each result's keys, and a
    message appended by another session is reported by ADDTO."""
    rng = random.Random()
    await asyncio.to_thread(_fill_hostile, imap_env, rng, "Live")

    def run() -> tuple[list[bytes], list[bytes]]:
        with ref._client(imap_env) as watcher, ref._client(imap_env) as writer:
            watcher.select_folder("Live")
            imap = watcher._imap
            typ, data = imap._simple_command(
                "UID", "SORT", "RETURN", "(ALL UPDATE)", "(DATE)", "UTF-8", "ALL"
            )
            assert typ == "OK", data
            first = imap._untagged_response(typ, data, "ESEARCH")[1]
            writer.append("Live", hostile_message(rng, 7))
            typ, data = imap._simple_command("NOOP")
            assert typ == "OK", data
            return first, imap._untagged_response(typ, data, "ESEARCH")[1]

    first, update_lines = await asyncio.to_thread(run)
    assert "sorted_uids" in calls
    assert first and b"ALL" in first[0]
    assert update_lines and b"ADDTO" in update_lines[0]

"""SORT and THREAD of many messages run in the content pool's worker
processes (``imapd/imap/commands/sort.py``, INLINE_ROWS), where their
seconds of pure Python on a 100,000-message mailbox cannot hold the
server's GIL while other sessions wait.

Here every SORT and THREAD goes to a real worker process (INLINE_ROWS 0):
the answers are the same as the reference's (the work and its inputs
survive the trip between processes), and a job past the pool's time limit
is a NO [LIMIT] (RFC 5530 section 3), after which the session goes on."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import imapclient
import pytest

from imapd.imap.commands import sort
from storage import contentpool
from tests.protocol.imap.conftest import ImapEnv
from tests.protocol.imap.test_imap_sort_thread import (
    REFERENCE_CASES,
    _client,
    _raw_thread,
    _sort_session,
    _thread_session,
)


@pytest.fixture
def in_workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """One worker process; the names of the jobs it was given."""
    monkeypatch.setattr(sort, "INLINE_ROWS", 0)
    pool = contentpool.configure(1)
    given: list[str] = []
    real = pool.run

    async def run(fn, *args):  # type: ignore[no-untyped-def]
        given.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(pool, "run", run)
    try:
        yield given
    finally:
        contentpool.configure(0)


async def test_sort_in_a_worker_process_matches_the_reference(
    imap_env: ImapEnv, in_workers: list[str]
) -> None:
    await asyncio.to_thread(_sort_session, imap_env, random.randrange(1 << 30))
    assert "sorted_uids" in in_workers


async def test_thread_in_a_worker_process_matches_the_reference(
    imap_env: ImapEnv, in_workers: list[str]
) -> None:
    await asyncio.to_thread(_thread_session, imap_env, random.randrange(1 << 30))
    got = await asyncio.to_thread(_raw_thread, imap_env)
    assert got == [want for _, want in REFERENCE_CASES]
    assert "thread_response" in in_workers


def _limited(env: ImapEnv) -> list[str]:
    with _client(env) as c:
        c.append("INBOX", b"Subject: one\r\n\r\nx\r\n")
        c.select_folder("INBOX")
        out = []
        for command in (lambda: c.sort(["SUBJECT"]), lambda: c.thread("REFERENCES")):
            with pytest.raises(imapclient.exceptions.IMAPClientError) as refused:
                command()
            out.append(str(refused.value))
        c.noop()  # the session goes on
        return out


async def test_a_sort_past_the_time_limit_is_no_limit(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sort, "INLINE_ROWS", 0)
    contentpool.configure(1, time_limit=0.001, startup_allowance=0.0)
    try:
        refusals = await asyncio.to_thread(_limited, imap_env)
    finally:
        contentpool.configure(0)
    assert all("[LIMIT]" in r for r in refusals), refusals

"""Two sessions on one mailbox: what one session caches about a message
never answers for another message (issue #17)."""

from __future__ import annotations

import random
import re

import pytest

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


def _once(real, failure: BaseException):  # type: ignore[no-untyped-def]
    """``real`` (a storage method) failing on its first call only."""
    calls: list[int] = []

    async def wrapper(self, *args):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise failure
        return await real(self, *args)

    return wrapper


def _no_forced_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOOP reads storage only when news says so: what these tests check is
    that the news is not lost, not that the two-second poll hides it."""
    from imapd.imap import session

    monkeypatch.setattr(session, "FORCED_POLL_INTERVAL", 3600.0)


@pytest.mark.parametrize("method", ["changes_since", "claim_recent"])
async def test_a_failed_storage_call_loses_no_news(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A storage outage while the session reads new mail is a temporary
    error (RFC 5530 UNAVAILABLE); the mail is announced once storage is
    back, and never counted in the view before the client is told."""
    from storage.errors import ErrorKind, StorageError
    from storage.sql.mailstore import SqlMailStore

    _no_forced_poll(monkeypatch)
    a = await imap_env.client(login=True)
    await a.ok("SELECT INBOX")
    await a.ok("NOOP")
    monkeypatch.setattr(SqlMailStore, method, _once(
        getattr(SqlMailStore, method), StorageError(ErrorKind.TEMPORARY, "storage down")
    ))
    await imap_env.deliver(message(f"during an outage {random.random()}"))
    told = await a.command("NOOP") + await a.command("NOOP")
    assert b"* 1 EXISTS" in told, told
    assert told.count(b"* 1 EXISTS") == 1, told
    assert any(b"[UNAVAILABLE]" in line for line in told), told
    lines = await a.ok("FETCH 1:* (UID)")
    assert len([x for x in lines if b" FETCH (" in x]) == 1, lines


async def test_a_change_made_during_select_is_heard(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another session's STORE that lands while SELECT reads the mailbox
    (its event reaches a session with no view yet) still shows."""
    from storage.model import StoreMode, UidSet
    from storage.sql.mailstore import SqlMailStore

    _no_forced_poll(monkeypatch)
    await imap_env.deliver(message(f"selected {random.random()}"))
    real = SqlMailStore.snapshot
    flagged: list[int] = []

    async def snapshot_then_store(self, account_id, mailbox_id):  # type: ignore[no-untyped-def]
        snapshot = await real(self, account_id, mailbox_id)
        if not flagged:
            flagged.append(snapshot.uids[0])
            await self.store_flags(account_id, mailbox_id, UidSet.of([snapshot.uids[0]]),
                                   StoreMode.ADD, ("\\Flagged",))
        return snapshot

    monkeypatch.setattr(SqlMailStore, "snapshot", snapshot_then_store)
    a = await imap_env.client(login=True)
    await a.ok("SELECT INBOX")
    lines = await a.ok("FETCH 1 (FLAGS)")
    assert b"\\Flagged" in lines[-2], lines


async def test_a_change_the_bus_lost_is_read_back(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event bus is best effort (storage/events.py); change ids grow by
    one per change, so a session that sees a jump reads storage again
    rather than miss new mail until some later poll."""
    from storage import events
    from storage.model import ChangeKind, StoreMode, UidSet

    _no_forced_poll(monkeypatch)
    first = await imap_env.deliver(message(f"kept {random.random()}"))
    a = await imap_env.client(login=True)
    await a.ok("SELECT INBOX")
    await a.ok("NOOP")
    real = events.InProcessSubscription._offer

    def losing_new(self, change):  # type: ignore[no-untyped-def]
        if change is None or change.kind is not ChangeKind.NEW:
            real(self, change)

    monkeypatch.setattr(events.InProcessSubscription, "_offer", losing_new)
    await imap_env.deliver(message(f"lost {random.random()}"))
    monkeypatch.setattr(events.InProcessSubscription, "_offer", real)
    mail = imap_env.storage.mail(imap_env.account)
    await mail.store_flags(imap_env.account.id, first.mailbox_id, UidSet.of([first.uid]),
                           StoreMode.ADD, ("\\Seen",))
    lines = await a.ok("NOOP")
    assert b"* 2 EXISTS" in lines, lines

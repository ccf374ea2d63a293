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
    monkeypatch.setattr(
        SqlMailStore,
        method,
        _once(getattr(SqlMailStore, method), StorageError(ErrorKind.TEMPORARY, "storage down")),
    )
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
            await self.store_flags(
                account_id, mailbox_id, UidSet.of([snapshot.uids[0]]), StoreMode.ADD, ("\\Flagged",)
            )
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
    await mail.store_flags(
        imap_env.account.id, first.mailbox_id, UidSet.of([first.uid]), StoreMode.ADD, ("\\Seen",)
    )
    lines = await a.ok("NOOP")
    assert b"* 2 EXISTS" in lines, lines


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The mailbox ids of every ``changes_since`` (a session's re-read) from now on."""
    from storage.sql.mailstore import SqlMailStore

    reads: list[int] = []
    real = SqlMailStore.changes_since

    async def counting(self, account_id, mailbox_id, modseq):  # type: ignore[no-untyped-def]
        reads.append(mailbox_id)
        return await real(self, account_id, mailbox_id, modseq)

    monkeypatch.setattr(SqlMailStore, "changes_since", counting)
    return reads


def _never_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """No forced poll at all (NOOP's first would come at once): only news
    makes a session read storage."""
    from imapd.imap import session

    monkeypatch.setattr(session, "FORCED_POLL_INTERVAL", float("inf"))


def _fetches(lines: list[bytes]) -> list[bytes]:
    """The FETCH responses, less \\Recent (its own test: SEARCH RECENT)."""
    return [re.sub(rb" ?\\Recent", b"", x) for x in lines if b" FETCH (" in x]


async def test_news_from_this_process_is_announced_without_reading_storage(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions of one process on one INBOX (issue #24's churn): another
    session's APPEND is announced from its NEW event, which carries the
    entry and the \\Recent floor its delivery left (RFC 3501 section 2.3.2:
    b's APPEND claimed it, so a sees it without \\Recent); flag changes and
    expunges from their events; and a's own APPEND after all that, still
    caught up, from its own entry. No session reads the mailbox back, and
    what each was told is what a fresh session reads."""
    rng = random.Random()
    _never_poll(monkeypatch)
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    await a.ok("SELECT INBOX")
    await b.ok("SELECT INBOX")
    reads = _count_reads(monkeypatch)
    raws = [
        message(f"churn {i} {rng.random()}", "z" * rng.randint(1, 3000) + "\r\n") for i in range(3)
    ]
    await b.ok(
        b'APPEND INBOX (\\Flagged $Work) "01-Feb-2025 10:20:30 +0100" {%d+}\r\n' % len(raws[0])
        + raws[0]
    )
    await b.ok(b"APPEND INBOX {%d+}\r\n" % len(raws[1]) + raws[1])
    told = await a.ok("NOOP")
    assert b"* 2 EXISTS" in told and b"* 0 RECENT" in told, told
    # RFC 3501 section 7.2.6: $Work is new to a's view, FLAGS come first.
    assert any(x.startswith(b"* FLAGS (") and b"$Work" in x for x in told), told
    await b.ok("UID STORE 2 +FLAGS.SILENT (\\Seen $Later)")
    await b.ok("UID STORE 1 +FLAGS.SILENT (\\Deleted)")
    await b.ok("EXPUNGE")
    told = await a.ok("NOOP")
    assert b"* 1 EXPUNGE" in told, told
    assert any(b"FETCH (FLAGS (" in x and b"$Later" in x for x in told), told
    await a.ok(b"APPEND INBOX {%d+}\r\n" % len(raws[2]) + raws[2])
    await b.ok("NOOP")
    assert reads == [], reads
    fetch = "UID FETCH 1:* (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)"
    ours, theirs = _fetches(await a.ok(fetch)), _fetches(await b.ok(fetch))
    fresh = await imap_env.client(login=True)
    await fresh.ok("EXAMINE INBOX")
    truth = _fetches(await fresh.ok(fetch))
    assert len(truth) == 2 and ours == truth and theirs == truth, (ours, theirs, truth)
    assert [await c.ok("SEARCH RECENT") for c in (a, b)] == [
        [b"* SEARCH 2", b"t" + str(a.n).encode() + b" OK SEARCH completed"],
        [b"* SEARCH 1", b"t" + str(b.n).encode() + b" OK SEARCH completed"],
    ]


async def test_a_change_lost_after_the_view_moved_on_is_read_back(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One STORE on two messages: a session takes the first FLAGS change
    and moves on with it; the second, still queued, is then dropped (a
    full subscription drops its oldest). When the loss shows, the session
    reads from before what it only heard, so the second change reaches
    the client too (RFC 3501 section 7.4.2)."""
    from storage import events
    from storage.model import ChangeKind

    _never_poll(monkeypatch)
    for i in range(2):
        await imap_env.deliver(message(f"pair {i} {random.random()}"))
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    await a.ok("SELECT INBOX")
    await a.ok("FETCH 1:* (FLAGS)")
    await b.ok("SELECT INBOX")
    real = events.InProcessSubscription._offer
    held: list[tuple[events.InProcessSubscription, object]] = []

    def holding(self, change):  # type: ignore[no-untyped-def]
        # a's copy of the change to message 2 waits in the queue.
        if change is not None and change.kind is ChangeKind.FLAGS and change.uid == 2:
            if not any(s is self for s, _ in held):
                held.append((self, change))
                return
        real(self, change)

    monkeypatch.setattr(events.InProcessSubscription, "_offer", holding)
    await b.ok("UID STORE 1:2 +FLAGS.SILENT (\\Answered)")
    monkeypatch.setattr(events.InProcessSubscription, "_offer", real)
    told = await a.ok("NOOP")
    assert any(x.startswith(b"* 1 FETCH (FLAGS (\\Answered") for x in told), told
    assert not any(x.startswith(b"* 2 FETCH") for x in told), told
    for sub, _ in held:
        sub.dropped += 1  # what the queue lost
    await b.ok("UID STORE 1 +FLAGS.SILENT (\\Flagged)")
    told = await a.ok("NOOP")
    assert any(x.startswith(b"* 2 FETCH (FLAGS (\\Answered") for x in told), told

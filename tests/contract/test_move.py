"""Online account moves between shards (issue #19, ``storage/move.py``) on
every SQL backend: what a client synchronised against survives the move,
the fence refuses writes, and a move interrupted at any point ends, when
run again, with the account on exactly one shard and every message there
exactly once."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage import move as mv
from storage.backend import SqlStorage, open_storage_from_url
from storage.errors import ErrorKind, StorageError
from storage.model import DELETED, SEEN, Account, StoreMode, UidSet
from storage.sql.schema import account_moves, mailboxes, moved_ids, shard_accounts
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build, deliver

SOURCE, TARGET = "default", "east"
GRANTEE = 987_654  # an account id keeping /private METADATA on bob's mailboxes
_SECOND_PG: dict[int, str] = {}  # the pg server's id -> its second database


async def second_shard_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database for shard "east": a second SQLite file, or a
    second PostgreSQL database on the test's server (emptied for reuse)."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'east.db'}"
    pg = request.getfixturevalue("pg_server")
    second = _SECOND_PG.get(id(pg.server))
    if second is None:
        second = _SECOND_PG[id(pg.server)] = await pg.server.create_database()
    else:
        await pg.server.reset_database(second)
    return second


@pytest.fixture
async def sharded(
    backend: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[SqlStorage]:
    """Storage with two shards of the test's backend: "default" and "east"
    (a second SQLite file, or a second PostgreSQL database)."""
    second = await second_shard_url(backend, tmp_path, request)
    storage = await open_storage_from_url(
        database_url, tmp_path / "blobs", {TARGET: second}, password_hasher=TEST_HASHER
    )
    try:
        yield storage
    finally:
        await storage.close()


async def _populate(storage: SqlStorage, rng: random.Random) -> Account:
    """An account with some history: messages of random sizes in several
    mailboxes, flags and keywords, copies, expunges, a rename, a deleted
    mailbox and a subscription to a name that is no mailbox."""
    await storage.directory.add_domain("example.org")
    bob = await storage.directory.add_account("bob@example.org", "pw", shard=SOURCE)
    mail = storage.mail(bob)
    await mail.create_mailbox(bob.id, "Work/Projects")
    await mail.create_mailbox(bob.id, "Doomed")
    await mail.set_subscribed(bob.id, "Lists/never-made", True)
    # METADATA of the server and of mailboxes, one of them deleted below.
    for name in ("INBOX", "Work/Projects", "Doomed", None):
        box_id = None if name is None else (await mail.get_mailbox(bob.id, name)).id
        entries = [(f"/private/e{i}", rng.randbytes(rng.randint(0, 99))) for i in range(3)]
        await mail.set_metadata(bob.id, box_id, entries, 100)
        if box_id is not None:  # a grantee's own /private entry (RFC 5464 section 3.3)
            mine = [("/private/grantee", rng.randbytes(rng.randint(1, 99)))]
            await mail.set_metadata(bob.id, box_id, mine, 100, user_id=GRANTEE)
    for i in range(rng.randint(25, 40)):
        box = rng.choice(["INBOX", "INBOX", "Work/Projects", "Sent", "Junk", "Doomed"])
        body = "".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(1, 3000)))
        flags = tuple(rng.sample([SEEN, "\\Flagged", "$Label1", "Project-X"], rng.randint(0, 2)))
        await deliver(storage, bob, box, flags, subject=f"m{i}", body=body)
    # A thread (RFC 5256 REFERENCES, as stored): a root and two replies.
    root = f"<root{rng.randrange(10**9)}@example.net>"
    await deliver(storage, bob, "Work/Projects", message_id=root, subject="plan")
    for box in ("INBOX", "Sent"):
        await deliver(storage, bob, box, in_reply_to=root, subject="Re: plan")
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    work = await mail.get_mailbox(bob.id, "Work/Projects")
    uids = [e.uid for e in await mail.uids(bob.id, inbox.id)]
    await mail.store_flags(bob.id, inbox.id, UidSet.of(uids[:5]), StoreMode.ADD, ["$Important"])
    await mail.copy(bob.id, inbox.id, UidSet.of(uids[5:9]), work.id)
    await mail.store_flags(bob.id, inbox.id, UidSet.of(uids[2:7]), StoreMode.ADD, [DELETED])
    await mail.expunge(bob.id, inbox.id)
    await mail.rename_mailbox(bob.id, "Work", "Office")
    await mail.delete_mailbox(bob.id, "Doomed")
    return bob


async def _snapshot(storage: SqlStorage, account: Account) -> dict[str, Any]:
    """Everything a client may have synchronised, keyed by mailbox name
    (row ids are each shard's own)."""
    mail = storage.mail(account)
    boxes = {}
    names = {}
    threads: dict[int, set[str | None]] = {}
    for box in await mail.list_mailboxes(account.id):
        names[box.id] = box.name
        entries = await mail.uids(account.id, box.id)
        fetched = await mail.fetch(account.id, box.id, UidSet.of([e.uid for e in entries]))
        for m in fetched:
            thread = await mail.thread_of(account.id, m.entry.message_id)
            threads.setdefault(thread or -m.entry.message_id, set()).add(m.parsed.message_id)
        boxes[box.name] = {
            "mailbox": dataclasses.replace(box, id=0),
            "entries": [
                (e.uid, e.flags, e.modseq, e.internal_date, e.size, e.blob_key) for e in entries
            ],
            "bodies": [await storage.blobs.get(m.entry.blob_key) for m in fetched],
            "subjects": [m.parsed.subject for m in fetched],
            # RFC 7162 section 3.2.5.2: QRESYNC from the oldest modseq.
            "vanished": (await mail.changes_since(account.id, box.id, 1)).vanished,
            "status": await mail.status(account.id, box.id),
            "recent": await mail.peek_recent(account.id, box.id),
            "metadata": await mail.metadata(account.id, box.id),
            "grantee_metadata": await mail.metadata(account.id, box.id, GRANTEE),
        }
    changes = [
        (c.id, c.kind, names.get(c.mailbox_id or -1), c.uid, c.modseq, c.data)
        for c in await mail.account_changes(account.id, 0, limit=100_000)
    ]
    return {
        "boxes": boxes,
        "threads": sorted(sorted(map(str, t)) for t in threads.values()),
        "subscriptions": await mail.subscriptions(account.id),
        "server_metadata": await mail.metadata(account.id, None),
        "changes": changes,
        "quota_used": await mail.quota_used(account.id),
        "last_change": await mail.last_change_id(account.id),
    }


async def _rows_of(storage: SqlStorage, shard: str, account_id: int) -> tuple[int, Any]:
    """(mailboxes of the account on ``shard``, its counters row's fence)."""
    db = storage.stores[shard].db
    async with db.read() as conn:
        boxes = (
            await conn.execute(mailboxes.select().where(mailboxes.c.account_id == account_id))
        ).all()
        fence = (
            await conn.execute(
                shard_accounts.select().where(shard_accounts.c.account_id == account_id)
            )
        ).first()
    return len(boxes), None if fence is None else fence.fence


async def _assert_moved(storage: SqlStorage, bob: Account, before: dict[str, Any]) -> None:
    """On the target only, unfenced, everything as before, nothing left over."""
    account = await storage.directory.get_account(bob.address)
    assert account.shard == TARGET
    assert await _snapshot(storage, account) == before
    left, fence = await _rows_of(storage, SOURCE, bob.id)
    assert (left, fence) == (0, f"gone:{TARGET}")
    boxes, fence = await _rows_of(storage, TARGET, bob.id)
    assert boxes == len(before["boxes"]) and fence is None
    async with storage.directory.db.read() as conn:
        assert (await conn.execute(account_moves.select())).all() == []
    async with storage.stores[TARGET].db.read() as conn:
        assert (await conn.execute(moved_ids.select())).all() == []


async def test_move_keeps_what_clients_synchronised(sharded: SqlStorage) -> None:
    rng = random.Random()
    bob = await _populate(sharded, rng)
    before = await _snapshot(sharded, bob)
    seen: list[mv.MoveState] = []
    moved = await mv.move_account(
        sharded, bob.address, TARGET, progress=lambda p: seen.append(p.state)
    )
    assert moved.shard == TARGET
    order = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
    assert order == sorted(order, key=list(mv.MoveState).index)
    assert {mv.MoveState.COPY, mv.MoveState.FENCED, mv.MoveState.FLIPPED} <= set(order)
    await _assert_moved(sharded, bob, before)
    # Sent and Junk keep their RFC 6154 special use on the new shard.
    uses = {b.name: b.special_use for b in await sharded.mail(moved).list_mailboxes(bob.id)}
    assert uses["Sent"] == "\\Sent" and uses["Junk"] == "\\Junk"
    # The moved account works: a new message takes the next UID, modseq
    # and change id after the old ones.
    inbox = before["boxes"]["INBOX"]["mailbox"]
    uid = await deliver(sharded, moved, "INBOX", subject="after the move")
    assert uid == inbox.uidnext
    box = await sharded.mail(moved).get_mailbox(bob.id, "INBOX")
    assert box.highestmodseq == inbox.highestmodseq + 1
    assert await sharded.mail(moved).last_change_id(bob.id) == before["last_change"] + 1
    # Moving it back works the same way (the old shard's tombstone is reused).
    back = await _snapshot(sharded, moved)
    home = await mv.move_account(sharded, bob.address, SOURCE)
    assert home.shard == SOURCE
    assert await _snapshot(sharded, home) == back


async def test_the_fence_refuses_writes_on_the_source(sharded: SqlStorage) -> None:
    bob = await _populate(sharded, random.Random())
    refused: list[ErrorKind] = []

    async def write_now() -> None:
        try:
            await deliver(sharded, bob, "INBOX", subject="during the fence")
        except StorageError as err:
            refused.append(err.kind)

    pending: list[Any] = []

    def at_fence(p: mv.MoveProgress) -> None:
        if p.state is mv.MoveState.FENCED and p.round == 0:
            pending.append(write_now())

    # The progress callback is synchronous: the write runs right after.
    interrupted = _raising_at(at_fence, lambda p: p.state is mv.MoveState.FENCED)
    with pytest.raises(_Killed):
        await mv.move_account(sharded, bob.address, TARGET, progress=interrupted)
    for coro in pending:
        await coro
    assert refused == [ErrorKind.TEMPORARY]
    # A stale route to the source after the move: still temporary, never
    # "no such mailbox" (SMTP would bounce the mail for good).
    await mv.move_account(sharded, bob.address, TARGET)
    raw, parsed = build(subject="stale route")
    key = await sharded.blobs.put(raw)
    with pytest.raises(StorageError) as info:
        await sharded.stores[SOURCE].deliver(bob.id, key, parsed, [("INBOX", (), None)])
    assert info.value.kind is ErrorKind.TEMPORARY
    with pytest.raises(StorageError) as info:
        await sharded.stores[SOURCE].get_mailbox(bob.id, "INBOX")
    assert info.value.kind is ErrorKind.TEMPORARY


class _Killed(Exception):
    """Stands for the mover's death (the SIGKILL case is an integration test)."""


def _raising_at(
    also: Callable[[mv.MoveProgress], None] | None, when: Callable[[mv.MoveProgress], bool]
) -> Callable[[mv.MoveProgress], None]:
    def progress(p: mv.MoveProgress) -> None:
        if also is not None:
            also(p)
        if when(p):
            raise _Killed

    return progress


def _after(obj: Any, name: str, monkeypatch: pytest.MonkeyPatch, calls: int = 1) -> None:
    """Makes ``obj.name`` die right after its ``calls``-th call did its work."""
    real = getattr(obj, name)
    count = [0]

    async def dying(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            raise _Killed
        return result

    monkeypatch.setattr(obj, name, dying)


KILL_POINTS = [
    "before-copy",
    "mid-copy",
    "after-copy-round",
    "mid-catchup",
    "fenced",
    "after-final-round",
    "after-flip",
    "flipped",
    "after-retire",
]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
async def test_an_interrupted_move_resumes(
    sharded: SqlStorage, kill_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random()
    bob = await _populate(sharded, rng)
    monkeypatch.setattr(mv, "BATCH", rng.randint(3, 7))  # several batches per mailbox
    state = mv.MoveState
    when: dict[str, Callable[[mv.MoveProgress], bool]] = {
        "before-copy": lambda p: p.state is state.COPY and p.copied == 0,
        "after-copy-round": lambda p: p.state is state.COPY and p.copied > 0,
        "fenced": lambda p: p.state is state.FENCED and p.round == 0,
        "after-final-round": lambda p: p.state is state.FENCED and p.round == 1,
        "flipped": lambda p: p.state is state.FLIPPED,
    }
    progress = None
    if kill_at in when:
        progress = _raising_at(None, when[kill_at])
    elif kill_at == "mid-copy":
        _after(mv.AccountMove, "_copy_entries", monkeypatch, calls=3)
    elif kill_at == "mid-catchup":
        # Changes between the rounds; the second round dies halfway.
        async def change_then_die(p: mv.MoveProgress) -> None:
            await deliver(sharded, bob, "INBOX", subject="during catch-up")
            inbox = await sharded.mail(bob).get_mailbox(bob.id, "INBOX")
            uids = UidSet.of([e.uid for e in await sharded.mail(bob).uids(bob.id, inbox.id)][:3])
            await sharded.mail(bob).store_flags(bob.id, inbox.id, uids, StoreMode.ADD, [DELETED])
            await sharded.mail(bob).expunge(bob.id, inbox.id)

        pending: list[Any] = []
        progress = lambda p: (  # noqa: E731
            pending.append(change_then_die(p)) if p.state is state.COPY and p.copied else None
        )
        real_round = mv.AccountMove.sync_round
        rounds = [0]

        async def round_then_maybe_die(self: mv.AccountMove) -> int:
            rounds[0] += 1
            if rounds[0] == 2:
                for coro in pending:
                    await coro
                monkeypatch.setattr(mv.AccountMove, "_sync_change_log", _dies)
            return await real_round(self)

        monkeypatch.setattr(mv.AccountMove, "sync_round", round_then_maybe_die)
        monkeypatch.setattr(mv, "SMALL_DELTA", -1)  # a second live round
    elif kill_at == "after-flip":
        _after(sharded.directory, "set_shard", monkeypatch)
    elif kill_at == "after-retire":
        _after(mv.SqlMailStore, "retire_account", monkeypatch)
    with pytest.raises(_Killed):
        await mv.move_account(
            sharded, bob.address, TARGET, progress=progress, small_delta=mv.SMALL_DELTA
        )
    monkeypatch.undo()
    # Whatever the point, the directory names one shard, and it holds the mail.
    account = await sharded.directory.get_account(bob.address)
    assert account.shard in (SOURCE, TARGET)
    before = await _snapshot(sharded, account)
    await mv.move_account(sharded, bob.address, TARGET)
    await _assert_moved(sharded, bob, before)


async def _dies(*_args: Any) -> int:
    raise _Killed


async def test_abort_rolls_back_before_the_flip(sharded: SqlStorage) -> None:
    bob = await _populate(sharded, random.Random())
    before = await _snapshot(sharded, bob)
    kill = _raising_at(None, lambda p: p.state is mv.MoveState.FENCED)
    with pytest.raises(_Killed):
        await mv.move_account(sharded, bob.address, TARGET, progress=kill)
    with pytest.raises(StorageError) as info:
        await mv.move_account(sharded, bob.address, "default")
    assert info.value.kind is ErrorKind.INVALID  # another target is recorded
    assert await mv.abort_move(sharded, bob.address)
    assert (await sharded.directory.get_account(bob.address)).shard == SOURCE
    assert await _snapshot(sharded, bob) == before
    assert await _rows_of(sharded, TARGET, bob.id) == (0, None)
    # Unfenced: the account takes mail again.
    await deliver(sharded, bob, "INBOX", subject="after the abort")
    assert not await mv.abort_move(sharded, bob.address)


async def test_drain_moves_every_account_off_a_shard(sharded: SqlStorage) -> None:
    await sharded.directory.add_domain("example.org")
    made = []
    for name in ("ann", "cid", "dee"):
        account = await sharded.directory.add_account(f"{name}@example.org", "pw", shard=SOURCE)
        await deliver(sharded, account, "INBOX", subject=f"for {name}")
        made.append((account, await _snapshot(sharded, account)))
    moved = await mv.drain_shard(sharded, SOURCE)
    assert sorted(moved) == sorted(a.address for a, _ in made)
    for account, before in made:
        now = await sharded.directory.get_account(account.address)
        assert now.shard == TARGET
        assert await _snapshot(sharded, now) == before


class _ApiContext:
    """What ``httpapi.realtime.ChangeFeed`` uses of the API's context."""

    def __init__(self, storage: SqlStorage) -> None:
        self.storage = storage

    def note_change(self, account_id: int, change_id: int) -> None:
        pass


async def test_an_event_feed_follows_the_account_to_its_new_shard(sharded: SqlStorage) -> None:
    """A WebSocket or long-poll client resumes by change id (``since=``):
    ids go on across the move, and an open feed reads the new shard."""
    from httpapi.realtime import ChangeFeed

    bob = await _populate(sharded, random.Random())
    last = await sharded.mail(bob).last_change_id(bob.id)
    feed = ChangeFeed(_ApiContext(sharded), bob, last)  # type: ignore[arg-type]
    try:
        await mv.move_account(sharded, bob.address, TARGET)
        uid = await deliver(sharded, bob, "INBOX", subject="after the move")
        changes = await feed.next_batch(timeout=5)
    finally:
        feed.close()
    assert [(c.id, c.kind.value, c.uid) for c in changes] == [(last + 1, "new", uid)]


async def test_recent_claimed_between_rounds_moves_too(sharded: SqlStorage) -> None:
    """RFC 3501 section 2.3.2: a message is \\Recent in one session only; a
    claim changes no modseq, yet the next round must carry it."""
    bob = await _populate(sharded, random.Random())
    kill = _raising_at(None, lambda p: p.state is mv.MoveState.COPY and p.copied > 0)
    with pytest.raises(_Killed):
        await mv.move_account(sharded, bob.address, TARGET, progress=kill)
    inbox = await sharded.mail(bob).get_mailbox(bob.id, "INBOX")
    assert await sharded.mail(bob).peek_recent(bob.id, inbox.id) > 0
    await sharded.mail(bob).claim_recent(bob.id, inbox.id)
    before = await _snapshot(sharded, bob)
    await mv.move_account(sharded, bob.address, TARGET)
    await _assert_moved(sharded, bob, before)


@pytest.mark.parametrize("backend", ["postgres"])  # row locks: SQLite has a single writer
async def test_retiring_the_source_waits_for_a_writer_instead_of_deadlocking(
    sharded: SqlStorage, database_url: str
) -> None:
    """Every writer locks the account's counters row first, then its
    mailbox rows (a delivery's foreign keys take KEY SHARE on them). The
    move's last step must take them in the same order: deleting the mail
    first and fencing the counters row after deadlocked with a delivery
    that arrived meanwhile (the cluster drill under SMTP load: "deadlock
    detected", and the move failed)."""
    await sharded.directory.add_domain("example.org")
    bob = await sharded.directory.add_account("bob@example.org", "pw", shard=SOURCE)
    await deliver(sharded, bob, "INBOX", subject="before")
    source = sharded._store(SOURCE)
    dsn = database_url.replace("postgresql+asyncpg", "postgresql")
    writer, watcher = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        tx = writer.transaction()
        await tx.start()
        # A delivery's first statement: the counters row, FOR UPDATE.
        await writer.execute(
            "SELECT 1 FROM shard_accounts WHERE account_id = $1 FOR UPDATE", bob.id
        )
        retire = asyncio.create_task(source.retire_account(bob.id, f"gone:{TARGET}"))
        for _ in range(200):  # until the retirement waits for that lock
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting, "the retirement never waited for the writer's lock"
        # The delivery goes on: its entry's foreign key locks the mailbox row.
        await writer.execute("SELECT 1 FROM mailboxes WHERE account_id = $1 FOR KEY SHARE", bob.id)
        await tx.commit()
        await asyncio.wait_for(retire, 30)
        fence = await watcher.fetchval(
            "SELECT fence FROM shard_accounts WHERE account_id = $1", bob.id
        )
        left = await watcher.fetchval(
            "SELECT count(*) FROM mailboxes WHERE account_id = $1", bob.id
        )
    finally:
        await writer.close()
        await watcher.close()
    assert (fence, left) == (f"gone:{TARGET}", 0)



async def test_a_round_ends_while_mail_keeps_arriving(
    sharded: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mail that arrives faster than a round copies it must wait for the
    next round: each round stops at the modseq it started with. Here every
    batch the mover copies brings more new messages than the batch holds,
    so a round that paged on after its start would never end (the cluster
    drill's move under steady SMTP load ran past five minutes)."""
    rng = random.Random()
    bob = await _populate(sharded, rng)
    monkeypatch.setattr(mv, "BATCH", 2)
    copy_entries = mv.AccountMove._copy_entries
    acked: list[str] = []

    async def copy_while_mail_arrives(self: Any, target_id: int, rows: Any) -> None:
        for _ in range(3):
            subject = f"arrived {len(acked)}"
            try:
                await deliver(sharded, bob, "INBOX", subject=subject)
            except StorageError as exc:
                assert exc.kind is ErrorKind.TEMPORARY  # fenced: the sender retries
            else:
                acked.append(subject)
        await copy_entries(self, target_id, rows)

    monkeypatch.setattr(mv.AccountMove, "_copy_entries", copy_while_mail_arrives)
    rounds: list[mv.MoveProgress] = []
    moved = await asyncio.wait_for(
        mv.move_account(sharded, bob.address, TARGET, progress=rounds.append, small_delta=10),
        60,
    )
    monkeypatch.setattr(mv.AccountMove, "_copy_entries", copy_entries)
    assert moved.shard == TARGET and acked
    # Here each batch copied brings more mail than it held: the live rounds
    # end with the first that copied no less than the one before (not after
    # MAX_LIVE_ROUNDS rounds, each longer than the last).
    copied = [p.copied for p in rounds if p.state is not mv.MoveState.FENCED and p.copied]
    assert 2 <= len(copied) < mv.MAX_LIVE_ROUNDS, copied
    assert copied[-1] >= copied[-2], copied
    assert all(a > b for a, b in itertools.pairwise(copied[:-1])), copied
    mail = sharded.mail(moved)
    inbox = await mail.get_mailbox(bob.id, "INBOX")
    entries = await mail.uids(bob.id, inbox.id)
    fetched = await mail.fetch(bob.id, inbox.id, UidSet.of([e.uid for e in entries]))
    subjects = [m.parsed.subject for m in fetched if m.parsed.subject.startswith("arrived ")]
    assert sorted(subjects) == sorted(acked)  # each acknowledged message there exactly once

"""Online moves of an account from one shard to another (issue #19).

A move keeps everything a client has synchronised against: mailboxes with
their UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ and \\Recent floor, entries with
their UIDs, flags, keywords and modseqs, expunge tombstones (RFC 7162
QRESYNC VANISHED from an old modseq), subscriptions, sender lists, special-use
attributes, and the change log with its ids (HTTP ``since=``). Row ids of
mailboxes and messages are the target database's own; the id map lives in
``moved_ids`` on the target until the move ends.

States, recorded in the directory's ``account_moves`` row::

    (none) -> copy -> catchup -> fenced -> flipped -> (row deleted)

* copy, catchup: rounds of :meth:`AccountMove.sync_round` copy what changed
  on the source since the last round (by modseq per mailbox, by id for the
  change log), in batches, while the account stays live on the source; the
  target's counters row is fenced ("in:<source>") so nothing else writes
  there. Rounds repeat until one finds little to copy.
* fenced: the source's counters row is fenced ("out:<target>"): every write
  of the account there now fails TEMPORARY (SMTP 451, IMAP NO [UNAVAILABLE],
  POP3 -ERR [SYS/TEMP], HTTP 503) and a FENCE event ends the account's IMAP
  sessions on every instance. One last round copies the rest exactly.
* flipped: the directory names the target (``Directory.set_shard``, one
  row: the account is never on two shards or none); the target is
  unfenced, the source's mail deleted, its counters row kept as a fenced
  tombstone ("gone:<target>") so a stale route retries instead of writing.

Every step is idempotent and the state is read back at start, so running
the same move again after a crash (SIGKILL) resumes it; :func:`abort_move`
rolls back one that has not flipped. Run one mover per account at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, exists, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from storage import errors
from storage.api import BlobStore
from storage.blob import deleting, gc
from storage.model import Account, Change, ChangeKind
from storage.sql.acl import copy_acl, delete_mailbox_acl
from storage.sql.mailstore import SqlMailStore, delete_account_mail
from storage.sql.metadata import copy_metadata, delete_mailbox_metadata
from storage.sql.schema import (
    account_moves,
    change_log,
    expunged,
    mailboxes,
    messages,
    moved_ids,
    shard_accounts,
    subscriptions,
)
from storage.sql.schema import mailbox_entries as E
from storage.sql.spampolicy import copy_spam_policy

if TYPE_CHECKING:
    from storage.backend import SqlStorage

BATCH = 2000  # entries (and their messages) copied per target transaction
IN_CLAUSE = 500  # ids per IN (...) list
SMALL_DELTA = 200  # a round that copies at most this many rows ends the live rounds
MAX_LIVE_ROUNDS = 10  # then fence anyway: the final round is exact whatever the rate
BLOB_COPIES = 8  # blobs copied at once when the shards' blob stores differ
# Tries of a batch whose blobs the target's garbage collection was deleting.
RESTORE_ATTEMPTS = 3
LEASE_SECONDS = 15.0  # a killed mover's lease lapses after this; a live one renews it


class MoveState(enum.Enum):
    COPY = "copy"
    CATCHUP = "catchup"
    FENCED = "fenced"
    FLIPPED = "flipped"


@dataclass(frozen=True)
class MoveProgress:
    """What a move is doing, for a progress display: ``state`` entered or
    still running, the round number and rows copied by the last round."""

    address: str
    state: MoveState
    round: int = 0
    copied: int = 0


Progress = Callable[[MoveProgress], None]


def _chunks(items: Sequence[Any], size: int = IN_CLAUSE) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_ENTRY_COPY = tuple(c for c in E.c if c.name != "mailbox_id")
_MESSAGE_COPY = tuple(c for c in messages.c if c.name not in ("id", "thread_id"))


async def _allocate_message_ids(conn: AsyncConnection, count: int) -> list[int]:
    """``count`` new ``messages`` ids in one statement, for a batch insert
    with explicit ids (one INSERT per row would be one round trip each).
    PostgreSQL: from the table's sequence. SQLite: above the highest id
    ever used (``sqlite_sequence``, which the insert then raises); the
    caller's write transaction holds the database's write lock."""
    if conn.dialect.name == "postgresql":
        rows = await conn.execute(
            text(
                "SELECT nextval(pg_get_serial_sequence('messages', 'id')) "
                "FROM generate_series(1, :n)"
            ),
            {"n": count},
        )
        return sorted(int(r[0]) for r in rows)
    top = (
        await conn.execute(
            text(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),"
                " coalesce((SELECT max(id) FROM messages), 0))"
            )
        )
    ).scalar()
    return list(range(int(top) + 1, int(top) + 1 + count))


async def _copy_blob(src: BlobStore, dst: BlobStore, key: str) -> None:
    """Copies one blob; a blob kept as a file is streamed, never read whole.
    TEMPORARY if the bytes read do not hash to ``key`` (the store's key is
    the content's SHA-256): nothing is written on the target's rows then."""
    path = getattr(src, "path", None)
    try:
        copied = await dst.put_file(path(key)) if path is not None else None
    except FileNotFoundError:  # packed, not a file
        copied = None
    if copied is None:
        copied = await dst.put(await src.get(key))
    if copied != key:
        raise errors.StorageError(
            errors.ErrorKind.TEMPORARY, f"blob {key} read back with another digest: not moved"
        )


class AccountMove:
    """One account's copy from ``source`` to ``target`` (SQL mail stores).

    :meth:`sync_round` is safe to repeat and to interrupt anywhere: each
    target transaction writes rows together with their ``moved_ids``."""

    def __init__(self, account_id: int, source: SqlMailStore, target: SqlMailStore) -> None:
        self.account_id = account_id
        self.source = source
        self.target = target

    # --- the target before and after ----------------------------------------

    async def reset_target(self) -> None:
        """Empties whatever an earlier, abandoned move left of the account on
        the target and fences its counters row there."""
        aid = self.account_id
        async with self.target.db.write() as conn:
            await delete_account_mail(conn, aid)
            await conn.execute(delete(moved_ids).where(moved_ids.c.account_id == aid))
            await conn.execute(delete(shard_accounts).where(shard_accounts.c.account_id == aid))
            await self._fence_row(conn, f"in:{self.source.shard}")

    async def set_fence(self, store: SqlMailStore, fence: str | None) -> None:
        """Sets the fence on ``store``'s counters row of the account. On
        PostgreSQL the UPDATE waits for any write holding the row, and every
        later write reads the new value when it locks the row."""
        async with store.db.write() as conn:
            await self._fence_row(conn, fence)

    async def _fence_row(self, conn: AsyncConnection, fence: str | None) -> None:
        result = await conn.execute(
            update(shard_accounts)
            .where(shard_accounts.c.account_id == self.account_id)
            .values(fence=fence)
        )
        if not result.rowcount and fence is not None:
            # No counters row yet: a write would start one, unfenced.
            await conn.execute(
                insert(shard_accounts).values(
                    account_id=self.account_id,
                    last_change_id=0,
                    next_uidvalidity=0,
                    used_bytes=0,
                    fence=fence,
                )
            )

    async def finish_target(self) -> None:
        """Unfences the target and forgets the id map."""
        aid = self.account_id
        async with self.target.db.write() as conn:
            await conn.execute(delete(moved_ids).where(moved_ids.c.account_id == aid))
            await conn.execute(
                update(shard_accounts).where(shard_accounts.c.account_id == aid).values(fence=None)
            )

    # --- one round ---------------------------------------------------------------

    async def sync_round(self) -> int:
        """Copies what changed on the source since the last round; returns
        the number of rows copied or removed (0: the target is up to date)."""
        aid = self.account_id
        async with self.source.db.read() as conn:
            src_boxes = (
                await conn.execute(select(mailboxes).where(mailboxes.c.account_id == aid))
            ).all()
        box_map, copied, dropped = await self._sync_mailbox_rows(src_boxes)
        async with self.target.db.read() as conn:
            synced = {
                r.id: r
                for r in await conn.execute(select(mailboxes).where(mailboxes.c.account_id == aid))
            }
        for box in src_boxes:
            n, removed = await self._sync_mailbox(box, synced[box_map[box.id]])
            copied += n
            dropped = dropped or removed
        if dropped:
            await self._drop_orphans()
        copied += await self._sync_change_log(box_map)
        await self._sync_account_rows()
        return copied

    async def _sync_mailbox_rows(
        self, src_boxes: Sequence[Any]
    ) -> tuple[dict[int, int], int, bool]:
        """Creates, renames and deletes target mailboxes to match the source
        (counters of a new one start at modseq 0: nothing synced yet).
        Returns (source id -> target id, rows changed, whether any went)."""
        aid = self.account_id
        changed = 0
        async with self.target.db.write() as conn:
            box_map = await self._id_map(conn, "mailbox")
            have = {
                r.id: r.name
                for r in await conn.execute(
                    select(mailboxes.c.id, mailboxes.c.name).where(mailboxes.c.account_id == aid)
                )
            }
            live = {b.id for b in src_boxes}
            gone = [t for s, t in box_map.items() if s not in live and t in have]
            for tgt in gone:
                await delete_mailbox_metadata(conn, tgt)
                await delete_mailbox_acl(conn, tgt)
                await conn.execute(delete(E).where(E.c.mailbox_id == tgt))
                await conn.execute(delete(expunged).where(expunged.c.mailbox_id == tgt))
                await conn.execute(delete(mailboxes).where(mailboxes.c.id == tgt))
            renamed = [
                b for b in src_boxes if b.id in box_map and have.get(box_map[b.id]) != b.name
            ]
            # Two steps, so that names swapped between mailboxes never collide.
            for b in renamed:
                await self._rename(conn, box_map[b.id], f"{b.name}\x00{b.id}")
            for b in src_boxes:
                if b.id not in box_map:
                    box_map[b.id] = await self._new_mailbox(conn, b)
                    changed += 1
            for b in renamed:
                await self._rename(conn, box_map[b.id], b.name)
            await conn.execute(delete(subscriptions).where(subscriptions.c.account_id == aid))
            async with self.source.db.read() as src:
                names = (
                    await src.execute(
                        select(subscriptions.c.name).where(subscriptions.c.account_id == aid)
                    )
                ).all()
            if names:
                await conn.execute(
                    insert(subscriptions), [{"account_id": aid, "name": n[0]} for n in names]
                )
            async with self.source.db.read() as src:
                await copy_spam_policy(src, conn, aid)
                await copy_metadata(src, conn, aid, box_map)
                await copy_acl(src, conn, aid, box_map)
        return box_map, changed + len(gone) + len(renamed), bool(gone)

    @staticmethod
    async def _rename(conn: AsyncConnection, mailbox_id: int, name: str) -> None:
        await conn.execute(update(mailboxes).where(mailboxes.c.id == mailbox_id).values(name=name))

    async def _new_mailbox(self, conn: AsyncConnection, box: Any) -> int:
        values = {c.name: getattr(box, c.name) for c in mailboxes.c if c.name != "id"}
        values["highestmodseq"] = 0  # nothing copied yet: see _sync_mailbox
        result = await conn.execute(insert(mailboxes).values(**values))
        target_id = int(result.inserted_primary_key[0])
        await self._map(conn, "mailbox", [(box.id, target_id)])
        return target_id

    async def _id_map(
        self, conn: AsyncConnection, kind: str, sources: Sequence[int] | None = None
    ) -> dict[int, int]:
        stmt = select(moved_ids.c.source_id, moved_ids.c.target_id).where(
            moved_ids.c.account_id == self.account_id, moved_ids.c.kind == kind
        )
        if sources is None:
            return dict((await conn.execute(stmt)).all())
        found: dict[int, int] = {}
        for chunk in _chunks(sources):
            found.update((await conn.execute(stmt.where(moved_ids.c.source_id.in_(chunk)))).all())
        return found

    async def _map(
        self, conn: AsyncConnection, kind: str, pairs: Sequence[tuple[int, int]]
    ) -> None:
        if pairs:
            await conn.execute(
                insert(moved_ids),
                [
                    {"account_id": self.account_id, "kind": kind, "source_id": s, "target_id": t}
                    for s, t in pairs
                ],
            )

    async def _sync_mailbox(self, box: Any, target: Any) -> tuple[int, bool]:
        """Copies the entries and tombstones of one mailbox whose modseq is
        above the ``target`` mailbox row's HIGHESTMODSEQ (only raised once
        the whole pass is in), then its counters as read at the round's start:
        anything changed since has a higher modseq for the next round.
        Returns (rows copied, whether entries were removed)."""
        counters = ("highestmodseq", "uidnext", "recent_floor")
        if all(getattr(box, c) == getattr(target, c) for c in counters):
            return 0, False  # (a \Recent claim moves the floor, not the modseq)
        target_id, synced = target.id, target.highestmodseq
        # Bounded by the modseq read at the round's start: without the bound
        # a round paged on through the messages that kept arriving, and a
        # move under steady delivery never ended its first round.
        upto = box.highestmodseq
        copied = 0
        after_uid = 0
        while True:
            async with self.source.db.read() as conn:
                rows = (
                    await conn.execute(
                        select(*_ENTRY_COPY)
                        .where(
                            E.c.mailbox_id == box.id,
                            E.c.modseq > synced,
                            E.c.modseq <= upto,
                            E.c.uid > after_uid,
                        )
                        .order_by(E.c.uid)
                        .limit(BATCH)
                    )
                ).all()
            if not rows:
                break
            await self._copy_entries(target_id, rows)
            copied += len(rows)
            after_uid = rows[-1].uid
        async with self.source.db.read() as conn:
            tombs = (
                await conn.execute(
                    select(expunged.c.uid, expunged.c.modseq).where(
                        expunged.c.mailbox_id == box.id,
                        expunged.c.modseq > synced,
                        expunged.c.modseq <= upto,
                    )
                )
            ).all()
        async with self.target.db.write() as conn:
            await conn.execute(
                delete(expunged).where(
                    expunged.c.mailbox_id == target_id, expunged.c.modseq > synced
                )
            )
            uids = [t.uid for t in tombs]
            for chunk in _chunks(uids):
                await conn.execute(delete(E).where(E.c.mailbox_id == target_id, E.c.uid.in_(chunk)))
            if tombs:
                await conn.execute(
                    insert(expunged),
                    [{"mailbox_id": target_id, "uid": t.uid, "modseq": t.modseq} for t in tombs],
                )
            await conn.execute(
                update(mailboxes)
                .where(mailboxes.c.id == target_id)
                .values(
                    uidnext=box.uidnext,
                    highestmodseq=box.highestmodseq,
                    recent_floor=box.recent_floor,
                    special_use=box.special_use,
                )
            )
        return copied + len(tombs), bool(tombs)

    async def _copy_entries(self, target_id: int, rows: Sequence[Any]) -> None:
        """Writes one batch of source entries into the target mailbox, with
        the message rows (and blobs) they need that are not there yet."""
        source_ids = sorted({r.message_id for r in rows})
        async with self.target.db.read() as conn:
            known = await self._id_map(conn, "message", source_ids)
        missing = [m for m in source_ids if m not in known]
        found: list[Any] = []
        if missing:
            async with self.source.db.read() as conn:
                for chunk in _chunks(missing):
                    found.extend(
                        await conn.execute(
                            select(messages.c.id, messages.c.thread_id, *_MESSAGE_COPY).where(
                                messages.c.id.in_(chunk)
                            )
                        )
                    )
        keys = {m.blob_key for m in found}
        answered = 0
        for attempt in range(1, RESTORE_ATTEMPTS + 1):
            await self._copy_blobs(keys, again=attempt > 1)
            try:
                await self._write_entries(target_id, rows, found, known, keys, answered)
                return
            except errors.BlobsBeingDeleted as err:
                if attempt == RESTORE_ATTEMPTS:
                    raise
                # The target's garbage collection deletes (or deleted) one:
                # once that is over, copy them again (storage/blob/deleting.py).
                await deleting.wait_done(self.target.db, err.keys)
                answered = err.last_id

    async def _write_entries(
        self,
        target_id: int,
        rows: Sequence[Any],
        found: Sequence[Any],
        known: dict[int, int],
        keys: set[str],
        answered: int,
    ) -> None:
        """One target transaction of :meth:`_copy_entries`: the message rows
        ``found`` (their blobs ``keys`` copied already), then the entries."""
        named = await self._named_blobs(keys)
        async with self.target.db.write() as conn:
            known.update(await self._insert_messages(conn, found))
            if keys and self.source.blobs is not self.target.blobs:
                await deleting.check(conn, named, answered)
            for chunk in _chunks([r.uid for r in rows]):
                await conn.execute(delete(E).where(E.c.mailbox_id == target_id, E.c.uid.in_(chunk)))
            await conn.execute(
                insert(E),
                [
                    {
                        **r._asdict(),
                        "mailbox_id": target_id,
                        "message_id": known[r.message_id],
                    }
                    for r in rows
                    if r.message_id in known  # else deleted from the source meanwhile
                ],
            )

    async def _insert_messages(self, conn: AsyncConnection, found: Sequence[Any]) -> dict[int, int]:
        """Inserts source message rows into the target; returns source id ->
        target id. Each keeps its thread: the target id of the first copied
        message of its source thread (which starts the thread if new)."""
        if not found:
            return {}
        threads = await self._id_map(conn, "thread", sorted({m.thread_id for m in found}))
        new_ids = await _allocate_message_ids(conn, len(found))
        values = []
        new_threads: list[tuple[int, int]] = []
        for row, new in zip(found, new_ids, strict=True):
            if row.thread_id is not None and row.thread_id not in threads:
                threads[row.thread_id] = new
                new_threads.append((row.thread_id, new))
            values.append(
                {
                    **{c.name: getattr(row, c.name) for c in _MESSAGE_COPY},
                    "id": new,
                    "thread_id": threads.get(row.thread_id, new),
                }
            )
        await conn.execute(insert(messages), values)
        pairs = [(row.id, new) for row, new in zip(found, new_ids, strict=True)]
        await self._map(conn, "message", pairs)
        await self._map(conn, "thread", new_threads)
        return dict(pairs)

    async def _copy_blobs(self, keys: set[str], again: bool = False) -> None:
        """Blobs are content-addressed: only copied when the target's blob
        store is not the source's, and only those it lacks (``again``:
        all, after garbage collection deleted some). Each copy is
        durable, and its SHA-256 checked against its key, before the
        message rows naming it are written on the target."""
        src, dst = self.source.blobs, self.target.blobs
        if src is dst or src is None or dst is None or not keys:
            return
        gate = asyncio.Semaphore(BLOB_COPIES)

        async def one(key: str) -> None:
            async with gate:
                if again or not await dst.exists(key):
                    await _copy_blob(src, dst, key)

        await asyncio.gather(*(one(k) for k in sorted(keys)))

    async def _named_blobs(self, keys: set[str]) -> set[str] | None:
        """``keys`` and the parts they refer to in the target's blob store:
        what the target's new rows name (None: not known, any deletion
        counts, ``storage/blob/deleting.py``)."""
        dst = self.target.blobs
        references = getattr(dst, "references", None)
        if references is None:
            return set(keys)
        parts_of = getattr(dst, "parts_of", None)
        named = set(keys)
        for key in keys:
            parts = parts_of(key) if parts_of is not None else None  # copied here: known
            if parts is None:
                try:
                    parts = await references(key)
                except errors.StorageError:
                    return None
            named |= parts
        return named

    async def target_blob_keys(self) -> set[str]:
        """The blob keys of the account's messages on the target."""
        async with self.target.db.read() as conn:
            rows = await conn.execute(
                select(messages.c.blob_key).where(messages.c.account_id == self.account_id)
            )
            return {r[0] for r in rows}

    async def _drop_orphans(self) -> None:
        """Target message rows no entry names any more (expunged at the
        source between rounds), with their ids in the map."""
        aid = self.account_id
        orphan = select(messages.c.id).where(
            messages.c.account_id == aid, ~exists().where(E.c.message_id == messages.c.id)
        )
        async with self.target.db.write() as conn:
            ids = [r[0] for r in await conn.execute(orphan)]
            for chunk in _chunks(ids):
                await conn.execute(
                    delete(moved_ids).where(
                        moved_ids.c.account_id == aid,
                        moved_ids.c.kind == "message",
                        moved_ids.c.target_id.in_(chunk),
                    )
                )
                await conn.execute(delete(messages).where(messages.c.id.in_(chunk)))

    async def _last_change_id(self, store: SqlMailStore) -> int:
        """The account's highest change-log id on ``store`` (0: none)."""
        async with store.db.read() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.coalesce(func.max(change_log.c.id), 0)).where(
                            change_log.c.account_id == self.account_id
                        )
                    )
                ).scalar()
                or 0
            )

    async def _sync_change_log(self, box_map: dict[int, int]) -> int:
        """Appends the source's change-log rows the target lacks, same ids
        (a client resumes with ``since=<id>``), mailbox ids mapped."""
        aid = self.account_id
        copied = 0
        # Up to the source's last id as the round finds it, for the reason
        # _sync_mailbox stops at the modseq it started with.
        upto = await self._last_change_id(self.source)
        while True:
            top = await self._last_change_id(self.target)
            async with self.source.db.read() as conn:
                rows = (
                    await conn.execute(
                        select(change_log)
                        .where(
                            change_log.c.account_id == aid,
                            change_log.c.id > top,
                            change_log.c.id <= upto,
                        )
                        .order_by(change_log.c.id)
                        .limit(BATCH)
                    )
                ).all()
            if not rows:
                return copied
            values = [
                {**r._asdict(), "mailbox_id": box_map.get(r.mailbox_id)}
                if r.mailbox_id is not None
                else r._asdict()
                for r in rows
            ]
            async with self.target.db.write() as conn:
                await conn.execute(insert(change_log), values)
            copied += len(rows)

    async def _sync_account_rows(self) -> None:
        """The account's counters (change ids, next UIDVALIDITY, quota and
        usage), the target's fence left as it is."""
        aid = self.account_id
        async with self.source.db.read() as conn:
            row = (
                await conn.execute(select(shard_accounts).where(shard_accounts.c.account_id == aid))
            ).one()
        async with self.target.db.write() as conn:
            await conn.execute(
                update(shard_accounts)
                .where(shard_accounts.c.account_id == aid)
                .values(
                    last_change_id=row.last_change_id,
                    next_uidvalidity=row.next_uidvalidity,
                    quota_bytes=row.quota_bytes,
                    used_bytes=row.used_bytes,
                )
            )


# --- the move as a whole -------------------------------------------------------------


async def _record(storage: SqlStorage, account_id: int) -> Any:
    async with storage.directory.db.read() as conn:
        return (
            await conn.execute(
                select(account_moves).where(account_moves.c.account_id == account_id)
            )
        ).first()


async def _set_state(storage: SqlStorage, account_id: int, state: MoveState) -> float:
    """Records the move's new state; returns when (``updated_at``)."""
    now = time.time()
    async with storage.directory.db.write() as conn:
        await conn.execute(
            update(account_moves)
            .where(account_moves.c.account_id == account_id)
            .values(state=state.value, updated_at=now)
        )
    return now


async def _forget(storage: SqlStorage, account_id: int) -> None:
    async with storage.directory.db.write() as conn:
        await conn.execute(delete(account_moves).where(account_moves.c.account_id == account_id))


async def _begin(storage: SqlStorage, account: Account, target: str) -> Any:
    """A new move record (state copy) after the target is emptied and fenced."""
    if target not in storage.stores:
        raise errors.invalid(f"no such shard {target!r}")
    mover = AccountMove(account.id, storage.stores[account.shard], storage.stores[target])
    await mover.reset_target()
    now = time.time()
    async with storage.directory.db.write() as conn:
        await conn.execute(
            insert(account_moves).values(
                account_id=account.id,
                source=account.shard,
                target=target,
                state=MoveState.COPY.value,
                started_at=now,
                updated_at=now,
            )
        )
    return await _record(storage, account.id)


@asynccontextmanager
async def _lease(storage: SqlStorage, address: str) -> AsyncIterator[None]:
    """Holds the account's mover lease (``MailStore.acquire_lock`` on the
    move's source shard, renewed while held) so that two movers never run
    the same move. A killed mover's lease lapses after LEASE_SECONDS; a
    second mover waits that long for it, then gives up (IN_USE)."""
    account = await storage.directory.get_account(address)
    rec = await _record(storage, account.id)
    store = storage.stores.get(rec.source if rec is not None else account.shard)
    if store is None:
        raise errors.StorageError(errors.ErrorKind.TEMPORARY, "the account's shard is not here")
    name = f"account-move:{account.id}"
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    deadline = time.monotonic() + LEASE_SECONDS + 2
    while not await store.acquire_lock(name, owner, LEASE_SECONDS):
        if time.monotonic() > deadline:
            raise errors.StorageError(
                errors.ErrorKind.IN_USE, f"another mover is moving {account.address}"
            )
        await asyncio.sleep(0.5)

    async def renew() -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            with contextlib.suppress(errors.StorageError):
                await store.acquire_lock(name, owner, LEASE_SECONDS)

    renewer = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewer.cancel()
        with contextlib.suppress(errors.StorageError, asyncio.CancelledError):
            await store.release_lock(name, owner)


async def _announce_fence(storage: SqlStorage, account_id: int, target: str) -> None:
    """Tells every instance's sessions on the account to end (FENCE)."""
    await storage.events.publish(
        Change(
            id=0,
            account_id=account_id,
            kind=ChangeKind.FENCE,
            mailbox_id=None,
            uid=None,
            modseq=None,
            at=dt.datetime.now(dt.UTC),
            data={"shard": target},
        )
    )


def _report(
    progress: Progress | None, address: str, state: MoveState, rnd: int = 0, n: int = 0
) -> None:
    if progress is not None:
        progress(MoveProgress(address, state, rnd, n))


async def move_account(
    storage: SqlStorage,
    address: str,
    target: str,
    *,
    progress: Progress | None = None,
    small_delta: int = SMALL_DELTA,
    max_live_rounds: int = MAX_LIVE_ROUNDS,
) -> Account:
    """Moves the account at ``address`` to shard ``target`` online, or
    resumes its interrupted move there; returns the account as it ends.

    INVALID for an unknown shard, or while a move of the account to another
    shard is recorded (finish or abort that one first); IN_USE while
    another mover runs it. Storage failures raise (TEMPORARY): running it
    again resumes where it stopped."""
    async with _lease(storage, address):
        return await _move(storage, address, target, progress, small_delta, max_live_rounds)


async def _move(
    storage: SqlStorage,
    address: str,
    target: str,
    progress: Progress | None,
    small_delta: int,
    max_live_rounds: int,
) -> Account:
    account = await storage.directory.get_account(address)
    rec = await _record(storage, account.id)
    if rec is None:
        if account.shard == target:
            return account
        rec = await _begin(storage, account, target)
    elif rec.target != target:
        raise errors.invalid(f"a move of {address} to shard {rec.target!r} is in progress")
    state = MoveState(rec.state)
    mover = AccountMove(account.id, storage.stores[rec.source], storage.stores[rec.target])
    if state in (MoveState.COPY, MoveState.CATCHUP):
        rnd = 0
        before: int | None = None
        while True:
            rnd += 1
            _report(progress, address, state, rnd)
            copied = await mover.sync_round()
            _report(progress, address, state, rnd, copied)
            if state is MoveState.COPY:
                state = MoveState.CATCHUP
                await _set_state(storage, account.id, state)
            # A round that copied no less than the one before is not catching
            # up (mail arrives faster than it is copied, as on a loaded host):
            # more live rounds would only grow, so fence now and let the
            # exact round copy the rest.
            converging = before is None or copied < before
            if copied <= small_delta or rnd >= max_live_rounds or not converging:
                break
            before = copied
        await mover.set_fence(mover.source, f"out:{rec.target}")
        state = MoveState.FENCED
        await _set_state(storage, account.id, state)
    if state is MoveState.FENCED:
        _report(progress, address, state)
        await _announce_fence(storage, account.id, rec.target)
        if account.shard != rec.target:
            # Exact: no write of the account commits on the source any more.
            copied = await mover.sync_round()
            _report(progress, address, state, 1, copied)
            await storage.directory.set_shard(address, rec.target)
        state = MoveState.FLIPPED
        flipped_at = await _set_state(storage, account.id, state)
    else:
        flipped_at = rec.updated_at  # resumed after the flip: when it was recorded
    _report(progress, address, state)
    await mover.finish_target()
    # Sessions that logged in on the source meanwhile end too.
    await _announce_fence(storage, account.id, rec.target)
    await mover.source.retire_account(account.id, f"gone:{rec.target}")
    await _remove_source_blobs(storage, mover, flipped_at)
    await _forget(storage, account.id)
    return await storage.directory.get_account(address)


async def _remove_source_blobs(storage: SqlStorage, mover: AccountMove, flipped_at: float) -> None:
    """After the flip (and the source's rows are gone): deletes the
    account's blobs (messages and their attachment parts) from the source
    shard's blob store when it has one of its own, except those still
    referenced there (another account's copy of the same bytes, an
    outbound message): garbage collection's own deletion
    (``gc.delete_unreferenced``), under that store's GC lease. If a pass
    holds it, that pass or the next collects them. Keys come from the
    target, so a move killed here removes the rest when run again. A blob
    stored again after the flip (an ingest of the same bytes in progress
    on the source) is spared: ``stored_before``."""
    src, dst = mover.source.blobs, mover.target.blobs
    if src is None or src is dst:
        return
    keys = set(await mover.target_blob_keys())
    references = getattr(src, "references", None)
    if references is not None:
        for key in sorted(keys):
            try:
                keys |= await references(key)
            except errors.StorageError as err:
                if err.kind is not errors.ErrorKind.NOT_FOUND:
                    raise
    if not keys:
        return
    owner = gc.lease_owner()
    async with gc.gc_lease(storage, owner, name=gc.lease_name(storage, src)) as held:
        if held:
            candidates = dict.fromkeys(sorted(keys), flipped_at)
            await gc.delete_unreferenced(storage, src, candidates, gc.GcReport(), 0.0, lease=held)


async def abort_move(storage: SqlStorage, address: str) -> bool:
    """Rolls back the account's unfinished move (before the flip): the
    source is unfenced, the target copy deleted. False if none is recorded;
    INVALID once it has flipped (run the move again to finish it)."""
    async with _lease(storage, address):
        return await _abort(storage, address)


async def _abort(storage: SqlStorage, address: str) -> bool:
    account = await storage.directory.get_account(address)
    rec = await _record(storage, account.id)
    if rec is None:
        return False
    if rec.state == MoveState.FLIPPED.value or account.shard == rec.target:
        raise errors.invalid("the move has flipped already: run it again to finish it")
    mover = AccountMove(account.id, storage.stores[rec.source], storage.stores[rec.target])
    await mover.set_fence(mover.source, None)
    await mover.target.remove_account(account.id)
    async with mover.target.db.write() as conn:
        await conn.execute(delete(moved_ids).where(moved_ids.c.account_id == account.id))
    await _forget(storage, account.id)
    return True


async def drain_shard(
    storage: SqlStorage,
    shard: str,
    *,
    to: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Moves every account off ``shard``, one at a time, each to the shard
    in ``to`` (default: every other shard that takes new accounts, weight
    above 0) with the fewest accounts per unit of placement weight then,
    as placement does; returns the addresses moved. Accounts whose move to
    another shard is recorded finish that move."""
    if shard not in storage.stores:
        raise errors.invalid(f"no such shard {shard!r}")
    weights: dict[str, float] = getattr(storage.directory, "weights", {})
    if to:
        targets = [s for s in to if s != shard]
    else:
        targets = [s for s in storage.stores if s != shard and weights.get(s, 1.0) > 0]
    if not targets:
        raise errors.invalid("no other shard to drain to")
    for name in targets:
        if name not in storage.stores:
            raise errors.invalid(f"no such shard {name!r}")
    accounts = await storage.directory.list_accounts()
    counts = {name: 0 for name in targets}
    for a in accounts:
        if a.shard in counts:
            counts[a.shard] += 1

    def fill(name: str) -> tuple[float, str]:
        weight = weights.get(name, 1.0)
        return (counts[name] / weight if weight > 0 else float("inf"), name)

    moved = []
    for a in accounts:
        if a.shard != shard:
            continue
        rec = await _record(storage, a.id)
        dest = rec.target if rec is not None else min(targets, key=fill)
        await move_account(storage, a.address, dest, progress=progress)
        counts[dest] = counts.get(dest, 0) + 1
        moved.append(a.address)
    return moved


__all__ = [
    "AccountMove",
    "MoveProgress",
    "MoveState",
    "abort_move",
    "drain_shard",
    "move_account",
]

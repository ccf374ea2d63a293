"""The durable outbound queue (RFC 5321 section 4.5.4.1 retry strategy is the
SMTP side's job, in ``mtad.outbound``; this is its storage).

One ``queue_messages`` row per message with a ``queue_recipients`` row per
recipient. :class:`OutboundQueue` is one partition: the queue tables of one
mail shard's database (``storage.queue.PartitionedQueue`` puts every shard's
partition behind one interface). An entry is named by a :class:`QueueRef`,
its partition and its number there. Contract:

* ``enqueue`` returns only after the commit: a 250 reply may then be sent
  ("no mail is lost").
* Workers on any number of instances call :meth:`OutboundQueue.lease_due`;
  an entry is leased by one owner at a time until ``lease_until``. A worker
  that dies leaves its lease to expire, then the entry is due again: delivery
  is at least once, never lost.
* :meth:`OutboundQueue.record_attempt` stores per-recipient outcomes and
  either completes the entry (nothing left to try) or reschedules it, and
  releases the lease. Only recipients still ``pending`` or ``deferred`` are
  tried again.
* Entries that fail validation move to the error queue (status ``error``,
  with a reason): kept, listed, never delivered until retried by an admin.
* Accounts over a sending limit (delivery/limits.py) are flagged in
  ``queue_held_senders``, beside the entries: flagging holds the account's
  queued entries and releasing clears the flag, each in one transaction.
* Every method takes an optional ``now`` (epoch seconds) so tests can drive
  the clock; by default the wall clock.
* What every relayed message passes through (``enqueue``, ``lease_due``,
  ``record_attempt``, ``suppressed``, ``is_flagged``) runs precompiled
  statements in one ``Database.write_batched`` or ``read_sync`` call:
  concurrent calls share one group commit. A lease and an attempt's record
  are not durable (``durable=False``): they survive a crash of the process,
  and a power failure at worst repeats a delivery (RFC 5321 section 6.1:
  at least once), never loses one.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.expression import literal_column, null

from storage import errors
from storage.sql.db import Database, execute
from storage.sql.schema import (
    queue_held_senders,
    queue_messages,
    queue_recipients,
    queue_suppressions,
)

# RFC 5321 section 4.5.4.1: give up after at least 4-5 days.
DEFAULT_EXPIRY = dt.timedelta(days=5)

# Recipient states.
PENDING = "pending"
DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"
RETRYABLE = (PENDING, DEFERRED)

# Entry states.
QUEUED = "queued"
DONE = "done"
ERROR = "error"  # the error queue: failed validation, kept with a reason

# Bounce feedback (from our own attempts or from a later DSN).
HARD = "hard"
SOFT = "soft"

# The partition of the shard named "default": its entries keep bare numbers.
DEFAULT_PARTITION = "default"


class QueueRef(NamedTuple):
    """An entry's name: the partition (shard) holding it and its number there.

    Written ``NUMBER`` in the default partition (as before partitioning) and
    ``PARTITION:NUMBER`` elsewhere; :meth:`parse` reads both."""

    partition: str
    number: int

    def __str__(self) -> str:
        if self.partition == DEFAULT_PARTITION:
            return str(self.number)
        return f"{self.partition}:{self.number}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    @classmethod
    def parse(cls, text: str) -> QueueRef:
        """``"12"`` or ``"shard:12"``; INVALID otherwise."""
        partition, _, number = text.strip().rpartition(":")
        if not number.isdigit() or (_ and not partition):
            raise errors.invalid(f"not a queue entry id: {text!r} (NUMBER or SHARD:NUMBER)")
        return cls(partition or DEFAULT_PARTITION, int(number))


def _number(queue_id: QueueRef | int) -> int:
    return queue_id.number if isinstance(queue_id, QueueRef) else queue_id


@dataclass(frozen=True)
class DsnEnvelope:
    """RFC 3461 MAIL parameters of a queued message, as the client sent
    them (validated by the receiving session): ``ret`` "FULL" or "HDRS"
    (section 4.3), ``envid`` the ENVID xtext (section 4.4); None: not given.
    ``require_tls``: MAIL had the RFC 8689 REQUIRETLS parameter (section
    4.1), carried with the other envelope parameters to the next hop.
    ``tls_report``: the message is a TLS-RPT report we send (RFC 8460
    section 3), delivered whatever the recipient's MTA-STS or DANE policy
    (``mtad/outbound/delivery.py``); set by ``mtad/outbound/tlsrpt.py``."""

    ret: str | None = None
    envid: str | None = None
    require_tls: bool = False
    tls_report: bool = False


@dataclass(frozen=True)
class DsnRecipient:
    """RFC 3461 RCPT parameters of one queued recipient: ``notify`` "NEVER"
    or a comma list of SUCCESS, FAILURE, DELAY (section 4.1), ``orcpt``
    "addr-type;xtext" (section 4.2); None: not given."""

    notify: str | None = None
    orcpt: str | None = None


NO_DSN = DsnRecipient()


@dataclass(frozen=True)
class QueuedRecipient:
    address: str
    status: str  # pending, delivered, deferred, failed
    last_reply: str | None
    feedback: str | None = None  # "hard" / "soft" once a DSN reported a bounce
    updated: dt.datetime | None = None
    dsn: DsnRecipient = NO_DSN

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE


@dataclass(frozen=True)
class QueuedMessage:
    id: QueueRef
    sender: str  # "" is the null reverse-path (bounces)
    blob_key: str
    created: dt.datetime
    next_attempt: dt.datetime
    expires: dt.datetime
    attempts: int
    status: str  # queued, done, error
    error: str | None
    lease_owner: str | None
    lease_until: dt.datetime | None
    recipients: tuple[QueuedRecipient, ...]
    held: bool = False
    warned: bool = False  # a delay warning DSN was sent
    dsn: DsnEnvelope = DsnEnvelope()

    @property
    def retryable(self) -> tuple[QueuedRecipient, ...]:
        """Recipients still to be tried (pending or deferred)."""
        return tuple(r for r in self.recipients if r.retryable)


@dataclass(frozen=True)
class Outcome:
    """One recipient's result of a delivery attempt."""

    status: str  # delivered, deferred, failed
    reply: str | None = None  # the remote reply or our own diagnostic


@dataclass(frozen=True)
class PartitionStats:
    """One partition's entries by state (as ``mailctl queue list`` names them)."""

    queued: int = 0  # waiting for their next attempt (due or not)
    delivering: int = 0  # under a live lease
    held: int = 0
    error: int = 0
    done: int = 0  # completed, kept ``done_retention_seconds`` for late DSNs
    oldest: dt.datetime | None = None  # creation of the oldest entry not done


@dataclass(frozen=True)
class Suppression:
    address: str
    hard_bounces: int
    soft_bounces: int
    suppressed: bool
    last_status: str | None
    last_diagnostic: str | None
    updated: dt.datetime


def _when(epoch: float | None) -> dt.datetime | None:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC)


def _at(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _hold_sender(sender: str, reason: str) -> Update:
    """Holds, with ``reason``, the entries of ``sender`` (any case) still
    queued and not held."""
    return (
        update(queue_messages)
        .where(
            func.lower(queue_messages.c.sender) == sender.lower(),
            queue_messages.c.status == QUEUED,
            queue_messages.c.held.is_(False),
        )
        .values(held=True, error=reason)
    )


def state_of(status: str, held: bool, leased: bool) -> str:
    """One word for an entry, the order of precedence ``mailctl queue`` shows."""
    if status in (ERROR, DONE):
        return status
    if held:
        return "held"
    return "delivering" if leased else "queued"


# --- the per-message statements (run by ``storage.sql.db.execute``) ----------
# Module constants with bound parameters only, so that each runs precompiled
# on the driver (SQLite's writer or reader thread, asyncpg inside
# ``run_sync``): every queued message passes through each of them, and
# SQLAlchemy's per-execution work cost more than the statements.

_M, _R = queue_messages.c, queue_recipients.c
# The status words, bound rather than inlined: ``execute`` takes every
# parameter from the caller (see _STATES).
_QUEUED, _PENDING, _DEFERRED = (
    bindparam("b_queued"),
    bindparam("b_pending"),
    bindparam("b_deferred"),
)
_STATES = {"b_queued": QUEUED, "b_pending": PENDING, "b_deferred": DEFERRED}
_RETRYABLE_NOW = or_(_R.status == _PENDING, _R.status == _DEFERRED)

_INSERT_MESSAGE = insert(queue_messages).returning(_M.id)
_INSERT_RECIPIENTS = insert(queue_recipients)
# Due: queued, not held, its time come, no live lease (see lease_due).
# (SQLite's compiler adds an OFFSET to a bound LIMIT: it is bound too.)
_DUE = (
    select(_M.id)
    .where(
        _M.status == _QUEUED,
        _M.held.is_(False),
        _M.next_attempt <= bindparam("b_now"),
        or_(_M.lease_until.is_(None), _M.lease_until < bindparam("b_now")),
    )
    .order_by(_M.next_attempt, _M.id)
    .limit(bindparam("b_limit"))
    .offset(bindparam("b_offset"))
)
# PostgreSQL: rows another instance is leasing are skipped, not waited for.
_DUE_PG = _DUE.with_for_update(skip_locked=True)
_TAKE = (
    update(queue_messages)
    .where(_M.id == bindparam("b_id"))
    .values(
        lease_owner=bindparam("b_owner"),
        lease_until=bindparam("b_until"),
        attempts=_M.attempts + literal_column("1"),
    )
)
_ENTRY = select(queue_messages).where(_M.id == bindparam("b_id"))
_ENTRY_RECIPIENTS = select(queue_recipients).where(_R.queue_id == bindparam("b_id")).order_by(_R.id)
# One recipient's outcome; only a recipient still to be tried changes (a
# delivery recorded twice, after a lost lease, is recorded once).
_SET_OUTCOME = (
    update(queue_recipients)
    .where(_R.queue_id == bindparam("b_id"), _R.address == bindparam("b_address"), _RETRYABLE_NOW)
    .values(
        status=bindparam("b_status"), last_reply=bindparam("b_reply"), updated=bindparam("b_now")
    )
)
_LEFT = (
    select(func.count())
    .select_from(queue_recipients)
    .where(_R.queue_id == bindparam("b_id"), _RETRYABLE_NOW)
)
# The lease given back by its owner (or by anyone once it has run out),
# the entry completed, rescheduled or left as it is; RETURNING says
# whether the row matched (``execute`` reports no row count).
_OWN_LEASE = and_(
    _M.id == bindparam("b_id"),
    or_(
        _M.lease_owner == bindparam("b_owner"),
        _M.lease_owner.is_(None),
        _M.lease_until < bindparam("b_now"),
    ),
)
_UNLEASE = update(queue_messages).where(_OWN_LEASE).returning(_M.id)
_RELEASE = _UNLEASE.values(lease_owner=null(), lease_until=null())
_RELEASE_DONE = _UNLEASE.values(lease_owner=null(), lease_until=null(), status=bindparam("b_done"))
_RELEASE_LATER = _UNLEASE.values(
    lease_owner=null(), lease_until=null(), next_attempt=bindparam("b_next")
)
_MARK_DONE = (
    update(queue_messages).where(_M.id == bindparam("b_id")).values(status=bindparam("b_done"))
)
_SUPPRESSED = select(queue_suppressions.c.address).where(
    queue_suppressions.c.address == bindparam("b_address"),
    queue_suppressions.c.suppressed.is_(True),
)
_FLAGGED = select(queue_held_senders.c.address).where(
    queue_held_senders.c.address == bindparam("b_address")
)
# ``Database.write_batched``'s key on PostgreSQL for every queue write: the
# queue's calls lock only queue rows, which no account's calls write, so
# they run beside the deliveries' batches, one queue batch at a time (queue
# writers never wait on each other's row locks). Account keys are >= 1.
QUEUE_WRITE_KEY = -1


def _entry_of(partition: str, m, rcpts) -> QueuedMessage:
    """A :class:`QueuedMessage` of its ``queue_messages`` row and its
    ``queue_recipients`` rows (in row order)."""
    return QueuedMessage(
        id=QueueRef(partition, m.id),
        sender=m.sender,
        blob_key=m.blob_key,
        created=_at(m.created),
        next_attempt=_at(m.next_attempt),
        expires=_at(m.expires),
        attempts=m.attempts,
        status=m.status,
        error=m.error,
        lease_owner=m.lease_owner,
        lease_until=_when(m.lease_until),
        recipients=tuple(
            QueuedRecipient(
                r.address,
                r.status,
                r.last_reply,
                r.feedback,
                _when(r.updated),
                DsnRecipient(r.dsn_notify, r.dsn_orcpt),
            )
            for r in rcpts
        ),
        held=bool(m.held),
        warned=bool(m.warned),
        dsn=DsnEnvelope(m.dsn_ret, m.dsn_envid, bool(m.require_tls), bool(m.tls_report)),
    )


def _entries_sync(conn: Connection, partition: str, ids: list[int]) -> list[QueuedMessage]:
    """The entries ``ids`` that exist, in id order, two keyed reads each."""
    out = []
    for number in sorted(ids):
        m = execute(conn, _ENTRY, {"b_id": number}).first()
        if m is not None:
            rcpts = execute(conn, _ENTRY_RECIPIENTS, {"b_id": number}).all()
            out.append(_entry_of(partition, m, rcpts))
    return out


class OutboundQueue:
    """One partition: messages waiting for remote delivery, and the
    suppression list, in one database."""

    def __init__(self, db: Database, partition: str = DEFAULT_PARTITION) -> None:
        self.db = db
        self.partition = partition
        # Called (no arguments) after each enqueue commits: local workers wake
        # at once instead of at their next poll. Other instances poll.
        self.listeners: list[Callable[[], None]] = []

    # -- writing ------------------------------------------------------------

    async def enqueue(
        self,
        sender: str,
        recipients: Iterable[str],
        blob_key: str,
        *,
        expires_in: dt.timedelta = DEFAULT_EXPIRY,
        now: float | None = None,
        held_for: str | None = None,
        blob_keys: tuple[Collection[str] | None, Mapping[str, int]] | None = None,
        dsn: DsnEnvelope | None = None,
        recipient_dsn: Mapping[str, DsnRecipient] | None = None,
    ) -> QueueRef:
        """Queues ``blob_key`` for ``recipients``; durable when it returns the id.
        ``dsn`` and ``recipient_dsn`` (by address) are the RFC 3461
        parameters stored with the entry and its recipients.
        Due at once, unless ``held_for`` (a reason, kept in ``error`` for
        ``mailctl queue``): then held, in the same transaction, so no worker
        can lease it first. INVALID with no recipients.
        ``blob_keys``: the blobs the entry names (the message's and its
        parts'; None: unknown) and, by partition, the newest deletion the
        caller answered there (each database numbers its own): if garbage
        collection is deleting one, or did lately, ``BlobsBeingDeleted``
        (its ``where``: this partition) and nothing is queued
        (``storage/blob/deleting.py``)."""
        rcpts = list(dict.fromkeys(recipients))
        if not rcpts:
            raise errors.invalid("no recipients")
        now = float(_now(now))
        envelope = dsn or DsnEnvelope()
        per_rcpt = recipient_dsn or {}
        entry = {
            "sender": sender,
            "blob_key": blob_key,
            "created": now,
            "next_attempt": now,
            "expires": now + expires_in.total_seconds(),
            "lease_owner": None,
            "lease_until": None,
            "attempts": 0,
            "status": QUEUED,
            "error": held_for,
            "held": held_for is not None,
            "warned": False,
            "dsn_ret": envelope.ret,
            "dsn_envid": envelope.envid,
            "require_tls": envelope.require_tls,
            "tls_report": envelope.tls_report,
        }

        def write(conn: Connection) -> int:
            queue_id = int(execute(conn, _INSERT_MESSAGE, entry).scalar())
            execute(
                conn,
                _INSERT_RECIPIENTS,
                [
                    {
                        "queue_id": queue_id,
                        "address": a,
                        "status": PENDING,
                        "last_reply": None,
                        "updated": now,
                        "dsn_notify": per_rcpt.get(a, NO_DSN).notify,
                        "dsn_orcpt": per_rcpt.get(a, NO_DSN).orcpt,
                    }
                    for a in rcpts
                ],
            )
            return queue_id

        # One group commit with the other sessions' enqueues and the
        # workers' records (durable: the 250 waits for it). The blobs the
        # entry names are checked against garbage collection's deletions
        # in the same transaction (``Database.write_batched``'s blob_keys).
        checked = None
        if blob_keys is not None:
            named, answered = blob_keys
            after = answered.get(self.partition, 0)
            checked = lambda: (named, after)  # noqa: E731
        try:
            queue_id = await self.db.write_batched(write, key=QUEUE_WRITE_KEY, blob_keys=checked)
        except errors.BlobsBeingDeleted as err:
            err.where = self.partition
            raise
        for listener in self.listeners:
            listener()
        return QueueRef(self.partition, queue_id)

    async def lease_due(
        self, owner: str, limit: int, lease_seconds: float, *, now: float | None = None
    ) -> list[QueuedMessage]:
        """Leases up to ``limit`` due entries to ``owner`` for ``lease_seconds``
        and counts an attempt on each. Due: status queued, not held,
        ``next_attempt <= now`` and no live lease. No two owners ever hold the
        same entry at once: PostgreSQL locks the rows with ``FOR UPDATE SKIP
        LOCKED``; SQLite runs the transaction as the single writer."""
        if limit <= 0:
            return []
        now = float(_now(now))
        due = _DUE if self.db.is_sqlite else _DUE_PG
        params = {"b_now": now, "b_limit": limit, "b_offset": 0, **_STATES}
        until = now + lease_seconds

        def lease(conn: Connection) -> list[QueuedMessage]:
            ids = [row[0] for row in execute(conn, due, params).all()]
            if not ids:
                return []
            taken = [{"b_id": i, "b_owner": owner, "b_until": until} for i in ids]
            execute(conn, _TAKE, taken)
            return _entries_sync(conn, self.partition, ids)

        # Not durable (``write_batched``): a lease lost to a power failure
        # only lets the entry be leased again, delivered at least once.
        return await self.db.write_batched(lease, durable=False, key=QUEUE_WRITE_KEY)

    async def renew_lease(
        self,
        queue_id: QueueRef | int,
        owner: str,
        lease_seconds: float,
        *,
        now: float | None = None,
    ) -> bool:
        """Extends ``owner``'s lease; False if it is no longer ``owner``'s."""
        queue_id, now = _number(queue_id), _now(now)
        async with self.db.write() as conn:
            result = await conn.execute(
                update(queue_messages)
                .where(queue_messages.c.id == queue_id, queue_messages.c.lease_owner == owner)
                .values(lease_until=now + lease_seconds)
            )
            return result.rowcount > 0

    async def record_attempt(
        self,
        queue_id: QueueRef | int,
        owner: str,
        outcomes: Mapping[str, Outcome],
        next_attempt: float | None,
        *,
        now: float | None = None,
    ) -> QueuedMessage:
        """Stores each recipient's outcome, then completes the entry if no
        recipient is left pending or deferred, else schedules it for
        ``next_attempt``; the lease is released. Outcomes are stored even if
        the lease was lost meanwhile (a delivery that happened is a fact).
        NOT_FOUND if the entry was deleted."""
        queue_id, now = _number(queue_id), float(_now(now))
        rows = [
            {
                "b_id": queue_id,
                "b_address": address,
                "b_status": outcome.status,
                "b_reply": outcome.reply,
                "b_now": now,
                **_STATES,
            }
            for address, outcome in outcomes.items()
        ]
        lease = {"b_id": queue_id, "b_owner": owner, "b_now": now}

        def record(conn: Connection) -> QueuedMessage | None:
            if rows:
                execute(conn, _SET_OUTCOME, rows)
            left = execute(conn, _LEFT, {"b_id": queue_id, **_STATES}).scalar()
            if left == 0:
                mine = execute(conn, _RELEASE_DONE, {**lease, "b_done": DONE}).first()
                if mine is None:
                    # Another owner holds it now; still mark it done.
                    execute(conn, _MARK_DONE, {"b_id": queue_id, "b_done": DONE})
            elif next_attempt is not None:
                execute(conn, _RELEASE_LATER, {**lease, "b_next": float(next_attempt)})
            else:
                execute(conn, _RELEASE, lease)
            loaded = _entries_sync(conn, self.partition, [queue_id])
            return loaded[0] if loaded else None

        # Not durable: a record lost to a power failure (the commit survives
        # a crash of the process) leaves the recipients to be tried again,
        # a second delivery, never a lost one (RFC 5321 section 6.1: at
        # least once); a bounce was queued durably before (mtad.outbound).
        # Any later durable commit (the next enqueue) makes it durable too.
        entry = await self.db.write_batched(record, durable=False, key=QUEUE_WRITE_KEY)
        if entry is None:
            raise errors.not_found(f"no such queue entry: {queue_id}")
        return entry

    async def release(self, queue_id: QueueRef | int, owner: str) -> None:
        """Gives up ``owner``'s lease without recording anything (shutdown)."""
        queue_id = _number(queue_id)
        async with self.db.write() as conn:
            await conn.execute(
                update(queue_messages)
                .where(queue_messages.c.id == queue_id, queue_messages.c.lease_owner == owner)
                .values(lease_owner=None, lease_until=None)
            )

    async def mark_warned(self, queue_id: QueueRef | int) -> None:
        """Records that the delay warning DSN went out (sent once)."""
        await self._set(queue_id, warned=True)

    async def move_to_errors(self, queue_id: QueueRef | int, reason: str) -> None:
        """Moves the entry to the error queue with ``reason``; lease released."""
        await self._set(queue_id, status=ERROR, error=reason, lease_owner=None, lease_until=None)

    # -- admin operations (mailctl queue ...) ----------------------------------

    async def hold(self, queue_id: QueueRef | int) -> None:
        """A held entry is never leased until released. NOT_FOUND if none."""
        await self._set(queue_id, held=True)

    async def hold_sender(self, sender: str, reason: str) -> int:
        """Holds, with ``reason`` (kept in ``error``), every entry from
        ``sender`` (any case) still queued and not held, in one statement;
        how many. Entries already held keep their reason."""
        async with self.db.write() as conn:
            result = await conn.execute(_hold_sender(sender, reason))
        return int(result.rowcount)

    async def flag(self, address: str, reason: str, *, now: float | None = None) -> int:
        """Flags ``address`` (any case) as held for a sending limit, with
        ``reason``, and holds its queued entries as :meth:`hold_sender`
        does, in one transaction; how many entries. Flagged already: the
        first reason and time stay (INSERT ... ON CONFLICT DO NOTHING, so
        two instances tripping at once both succeed)."""
        key = address.lower()
        async with self.db.write() as conn:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            await conn.execute(
                dialect.insert(queue_held_senders)
                .values(address=key, reason=reason, since=_now(now))
                .on_conflict_do_nothing(index_elements=[queue_held_senders.c.address])
            )
            result = await conn.execute(_hold_sender(key, reason))
        return int(result.rowcount)

    async def is_flagged(self, address: str) -> bool:
        """Whether ``address`` (any case) is flagged: one primary-key read."""
        params = {"b_address": address.lower()}
        row = await self.db.read_sync(lambda conn: execute(conn, _FLAGGED, params).first())
        return row is not None

    async def release_flagged(self, address: str, reason_prefix: str) -> tuple[int, bool]:
        """Releases every queued entry held with a reason starting with
        ``reason_prefix`` (its reason goes with the hold) and clears the
        flag of ``address`` (any case), in one transaction: (entries
        released, whether the flag was set)."""
        async with self.db.write() as conn:
            released = await conn.execute(
                update(queue_messages)
                .where(
                    queue_messages.c.held.is_(True),
                    queue_messages.c.status == QUEUED,
                    queue_messages.c.error.startswith(reason_prefix, autoescape=True),
                )
                .values(held=False, error=None)
            )
            cleared = await conn.execute(
                delete(queue_held_senders).where(queue_held_senders.c.address == address.lower())
            )
        return int(released.rowcount), cleared.rowcount > 0

    async def release_hold(self, queue_id: QueueRef | int) -> None:
        """Due again; a queued entry's hold reason (``error``) goes with the hold."""
        async with self.db.write() as conn:
            number = _number(queue_id)
            result = await conn.execute(
                update(queue_messages).where(queue_messages.c.id == number).values(held=False)
            )
            await conn.execute(
                update(queue_messages)
                .where(queue_messages.c.id == number, queue_messages.c.status == QUEUED)
                .values(error=None)
            )
        if result.rowcount == 0:
            raise errors.not_found(f"no such queue entry: {queue_id}")

    async def retry_now(
        self, queue_id: QueueRef | int | None = None, *, now: float | None = None
    ) -> int:
        """Makes the entry (every queued or error entry if None) due now; an
        error entry returns to the queue and its recipients are retried.
        Returns how many entries changed; NOT_FOUND for an unknown id."""
        now = _now(now)
        where = [queue_messages.c.status.in_((QUEUED, ERROR))]
        if queue_id is not None:
            where.append(queue_messages.c.id == _number(queue_id))
        async with self.db.write() as conn:
            result = await conn.execute(
                update(queue_messages)
                .where(*where)
                .values(status=QUEUED, error=None, next_attempt=now)
            )
        if queue_id is not None and result.rowcount == 0:
            raise errors.not_found(f"no such queue entry: {queue_id}")
        return result.rowcount

    async def delete(self, queue_id: QueueRef | int) -> None:
        """Removes the entry and its recipients (no bounce). NOT_FOUND if none."""
        number = _number(queue_id)
        async with self.db.write() as conn:
            await conn.execute(
                delete(queue_recipients).where(queue_recipients.c.queue_id == number)
            )
            result = await conn.execute(delete(queue_messages).where(queue_messages.c.id == number))
        if result.rowcount == 0:
            raise errors.not_found(f"no such queue entry: {queue_id}")

    async def purge_done(self, older_than: float, *, now: float | None = None) -> int:
        """Deletes completed entries whose last change is older than
        ``older_than`` seconds (kept a while so later DSNs find them)."""
        cutoff = _now(now) - older_than
        async with self.db.write() as conn:
            recent = (
                select(queue_recipients.c.queue_id)
                .where(queue_recipients.c.updated >= cutoff)
                .scalar_subquery()
            )
            ids = [
                r[0]
                for r in await conn.execute(
                    select(queue_messages.c.id).where(
                        queue_messages.c.status == DONE,
                        queue_messages.c.id.not_in(recent),
                    )
                )
            ]
            if ids:
                await conn.execute(
                    delete(queue_recipients).where(queue_recipients.c.queue_id.in_(ids))
                )
                await conn.execute(delete(queue_messages).where(queue_messages.c.id.in_(ids)))
        return len(ids)

    # -- reading ------------------------------------------------------------

    async def stats(self, *, now: float | None = None) -> PartitionStats:
        """This partition's entries counted by state."""
        now = _now(now)
        leased = and_(queue_messages.c.lease_until.is_not(None), queue_messages.c.lease_until > now)
        query = select(
            queue_messages.c.status,
            queue_messages.c.held,
            leased.label("leased"),
            func.count(),
            func.min(queue_messages.c.created),
        ).group_by(queue_messages.c.status, queue_messages.c.held, leased)
        counts = dict.fromkeys(("queued", "delivering", "held", "error", "done"), 0)
        oldest: float | None = None
        async with self.db.read() as conn:
            for status, held, live, count, created in await conn.execute(query):
                state = state_of(status, bool(held), bool(live))
                counts[state] += count
                if state != DONE and (oldest is None or created < oldest):
                    oldest = created
        return PartitionStats(**counts, oldest=_when(oldest))

    async def referenced_blobs(self) -> set[str]:
        """The blob keys of every entry here, done or not."""
        async with self.db.read() as conn:
            return {r[0] for r in await conn.execute(select(queue_messages.c.blob_key))}

    async def get(self, queue_id: QueueRef | int) -> QueuedMessage:
        """One entry with its recipients. NOT_FOUND if none."""
        number = _number(queue_id)
        loaded = await self.db.read_sync(lambda conn: _entries_sync(conn, self.partition, [number]))
        if not loaded:
            raise errors.not_found(f"no such queue entry: {queue_id}")
        return loaded[0]

    async def list(self, *, include_done: bool = True) -> list[QueuedMessage]:
        """Every queued message with its recipients, oldest first
        (``include_done=False``: only entries still queued or in error)."""
        query = select(queue_messages).order_by(_M.id)
        rquery = select(queue_recipients).order_by(_R.id)
        if not include_done:
            query = query.where(_M.status != DONE)
            rquery = rquery.where(_R.queue_id.in_(select(_M.id).where(_M.status != DONE)))
        async with self.db.read() as conn:
            msgs = (await conn.execute(query)).all()
            rcpts = (await conn.execute(rquery)).all()
        by_msg: dict[int, list] = {}
        for r in rcpts:
            by_msg.setdefault(r.queue_id, []).append(r)
        return [_entry_of(self.partition, m, by_msg.get(m.id, ())) for m in msgs]

    async def _set(self, queue_id: QueueRef | int, **values: object) -> None:
        async with self.db.write() as conn:
            result = await conn.execute(
                update(queue_messages)
                .where(queue_messages.c.id == _number(queue_id))
                .values(**values)
            )
        if result.rowcount == 0:
            raise errors.not_found(f"no such queue entry: {queue_id}")

    # -- bounces and suppression ----------------------------------------------

    async def count_bounce(
        self,
        address: str,
        hard: bool,
        status: str | None,
        diagnostic: str | None,
        *,
        suppress_after: int,
        now: float | None = None,
    ) -> Suppression:
        """Counts a bounce of ``address`` in this partition's suppression
        list; after ``suppress_after`` hard bounces (0: never) the address is
        suppressed. The feedback on the recipient row is
        :meth:`last_finished` and :meth:`set_feedback`: that row may be in
        another partition."""
        now = _now(now)
        key = address.lower()
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    select(queue_suppressions).where(queue_suppressions.c.address == key)
                )
            ).first()
            hard_n = (row.hard_bounces if row else 0) + (1 if hard else 0)
            soft_n = (row.soft_bounces if row else 0) + (0 if hard else 1)
            suppressed = bool(row and row.suppressed) or (
                suppress_after > 0 and hard_n >= suppress_after
            )
            values = {
                "hard_bounces": hard_n,
                "soft_bounces": soft_n,
                "suppressed": suppressed,
                "last_status": status,
                "last_diagnostic": diagnostic,
                "updated": now,
            }
            if row is None:
                await conn.execute(insert(queue_suppressions).values(address=key, **values))
            else:
                await conn.execute(
                    update(queue_suppressions)
                    .where(queue_suppressions.c.address == key)
                    .values(**values)
                )
        return Suppression(key, hard_n, soft_n, suppressed, status, diagnostic, _at(now))

    async def last_finished(self, address: str) -> tuple[float, int] | None:
        """(last change, row) of the most recent delivered or failed
        recipient row of ``address`` (case-blind) here, or None: what a DSN
        about that address most likely reports on."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(queue_recipients.c.updated, queue_recipients.c.id)
                    .where(
                        func.lower(queue_recipients.c.address) == address.lower(),
                        queue_recipients.c.status.in_((DELIVERED, FAILED)),
                    )
                    .order_by(queue_recipients.c.id.desc())
                    .limit(1)
                )
            ).first()
        return None if row is None else (row[0] or 0.0, row[1])

    async def set_feedback(self, recipient_row: int, hard: bool) -> None:
        """Marks a recipient row (from :meth:`last_finished`) hard or soft bounced."""
        async with self.db.write() as conn:
            await conn.execute(
                update(queue_recipients)
                .where(queue_recipients.c.id == recipient_row)
                .values(feedback=HARD if hard else SOFT)
            )

    async def suppressed(self, addresses: Iterable[str]) -> set[str]:
        """The lower-cased addresses of ``addresses`` that are suppressed."""
        keys = sorted({a.lower() for a in addresses})
        if not keys:
            return set()

        def read(conn: Connection) -> set[str]:
            # One keyed read per address (a message has few recipients): a
            # constant statement where an IN list would be compiled anew.
            return {
                a for a in keys if execute(conn, _SUPPRESSED, {"b_address": a}).first() is not None
            }

        return await self.db.read_sync(read)

    async def list_suppressions(self) -> list[Suppression]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(queue_suppressions).order_by(queue_suppressions.c.address)
            )
            return [
                Suppression(
                    r.address,
                    r.hard_bounces,
                    r.soft_bounces,
                    bool(r.suppressed),
                    r.last_status,
                    r.last_diagnostic,
                    _at(r.updated),
                )
                for r in rows
            ]

    async def unsuppress(self, address: str) -> None:
        """Forgets the address's bounces. NOT_FOUND if it has none."""
        async with self.db.write() as conn:
            result = await conn.execute(
                delete(queue_suppressions).where(queue_suppressions.c.address == address.lower())
            )
        if result.rowcount == 0:
            raise errors.not_found(f"no bounces recorded for {address}")

"""The SQL mail store: one shard's mailboxes, messages, flags and change log.

Transactions: every write runs in ``Database.write()`` and starts by locking
the account's ``shard_accounts`` row (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite writes are serialised anyway). All writes of one account
are therefore serial, which makes UID allocation, modseq bumps, change-log
ids and the quota check race-free; commit order equals allocation order, so
no session ever sees UID n+1 before UID n. Changes are published on the
event bus only after the commit.

The hot writes (``deliver``, ``append``, ``add_message``, ``store_flags``,
``expunge``, ``claim_recent``) are synchronous functions handed to
``Database.write_batched`` instead: on SQLite many of them share one
transaction and one fsync in the writer thread (group commit), each in its
own savepoint, with the same locking, ordering and publish-after-commit
rules. The hot reads (mailbox lookups, ``status``, ``changes_since``,
``fetch``, ``uids``...) are synchronous functions handed to
``Database.read_sync``: one thread hop per call on SQLite instead of one per
statement. Both run module-constant statements straight on the driver
(``storage.sql.db.execute``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import functools
import json
import operator
import time
from array import array
from collections import OrderedDict, namedtuple
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.util import find_tables

from storage import errors
from storage.api import BlobStore, EventBus
from storage.blob.pack import PUT_SQL_NAMED as PACK_PUT_SQL
from storage.errors import ErrorKind, StorageError
from storage.events import compact_json
from storage.model import (
    DEFAULT_MAILBOXES,
    DELETED,
    HIERARCHY_DELIMITER,
    SEEN,
    AppendResult,
    Change,
    ChangeKind,
    CopyResult,
    Mailbox,
    MailboxChanges,
    MailboxSnapshot,
    MailboxStatus,
    MessageEntry,
    ParsedMessage,
    SpamCounts,
    StoredMessage,
    StoreMode,
    StoreResult,
    UidSet,
)
from storage.search import All, Criteria
from storage.sortkeys import KEY_COLUMNS, EntryKeys, ThreadRow, entry_keys
from storage.sortrows import SortRow, sort_row, sort_row_of
from storage.sql import codec, fts, sortkeys, spamtokens
from storage.sql import criteria as crit
from storage.sql.acl import AclStore, delete_acl, delete_mailbox_acl
from storage.sql.db import Database, execute, execute_later, settle
from storage.sql.metadata import MetadataStore, delete_mailbox_metadata, delete_metadata
from storage.sql.schema import (
    change_log,
    expunged,
    locks,
    mailboxes,
    messages,
    shard_accounts,
    spam_learned,
    spam_tokens,
    subscriptions,
)
from storage.sql.schema import mailbox_entries as E
from storage.sql.spampolicy import SpamPolicyStore, delete_spam_policy

INBOX = "INBOX"
MAX_MAILBOX_NAME = 1000  # characters; well below what clients and the column allow
MAX_KEYWORD = 200
PARSED_CACHE_SIZE = 4096
PAGES_CACHED = 1024  # unfiltered folder pages kept (references to kept entries)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# RFC 3501 section 9: atom-specials may not appear in a flag keyword.
_ATOM_SPECIALS = set('(){ %*"\\]') | {chr(i) for i in range(32)} | {chr(127)}


def normalize_mailbox_name(name: str) -> str:
    """Validates a mailbox name; "INBOX" in any case becomes "INBOX"
    (RFC 3501 section 5.1), also as the first level of a hierarchy."""
    if not name or len(name) > MAX_MAILBOX_NAME:
        raise errors.invalid("bad mailbox name")
    if name.startswith(HIERARCHY_DELIMITER) or name.endswith(HIERARCHY_DELIMITER):
        raise errors.invalid("mailbox name may not start or end with the delimiter")
    parts = name.split(HIERARCHY_DELIMITER)
    if any(not p for p in parts) or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise errors.invalid("bad mailbox name")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return HIERARCHY_DELIMITER.join(parts)


def existing_mailbox_name(name: str) -> str:
    """:func:`normalize_mailbox_name` for a name looked up: one that no
    mailbox can have names none, so it is NOT_FOUND (IMAP NONEXISTENT, RFC
    5530 section 3), not INVALID as for a mailbox about to be made."""
    try:
        return normalize_mailbox_name(name)
    except errors.StorageError:
        raise errors.not_found("no such mailbox") from None


def _parents(name: str) -> list[str]:
    parts = name.split(HIERARCHY_DELIMITER)
    return [HIERARCHY_DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def split_flags(flags: Iterable[str]) -> tuple[int, list[str]]:
    """System flags as a bit mask and keywords (case-insensitively unique).

    ``\\Recent`` is dropped: it is session state, never stored (RFC 3501
    section 2.3.2). Another unknown ``\\`` flag or a malformed keyword is INVALID.
    """
    mask = 0
    keywords: dict[str, str] = {}
    for flag in flags:
        sysflag = crit.system_flag(flag)
        if sysflag is not None:
            mask |= crit.FLAG_BITS[sysflag]
        elif flag.casefold() == "\\recent":
            continue
        elif (
            not flag
            or flag.startswith("\\")
            or len(flag) > MAX_KEYWORD
            or any(ch in _ATOM_SPECIALS for ch in flag)
            or not flag.isascii()
        ):
            raise errors.invalid(f"bad flag {flag[:40]!r}")
        else:
            keywords.setdefault(flag.lower(), flag)
    return mask, list(keywords.values())


def _keywords_text(keywords: Iterable[str]) -> str:
    kws = sorted(keywords, key=str.lower)
    return f" {' '.join(kws)} " if kws else " "


@functools.lru_cache(maxsize=4096)
def _flags_of(mask: int, keywords: str) -> frozenset[str]:
    """The flag set of stored flags; cached, since a mailbox holds few
    distinct combinations: a SELECT of 100,000 entries builds a handful of
    sets and shares them, instead of one per entry."""
    out = {flag for flag, bit in crit.FLAG_BITS.items() if mask & bit}
    out.update(keywords.split())
    return frozenset(out)


def _split_date(when: dt.datetime) -> tuple[int, int, int]:
    """(epoch microseconds, UTC offset minutes, calendar day ordinal in that zone)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    offset = when.utcoffset() or dt.timedelta(0)
    micros = (when - _EPOCH) // dt.timedelta(microseconds=1)
    return micros, int(offset.total_seconds() // 60), when.date().toordinal()


def _join_date(micros: int, tz_minutes: int) -> dt.datetime:
    when = _EPOCH + dt.timedelta(microseconds=micros)
    return when if tz_minutes == 0 else when.astimezone(_zone(tz_minutes))


@functools.lru_cache(maxsize=256)
def _zone(tz_minutes: int) -> dt.timezone:
    return dt.timezone(dt.timedelta(minutes=tz_minutes))


def _list_date(sent_date: float | None, internal_micros: int) -> int:
    """An entry's place in a folder list (``mailbox_entries.list_date``), in
    epoch microseconds: its Date (RFC 5322 section 3.6.1; ``sent_date`` in
    epoch seconds), so imported mail sits by its date, but never later than
    its arrival, so a forged future Date cannot pin it to the top; never
    negative. Schema step 11 computes the same for stored entries."""
    if sent_date is None:
        return internal_micros
    return max(0, min(int(sent_date * 1_000_000), internal_micros))


def _now() -> float:
    return time.time()


_ENTRY_COLUMNS = (
    E.c.mailbox_id,
    E.c.uid,
    E.c.message_id,
    E.c.sysflags,
    E.c.keywords,
    E.c.modseq,
    E.c.internal_date,
    E.c.internal_tz,
    E.c.size,
    messages.c.blob_key,
    E.c.saved_at,
)


def _saved(micros: int | None) -> dt.datetime | None:
    """An entry's ``saved_at`` column as its save date (RFC 8514), UTC."""
    return None if micros is None else _EPOCH + dt.timedelta(microseconds=micros)


# Fewest candidates one keyset step of ``search_account`` lists: listing is
# cheap (no text read), each step repeats the index lookup and the sort.
SEARCH_BATCH = 256


def _after_in_search_order(internal_date: int, mailbox_id: int, uid: int) -> Any:
    """Entries after (internal_date, mailbox_id, uid) in search_account's
    order: internal date descending, mailbox id ascending, UID descending."""
    return or_(
        E.c.internal_date < internal_date,
        and_(
            E.c.internal_date == internal_date,
            or_(E.c.mailbox_id > mailbox_id, and_(E.c.mailbox_id == mailbox_id, E.c.uid < uid)),
        ),
    )


def _entry(row: Any) -> MessageEntry:
    return MessageEntry(
        mailbox_id=row.mailbox_id,
        uid=row.uid,
        message_id=row.message_id,
        flags=_flags_of(row.sysflags, row.keywords),
        modseq=row.modseq,
        internal_date=_join_date(row.internal_date, row.internal_tz),
        size=row.size,
        blob_key=row.blob_key,
        saved=_saved(row.saved_at),
    )


def _mailbox(row: Any) -> Mailbox:
    return Mailbox(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        uidvalidity=row.uidvalidity,
        uidnext=row.uidnext,
        highestmodseq=row.highestmodseq,
        special_use=row.special_use,
    )


@dataclass
class _Tx:
    """One account-locked write transaction and the changes it logs."""

    conn: Any  # AsyncConnection, or a sync Connection in a write function
    account_id: int
    quota_bytes: int | None
    last_change_id: int
    next_uidvalidity: int
    at: float = field(default_factory=_now)
    used_bytes: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    uidvalidity_used: int = 0
    used_delta: int = 0  # octets added (+) or removed (-) by this transaction
    # PostgreSQL, write functions: appended entries and the mailbox
    # counters they move, written by flush_sync in its one statement.
    entries: list[dict[str, Any]] = field(default_factory=list)
    bumps: dict[int, tuple[int, int]] = field(default_factory=dict)  # id: (uidnext, modseq)
    floors: dict[int, int] = field(default_factory=dict)  # id: recent floor (of bumped boxes)

    def write_entry(self, entry: dict[str, Any], uidnext: int, modseq: int) -> None:
        """Inserts a ``mailbox_entries`` row and moves its mailbox's
        UIDNEXT and HIGHESTMODSEQ: at once on SQLite (a statement is a
        call, not a round trip), at :meth:`flush_sync` on PostgreSQL.
        Nothing in the write function reads them back before that."""
        box = entry["mailbox_id"]
        if self.conn.dialect.name == "sqlite":
            bump = {"b_id": box, "b_uidnext": uidnext, "b_modseq": modseq}
            execute(self.conn, _BUMP_MAILBOX, bump)
            execute(self.conn, _INSERT_ENTRY, entry)
            return
        self.entries.append(entry)
        self.bumps[box] = (uidnext, modseq)  # the last append's are the highest

    def set_recent_floor(self, box: int, floor: int) -> None:
        """Moves a mailbox's recent floor (RFC 3501 section 2.3.1.1,
        \\Recent): at once on SQLite; on PostgreSQL with :meth:`flush_sync`'s
        one statement when this transaction moves the box's UIDNEXT there
        (an APPEND to the selected mailbox: one round trip fewer), else at
        once. Nothing in the write function reads it back before that."""
        if self.conn.dialect.name == "sqlite" or box not in self.bumps:
            execute(self.conn, _SET_RECENT_FLOOR, {"b_id": box, "b_floor": floor})
            return
        self.floors[box] = floor

    def change(
        self,
        kind: ChangeKind,
        mailbox_id: int | None,
        uid: int | None = None,
        modseq: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.pending.append(
            {
                "kind": kind.value,
                "mailbox_id": mailbox_id,
                "uid": uid,
                "modseq": modseq,
                "data": data or {},
            }
        )

    def new_uidvalidity(self) -> int:
        value = self.next_uidvalidity + self.uidvalidity_used
        self.uidvalidity_used += 1
        return value

    def _flush_plan(self) -> tuple[list[dict[str, Any]], dict[str, Any], list[Change]]:
        """(change-log rows, account counter values, changes to publish)."""
        rows = []
        changes = []
        when = dt.datetime.fromtimestamp(self.at, dt.UTC)
        for i, ch in enumerate(self.pending, start=self.last_change_id + 1):
            rows.append(
                {
                    "account_id": self.account_id,
                    "id": i,
                    "kind": ch["kind"],
                    "mailbox_id": ch["mailbox_id"],
                    "uid": ch["uid"],
                    "modseq": ch["modseq"],
                    "at": self.at,
                    "data": compact_json(ch["data"]),
                }
            )
            changes.append(
                Change(
                    id=i,
                    account_id=self.account_id,
                    kind=ChangeKind(ch["kind"]),
                    mailbox_id=ch["mailbox_id"],
                    uid=ch["uid"],
                    modseq=ch["modseq"],
                    at=when,
                    data=ch["data"],
                    local=True,
                    entry=ch.get("entry"),
                    recent_floor=ch.get("recent_floor", 0),
                )
            )
        return rows, self._counters(len(rows)), changes

    def attach_entries(self, entries: Sequence[MessageEntry], floors: dict[int, int]) -> None:
        """Gives the NEW changes of ``entries`` (appended by this
        transaction) the entry and their mailbox's recent floor as
        committed (``floors`` by mailbox id), for this process's
        subscribers (see ``Change``): they need not read them back."""
        by_key = {(e.mailbox_id, e.uid): e for e in entries}
        for ch in self.pending:
            if ch["kind"] == ChangeKind.NEW.value:
                entry = by_key.get((ch["mailbox_id"], ch["uid"]))
                if entry is not None:
                    ch["entry"] = entry
                    ch["recent_floor"] = floors.get(entry.mailbox_id, 0)

    def _counters(self, logged: int) -> dict[str, Any]:
        """The account counters' values once ``logged`` change-log rows are written."""
        return {
            "b_account": self.account_id,
            "b_last_change": self.last_change_id + logged,
            "b_uidvalidity": self.next_uidvalidity + self.uidvalidity_used,
            "b_used": max(0, self.used_bytes + self.used_delta),
        }

    def _idle(self) -> bool:
        return (
            not self.pending
            and not self.uidvalidity_used
            and not self.used_delta
            and not self.entries
            and not self.bumps
            and not self.floors
        )

    async def flush(self) -> list[Change]:
        """Writes the change log rows and counters; returns what to publish."""
        if self._idle():
            return []
        rows, counters, changes = self._flush_plan()
        if rows:
            await self.conn.execute(_INSERT_CHANGES, rows)
        await self.conn.execute(_UPDATE_COUNTERS, counters)
        return changes

    def flush_sync(self, conn: Connection) -> list[Change]:
        """:meth:`flush` for a synchronous transaction; on PostgreSQL in
        one statement with the entries and mailbox counters of
        :meth:`write_entry` (one round trip instead of four per delivery)."""
        if self._idle():
            return []
        rows, counters, changes = self._flush_plan()
        if conn.dialect.name != "sqlite":
            self._flush_pg(conn, rows, counters)
            return changes
        if rows:
            execute(conn, _INSERT_CHANGES, rows)
        execute(conn, _UPDATE_COUNTERS, counters)
        return changes

    def _flush_pg(
        self, conn: Connection, rows: list[dict[str, Any]], counters: dict[str, Any]
    ) -> None:
        entry_keys = tuple(self.entries[0]) if self.entries else _ENTRY_KEYS
        params: dict[str, list[Any]] = {k: [v] for k, v in counters.items()}
        params.update(_columns("e_", entry_keys, self.entries))
        params.update(_columns("c_", _CHANGE_KEYS, rows))
        params["bump_id"] = list(self.bumps)
        params["bump_uidnext"] = [uidnext for uidnext, _ in self.bumps.values()]
        params["bump_modseq"] = [modseq for _, modseq in self.bumps.values()]
        # -1: the box's recent floor stays (floors are UIDs, never negative).
        params["bump_floor"] = [self.floors.get(box, -1) for box in self.bumps]
        # Nothing reads these rows back before the commit: in a batch of
        # several deliveries (other accounts') they go in one statement.
        execute_later(conn, _flush_statement_pg(entry_keys), params, self.account_id)
        self.entries, self.bumps, self.floors = [], {}, {}

    def log_rows_sync(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Writes change-log rows a caller built itself (ids from
        ``last_change_id + 1``, in order) and the counters; the caller makes
        the :class:`Change` objects, after the commit if it likes."""
        if conn.dialect.name != "sqlite":  # with any deferred counters, in one statement
            self._flush_pg(conn, rows, self._counters(len(rows)))
            return
        execute(conn, _INSERT_CHANGES, rows)
        execute(conn, _UPDATE_COUNTERS, self._counters(len(rows)))

    def set_highestmodseq(self, mbox: Any, modseq: int) -> None:
        """Moves a mailbox's HIGHESTMODSEQ (``mbox``: its row as this
        transaction locked it): at once on SQLite, on PostgreSQL with the
        flush's one statement (its UIDNEXT written back unchanged)."""
        if self.conn.dialect.name == "sqlite":
            execute(self.conn, _SET_HIGHESTMODSEQ, {"b_id": mbox.id, "b_modseq": modseq})
            return
        uidnext, _ = self.bumps.get(mbox.id, (mbox.uidnext, 0))
        self.bumps[mbox.id] = (uidnext, modseq)


# The account's counters after a write (one statement, bound parameters).
_UPDATE_COUNTERS = (
    update(shard_accounts)
    .where(shard_accounts.c.account_id == bindparam("b_account"))
    .values(
        last_change_id=bindparam("b_last_change"),
        next_uidvalidity=bindparam("b_uidvalidity"),
        used_bytes=bindparam("b_used"),
    )
)
_CHANGE_KEYS = ("account_id", "id", "kind", "mailbox_id", "uid", "modseq", "at", "data")
_ENTRY_KEYS = tuple(c.name for c in E.c)


def _columns(prefix: str, keys: Sequence[str], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows as one list per column (the arrays ``unnest`` takes apart)."""
    return {prefix + k: [row[k] for row in rows] for k in keys}


def _unnest(table: Any, prefix: str, keys: Sequence[str]) -> str:
    pg = postgresql.dialect()
    arrays = ", ".join(
        f"CAST(:{prefix}{k} AS {table.c[k].type.compile(dialect=pg)}[])" for k in keys
    )
    return f"INSERT INTO {table.name} ({', '.join(keys)}) SELECT * FROM unnest({arrays})"


@functools.cache
def _flush_statement_pg(entry_keys: tuple[str, ...]) -> Any:
    """PostgreSQL: a write function's entries, mailbox counters (with the
    recent floors of :meth:`_Tx.set_recent_floor`), change-log rows and
    account counters in one statement (each list of rows passed as
    arrays, one per column, so one prepared statement serves any number,
    and the flushes of several accounts' transactions joined, see
    ``db.execute_later``, are one). Beside the shared statements it
    replaces: _BUMP_MAILBOX, _INSERT_ENTRY, _INSERT_CHANGES,
    _UPDATE_COUNTERS. The parts touch different tables, so that they
    share one snapshot changes nothing."""
    return sql_text(
        "WITH bump AS (UPDATE mailboxes SET uidnext = u.uidnext, highestmodseq = u.modseq, "
        "recent_floor = CASE WHEN u.floor < 0 THEN mailboxes.recent_floor ELSE u.floor END "
        "FROM unnest(CAST(:bump_id AS BIGINT[]), CAST(:bump_uidnext AS BIGINT[]), "
        "CAST(:bump_modseq AS BIGINT[]), CAST(:bump_floor AS BIGINT[])) "
        "AS u(id, uidnext, modseq, floor) WHERE mailboxes.id = u.id), "
        f"entries AS ({_unnest(E, 'e_', entry_keys)}), "
        f"changes AS ({_unnest(change_log, 'c_', _CHANGE_KEYS)}) "
        "UPDATE shard_accounts SET last_change_id = a.last_change, "
        "next_uidvalidity = a.uidvalidity, used_bytes = a.used "
        "FROM unnest(CAST(:b_account AS BIGINT[]), CAST(:b_last_change AS BIGINT[]), "
        "CAST(:b_uidvalidity AS BIGINT[]), CAST(:b_used AS BIGINT[])) "
        "AS a(account_id, last_change, uidvalidity, used) "
        "WHERE shard_accounts.account_id = a.account_id"
    )


_LOCK_ACCOUNT = (
    select(shard_accounts)
    .where(shard_accounts.c.account_id == bindparam("b_account"))
    .with_for_update()
)

# Statements of the delivery path, built once: SQLAlchemy then finds their
# compiled form without rebuilding a cache key per execution.
_INSERT_CHANGES = insert(change_log)
_INSERT_MESSAGE = insert(messages).returning(messages.c.id)
_INSERT_ENTRY = insert(E)
_INSERT_MESSAGE_OWN_THREAD = (
    insert(messages)
    .values(
        thread_id=literal_column(
            "(SELECT coalesce(max(seq), 0) + 1 FROM sqlite_sequence WHERE name = 'messages')"
        )
    )
    .returning(messages.c.id, messages.c.thread_id)
)


# PostgreSQL: the next message id, from the BIGSERIAL's sequence named as
# a constant: resolved once, when a session prepares the statement, where
# ``pg_get_serial_sequence('messages', 'id')`` looked the sequence up in
# the catalog (pg_depend) at every delivery.
_NEXT_MESSAGE_ID_PG = "nextval(CAST('messages_id_seq' AS regclass))"


@functools.cache
def _insert_own_thread_pg(keys: tuple[str, ...]) -> Any:
    """PostgreSQL's insert of a message in a thread of its own (``keys``:
    the columns of :func:`_message_values`): ``WITH n AS (SELECT
    nextval(...)) INSERT ... SELECT n.id, n.id, ... RETURNING id``. The
    same statement object per column set, so ``execute`` prepares it once."""
    seq = select(
        literal_column(_NEXT_MESSAGE_ID_PG).label("id")
    ).cte("n")
    values = [bindparam(k, type_=messages.c[k].type) for k in keys]
    return (
        insert(messages)
        .from_select(["id", "thread_id", *keys], select(seq.c.id, seq.c.id, *values))
        .returning(messages.c.id)
    )


@functools.cache
def _insert_message_pg(keys: tuple[str, ...], own_thread: bool) -> Any:
    """PostgreSQL's insert of a message row with its word hashes (schema
    step 20), in one statement: the words new to the vocabulary go in
    first (a CTE, ``fts.ADD_VOCAB_SQL``; none: no row), then the row, in
    a thread of its own (``own_thread``: its id, taken from the sequence
    first) or ``thread_id``. ``keys``: the columns of
    :func:`_message_values` plus ``fts.search_params``'. Cached per key
    set, so ``execute`` prepares it once."""
    pg = postgresql.dialect()
    cols = [k for k in keys if k in messages.c and k != "thread_id"]
    casts = ", ".join(f"CAST(:{k} AS {messages.c[k].type.compile(dialect=pg)})" for k in cols)
    thread = "n.id" if own_thread else "CAST(:thread_id AS BIGINT)"
    return sql_text(
        f"WITH v AS ({fts.ADD_VOCAB_SQL}), "
        f"n AS (SELECT {_NEXT_MESSAGE_ID_PG} AS id) "
        f"INSERT INTO messages (id, thread_id, {', '.join(cols)}, search_words) "
        f"SELECT n.id, {thread}, {casts}, CAST(:search_words AS int4[]) FROM n RETURNING id"
    )


# PostgreSQL: the thread of a message the new one refers to (``refs``:
# its References and In-Reply-To), one index lookup per reference on
# messages_account_msgid. Not ``message_id_header = ANY(:refs)``: the
# generic plan of that prepared statement (the one a pooled connection
# keeps after five executions) costs an unknown array's probes above a
# filter, and so read every message of the account per delivery, no refs
# at all included. Here each lookup is a plain equality on both columns
# of the index, and an empty ``refs`` runs none.
_THREAD_OF_REFS_PG = (
    "SELECT t.thread_id FROM unnest(CAST(:refs AS TEXT[])) AS r(ref) "
    "CROSS JOIN LATERAL (SELECT m.thread_id FROM messages m "
    "WHERE m.account_id = CAST(:account_id AS BIGINT) AND m.message_id_header = r.ref "
    "LIMIT 1) AS t LIMIT 1"
)


@functools.cache
def _deliver_head_pg(keys: tuple[str, ...], by_name: bool, with_blob: bool) -> Any:
    """PostgreSQL: a delivery's first and only statement before the flush
    (a round trip instead of three): the blob put in the shard's ``blobs``
    table (``with_blob``: PACK_PUT_SQL's upsert), the words new to the
    vocabulary and the message row as :func:`_insert_message_pg` writes
    them, its thread found by ``refs`` (that of a message of the account
    with one of those Message-IDs, _THREAD_OF_REFS_PG, else a thread of
    its own), then the
    account and the target mailbox locked as _LOCK_WITH_MAILBOX_BY_*_PG
    lock them (by name with ``by_name``, else by id). One row: the new
    message's id (``new_message_id``) and, left-joined, the locked
    account's columns and the mailbox's (``m_<name>``), all NULL when the
    lock found nothing (the caller then goes the long way, the message row
    written). The lock runs after the insert, in its own sub-select: a
    lock that waited rereads the committed rows, as the plain lock does;
    the unreferenced blob upsert runs last, after the account's lock, in
    the order every delivery takes its locks."""
    pg = postgresql.dialect()
    cols = [k for k in keys if k in messages.c and k != "thread_id"]
    casts = ", ".join(f"CAST(:{k} AS {messages.c[k].type.compile(dialect=pg)})" for k in cols)
    blob = f"b AS ({PACK_PUT_SQL}), " if with_blob else ""
    which = "m.name = CAST(:b_name AS TEXT)" if by_name else "m.id = CAST(:b_id AS BIGINT)"
    account_cols = ", ".join(f"a.{c.name}" for c in shard_accounts.c)
    mailbox_cols = ", ".join(f"m.{c.name} AS m_{c.name}" for c in mailboxes.c)
    return sql_text(
        f"WITH {blob}v AS ({fts.ADD_VOCAB_SQL}), "
        f"n AS (SELECT {_NEXT_MESSAGE_ID_PG} AS id), "
        f"msg AS (INSERT INTO messages (id, thread_id, {', '.join(cols)}, search_words) "
        f"SELECT n.id, coalesce(({_THREAD_OF_REFS_PG}), n.id), "
        f"{casts}, CAST(:search_words AS int4[]) FROM n RETURNING id) "
        "SELECT msg.id AS new_message_id, l.* FROM msg LEFT JOIN ("
        f"SELECT {account_cols}, {mailbox_cols} FROM shard_accounts a JOIN mailboxes m "
        f"ON m.account_id = a.account_id AND {which} "
        "WHERE a.account_id = CAST(:b_account AS BIGINT) FOR UPDATE OF a, m"
        ") AS l ON true"
    )


_SET_THREAD = (
    update(messages).where(messages.c.id == bindparam("b_id")).values(thread_id=bindparam("b_id"))
)
_BUMP_MAILBOX = (
    update(mailboxes)
    .where(mailboxes.c.id == bindparam("b_id"))
    .values(uidnext=bindparam("b_uidnext"), highestmodseq=bindparam("b_modseq"))
)
_MAILBOX_BY_NAME = select(mailboxes).where(
    mailboxes.c.account_id == bindparam("b_account"), mailboxes.c.name == bindparam("b_name")
)
_MAILBOX_BY_ID = select(mailboxes).where(
    mailboxes.c.account_id == bindparam("b_account"), mailboxes.c.id == bindparam("b_id")
)


# SQLite: the account's counters and one of its mailboxes in one statement,
# the start of most write functions (each statement costs the SQLite writer
# a wait for the GIL while the event loop is busy). Not on PostgreSQL: a
# SELECT that waits for FOR UPDATE rereads only the locked row, and the
# mailbox's UIDNEXT must be read after the lock. No row: the account has no
# counters row on this shard yet; a row with m_id NULL: no such mailbox.
_MAILBOX_FIELDS = tuple(c.name for c in mailboxes.c)
_MailboxRow = namedtuple("_MailboxRow", _MAILBOX_FIELDS)  # type: ignore[misc]
# The mailbox's columns out of a _LOCK_WITH_MAILBOX_* row (labelled m_<name>).
_MAILBOX_OF_LOCK_ROW = operator.attrgetter(*(f"m_{n}" for n in _MAILBOX_FIELDS))
_ACCOUNT_AND_MAILBOX = select(shard_accounts, *(c.label(f"m_{c.name}") for c in mailboxes.c)).where(
    shard_accounts.c.account_id == bindparam("b_account")
)
_LOCK_WITH_MAILBOX_BY_ID = _ACCOUNT_AND_MAILBOX.outerjoin(
    mailboxes,
    and_(
        mailboxes.c.account_id == shard_accounts.c.account_id,
        mailboxes.c.id == bindparam("b_id"),
    ),
)
_LOCK_WITH_MAILBOX_BY_NAME = _ACCOUNT_AND_MAILBOX.outerjoin(
    mailboxes,
    and_(
        mailboxes.c.account_id == shard_accounts.c.account_id,
        mailboxes.c.name == bindparam("b_name"),
    ),
)
# PostgreSQL: the same in one statement (a round trip less per write) by
# locking the mailbox row as well, after the account's (FOR UPDATE OF both,
# in FROM order, as every writer locks them): a SELECT that waited for a
# lock rereads the latest version of each row it locks, so the mailbox's
# UIDNEXT is the committed one. An inner join (the nullable side of an
# outer join cannot be locked): no row sends the caller the long way.
def _lock_with_mailbox_pg(which: Any) -> Any:
    mine = mailboxes.c.account_id == shard_accounts.c.account_id
    return _ACCOUNT_AND_MAILBOX.join(mailboxes, and_(mine, which)).with_for_update(
        of=[shard_accounts, mailboxes]
    )


_LOCK_WITH_MAILBOX_BY_ID_PG = _lock_with_mailbox_pg(mailboxes.c.id == bindparam("b_id"))
_LOCK_WITH_MAILBOX_BY_NAME_PG = _lock_with_mailbox_pg(mailboxes.c.name == bindparam("b_name"))


def _mailbox_query(
    account_id: int, name: str | None, mailbox_id: int | None
) -> tuple[Any, dict[str, Any]]:
    if name is not None:
        return _MAILBOX_BY_NAME, {"b_account": account_id, "b_name": name}
    return _MAILBOX_BY_ID, {"b_account": account_id, "b_id": mailbox_id}


# --- synchronous reads and writes (Database.read_sync / write_batched) ------
# Every statement here is a module constant with only bound parameters, so
# ``execute`` runs it straight on the SQLite driver.

_MAX_UID = select(func.max(E.c.uid)).where(E.c.mailbox_id == bindparam("b_box"))
# At most this many UID ranges are read one indexed range query each; more
# become one statement (see _select_entries_sync).
_RANGE_QUERIES = 4


class _EntryQuery:
    """Entry rows of one mailbox with fixed columns: the whole mailbox, or
    one UID range, in UID order."""

    def __init__(self, columns: Sequence[Any], with_message: bool) -> None:
        stmt = select(*columns)
        if with_message:
            stmt = stmt.select_from(E.join(messages, messages.c.id == E.c.message_id))
        self.base = stmt.where(E.c.mailbox_id == bindparam("b_box"))
        self.every = self.base.order_by(E.c.uid)
        self.range = self.base.where(
            E.c.uid.between(bindparam("b_lo"), bindparam("b_hi"))
        ).order_by(E.c.uid)
        # One range of a mailbox that is the account's (the owner check in
        # the same statement: one round trip where rows are found).
        self.owned_range = self.range.where(
            exists().where(
                mailboxes.c.id == bindparam("b_box"),
                mailboxes.c.account_id == bindparam("b_account"),
            )
        )


_ENTRIES = _EntryQuery(_ENTRY_COLUMNS, True)
_ENTRIES_PARSED = _EntryQuery((*_ENTRY_COLUMNS, messages.c.parsed), True)
# What IMAP SORT and THREAD read (SqlMailStore.sort_rows) on the in-memory
# path: the decoded subject and sent date from their columns, and from the
# stored parsed form only its small fields, picked by the database as one
# JSON array (see storage.sortrows.SORT_PATHS): parsing the whole form in
# Python cost 3-5 s per 100,000 messages, the database's own JSON
# functions a fraction.
_SORT_COLUMNS = (E.c.uid, E.c.internal_date, E.c.size, messages.c.sent_date, messages.c.subject)
_SORT_ROWS_SQLITE = _EntryQuery((*_SORT_COLUMNS, sortkeys.PICKED_SQLITE), True)
_SORT_ROWS_PG = _EntryQuery((*_SORT_COLUMNS, sortkeys.PICKED_PG), True)
# The same of one message (its stored keys for a new entry, see append).
_MESSAGE_SORT_SQLITE = select(
    messages.c.size, messages.c.sent_date, messages.c.subject, sortkeys.PICKED_SQLITE
).where(messages.c.id == bindparam("b_id"), messages.c.account_id == bindparam("b_account"))
_MESSAGE_SORT_PG = select(
    messages.c.size, messages.c.sent_date, messages.c.subject, sortkeys.PICKED_PG
).where(messages.c.id == bindparam("b_id"), messages.c.account_id == bindparam("b_account"))
# An unfiltered folder-list page (SqlMailStore.page with All(), what a
# client opening a folder asks), on the index (mailbox_id, list_date, uid):
# constant statements, run precompiled by ``execute`` on either backend.
_PAGE_ALL = (
    select(*_ENTRY_COLUMNS, messages.c.parsed, E.c.list_date)
    .select_from(E.join(messages, messages.c.id == E.c.message_id))
    .where(E.c.mailbox_id == bindparam("b_box"))
)
# (SQLite's compiler adds an OFFSET to a bound LIMIT: it is bound too.)
_PAGE_ALL_FIRST = (
    _PAGE_ALL.order_by(E.c.list_date.desc(), E.c.uid.desc())
    .limit(bindparam("b_limit"))
    .offset(bindparam("b_offset"))
)
_PAGE_ALL_AFTER = (
    _PAGE_ALL.where(
        tuple_(E.c.list_date, E.c.uid) < tuple_(bindparam("b_date"), bindparam("b_uid"))
    )
    .order_by(E.c.list_date.desc(), E.c.uid.desc())
    .limit(bindparam("b_limit"))
    .offset(bindparam("b_offset"))
)
_ENTRY_FLAGS = _EntryQuery((E.c.uid, E.c.sysflags), False)


def _select_entries_sync(
    conn: Connection, mailbox_id: int, uids: UidSet | None, query: _EntryQuery
) -> list[Any]:
    """Rows of the mailbox's entries in ``uids`` (all if None), UID order."""
    if uids is None:
        return execute(conn, query.every, {"b_box": mailbox_id}).all()
    if uids.is_empty():
        return []
    ranges = uids.ranges
    if any(last is None for _first, last in ranges):
        top = execute(conn, _MAX_UID, {"b_box": mailbox_id}).scalar()
        if top is None:
            return []
        # ``n:*`` covers the highest UID even when n exceeds it (RFC 3501
        # section 9, seq-range); resolved ranges may now overlap: merge.
        ranges = UidSet.from_ranges(
            (first, last) if last is not None else (min(first, top), top) for first, last in ranges
        ).ranges
    if len(ranges) <= _RANGE_QUERIES:
        rows: list[Any] = []
        for lo, hi in ranges:
            params = {"b_box": mailbox_id, "b_lo": lo, "b_hi": hi}
            rows.extend(execute(conn, query.range, params).all())
        return rows
    bounded = UidSet(ranges)
    cond = crit.uid_condition(E.c.uid, bounded, None)
    if cond is not None:
        stmt = query.base.where(cond).order_by(E.c.uid)
        return list(conn.execute(stmt, {"b_box": mailbox_id}).all())
    matcher = crit.UidMatcher(bounded, None)
    params = {"b_box": mailbox_id, "b_lo": ranges[0][0], "b_hi": ranges[-1][1]}
    return [r for r in execute(conn, query.range, params).all() if r.uid in matcher]


_STORE_FLAGS = (
    update(E)
    .where(E.c.mailbox_id == bindparam("b_box"), E.c.uid == bindparam("b_uid"))
    .values(sysflags=bindparam("b_mask"), keywords=bindparam("b_kw"), modseq=bindparam("b_modseq"))
)
_INSERT_EXPUNGED = insert(expunged)
# _remove_entries_sync on SQLite, for up to _FEW_EXPUNGED UIDs.
_FEW_EXPUNGED = 32
_DELETE_ENTRY = (
    delete(E)
    .where(E.c.mailbox_id == bindparam("b_box"), E.c.uid == bindparam("b_uid"))
    .returning(E.c.message_id, E.c.size)
)
_DELETE_ORPHAN = delete(messages).where(
    messages.c.id == bindparam("b_id"), ~exists().where(E.c.message_id == messages.c.id)
)
_SET_HIGHESTMODSEQ = (
    update(mailboxes)
    .where(mailboxes.c.id == bindparam("b_id"))
    .values(highestmodseq=bindparam("b_modseq"))
)
_SET_RECENT_FLOOR = (
    update(mailboxes)
    .where(mailboxes.c.id == bindparam("b_id"))
    .values(recent_floor=bindparam("b_floor"))
)
_STATUS_COUNTS = select(
    func.count(),
    func.coalesce(func.sum(E.c.sysflags.op("&")(bindparam("b_seen"))), literal_column("0")),
    func.coalesce(func.sum(E.c.size), literal_column("0")),
).where(E.c.mailbox_id == bindparam("b_box"))
_RECENT_COUNT = select(func.count()).where(
    E.c.mailbox_id == bindparam("b_box"), E.c.uid >= bindparam("b_floor")
)
_STATUS_ALL = (
    select(
        mailboxes.c.id,
        mailboxes.c.uidnext,
        mailboxes.c.uidvalidity,
        mailboxes.c.highestmodseq,
        func.count(E.c.uid),
        func.coalesce(func.sum(E.c.sysflags.op("&")(bindparam("b_seen"))), literal_column("0")),
        func.coalesce(func.sum(E.c.size), literal_column("0")),
    )
    .select_from(mailboxes.outerjoin(E, E.c.mailbox_id == mailboxes.c.id))
    .where(mailboxes.c.account_id == bindparam("b_account"))
    .group_by(
        mailboxes.c.id, mailboxes.c.uidnext, mailboxes.c.uidvalidity, mailboxes.c.highestmodseq
    )
)
_MAILBOXES = (
    select(mailboxes)
    .where(mailboxes.c.account_id == bindparam("b_account"))
    .order_by(mailboxes.c.name)
)
_LAST_CHANGE = select(shard_accounts.c.last_change_id).where(
    shard_accounts.c.account_id == bindparam("b_account")
)
# A delivery's blob in its own transaction (the pack's own statement).
_PUT_BLOB = sql_text(PACK_PUT_SQL)
_KEYWORD_TEXTS = select(E.c.keywords).where(E.c.mailbox_id == bindparam("b_box")).distinct()
# The snapshot's reads (SqlMailStore.snapshot). The WHERE terms below are
# written exactly as the partial indexes of schema step 16 declare them,
# which is how SQLite and PostgreSQL match a query to a partial index:
# keep the two alike. Entries without keywords store " " (_keywords_text).
_SEEN_BIT = crit.FLAG_BITS[SEEN]
_UNSEEN_TERM = E.c.sysflags.op("&")(literal_column(str(_SEEN_BIT))) == literal_column("0")
_FIRST_UNSEEN = select(func.min(E.c.uid)).where(
    E.c.mailbox_id == bindparam("b_box"), _UNSEEN_TERM, E.c.uid <= bindparam("b_top")
)
_SNAPSHOT_KEYWORDS = (
    select(E.c.keywords)
    .where(E.c.mailbox_id == bindparam("b_box"), E.c.keywords != literal_column("' '"))
    .distinct()
)
_UIDS_ORDERED = (
    select(E.c.uid).where(E.c.mailbox_id == bindparam("b_box")).order_by(E.c.uid).subquery()
)
# One row, not one per message: a mailbox of 100,000 UIDs is one string
# (SQLite) or one integer array (PostgreSQL) decoded in C. PostgreSQL:
# ARRAY(ordered subquery), which takes the UIDs in the index's order as
# it reads them, not array_agg(uid ORDER BY uid), whose aggregate sorts
# its input again (a third of the read for 100,000, bench/README.md).
_UIDS_SQLITE = select(func.group_concat(_UIDS_ORDERED.c.uid))
_UIDS_PG = select(
    func.array(
        select(E.c.uid)
        .where(E.c.mailbox_id == bindparam("b_box"))
        .order_by(E.c.uid)
        .scalar_subquery()
    )
)


def _uid_array(conn: Connection, mailbox_id: int) -> array[int]:
    """Every UID of the mailbox, ascending. UIDs are 32-bit (RFC 3501
    section 2.3.1.1): four bytes each."""
    params = {"b_box": mailbox_id}
    if conn.dialect.name == "sqlite":
        text = execute(conn, _UIDS_SQLITE, params).scalar()
        values = list(map(int, text.split(","))) if text else []
        # group_concat keeps the subquery's order in practice, which SQLite
        # does not promise before 3.44; sorting sorted input is one pass.
        values.sort()
    else:
        values = execute(conn, _UIDS_PG, params).scalar() or []
    return array("I", values)


def _keyword_names(texts: Iterable[str]) -> list[str]:
    """Stored keyword texts -> the distinct keywords, one spelling each,
    sorted case-insensitively."""
    found: dict[str, str] = {}
    for text in texts:
        for kw in text.split():
            found.setdefault(kw.lower(), kw)
    return sorted(found.values(), key=str.lower)
_CHANGED_ENTRIES = (
    select(*_ENTRY_COLUMNS)
    .select_from(E.join(messages, messages.c.id == E.c.message_id))
    .where(E.c.mailbox_id == bindparam("b_box"), E.c.modseq > bindparam("b_modseq"))
    .order_by(E.c.uid)
)
_VANISHED = (
    select(expunged.c.uid)
    .where(expunged.c.mailbox_id == bindparam("b_box"), expunged.c.modseq > bindparam("b_modseq"))
    .order_by(expunged.c.uid)
)


# (system flag mask, keywords text) -> (the flag names, sorted; their
# change-log JSON): STORE writes few distinct combinations, and the JSON is
# built inside the writers' lock. Bounded: cleared when full.
_FLAG_TEXTS: dict[tuple[int, str], tuple[tuple[str, ...], str]] = {}
_MAX_FLAG_TEXTS = 4096


def _flag_texts(mask: int, keywords: str) -> tuple[tuple[str, ...], str]:
    key = (mask, keywords)
    texts = _FLAG_TEXTS.get(key)
    if texts is None:
        names = tuple(sorted(_flags_of(mask, keywords)))
        texts = (names, compact_json({"flags": list(names)}))
        if len(_FLAG_TEXTS) >= _MAX_FLAG_TEXTS:
            _FLAG_TEXTS.clear()
        _FLAG_TEXTS[key] = texts
    return texts


def _plan_store(
    rows: Sequence[Any],
    mode: StoreMode,
    mask: int,
    keywords: Sequence[str],
    unchanged_since: int | None,
    keep_mask: int = 0,
    keep_keywords: bool = False,
) -> tuple[list[int], list[tuple[Any, int, str]]]:
    """What a STORE does to entry rows: (UIDs refused by UNCHANGEDSINCE,
    (row, new system flag mask, new keywords text) of each entry whose
    flags change). Rows whose flags would not change are left out. A
    REPLACE leaves the system flags of ``keep_mask`` and, with
    ``keep_keywords``, the keywords as each row has them."""
    modified: list[int] = []
    changed: list[tuple[Any, int, str]] = []
    for r in rows:
        # RFC 7162 section 3.1.3: changed since the client's modseq: refused.
        if unchanged_since is not None and r.modseq > unchanged_since:
            modified.append(r.uid)
            continue
        if not keywords and mode is not StoreMode.REPLACE:
            # System flags only (the usual \Seen, \Deleted): keywords stay.
            new_mask = r.sysflags | mask if mode is StoreMode.ADD else r.sysflags & ~mask
            if new_mask != r.sysflags:
                changed.append((r, new_mask, r.keywords))
            continue
        old_kw = {k.lower(): k for k in r.keywords.split()}
        if mode is StoreMode.REPLACE:
            new_mask = (mask & ~keep_mask) | (r.sysflags & keep_mask)
            new_kw = dict(old_kw) if keep_keywords else {k.lower(): k for k in keywords}
        elif mode is StoreMode.ADD:
            new_mask = r.sysflags | mask
            new_kw = dict(old_kw)
            for k in keywords:
                new_kw.setdefault(k.lower(), k)
        else:
            new_mask = r.sysflags & ~mask
            new_kw = dict(old_kw)
            for k in keywords:
                new_kw.pop(k.lower(), None)
        kw_text = _keywords_text(new_kw.values())
        if new_mask == r.sysflags and kw_text == _keywords_text(old_kw.values()):
            continue
        changed.append((r, new_mask, kw_text))
    return modified, changed


# What a STORE's write function hands back from inside the lock: (UIDs
# refused by UNCHANGEDSINCE, _plan_store's changed entries, the new modseq,
# the first change-log id, the transaction's time).
_StoreOutcome = tuple[list[int], list[tuple[Any, int, str]], int, int, float]

# PostgreSQL: a STORE of one UID range in two statements (one round trip
# each) instead of four. The first locks the account and mailbox rows (as
# _LOCK_WITH_MAILBOX_BY_ID_PG, in that order, as every writer) and the
# range's entries: a row that waited for a lock is reread at its latest
# version (READ COMMITTED, PostgreSQL manual 13.2.1), so the flags planned
# from it are the committed ones. Entries committed while it waited are
# not seen: unless every UID of the range came back, they are read again
# (_select_entries_sync, under the lock). Beside the shared statements
# _begin_in_mailbox_sync and _select_entries_sync.
_ENTRY_FIELDS = tuple(c.name for c in _ENTRY_COLUMNS)
_EntryRow = namedtuple("_EntryRow", _ENTRY_FIELDS)  # type: ignore[misc]
_ENTRY_OF_LOCK_ROW = operator.attrgetter(*(f"e_{n}" for n in _ENTRY_FIELDS))
_LOCK_STORE_RANGE_PG = (
    select(
        shard_accounts,
        *(c.label(f"m_{c.name}") for c in mailboxes.c),
        *(c.label(f"e_{c.name}") for c in _ENTRY_COLUMNS),
    )
    .select_from(
        shard_accounts.join(
            mailboxes,
            and_(
                mailboxes.c.account_id == shard_accounts.c.account_id,
                mailboxes.c.id == bindparam("b_id"),
            ),
        )
        .join(
            E,
            and_(
                E.c.mailbox_id == mailboxes.c.id,
                E.c.uid.between(bindparam("b_lo"), bindparam("b_hi")),
            ),
        )
        .join(messages, messages.c.id == E.c.message_id)
    )
    .where(shard_accounts.c.account_id == bindparam("b_account"))
    .order_by(E.c.uid)
    .with_for_update(of=[shard_accounts, mailboxes, E])
)
# The second writes the entries' flags, HIGHESTMODSEQ, the change log and
# the account's last change id (rows passed as arrays, as _flush_statement_pg
# does). Beside _STORE_FLAGS, _SET_HIGHESTMODSEQ and _Tx.log_rows_sync.
_STORE_WRITE_PG = sql_text(
    "WITH entries AS (UPDATE mailbox_entries SET sysflags = u.mask, keywords = u.kw, "
    "modseq = CAST(:s_modseq AS BIGINT) FROM unnest(CAST(:s_uid AS BIGINT[]), "
    "CAST(:s_mask AS INTEGER[]), CAST(:s_kw AS TEXT[])) AS u(uid, mask, kw) "
    "WHERE mailbox_entries.mailbox_id = CAST(:s_box AS BIGINT) "
    "AND mailbox_entries.uid = u.uid), "
    "bump AS (UPDATE mailboxes SET highestmodseq = CAST(:s_modseq AS BIGINT) "
    "WHERE id = CAST(:s_box AS BIGINT)), "
    f"changes AS ({_unnest(change_log, 'c_', _CHANGE_KEYS)}) "
    "UPDATE shard_accounts SET last_change_id = CAST(:b_last_change AS BIGINT) "
    "WHERE account_id = CAST(:b_account AS BIGINT)"
)


def _lock_store_range_pg(
    conn: Connection, account_id: int, mailbox_id: int, uids: UidSet
) -> tuple[_Tx, Any, list[Any]] | None:
    """PostgreSQL: the STORE's transaction, its mailbox row and the
    entries in ``uids`` (UID order), locked in one statement (see
    _LOCK_STORE_RANGE_PG); None if ``uids`` is not one bounded range or
    none of it was found (no such mailbox, no entry, the account's first
    write here): the caller then goes the long way."""
    ranges = uids.ranges
    if len(ranges) != 1 or ranges[0][1] is None:
        return None
    lo, hi = ranges[0]
    assert hi is not None
    params = {"b_account": account_id, "b_id": mailbox_id, "b_lo": lo, "b_hi": hi}
    locked = execute(conn, _LOCK_STORE_RANGE_PG, params).all()
    if not locked:
        return None
    tx = _tx_from_row(conn, account_id, locked[0])
    mbox = _MailboxRow(*_MAILBOX_OF_LOCK_ROW(locked[0]))
    if len(locked) == hi - lo + 1:
        return tx, mbox, [_EntryRow(*_ENTRY_OF_LOCK_ROW(r)) for r in locked]
    # Gaps: entries committed while the lock was awaited may fill them.
    return tx, mbox, _select_entries_sync(conn, mailbox_id, uids, _ENTRIES)



# PostgreSQL: the common STORE (RFC 3501 section 6.4.6 +FLAGS or -FLAGS of
# system flags only, one bounded UID range, with or without the RFC 7162
# section 3.1.3 UNCHANGEDSINCE guard) in one statement instead of
# _LOCK_STORE_RANGE_PG then _STORE_WRITE_PG: a STORE batch is then this and
# its COMMIT. ``locked`` takes _LOCK_STORE_RANGE_PG's locks in its order
# (account, mailbox, entries; a row that waited is read at its latest
# version); ``planned`` is _plan_store's arithmetic for that case; the
# writes go ahead only when every UID of the range came back and the
# account has no fence (``whole``), otherwise nothing is written and the
# caller plans again under the locks now held (the long way). The updates
# find rows of the statement's snapshot and, in READ COMMITTED, move to the
# version this statement locked (PostgreSQL manual 13.2.1). The change-log
# JSON is _flag_texts': {"flags":[...]} with the flag names sorted by code
# point (COLLATE "C" on UTF-8), keywords being ASCII atoms.
def _system_flag_values() -> str:
    values = []
    for name, bit in crit.FLAG_BITS.items():
        literal = name.replace("\\", "\\\\").replace("'", "\\'")
        values.append(f"(E'{literal}', {bit})")
    return ", ".join(values)


_FLAGS_JSON_PG = (
    "(SELECT '{\"flags\":[' || coalesce(string_agg(CAST(to_json(f.name) AS TEXT), ',' "
    "ORDER BY f.name COLLATE \"C\"), '') || ']}' FROM ("
    f"SELECT s.name FROM (VALUES {_system_flag_values()}) AS s(name, bit) "
    "WHERE c.new_mask & s.bit <> 0 UNION "
    "SELECT k FROM unnest(string_to_array(c.keywords, ' ')) AS k WHERE k <> '') AS f(name))"
)
_STORE_SYSTEM_FLAGS_PG = sql_text(
    "WITH locked AS MATERIALIZED (SELECT a.fence, a.last_change_id, m.highestmodseq, "
    "e.mailbox_id, e.uid, e.message_id, e.sysflags, e.keywords, e.modseq, e.internal_date, "
    "e.internal_tz, e.size, g.blob_key, e.saved_at "
    "FROM shard_accounts a "
    "JOIN mailboxes m ON m.account_id = a.account_id AND m.id = CAST(:q_box AS BIGINT) "
    "JOIN mailbox_entries e ON e.mailbox_id = m.id "
    "AND e.uid BETWEEN CAST(:q_lo AS BIGINT) AND CAST(:q_hi AS BIGINT) "
    "JOIN messages g ON g.id = e.message_id "
    "WHERE a.account_id = CAST(:q_account AS BIGINT) ORDER BY e.uid FOR UPDATE OF a, m, e), "
    "planned AS MATERIALIZED (SELECT l.*, CASE WHEN CAST(:q_add AS BOOLEAN) "
    "THEN l.sysflags | CAST(:q_mask AS INTEGER) ELSE l.sysflags & ~CAST(:q_mask AS INTEGER) "
    "END AS new_mask, COALESCE(l.modseq > CAST(:q_since AS BIGINT), false) AS refused "
    "FROM locked l), "
    "whole AS MATERIALIZED (SELECT min(last_change_id) AS last_change_id, "
    "min(highestmodseq) + 1 AS modseq FROM locked "
    "HAVING count(*) = CAST(:q_hi AS BIGINT) - CAST(:q_lo AS BIGINT) + 1 "
    "AND bool_and(fence IS NULL)), "
    "changed AS MATERIALIZED (SELECT p.uid, p.new_mask, p.keywords, w.modseq, "
    "w.last_change_id + row_number() OVER (ORDER BY p.uid) AS change_id "
    "FROM planned p CROSS JOIN whole w WHERE NOT p.refused AND p.new_mask <> p.sysflags), "
    "entries AS (UPDATE mailbox_entries SET sysflags = c.new_mask, modseq = c.modseq "
    "FROM changed c WHERE mailbox_entries.mailbox_id = CAST(:q_box AS BIGINT) "
    "AND mailbox_entries.uid BETWEEN CAST(:q_lo AS BIGINT) AND CAST(:q_hi AS BIGINT) "
    "AND mailbox_entries.uid = c.uid), "
    "bump AS (UPDATE mailboxes SET highestmodseq = w.modseq FROM whole w "
    "WHERE mailboxes.id = CAST(:q_box AS BIGINT) AND EXISTS (SELECT 1 FROM changed)), "
    "changes AS (INSERT INTO change_log (account_id, id, kind, mailbox_id, uid, modseq, at, data) "
    "SELECT CAST(:q_account AS BIGINT), c.change_id, CAST(:q_kind AS TEXT), "
    "CAST(:q_box AS BIGINT), c.uid, c.modseq, CAST(:q_at AS DOUBLE PRECISION), "
    f"{_FLAGS_JSON_PG} FROM changed c), "
    "account AS (UPDATE shard_accounts SET last_change_id = "
    "(SELECT max(change_id) FROM changed) "
    "WHERE account_id = CAST(:q_account AS BIGINT) AND EXISTS (SELECT 1 FROM changed)) "
    "SELECT p.*, EXISTS (SELECT 1 FROM whole) AS written FROM planned p ORDER BY p.uid"
)
_ENTRY_OF_STORE_ROW = operator.attrgetter(*_ENTRY_FIELDS)


def _store_system_flags_pg(
    conn: Connection,
    account_id: int,
    uids: UidSet,
    mailbox_id: int,
    add: bool,
    mask: int,
    unchanged_since: int | None,
) -> _StoreOutcome | None:
    """PostgreSQL: a +FLAGS (``add``) or -FLAGS of the system flags of
    ``mask`` on one bounded UID range, locked, planned and written in one
    statement (see _STORE_SYSTEM_FLAGS_PG); the same outcome as the long
    way's. None if ``uids`` is not one bounded range, or the statement
    wrote nothing because it could not tell the whole outcome (no such
    mailbox or entry, the account's first write here, a gap in the range
    that a commit may have filled while it waited): the caller then goes
    the long way, under the locks this took, if any. Raises for a fenced
    account (nothing written)."""
    ranges = uids.ranges
    if len(ranges) != 1 or ranges[0][1] is None:
        return None
    lo, hi = ranges[0]
    at = _now()
    params = {
        "q_account": account_id,
        "q_box": mailbox_id,
        "q_lo": lo,
        "q_hi": hi,
        "q_add": add,
        "q_mask": mask,
        "q_since": unchanged_since,
        "q_kind": ChangeKind.FLAGS.value,
        "q_at": at,
    }
    rows = execute(conn, _STORE_SYSTEM_FLAGS_PG, params).all()
    if not rows:
        return None
    if rows[0].fence is not None:
        raise fenced_error()
    if not rows[0].written:
        return None
    modified = [r.uid for r in rows if r.refused]
    changed = [
        (_EntryRow(*_ENTRY_OF_STORE_ROW(r)), r.new_mask, r.keywords)
        for r in rows
        if not r.refused and r.new_mask != r.sysflags
    ]
    return modified, changed, rows[0].highestmodseq + 1, rows[0].last_change_id + 1, at


def _stored_flags(
    account_id: int,
    modseq: int,
    first_change: int,
    at: float,
    changed: Sequence[tuple[Any, int, str]],
) -> tuple[tuple[MessageEntry, ...], list[Change]]:
    """The entries a committed STORE wrote and their change-log entries
    (ids from ``first_change``), built after the commit, outside the lock."""
    when = dt.datetime.fromtimestamp(at, dt.UTC)
    entries = []
    changes = []
    for i, (r, new_mask, kw_text) in enumerate(changed):
        names = _flag_texts(new_mask, kw_text)[0]
        entries.append(
            MessageEntry(
                mailbox_id=r.mailbox_id,
                uid=r.uid,
                message_id=r.message_id,
                flags=frozenset(names),
                modseq=modseq,
                internal_date=_join_date(r.internal_date, r.internal_tz),
                size=r.size,
                blob_key=r.blob_key,
                saved=_saved(r.saved_at),
            )
        )
        changes.append(
            Change(
                id=first_change + i,
                account_id=account_id,
                kind=ChangeKind.FLAGS,
                mailbox_id=r.mailbox_id,
                uid=r.uid,
                modseq=modseq,
                at=when,
                data={"flags": list(names)},
                local=True,  # published here, all together (see Change)
            )
        )
    return tuple(entries), changes


_FENCE = select(shard_accounts.c.fence).where(shard_accounts.c.account_id == bindparam("b_account"))


def _no_mailbox(conn: Connection, account_id: int) -> StorageError:
    """NOT_FOUND for a missing mailbox, unless the account moved off this
    shard (or is moving): a session still routed here must retry, not be
    told its mailbox is gone. Read only on this rare path."""
    if execute(conn, _FENCE, {"b_account": account_id}).scalar() is not None:
        return fenced_error()
    return errors.not_found("no such mailbox")


def _mailbox_sync(conn: Connection, stmt: Any, params: dict[str, Any]) -> Mailbox:
    row = execute(conn, stmt, params).first()
    if row is None:
        raise _no_mailbox(conn, params["b_account"])
    return _mailbox(row)


def _message_values(account_id: int, blob_key: str, parsed: ParsedMessage) -> dict[str, Any]:
    """The ``messages`` row of a parsed message, less ``thread_id``."""
    sent = parsed.sent_date
    if sent is not None and sent.tzinfo is None:
        sent = sent.replace(tzinfo=dt.UTC)
    return {
        "account_id": account_id,
        "blob_key": blob_key,
        "size": parsed.size,
        "parsed": codec.parsed_to_json(parsed),
        "message_id_header": (parsed.message_id or None) and parsed.message_id[:998],
        "sent_date": None if sent is None else sent.timestamp(),
        "sent_day": None if sent is None else sent.date().toordinal(),
        "subject": parsed.subject or "",
        "from_text": parsed.from_text or "",
        "to_text": parsed.to_text or "",
        "cc_text": parsed.cc_text or "",
        "body_text": parsed.body_text or "",
        "created": _now(),
    }


def fenced_error() -> StorageError:
    """What a write of an account in the middle of a move gets: TEMPORARY,
    so SMTP answers 451, IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP], HTTP
    503, and the client retries (after the move, on the account's new shard)."""
    return errors.AccountMoving()


def _tx_from_row(conn: Any, account_id: int, row: Any) -> _Tx:
    # The fence is read in the row every write locks first: once the mover
    # has set it, no write of this account can commit on this shard.
    if row.fence is not None:
        raise fenced_error()
    return _Tx(
        conn,
        account_id,
        quota_bytes=row.quota_bytes,
        last_change_id=row.last_change_id,
        next_uidvalidity=row.next_uidvalidity,
        used_bytes=row.used_bytes,
    )


def _new_account_row(account_id: int, quota_bytes: int | None) -> Any:
    # Time-based first UIDVALIDITY: a recreated account id never reuses
    # the values of its predecessor (RFC 3501 section 2.3.1.1).
    return insert(shard_accounts).values(
        account_id=account_id,
        last_change_id=0,
        next_uidvalidity=int(_now()) & 0x7FFFFFFF,
        quota_bytes=quota_bytes,
        used_bytes=0,
    )


async def delete_account_mail(conn: AsyncConnection, account_id: int) -> None:
    """Deletes every mailbox, entry, tombstone, subscription, message,
    change-log row, spam policy row, METADATA entry and mailbox ACL of the
    account in this shard database (not its counters)."""
    mbox_ids = select(mailboxes.c.id).where(mailboxes.c.account_id == account_id)
    await conn.execute(delete(E).where(E.c.mailbox_id.in_(mbox_ids)))
    await conn.execute(delete(expunged).where(expunged.c.mailbox_id.in_(mbox_ids)))
    await conn.execute(delete(mailboxes).where(mailboxes.c.account_id == account_id))
    await conn.execute(delete(subscriptions).where(subscriptions.c.account_id == account_id))
    await conn.execute(delete(messages).where(messages.c.account_id == account_id))
    await conn.execute(delete(change_log).where(change_log.c.account_id == account_id))
    await delete_spam_policy(conn, account_id)
    await delete_metadata(conn, account_id)
    await delete_acl(conn, account_id)
    await conn.execute(delete(spam_tokens).where(spam_tokens.c.account_id == account_id))
    await conn.execute(delete(spam_learned).where(spam_learned.c.account_id == account_id))


class SqlMailStore(SpamPolicyStore, MetadataStore, AclStore):
    """A :class:`storage.api.MailStore` over one shard :class:`Database`."""

    def __init__(
        self,
        db: Database,
        events: EventBus,
        blobs: BlobStore | None = None,
        shard: str = "default",
    ) -> None:
        self.db = db
        self.events = events
        self.blobs = blobs
        self.shard = shard
        self._parsed_cache: OrderedDict[int, ParsedMessage] = OrderedDict()
        # Folder pages and fetches, by every column an entry is built from
        # (see _stored): a key names one StoredMessage for good.
        self._stored_cache: dict[tuple[Any, ...], StoredMessage] = {}
        # Unfiltered folder pages by (mailbox, limit, before), with the
        # mailbox counters they were read at (see _page_all).
        self._pages: dict[
            tuple[int, int, tuple[int, int] | None],
            tuple[tuple[int, int, int], tuple[tuple[tuple[int, int], StoredMessage], ...]],
        ] = {}
        # PostgreSQL: the words this store knows are in the search vocabulary.
        self._vocab = fts.Vocabulary()

    @property
    def inline_blob_max(self) -> int:
        """Blobs this store writes in a delivery's own transaction
        (``deliver``'s ``blob_data``): those the blob store packs, when its
        pack is a table in this shard's database (SQLite or PostgreSQL,
        ``FsBlobStore.inline_max``); else 0."""
        inline_max = getattr(self.blobs, "inline_max", None)
        return int(inline_max(self.db)) if inline_max is not None else 0

    # --- transactions ------------------------------------------------------

    @asynccontextmanager
    async def _write(self, account_id: int) -> AsyncIterator[_Tx]:
        published: list[Change] = []
        async with self.db.write() as conn:
            params = {"b_account": account_id}
            row = (await conn.execute(_LOCK_ACCOUNT, params)).first()
            if row is None:
                # An account this shard has not seen (created elsewhere, or
                # moved here): start its counters now.
                await self._insert_account_row(conn, account_id, None)
                row = (await conn.execute(_LOCK_ACCOUNT, params)).one()
            tx = _tx_from_row(conn, account_id, row)
            yield tx
            published = await tx.flush()
        # Only committed changes are announced.
        await self._publish(published)

    async def _publish(self, changes: Sequence[Change]) -> None:
        for change in changes:
            await self.events.publish(change)

    def _begin_sync(self, conn: Connection, account_id: int) -> _Tx:
        """The start of :meth:`_write` inside a synchronous write function
        (:meth:`Database.write_batched`): locks the account's counters row."""
        settle(conn, account_id)
        params = {"b_account": account_id}
        row = execute(conn, _LOCK_ACCOUNT, params).first()
        if row is None:
            try:
                with conn.begin_nested():
                    conn.execute(_new_account_row(account_id, None))
            except IntegrityError:
                pass  # created concurrently: fine
            row = execute(conn, _LOCK_ACCOUNT, params).one()
        return _tx_from_row(conn, account_id, row)

    @staticmethod
    async def _insert_account_row(
        conn: AsyncConnection, account_id: int, quota_bytes: int | None
    ) -> None:
        try:
            async with conn.begin_nested():
                await conn.execute(_new_account_row(account_id, quota_bytes))
        except IntegrityError:
            pass  # created concurrently: fine

    # --- accounts (called by the directory) --------------------------------

    async def init_account(self, account_id: int, quota_bytes: int | None) -> None:
        """Creates the account's counters in this shard (idempotent)."""
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    select(shard_accounts.c.account_id).where(
                        shard_accounts.c.account_id == account_id
                    )
                )
            ).first()
            if row is None:
                await self._insert_account_row(conn, account_id, quota_bytes)
            else:
                await conn.execute(
                    update(shard_accounts)
                    .where(shard_accounts.c.account_id == account_id)
                    .values(quota_bytes=quota_bytes)
                )

    async def set_quota(self, account_id: int, quota_bytes: int | None) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                update(shard_accounts)
                .where(shard_accounts.c.account_id == account_id)
                .values(quota_bytes=quota_bytes)
            )

    async def remove_account(self, account_id: int) -> None:
        """Deletes every mailbox, message and log row of the account here.
        The blobs stay until garbage collection."""
        async with self.db.write() as conn:
            await delete_account_mail(conn, account_id)
            await conn.execute(
                delete(shard_accounts).where(shard_accounts.c.account_id == account_id)
            )

    async def retire_account(self, account_id: int, fence: str) -> None:
        """The last step of a move off this shard: deletes the account's
        mail here like :meth:`remove_account`, but in the same transaction
        leaves its counters row behind with ``fence`` set, so that a write
        still routed here (a stale cache) is refused as TEMPORARY instead of
        starting the account afresh on the wrong shard."""
        async with self.db.write() as conn:
            # The counters row first, as every writer locks it (_LOCK_ACCOUNT)
            # before the mailbox rows its foreign keys share-lock: deleting
            # the mail first deadlocked with a delivery arriving meanwhile.
            await conn.execute(
                update(shard_accounts)
                .where(shard_accounts.c.account_id == account_id)
                .values(fence=fence)
            )
            await delete_account_mail(conn, account_id)

    # --- mailboxes -----------------------------------------------------------

    async def _get_mailbox_row(
        self,
        conn: AsyncConnection,
        account_id: int,
        *,
        name: str | None = None,
        mailbox_id: int | None = None,
    ) -> Any:
        stmt, params = _mailbox_query(account_id, name, mailbox_id)
        row = (await conn.execute(stmt, params)).first()
        if row is None:
            raise errors.not_found("no such mailbox")
        return row

    def _begin_in_mailbox_sync(
        self, conn: Connection, account_id: int, mailbox: str | int
    ) -> tuple[_Tx, Any]:
        """:meth:`_begin_sync` then :meth:`_mailbox_row_sync`, in one
        statement when the account has its counters row (the usual case):
        on SQLite BEGIN IMMEDIATE already serialises the writers; on
        PostgreSQL the statement locks the mailbox row too."""
        settle(conn, account_id)
        pg = conn.dialect.name != "sqlite"
        if isinstance(mailbox, int):
            stmt = _LOCK_WITH_MAILBOX_BY_ID_PG if pg else _LOCK_WITH_MAILBOX_BY_ID
            params: dict[str, Any] = {"b_account": account_id, "b_id": mailbox}
        else:
            stmt = _LOCK_WITH_MAILBOX_BY_NAME_PG if pg else _LOCK_WITH_MAILBOX_BY_NAME
            params = {"b_account": account_id, "b_name": existing_mailbox_name(mailbox)}
        row = execute(conn, stmt, params).first()
        if row is None:  # this account's first write here; on PostgreSQL no such mailbox too
            tx = self._begin_sync(conn, account_id)
            return tx, self._mailbox_row_sync(conn, account_id, mailbox)
        tx = _tx_from_row(conn, account_id, row)  # the fence first: see _no_mailbox
        if row.m_id is None:
            raise errors.not_found("no such mailbox")
        return tx, _MailboxRow(*_MAILBOX_OF_LOCK_ROW(row))

    def _begin_delivery_sync(
        self,
        conn: Connection,
        account_id: int,
        mailbox: str | int,
        values: dict[str, Any],
        parsed: ParsedMessage,
        blob: dict[str, Any] | None,
    ) -> tuple[_Tx, Any, int]:
        """A delivery's start: its transaction (:meth:`_begin_in_mailbox_sync`,
        with its target ``mailbox``), ``blob`` (``PACK_PUT_SQL``'s
        parameters) put in the shard's blob table if given, and the message
        row of ``values`` inserted (:meth:`_insert_message_sync`); returns
        the transaction, the mailbox row and the message's id. On
        PostgreSQL with the row's word hashes all in one statement
        (:func:`_deliver_head_pg`), else one statement each."""
        if "search_words" not in values:
            tx, box = self._begin_in_mailbox_sync(conn, account_id, mailbox)
            if blob is not None:
                execute(conn, _PUT_BLOB, blob)
            return tx, box, self._insert_message_sync(conn, account_id, values, parsed)
        settle(conn, account_id)
        refs = [r for r in (*parsed.references, parsed.in_reply_to) if r]
        params = {**values, **(blob or {}), "refs": refs[-50:], "b_account": account_id}
        by_name = not isinstance(mailbox, int)
        if by_name:
            params["b_name"] = existing_mailbox_name(str(mailbox))
        else:
            params["b_id"] = mailbox
        stmt = _deliver_head_pg(tuple(values), by_name, blob is not None)
        row = execute(conn, stmt, params).one()
        message_id = int(row.new_message_id)
        if row.account_id is None:  # the account's first write here, or no such mailbox
            tx = self._begin_sync(conn, account_id)
            return tx, self._mailbox_row_sync(conn, account_id, mailbox), message_id
        tx = _tx_from_row(conn, account_id, row)  # the fence first: see _no_mailbox
        return tx, _MailboxRow(*_MAILBOX_OF_LOCK_ROW(row)), message_id

    @staticmethod
    def _mailbox_row_sync(conn: Connection, account_id: int, mailbox: str | int) -> Any:
        """A mailbox row by name (normalised here) or id; NOT_FOUND if absent."""
        if isinstance(mailbox, int):
            stmt, params = _mailbox_query(account_id, None, mailbox)
        else:
            stmt, params = _mailbox_query(account_id, existing_mailbox_name(mailbox), None)
        row = execute(conn, stmt, params).first()
        if row is None:
            raise _no_mailbox(conn, account_id)
        return row

    async def _insert_mailbox(self, tx: _Tx, name: str, special_use: str | None) -> int:
        result = await tx.conn.execute(
            insert(mailboxes).values(
                account_id=tx.account_id,
                name=name,
                uidvalidity=tx.new_uidvalidity(),
                uidnext=1,
                highestmodseq=1,
                recent_floor=1,
                special_use=special_use,
                subscribed=False,  # unused since schema v9: see ``subscriptions``
            )
        )
        mailbox_id = int(result.inserted_primary_key[0])
        tx.change(ChangeKind.MAILBOX, mailbox_id, data={"op": "create", "name": name})
        return mailbox_id

    async def _existing_names(self, conn: AsyncConnection, account_id: int) -> set[str]:
        rows = await conn.execute(
            select(mailboxes.c.name).where(mailboxes.c.account_id == account_id)
        )
        return {r[0] for r in rows}

    async def create_default_mailboxes(self, account_id: int) -> None:
        """INBOX, Sent, Drafts, Trash, Junk, Archive with RFC 6154
        special-use attributes, each subscribed; existing ones are kept."""
        async with self._write(account_id) as tx:
            names = await self._existing_names(tx.conn, account_id)
            subscribed = await self._subscribed_names(tx.conn, account_id)
            for name, special_use in DEFAULT_MAILBOXES:
                if name not in names:
                    await self._insert_mailbox(tx, name, special_use)
                    if name not in subscribed:
                        await tx.conn.execute(
                            insert(subscriptions).values(account_id=account_id, name=name)
                        )

    async def list_mailboxes(self, account_id: int) -> list[Mailbox]:
        """Every mailbox of the account, by name."""
        params = {"b_account": account_id}
        rows = await self.db.read_sync(lambda conn: execute(conn, _MAILBOXES, params).all())
        found = [_mailbox(r) for r in rows]
        # INBOX first, as clients expect it at the top of LIST.
        return sorted(found, key=lambda m: (m.name != INBOX, m.name))

    async def get_mailbox(self, account_id: int, name: str) -> Mailbox:
        """The mailbox by name (normalised: INBOX in any case); NOT_FOUND if absent."""
        stmt, params = _mailbox_query(account_id, existing_mailbox_name(name), None)
        return await self.db.read_sync(lambda conn: _mailbox_sync(conn, stmt, params))

    async def get_mailbox_by_id(self, account_id: int, mailbox_id: int) -> Mailbox:
        """The mailbox by id; NOT_FOUND if absent (or another account's)."""
        stmt, params = _mailbox_query(account_id, None, mailbox_id)
        return await self.db.read_sync(lambda conn: _mailbox_sync(conn, stmt, params))

    async def create_mailbox(
        self, account_id: int, name: str, special_use: str | None = None
    ) -> Mailbox:
        """Creates missing parents too (RFC 3501 section 6.3.3); EXISTS if taken."""
        name = normalize_mailbox_name(name)
        async with self._write(account_id) as tx:
            names = await self._existing_names(tx.conn, account_id)
            if name in names:
                raise errors.exists("mailbox exists")
            for parent in _parents(name):
                if parent not in names:
                    await self._insert_mailbox(tx, parent, None)
            mailbox_id = await self._insert_mailbox(tx, name, special_use)
            row = await self._get_mailbox_row(tx.conn, account_id, mailbox_id=mailbox_id)
        return _mailbox(row)

    async def rename_mailbox(self, account_id: int, old: str, new: str) -> None:
        """Renames inferiors too and creates missing parents of ``new``;
        renaming INBOX moves its messages into a new mailbox and leaves INBOX
        empty (RFC 3501 section 6.3.5). A renamed mailbox keeps its UIDVALIDITY."""
        old = existing_mailbox_name(old)
        new = normalize_mailbox_name(new)
        async with self._write(account_id) as tx:
            conn = tx.conn
            src = await self._get_mailbox_row(conn, account_id, name=old)
            names = await self._existing_names(conn, account_id)
            if new in names or new == INBOX:
                raise errors.exists("target mailbox exists")
            if new.startswith(old + HIERARCHY_DELIMITER):
                raise errors.invalid("cannot rename a mailbox into its own inferior")
            for parent in _parents(new):
                if parent not in names:
                    await self._insert_mailbox(tx, parent, None)
            if old == INBOX:
                dest_id = await self._insert_mailbox(tx, new, None)
                dest = await self._get_mailbox_row(conn, account_id, mailbox_id=dest_id)
                entries = (
                    await conn.execute(select(E).where(E.c.mailbox_id == src.id).order_by(E.c.uid))
                ).all()
                # A rename, not a save: the entries keep their save dates.
                await self._copy_entries(tx, entries, dest, keep_saved=True)
                await self._remove_entries(tx, src, [e.uid for e in entries], gc=False)
                return
            await self._rename_subscriptions(conn, account_id, old, new)
            prefix = old + HIERARCHY_DELIMITER
            inferiors = [n for n in names if n.startswith(prefix)]
            for name in [old, *sorted(inferiors)]:
                renamed = new + name[len(old) :]
                if renamed in names:
                    raise errors.exists(f"mailbox {renamed} exists")
                row = await self._get_mailbox_row(conn, account_id, name=name)
                await conn.execute(
                    update(mailboxes).where(mailboxes.c.id == row.id).values(name=renamed)
                )
                tx.change(
                    ChangeKind.MAILBOX, row.id, data={"op": "rename", "old": name, "name": renamed}
                )

    async def delete_mailbox(self, account_id: int, name: str) -> None:
        """INVALID for INBOX; the mailbox's messages are expunged. Inferior
        mailboxes stay (RFC 3501 section 6.3.4)."""
        name = existing_mailbox_name(name)
        if name == INBOX:
            raise errors.invalid("INBOX cannot be deleted")
        async with self._write(account_id) as tx:
            row = await self._get_mailbox_row(tx.conn, account_id, name=name)
            gone = (
                await tx.conn.execute(
                    select(E.c.message_id, E.c.size).where(E.c.mailbox_id == row.id)
                )
            ).all()
            msg_ids = [r.message_id for r in gone]
            tx.used_delta -= sum(r.size for r in gone)
            await tx.conn.execute(delete(E).where(E.c.mailbox_id == row.id))
            await tx.conn.execute(delete(expunged).where(expunged.c.mailbox_id == row.id))
            await tx.conn.execute(delete(mailboxes).where(mailboxes.c.id == row.id))
            await delete_mailbox_metadata(tx.conn, row.id)  # RFC 5464 section 3: its own
            await delete_mailbox_acl(tx.conn, row.id)  # RFC 4314: the ACL goes with it
            await self._drop_orphans(tx.conn, msg_ids)
            tx.change(ChangeKind.MAILBOX, row.id, data={"op": "delete", "name": name})

    async def set_subscribed(self, account_id: int, name: str, subscribed: bool) -> None:
        """Adds ``name`` to the subscription list or takes it off, whether a
        mailbox has that name or not (RFC 3501 sections 6.3.6 and 6.3.7).
        Idempotent: subscribing a listed name or unsubscribing one that is
        not listed changes nothing."""
        name = normalize_mailbox_name(name)
        async with self._write(account_id) as tx:
            listed = name in await self._subscribed_names(tx.conn, account_id, name)
            if subscribed == listed:
                return
            if subscribed:
                stmt: Any = insert(subscriptions).values(account_id=account_id, name=name)
            else:
                stmt = delete(subscriptions).where(
                    subscriptions.c.account_id == account_id, subscriptions.c.name == name
                )
            await tx.conn.execute(stmt)
            tx.change(
                ChangeKind.MAILBOX,
                None,
                data={"op": "subscribe" if subscribed else "unsubscribe", "name": name},
            )

    async def subscriptions(self, account_id: int) -> list[str]:
        """The account's subscription list, by name."""
        async with self.db.read() as conn:
            return sorted(await self._subscribed_names(conn, account_id))

    @staticmethod
    async def _subscribed_names(
        conn: AsyncConnection, account_id: int, name: str | None = None
    ) -> set[str]:
        """The subscribed names of the account (only ``name``, if given)."""
        stmt = select(subscriptions.c.name).where(subscriptions.c.account_id == account_id)
        if name is not None:
            stmt = stmt.where(subscriptions.c.name == name)
        return {r[0] for r in await conn.execute(stmt)}

    async def _rename_subscriptions(
        self, conn: AsyncConnection, account_id: int, old: str, new: str
    ) -> None:
        """A renamed mailbox and its inferiors stay subscribed under their new
        names (RFC 3501 section 6.3.5 renames the hierarchy as a whole)."""
        names = await self._subscribed_names(conn, account_id)
        prefix = old + HIERARCHY_DELIMITER
        moving = [n for n in names if n == old or n.startswith(prefix)]
        if not moving:
            return
        await conn.execute(
            delete(subscriptions).where(
                subscriptions.c.account_id == account_id, subscriptions.c.name.in_(moving)
            )
        )
        kept = names.difference(moving)
        renamed = {new + n[len(old) :] for n in moving} - kept
        if renamed:
            await conn.execute(
                insert(subscriptions), [{"account_id": account_id, "name": n} for n in renamed]
            )

    # --- messages ------------------------------------------------------------

    async def add_message(
        self,
        account_id: int,
        blob_key: str,
        parsed: ParsedMessage,
        blob_keys: Callable[[], tuple[Collection[str] | None, int]] | None = None,
    ) -> int:
        """Stores the parsed form of a blob; threads it by Message-ID,
        In-Reply-To and References (RFC 5256 REFERENCES, simplified).
        ``blob_keys``: as :meth:`deliver`'s (``BlobsBeingDeleted``, nothing
        committed, if garbage collection is deleting one of them)."""
        values, new_words = self._search_values(_message_values(account_id, blob_key, parsed))

        def write(conn: Connection) -> int:
            return self._insert_message_sync(conn, account_id, values, parsed)

        message_id = await self.db.write_batched(write, blob_keys=blob_keys)
        self._vocab.committed(new_words)
        self._cache_parsed(message_id, parsed)
        return message_id

    def _search_values(self, values: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        """PostgreSQL: ``values`` plus the row's word hashes and the words new
        to the vocabulary (``fts.search_params``), and those words, to pass
        to ``self._vocab.committed`` after the commit. SQLite: unchanged."""
        if self.db.is_sqlite:
            return values, []
        extra, new_words = fts.search_params(values, self._vocab)
        return {**values, **extra}, new_words

    @staticmethod
    def _insert_message_sync(
        conn: Connection, account_id: int, values: dict[str, Any], parsed: ParsedMessage
    ) -> int:
        """Inserts a message row (``values`` from :func:`_message_values`)
        in its thread: the thread of the newest referenced message it finds,
        else a thread of its own (the id of its first message)."""
        refs = [r for r in (*parsed.references, parsed.in_reply_to) if r]
        thread_id = None
        if refs:
            thread_id = conn.execute(
                select(messages.c.thread_id)
                .where(
                    messages.c.account_id == account_id,
                    messages.c.message_id_header.in_(refs[-50:]),
                )
                .limit(1)
            ).scalar()
        if thread_id is None and conn.dialect.name == "sqlite":
            # A thread of its own, in the same statement: SQLite gives the
            # row the highest id ever used plus one (AUTOINCREMENT), the
            # value the insert reads (an UPDATE less per delivery); any
            # other id is still corrected.
            row = execute(conn, _INSERT_MESSAGE_OWN_THREAD, values).one()
            if row.thread_id != row.id:
                execute(conn, _SET_THREAD, {"b_id": row.id})
            return int(row.id)
        if "search_words" in values:
            # PostgreSQL with the row's word hashes (see _insert_message_pg).
            if thread_id is not None:
                values = {**values, "thread_id": thread_id}
            stmt = _insert_message_pg(tuple(values), thread_id is None)
            return int(execute(conn, stmt, values).scalar())
        if thread_id is None:
            # PostgreSQL: the id is taken from its sequence first and
            # written as the thread too, in one statement.
            return int(execute(conn, _insert_own_thread_pg(tuple(values)), values).scalar())
        return int(execute(conn, _INSERT_MESSAGE, {**values, "thread_id": thread_id}).scalar())

    async def deliver(
        self,
        account_id: int,
        blob_key: str,
        parsed: ParsedMessage,
        targets: Sequence[tuple[str | int, Iterable[str], dt.datetime | None]],
        blob_ready: concurrent.futures.Future[str] | None = None,
        claim_recent: bool = False,
        blob_data: bytes | None = None,
        blob_keys: Callable[[], tuple[Collection[str] | None, int]] | None = None,
    ) -> list[AppendResult]:
        """Stores a message row and appends it to every target mailbox
        (name or id, flags, internal date) in ONE transaction: all targets
        are committed, or none (NOT_FOUND mailbox, OVER_QUOTA, INVALID flag).
        The ingest path uses this so metadata commits once per account.
        ``claim_recent``: each target's recent floor moves past the new
        message in the same transaction (see :meth:`claim_recent`).
        ``blob_data``: the blob's bytes (``blob_key`` is their SHA-256), at
        most :attr:`inline_blob_max`, written to the blob pack's table in
        this same transaction; INVALID if this store has no such table.
        ``blob_keys``: the blobs the row names and the newest deletion row
        the caller answered (``Database.write_batched``); if one is being
        deleted, ``BlobsBeingDeleted`` and nothing committed.

        Durable, visible and published when it returns. On SQLite concurrent
        deliveries share one group commit (see ``Database.write_batched``).
        """
        if blob_data is not None and len(blob_data) > self.inline_blob_max:
            raise errors.invalid("this shard does not store that blob itself")
        # Everything that needs no database is prepared here, off the writer.
        values, new_words = self._search_values(_message_values(account_id, blob_key, parsed))
        now = dt.datetime.now(dt.UTC)
        saved = _split_date(now)[0]  # RFC 8514: the save date of every entry made here
        # Flag iterables may be one-shot; the write function may run later.
        targets = [(box, tuple(flags), date) for box, flags, date in targets]

        def write(conn: Connection) -> tuple[list[AppendResult], list[Change], int]:
            # The blob and the row naming it commit together: one WAL fsync
            # makes both durable, and a refused delivery leaves no blob
            # behind. (The pack's own statement: an existing blob only has
            # its stored time refreshed, as garbage collection expects.)
            blob = None
            if blob_data is not None:
                blob = {"key": blob_key, "data": blob_data, "stored": time.time()}
            tx, first, message_id = self._begin_delivery_sync(
                conn, account_id, targets[0][0], values, parsed, blob
            )
            boxes = [first] + [self._mailbox_row_sync(conn, account_id, t[0]) for t in targets[1:]]
            results = []
            uidnext: dict[int, tuple[int, int]] = {}
            for box, (_, flags, internal_date) in zip(boxes, targets, strict=True):
                mask, keywords = split_flags(flags)
                when = _split_date(internal_date or now)
                uid, modseq = uidnext.get(box.id, (box.uidnext, box.highestmodseq))
                keys = entry_keys(sort_row_of(parsed, when[0], values["sent_date"]))
                result = self._append_entry_sync(
                    tx,
                    box,
                    uid,
                    modseq,
                    message_id,
                    parsed.size,
                    mask,
                    keywords,
                    when,
                    values["sent_date"],
                    saved,
                    keys,
                )
                uidnext[box.id] = (result.uid + 1, result.modseq)
                results.append(result)
            # The recent floors once committed (see Change.recent_floor).
            after = {box.id: int(box.recent_floor) for box in boxes}
            if claim_recent:
                # The floor as this transaction found it; a second target
                # in the same mailbox reports the same floor.
                floors = dict(after)
                for box_id, (next_uid, _) in uidnext.items():
                    tx.set_recent_floor(box_id, next_uid)
                    after[box_id] = next_uid
                results = [
                    dataclasses.replace(r, recent_floor=floors[r.mailbox_id]) for r in results
                ]
            results = [
                dataclasses.replace(r, entry=_delivered_entry(r, message_id, target, now))
                for r, target in zip(results, targets, strict=True)
            ]
            tx.attach_entries([r.entry for r in results if r.entry is not None], after)
            return results, tx.flush_sync(conn), message_id

        def _delivered_entry(
            result: AppendResult,
            message_id: int,
            target: tuple[str | int, tuple[str, ...], dt.datetime | None],
            now: dt.datetime,
        ) -> MessageEntry:
            """The entry exactly as a read would build it (see ``_entry``)."""
            mask, keywords = split_flags(target[1])
            micros, tz, _ = _split_date(target[2] or now)
            return MessageEntry(
                mailbox_id=result.mailbox_id,
                uid=result.uid,
                message_id=message_id,
                flags=_flags_of(mask, _keywords_text(keywords)),
                modseq=result.modseq,
                internal_date=_join_date(micros, tz),
                size=parsed.size,
                blob_key=blob_key,
                saved=_saved(saved),
            )

        async def published(outcome: tuple[list[AppendResult], list[Change], int]) -> None:
            await self._publish(outcome[1])

        results, _, message_id = await self.db.write_batched(
            write, published, ready=blob_ready, blob_keys=blob_keys, settles=True
        )
        self._vocab.committed(new_words)
        self._cache_parsed(message_id, parsed)
        return results

    async def thread_of(self, account_id: int, message_id: int) -> int | None:
        """The thread id of a stored message (the id of its thread's first message)."""
        async with self.db.read() as conn:
            return (
                await conn.execute(
                    select(messages.c.thread_id).where(
                        messages.c.id == message_id, messages.c.account_id == account_id
                    )
                )
            ).scalar()

    def _cache_parsed(self, message_id: int, parsed: ParsedMessage) -> None:
        if parsed.body_text:
            # The search text (up to MAX_BODY_TEXT each) has its own column
            # and no reader takes it from here (a parse read back from the
            # row has none either): kept, 4096 of them could hold gigabytes.
            parsed = dataclasses.replace(parsed, body_text="")
        self._parsed_cache[message_id] = parsed
        self._parsed_cache.move_to_end(message_id)
        while len(self._parsed_cache) > PARSED_CACHE_SIZE:
            self._parsed_cache.popitem(last=False)

    def _stored(self, row: Any) -> StoredMessage:
        """The entry and parsed form of a row carrying the entry columns and
        ``parsed``, remembered by the entry's columns: its flags and modseq
        are among them and its message row with its content-addressed blob
        names the parsed form, so a remembered one is never stale. At most
        PARSED_CACHE_SIZE, oldest out first; only touched on the event loop."""
        key = (
            row.mailbox_id, row.uid, row.message_id, row.sysflags, row.keywords, row.modseq,
            row.internal_date, row.internal_tz, row.size, row.blob_key,
        )
        stored = self._stored_cache.get(key)
        if stored is None:
            stored = StoredMessage(_entry(row), self._parsed(row.message_id, row.parsed))
            if len(self._stored_cache) >= PARSED_CACHE_SIZE:
                del self._stored_cache[next(iter(self._stored_cache))]
            self._stored_cache[key] = stored
        return stored

    def _parsed(self, message_id: int, data: str) -> ParsedMessage:
        parsed = self._parsed_cache.get(message_id)
        if parsed is None:
            parsed = codec.parsed_from_json(data)
            self._cache_parsed(message_id, parsed)
        return parsed

    async def _quota_used(self, conn: AsyncConnection, account_id: int) -> int:
        used = (
            await conn.execute(
                select(shard_accounts.c.used_bytes).where(shard_accounts.c.account_id == account_id)
            )
        ).scalar()
        return int(used or 0)

    @staticmethod
    def _check_quota(tx: _Tx, adding: int) -> None:
        # RFC 9208 STORAGE: the sum of message sizes in every mailbox.
        if tx.quota_bytes is not None and adding > 0:
            if tx.used_bytes + tx.used_delta + adding > tx.quota_bytes:
                raise StorageError(ErrorKind.OVER_QUOTA, "mailbox quota exceeded")

    async def append(
        self,
        account_id: int,
        mailbox_id: int,
        message_id: int,
        flags: Iterable[str] = (),
        internal_date: dt.datetime | None = None,
    ) -> AppendResult:
        """The next UID of the mailbox; OVER_QUOTA if the account would exceed
        its quota. Durable and published on return."""
        items = [(message_id, flags, internal_date)]
        return (await self.append_many(account_id, mailbox_id, items))[0]

    async def append_many(
        self,
        account_id: int,
        mailbox_id: int,
        items: Sequence[tuple[int, Iterable[str], dt.datetime | None]],
        *,
        claim_recent: bool = False,
    ) -> list[AppendResult]:
        """:meth:`append` of several stored messages (message row id,
        flags, internal date) into one mailbox, in ONE transaction: every
        entry is committed when this returns, or none is (NOT_FOUND for a
        message or the mailbox, OVER_QUOTA if their sizes together do not
        fit). UIDs ascending in the order given. Durable and published on
        return. ``claim_recent``: as :meth:`deliver`'s."""
        now = dt.datetime.now(dt.UTC)
        saved = _split_date(now)[0]
        # Flag iterables may be one-shot; the write function may run again.
        wanted = [(mid, tuple(flags), _split_date(date or now)) for mid, flags, date in items]

        def write(conn: Connection) -> tuple[list[AppendResult], list[Change]]:
            tx, mbox = self._begin_in_mailbox_sync(conn, account_id, mailbox_id)
            query = _MESSAGE_SORT_SQLITE if conn.dialect.name == "sqlite" else _MESSAGE_SORT_PG
            uid, modseq = mbox.uidnext, mbox.highestmodseq
            results = []
            for message_id, flags, when in wanted:
                row = execute(conn, query, {"b_id": message_id, "b_account": account_id}).first()
                if row is None:
                    raise errors.not_found("no such message")
                mask, keywords = split_flags(flags)
                keys = entry_keys(
                    sort_row(0, when[0], row.size, row.sent_date, row.subject, row.picked)
                )
                result = self._append_entry_sync(
                    tx, mbox, uid, modseq, message_id, row.size, mask, keywords, when,
                    row.sent_date, saved, keys,
                )  # fmt: skip
                uid, modseq = result.uid + 1, result.modseq
                results.append(result)
            if claim_recent:
                floor = int(mbox.recent_floor)
                tx.set_recent_floor(mbox.id, uid)
                results = [dataclasses.replace(r, recent_floor=floor) for r in results]
            return results, tx.flush_sync(conn)

        async def published(outcome: tuple[list[AppendResult], list[Change]]) -> None:
            await self._publish(outcome[1])

        results, _ = await self.db.write_batched(write, published, key=account_id, settles=True)
        return results

    async def drop_staged(self, account_id: int, message_ids: Iterable[int]) -> None:
        """Deletes the account's message rows among ``message_ids`` that no
        mailbox entry names (stored by :meth:`add_message` for an
        :meth:`append_many` that did not commit); a row an entry names
        stays. Their blobs are left to garbage collection."""
        async with self.db.write() as conn:
            await self._drop_orphans(conn, message_ids)

    async def drop_stale_staged(self, before: float, batch: int = 1000) -> int:
        """Deletes message rows created before ``before`` (epoch seconds)
        that no mailbox entry names: what a process that died between
        ``add_message`` and ``append_many`` left (``storage.ingest.
        ingest_many``). Found on a reader, deleted in writes of at most
        ``batch`` rows that check each again; returns how many were found.
        A staged row older than ``before`` whose COPY is still running is
        deleted too: that COPY then fails whole (its ``append_many`` finds
        no such message), so ``before`` is set well in the past (garbage
        collection's grace)."""
        stale = (
            select(messages.c.id)
            .where(
                messages.c.created < before,
                ~exists().where(E.c.message_id == messages.c.id),
            )
            .limit(batch)
        )
        found = 0
        while True:
            async with self.db.read() as conn:
                ids = [r[0] for r in await conn.execute(stale)]
            if not ids:
                return found
            found += len(ids)
            async with self.db.write() as conn:
                await self._drop_orphans(conn, ids)
            if len(ids) < batch:
                return found

    def _append_entry_sync(
        self,
        tx: _Tx,
        mbox: Any,
        uid: int,
        highestmodseq: int,
        message_id: int,
        size: int,
        mask: int,
        keywords: list[str],
        when: tuple[int, int, int],
        sent_date: float | None,
        saved: int,
        keys: EntryKeys,
    ) -> AppendResult:
        """Appends one entry at ``uid`` with a new modseq above
        ``highestmodseq`` (the mailbox counters as this transaction sees
        them); ``mask``/``keywords`` from :func:`split_flags`, ``when`` from
        :func:`_split_date`, ``sent_date`` the message's (for
        :func:`_list_date`), ``saved`` the entry's save date (RFC 8514, epoch
        microseconds), ``keys`` its stored sort and thread keys
        (storage.sortkeys.entry_keys). OVER_QUOTA if it does not fit."""
        micros, tz, day = when
        self._check_quota(tx, size)
        tx.used_delta += size
        modseq = highestmodseq + 1
        kw_text = _keywords_text(keywords)
        tx.write_entry(
            {
                "mailbox_id": mbox.id,
                "uid": uid,
                "message_id": message_id,
                "sysflags": mask,
                "keywords": kw_text,
                "modseq": modseq,
                "internal_date": micros,
                "internal_tz": tz,
                "internal_day": day,
                "size": size,
                "list_date": _list_date(sent_date, micros),
                "saved_at": saved,
                **keys._asdict(),
            },
            uid + 1,
            modseq,
        )
        tx.change(ChangeKind.NEW, mbox.id, uid, modseq, {"flags": sorted(_flags_of(mask, kw_text))})
        return AppendResult(mbox.id, mbox.uidvalidity, uid, modseq)

    async def _max_uid(self, conn: AsyncConnection, mailbox_id: int) -> int | None:
        return (
            await conn.execute(select(func.max(E.c.uid)).where(E.c.mailbox_id == mailbox_id))
        ).scalar()

    async def _select_entries(
        self,
        conn: AsyncConnection,
        mailbox_id: int,
        uids: UidSet | None,
        columns: Sequence[Any],
        *,
        with_message: bool = False,
    ) -> list[Any]:
        """Rows of the mailbox's entries in ``uids`` (all if None), UID order."""
        stmt = select(*columns)
        if with_message:
            stmt = stmt.select_from(E.join(messages, messages.c.id == E.c.message_id))
        stmt = stmt.where(E.c.mailbox_id == mailbox_id).order_by(E.c.uid)
        matcher = None
        if uids is not None:
            if uids.is_empty():
                return []
            max_uid = None
            if any(last is None for _first, last in uids.ranges):
                max_uid = await self._max_uid(conn, mailbox_id)
                if max_uid is None:
                    return []
            cond = crit.uid_condition(E.c.uid, uids, max_uid)
            if cond is None:
                matcher = crit.UidMatcher(uids, max_uid)
                bounds = matcher.bounds()
                if bounds is not None and bounds[1] != float("inf"):
                    cond = E.c.uid.between(bounds[0], int(bounds[1]))
                elif bounds is not None:
                    cond = E.c.uid >= bounds[0]
            if cond is not None:
                stmt = stmt.where(cond)
        rows = (await conn.execute(stmt)).all()
        if matcher is not None:
            rows = [r for r in rows if r.uid in matcher]
        return rows

    async def uids(self, account_id: int, mailbox_id: int) -> list[MessageEntry]:
        """Every entry of the mailbox in UID order (a consistent snapshot)."""
        return await self._entries(account_id, mailbox_id, None)

    async def entries(self, account_id: int, mailbox_id: int, uids: UidSet) -> list[MessageEntry]:
        """The entries ``uids`` names, UID order; missing UIDs skipped."""
        return await self._entries(account_id, mailbox_id, uids)

    async def _entries(
        self, account_id: int, mailbox_id: int, uids: UidSet | None
    ) -> list[MessageEntry]:
        def read(conn: Connection) -> list[MessageEntry]:
            self._mailbox_row_sync(conn, account_id, mailbox_id)
            return [_entry(r) for r in _select_entries_sync(conn, mailbox_id, uids, _ENTRIES)]

        return await self.db.read_sync(read)

    async def snapshot(self, account_id: int, mailbox_id: int) -> MailboxSnapshot:
        """UIDs, first unseen and keywords in one reader snapshot, from the
        (mailbox_id, uid) index and the partial indexes of schema step 16:
        no entry rows, no join to messages."""

        def read(conn: Connection) -> MailboxSnapshot:
            self._mailbox_row_sync(conn, account_id, mailbox_id)
            uids = _uid_array(conn, mailbox_id)
            first_unseen = None
            if uids:
                params = {"b_box": mailbox_id, "b_top": uids[-1]}
                first_unseen = execute(conn, _FIRST_UNSEEN, params).scalar()
            texts = execute(conn, _SNAPSHOT_KEYWORDS, {"b_box": mailbox_id}).all()
            keywords = tuple(_keyword_names(t for (t,) in texts))
            return MailboxSnapshot(uids, first_unseen, keywords)

        return await self.db.read_sync(read)

    async def fetch(self, account_id: int, mailbox_id: int, uids: UidSet) -> list[StoredMessage]:
        """Entries with their parsed form, UID order; missing UIDs skipped."""

        ranges = uids.ranges
        one = ranges[0] if len(ranges) == 1 and ranges[0][1] is not None else None

        def read(conn: Connection) -> list[Any]:
            if one is not None:
                # The owner check and the rows in one statement (one round
                # trip on PostgreSQL, what an API message read and most UID
                # FETCHes ask); without rows the mailbox is looked up to
                # tell "none there" from NOT_FOUND, as below.
                params = {"b_box": mailbox_id, "b_account": account_id}
                params.update(b_lo=one[0], b_hi=one[1])
                rows = execute(conn, _ENTRIES_PARSED.owned_range, params).all()
                if rows:
                    return rows
            self._mailbox_row_sync(conn, account_id, mailbox_id)
            return _select_entries_sync(conn, mailbox_id, uids, _ENTRIES_PARSED)

        rows = await self.db.read_sync(read)
        # The parsed-form cache is only touched here, on the event loop.
        return [self._stored(r) for r in rows]

    async def sort_rows(self, account_id: int, mailbox_id: int, uids: UidSet) -> list[SortRow]:
        """What SORT and THREAD compare, UID order; missing UIDs skipped.
        One read; the fields are picked from the stored parsed form in the
        reading thread, no ParsedMessage is built (storage.sortrows)."""

        def read(conn: Connection) -> list[SortRow]:
            self._mailbox_row_sync(conn, account_id, mailbox_id)
            query = _SORT_ROWS_SQLITE if conn.dialect.name == "sqlite" else _SORT_ROWS_PG
            rows = _select_entries_sync(conn, mailbox_id, uids, query)
            return [
                sort_row(r.uid, r.internal_date, r.size, r.sent_date, r.subject, r.picked)
                for r in rows
            ]

        return await self.db.read_sync(read)

    async def sorted_uids(
        self, account_id: int, mailbox_id: int, criteria: Sequence[tuple[str, bool]]
    ) -> list[int] | None:
        """Every UID of the mailbox in IMAP SORT order by ``criteria``
        ((key, reverse) pairs, RFC 5256 section 3), ordered by the database
        over the stored keys (storage.sql.sortkeys.order_by). None if an
        entry has no stored keys (written by an older process): the
        caller sorts in memory."""

        def read(conn: Connection) -> list[int] | None:
            self._mailbox_row_sync(conn, account_id, mailbox_id)
            params = {"b_box": mailbox_id}
            if conn.execute(sortkeys.MISSING_KEYS, params).first() is not None:
                return None
            return sortkeys.read_sorted_uids(conn, mailbox_id, criteria)

        return await self.db.read_sync(read)

    async def thread_rows(self, account_id: int, mailbox_id: int) -> list[ThreadRow] | None:
        """Every entry's stored THREAD inputs (storage.sortkeys), UID
        order: one read of compact rows, no parsed form. None if an entry
        has no stored keys (as :meth:`sorted_uids`)."""

        def read(conn: Connection) -> list[ThreadRow] | None:
            self._mailbox_row_sync(conn, account_id, mailbox_id)
            params = {"b_box": mailbox_id}
            if conn.execute(sortkeys.MISSING_KEYS, params).first() is not None:
                return None
            return sortkeys.read_thread_rows(conn, mailbox_id)

        return await self.db.read_sync(read)

    # --- search --------------------------------------------------------------

    _CANDIDATE_COLUMNS = (
        E.c.mailbox_id,
        E.c.uid,
        E.c.message_id,
        E.c.sysflags,
        E.c.keywords,
        E.c.modseq,
        E.c.size,
        E.c.internal_day,
        E.c.internal_date,
        E.c.saved_at,
        messages.c.sent_day,
        messages.c.subject,
        messages.c.from_text,
        messages.c.to_text,
        messages.c.cc_text,
        messages.c.body_text,
        messages.c.blob_key,
        messages.c.parsed,
    )

    @staticmethod
    def _candidate(r: Any) -> crit.Candidate:
        return crit.Candidate(
            uid=r.uid,
            sysflags=r.sysflags,
            keywords=r.keywords,
            modseq=r.modseq,
            size=r.size,
            internal_day=r.internal_day,
            saved_at=r.internal_date if r.saved_at is None else r.saved_at,
            sent_day=r.sent_day,
            subject=r.subject,
            from_text=r.from_text,
            to_text=r.to_text,
            cc_text=r.cc_text,
            body_text=r.body_text,
        )

    async def _load_header(self, row: Any, candidate: crit.Candidate) -> None:
        body_start = self._parsed(row.message_id, row.parsed).body.body_start
        try:
            if self.blobs is None:
                raise StorageError(ErrorKind.NOT_FOUND)
            candidate.header = await self.blobs.get_range(row.blob_key, 0, body_start)
        except StorageError:
            candidate.header = b""  # a lost blob matches no header search

    async def _evaluate(
        self, rows: Sequence[Any], criteria: Criteria, ctx: crit.Context
    ) -> list[Any]:
        """The rows that match, decided in Python. Headers are read from the
        blob only for rows the stored columns could not decide."""
        candidates = [self._candidate(r) for r in rows]
        matcher = crit.compile_matcher(criteria, ctx)

        def run(indexes: Sequence[int]) -> tuple[list[int], list[int]]:
            hits, undecided = [], []
            for i in indexes:
                try:
                    if matcher(candidates[i]):
                        hits.append(i)
                except crit.NeedHeader:
                    undecided.append(i)
            return hits, undecided

        async def run_off_loop(indexes: Sequence[int]) -> tuple[list[int], list[int]]:
            # Matching is CPU work: big batches go to a thread.
            if len(indexes) > 200:
                return await asyncio.to_thread(run, indexes)
            return run(indexes)

        hits, undecided = await run_off_loop(range(len(rows)))
        if undecided:
            for start in range(0, len(undecided), 64):
                await asyncio.gather(
                    *(
                        self._load_header(rows[i], candidates[i])
                        for i in undecided[start : start + 64]
                    )
                )
            more, _ = await run_off_loop(undecided)
            hits = sorted(hits + more)
        return [rows[i] for i in hits]

    async def _read_rows(self, stmt: Any) -> list[Any]:
        """The rows of a search statement. On SQLite through a reader
        connection, the only kind that sees the full-text index (schema
        ``fts``, ``storage/sql/fts.py``)."""
        return await self.db.read_sync(lambda conn: conn.execute(stmt).all())

    async def search(self, account_id: int, mailbox_id: int, criteria: Criteria) -> list[int]:
        """Matching UIDs, ascending (RFC 3501 section 6.4.4 semantics)."""
        base = E.join(messages, messages.c.id == E.c.message_id)

        def query(conn: Connection) -> tuple[crit.Context, list[Any] | None, list[Any]]:
            # One reader hop: the mailbox check, its highest UID (for "*")
            # and the search, in one snapshot.
            self._mailbox_row_sync(conn, account_id, mailbox_id)
            max_uid = execute(conn, _MAX_UID, {"b_box": mailbox_id}).scalar()
            ctx = crit.Context.for_backend(self.db.is_sqlite, max_uid)
            exact = crit.to_sql(criteria, ctx)
            if exact is not None:
                # Entries only when no message column is named (ALL, flags,
                # UIDs, sizes...): the join read every message row's page,
                # seconds for 100,000 (SORT and THREAD of ALL, issue #24).
                on_message = messages in find_tables(exact, check_columns=True)
                stmt = (
                    select(E.c.uid)
                    .select_from(base if on_message else E)
                    .where(E.c.mailbox_id == mailbox_id, exact)
                    .order_by(E.c.uid)
                )
                return ctx, [r[0] for r in conn.execute(stmt)], []
            narrow = crit.superset(criteria, ctx)
            stmt = (
                select(*self._CANDIDATE_COLUMNS)
                .select_from(base)
                .where(E.c.mailbox_id == mailbox_id)
                .order_by(E.c.uid)
            )
            if narrow is not None:
                stmt = stmt.where(narrow)
            return ctx, None, conn.execute(stmt).all()

        ctx, uids, rows = await self.db.read_sync(query)
        if uids is not None:
            return uids
        return [r.uid for r in await self._evaluate(rows, criteria, ctx)]

    async def page(
        self,
        account_id: int,
        mailbox_id: int,
        criteria: Criteria,
        limit: int,
        before: tuple[int, int] | None = None,
    ) -> list[tuple[tuple[int, int], StoredMessage]]:
        """A folder list page: the mailbox's entries matching ``criteria``,
        newest first by (list date, UID) (see :func:`_list_date`), only those
        strictly before the key ``before``, at most ``limit``; each with its
        key, the next page's ``before``. Keyset paging on the index
        (mailbox_id, list_date, uid): a page reads its own rows (and those
        the criteria turn down on the way), never the whole mailbox, and
        mail arriving meanwhile (keyed by its arrival, so later) moves nothing."""
        if isinstance(criteria, All):
            return await self._page_all(account_id, mailbox_id, limit, before)
        ctx = crit.Context.for_backend(self.db.is_sqlite)
        exact = crit.to_sql(criteria, ctx)
        narrow = exact if exact is not None else crit.superset(criteria, ctx)
        columns = (
            (*_ENTRY_COLUMNS, messages.c.parsed)
            if exact is not None
            else (*self._CANDIDATE_COLUMNS, E.c.internal_tz)
        )
        base = (
            select(*columns, E.c.list_date)
            .select_from(E.join(messages, messages.c.id == E.c.message_id))
            .where(E.c.mailbox_id == mailbox_id)
        )
        if narrow is not None:
            base = base.where(narrow)
        # Criteria that SQL cannot decide are finished in Python, a batch at a time.
        batch = limit if exact is not None else max(4 * limit, 200)
        found: list[Any] = []
        key = before
        while len(found) < limit:
            stmt = base if key is None else base.where(tuple_(E.c.list_date, E.c.uid) < key)
            stmt = stmt.order_by(E.c.list_date.desc(), E.c.uid.desc()).limit(batch)

            def read(conn: Connection, stmt: Any = stmt) -> list[Any]:
                self._mailbox_row_sync(conn, account_id, mailbox_id)
                return conn.execute(stmt).all()

            rows = await self.db.read_sync(read)
            if len(rows) < batch:
                key = None
            elif rows:
                key = (rows[-1].list_date, rows[-1].uid)
            found.extend(rows if exact is not None else await self._evaluate(rows, criteria, ctx))
            if key is None:
                break
        return [((r.list_date, r.uid), self._stored(r)) for r in found[:limit]]

    async def _page_all(
        self, account_id: int, mailbox_id: int, limit: int, before: tuple[int, int] | None
    ) -> list[tuple[tuple[int, int], StoredMessage]]:
        """:meth:`page` without criteria: one read of precompiled statements.

        A page read before is answered again without its query when the
        mailbox row, read in the same call (the owner check), still has the
        UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ it had then: every write that
        adds, removes or changes an entry raises UIDNEXT or HIGHESTMODSEQ in
        its own transaction, whichever process makes it (RFC 7162 section
        3.1.1: an entry's modseq never exceeds its mailbox's), neither ever
        goes down, mailbox row ids are never reused (AUTOINCREMENT, identity
        columns), and the message rows a page shows are immutable. So a kept
        page is served only when no write could have changed it. (An account
        move writes a target mailbox's entries before its counters, but the
        target is not read until the move has flipped, its last round done.)"""
        if before is None:
            stmt, params = _PAGE_ALL_FIRST, {"b_box": mailbox_id}
        else:
            stmt = _PAGE_ALL_AFTER
            params = {"b_box": mailbox_id, "b_date": before[0], "b_uid": before[1]}
        params.update(b_limit=limit, b_offset=0)
        cache_key = (mailbox_id, limit, before)
        known = self._pages.get(cache_key)
        known_stamp = known[0] if known is not None else None

        def read(conn: Connection) -> tuple[tuple[int, int, int], list[Any] | None]:
            # The stamp first: on PostgreSQL each statement has its own
            # snapshot, so the rows are never older than the stamp kept
            # with them (a write in between only makes the next read miss).
            box = self._mailbox_row_sync(conn, account_id, mailbox_id)
            stamp = (box.uidvalidity, box.uidnext, box.highestmodseq)
            if stamp == known_stamp:
                return stamp, None
            return stamp, execute(conn, stmt, params).all()

        stamp, rows = await self.db.read_sync(read)
        if rows is None and known is not None:
            return list(known[1])
        page = [((r.list_date, r.uid), self._stored(r)) for r in rows or ()]
        if len(self._pages) >= PAGES_CACHED:
            del self._pages[next(iter(self._pages))]
        self._pages.pop(cache_key, None)
        self._pages[cache_key] = (stamp, tuple(page))
        return page

    async def search_account(
        self, account_id: int, criteria: Criteria, limit: int = 100
    ) -> list[MessageEntry]:
        """Matches across every mailbox of the account, newest internal date
        first (then mailbox id ascending, UID descending), at most ``limit``."""
        ctx = crit.Context.for_backend(self.db.is_sqlite)
        base = E.join(messages, messages.c.id == E.c.message_id).join(
            mailboxes, mailboxes.c.id == E.c.mailbox_id
        )
        order = (E.c.internal_date.desc(), E.c.mailbox_id, E.c.uid.desc())
        indexed = crit.index_superset(criteria, ctx)
        if indexed is not None:
            return await self._search_account_indexed(account_id, criteria, limit, indexed)
        exact = crit.to_sql(criteria, ctx)
        if exact is not None:
            rows = await self._read_rows(
                select(*_ENTRY_COLUMNS)
                .select_from(base)
                .where(mailboxes.c.account_id == account_id, exact)
                .order_by(*order)
                .limit(limit)
            )
            return [_entry(r) for r in rows]
        narrow = crit.superset(criteria, ctx)
        stmt = (
            select(*self._CANDIDATE_COLUMNS, E.c.internal_tz)
            .select_from(base)
            .where(mailboxes.c.account_id == account_id)
            .order_by(*order)
        )
        if narrow is not None:
            stmt = stmt.where(narrow)
        found: list[MessageEntry] = []
        batch = max(limit, 200)
        offset = 0
        while len(found) < limit:
            rows = await self._read_rows(stmt.limit(batch).offset(offset))
            if not rows:
                break
            offset += len(rows)
            found.extend(_entry(r) for r in await self._evaluate(rows, criteria, ctx))
        return found[:limit]

    async def _search_account_indexed(
        self, account_id: int, criteria: Criteria, limit: int, indexed: Any
    ) -> list[MessageEntry]:
        """:meth:`search_account` for criteria a full-text index narrows
        (``indexed``, :func:`criteria.index_superset`): the index's
        candidates are listed in result order without reading any message
        text, and the exact test (which reads it) runs on them a few at a
        time, in that order, until ``limit`` matched. A page of a word in
        thousands of messages so reads about a page of bodies, not all of
        them, and a rarer word's candidates are all but its matches.

        Candidates come in batches by keyset on the result order (``indexed``
        may be true of every row); each batch is checked in chunks a little
        larger than what the page still lacks."""
        ctx = crit.Context.for_backend(self.db.is_sqlite)
        check = crit.to_sql(criteria, dataclasses.replace(ctx, use_index=False))
        base = E.join(messages, messages.c.id == E.c.message_id).join(
            mailboxes, mailboxes.c.id == E.c.mailbox_id
        )
        order = (E.c.internal_date.desc(), E.c.mailbox_id, E.c.uid.desc())
        # SQLite's index conditions name entries only: no message row read.
        listed = E.join(mailboxes, mailboxes.c.id == E.c.mailbox_id) if ctx.sqlite_fts else base
        keys = (
            select(E.c.mailbox_id, E.c.uid, E.c.message_id, E.c.internal_date)
            .select_from(listed)
            .where(mailboxes.c.account_id == account_id, indexed)
            .order_by(*order)
        )
        found: list[Any] = []
        batch = max(4 * limit, SEARCH_BATCH)
        after: tuple[int, int, int] | None = None
        while len(found) < limit:
            stmt = keys if after is None else keys.where(_after_in_search_order(*after))
            rows = await self._read_rows(stmt.limit(batch))
            pos = 0
            while pos < len(rows) and len(found) < limit:
                need = limit - len(found)
                chunk = rows[pos : pos + max(2 * need, 32)]
                pos += len(chunk)
                found.extend(await self._check_candidates(account_id, chunk, criteria, check))
            if len(rows) < batch:
                break
            after = (rows[-1].internal_date, rows[-1].mailbox_id, rows[-1].uid)
            batch *= 2
        return [_entry(r) for r in found[:limit]]

    async def _check_candidates(
        self, account_id: int, chunk: Sequence[Any], criteria: Criteria, check: Any
    ) -> list[Any]:
        """The entries of ``chunk`` (rows of mailbox_id, uid, message_id, in
        result order) that match ``criteria``, in that order, as entry rows:
        by ``check`` (the exact SQL condition, indexes left out) when SQL
        decides it, else in Python over the candidate columns."""
        wanted = E.c.message_id.in_(sorted({r.message_id for r in chunk}))
        columns = (
            _ENTRY_COLUMNS if check is not None else (*self._CANDIDATE_COLUMNS, E.c.internal_tz)
        )
        stmt = (
            select(*columns)
            .select_from(
                E.join(messages, messages.c.id == E.c.message_id).join(
                    mailboxes, mailboxes.c.id == E.c.mailbox_id
                )
            )
            .where(mailboxes.c.account_id == account_id, wanted)
        )
        if check is not None:
            rows = await self._read_rows(stmt.where(check))
        else:
            ctx = crit.Context.for_backend(self.db.is_sqlite)
            rows = await self._evaluate(await self._read_rows(stmt), criteria, ctx)
        # A message in several of the chunk's mailboxes comes back once per
        # entry; the chunk's keys pick and order them.
        by_key = {(r.mailbox_id, r.uid): r for r in rows}
        return [by_key[k] for k in ((r.mailbox_id, r.uid) for r in chunk) if k in by_key]

    # --- flags, copy, move, expunge -------------------------------------------

    async def store_flags(
        self,
        account_id: int,
        mailbox_id: int,
        uids: UidSet,
        mode: StoreMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
        keep: Iterable[str] = (),
    ) -> StoreResult:
        """RFC 3501 section 6.4.6 STORE with the RFC 7162 section 3.1.3
        UNCHANGEDSINCE guard. Entries whose flags change share one new modseq.
        ``keep``: what a REPLACE leaves alone (system flags, "\\*" the
        keywords; see storage.acl.GrantedStore.store_flags).
        Durable and published on return; concurrent calls share a group
        commit (``Database.write_batched``), and on PostgreSQL those of
        other accounts commit beside it (its ``key``: it locks only this
        account's rows)."""
        mask, keywords = split_flags(flags)
        keep = set(keep)
        keep_keywords = "\\*" in keep
        keep_mask, _ = split_flags(keep - {"\\*"})

        # Inside the writers' lock only the SQL and what it needs; the
        # entries and change objects are built after the commit.
        # PostgreSQL's common case in one statement (_store_system_flags_pg).
        one_statement = not keywords and mode is not StoreMode.REPLACE

        def write(conn: Connection) -> _StoreOutcome:
            pg = conn.dialect.name != "sqlite"
            if pg and one_statement:
                add = mode is StoreMode.ADD
                done = _store_system_flags_pg(
                    conn, account_id, uids, mailbox_id, add, mask, unchanged_since
                )
                if done is not None:
                    return done
            locked = _lock_store_range_pg(conn, account_id, mailbox_id, uids) if pg else None
            if locked is None:
                tx, mbox = self._begin_in_mailbox_sync(conn, account_id, mailbox_id)
                rows = _select_entries_sync(conn, mailbox_id, uids, _ENTRIES)
            else:
                tx, mbox, rows = locked
            modseq = mbox.highestmodseq + 1
            modified, changed = _plan_store(
                rows, mode, mask, keywords, unchanged_since, keep_mask, keep_keywords
            )
            first_change = tx.last_change_id + 1
            if changed:
                kind = ChangeKind.FLAGS.value
                log_rows = [
                    {
                        "account_id": account_id,
                        "id": first_change + i,
                        "kind": kind,
                        "mailbox_id": mailbox_id,
                        "uid": r.uid,
                        "modseq": modseq,
                        "at": tx.at,
                        "data": _flag_texts(m, kw)[1],
                    }
                    for i, (r, m, kw) in enumerate(changed)
                ]
                if pg:
                    params: dict[str, Any] = {
                        "s_box": mailbox_id,
                        "s_modseq": modseq,
                        "s_uid": [r.uid for r, _, _ in changed],
                        "s_mask": [m for _, m, _ in changed],
                        "s_kw": [kw for _, _, kw in changed],
                        "b_account": account_id,
                        "b_last_change": first_change + len(changed) - 1,
                    }
                    params.update(_columns("c_", _CHANGE_KEYS, log_rows))
                    execute(conn, _STORE_WRITE_PG, params)
                else:
                    execute(
                        conn,
                        _STORE_FLAGS,
                        [
                            {
                                "b_box": mailbox_id,
                                "b_uid": r.uid,
                                "b_mask": m,
                                "b_kw": kw,
                                "b_modseq": modseq,
                            }
                            for r, m, kw in changed
                        ],
                    )
                    tx.set_highestmodseq(mbox, modseq)
                    tx.log_rows_sync(conn, log_rows)
            return modified, changed, modseq, first_change, tx.at

        built: list[StoreResult] = []

        async def published(outcome: _StoreOutcome) -> None:
            modified, changed, modseq, first_change, at = outcome
            entries, changes = _stored_flags(account_id, modseq, first_change, at, changed)
            built.append(StoreResult(entries, tuple(modified)))
            await self._publish(changes)

        await self.db.write_batched(write, published, durable=False, key=account_id)
        return built[0]

    async def _copy_entries(
        self, tx: _Tx, rows: Sequence[Any], dest: Any, keep_saved: bool = False
    ) -> list[tuple[int, int]]:
        """Appends copies of entry rows to ``dest`` (a mailbox row); the
        caller has checked quota. Returns (source uid, new uid) pairs. The
        copies are saved now (RFC 8514 save date) unless ``keep_saved``
        (the rows then carry ``saved_at``)."""
        if not rows:
            return []
        modseq = dest.highestmodseq + 1
        saved = int(tx.at * 1_000_000)  # RFC 8514 section 1: a copy is saved now
        pairs = []
        values = []
        for i, r in enumerate(rows):
            uid = dest.uidnext + i
            pairs.append((r.uid, uid))
            values.append(
                {
                    "mailbox_id": dest.id,
                    "uid": uid,
                    "message_id": r.message_id,
                    "sysflags": r.sysflags,
                    "keywords": r.keywords,
                    "modseq": modseq,
                    "internal_date": r.internal_date,
                    "internal_tz": r.internal_tz,
                    "internal_day": r.internal_day,
                    "size": r.size,
                    "list_date": r.list_date,
                    "saved_at": r.saved_at if keep_saved else saved,
                    # A copy keeps the internal date: the same keys.
                    **{k: getattr(r, k) for k in KEY_COLUMNS},
                }
            )
        await tx.conn.execute(insert(E), values)
        tx.used_delta += sum(r.size for r in rows)
        await tx.conn.execute(
            update(mailboxes)
            .where(mailboxes.c.id == dest.id)
            .values(uidnext=dest.uidnext + len(rows), highestmodseq=modseq)
        )
        for r, (_src, uid) in zip(rows, pairs, strict=True):
            tx.change(
                ChangeKind.NEW,
                dest.id,
                uid,
                modseq,
                {"flags": sorted(_flags_of(r.sysflags, r.keywords))},
            )
        return pairs

    async def _remove_entries(
        self, tx: _Tx, mbox: Any, uids: Sequence[int], *, gc: bool = True
    ) -> None:
        """Deletes entries, writes tombstones and EXPUNGE changes (one new modseq)."""
        if not uids:
            return
        conn = tx.conn
        modseq = mbox.highestmodseq + 1
        msg_ids: list[int] = []
        for chunk_start in range(0, len(uids), 500):
            chunk = list(uids[chunk_start : chunk_start + 500])
            gone = (
                await conn.execute(
                    select(E.c.message_id, E.c.size).where(
                        E.c.mailbox_id == mbox.id, E.c.uid.in_(chunk)
                    )
                )
            ).all()
            msg_ids.extend(r.message_id for r in gone)
            tx.used_delta -= sum(r.size for r in gone)
            await conn.execute(delete(E).where(E.c.mailbox_id == mbox.id, E.c.uid.in_(chunk)))
        await conn.execute(
            insert(expunged), [{"mailbox_id": mbox.id, "uid": u, "modseq": modseq} for u in uids]
        )
        await conn.execute(
            update(mailboxes).where(mailboxes.c.id == mbox.id).values(highestmodseq=modseq)
        )
        for u in uids:
            tx.change(ChangeKind.EXPUNGE, mbox.id, u, modseq)
        if gc:
            await self._drop_orphans(conn, msg_ids)

    async def _drop_orphans(self, conn: AsyncConnection, message_ids: Iterable[int]) -> None:
        """Deletes message rows no mailbox entry refers to any more. Blobs are
        left to garbage collection: other shards may share the same bytes."""
        ids = sorted(set(message_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            await conn.execute(
                delete(messages).where(
                    messages.c.id.in_(chunk),
                    ~exists().where(E.c.message_id == messages.c.id),
                )
            )
            for mid in chunk:
                self._parsed_cache.pop(mid, None)

    _COPY_COLUMNS = (
        E.c.uid,
        E.c.message_id,
        E.c.sysflags,
        E.c.keywords,
        E.c.internal_date,
        E.c.internal_tz,
        E.c.internal_day,
        E.c.size,
        E.c.list_date,
        *(E.c[k] for k in KEY_COLUMNS),
    )

    async def copy(
        self, account_id: int, mailbox_id: int, uids: UidSet, dest_mailbox_id: int
    ) -> CopyResult:
        """Copies keep flags and internal date and share the stored message
        (RFC 3501 section 6.4.7; COPYUID data of RFC 4315). OVER_QUOTA applies."""
        async with self._write(account_id) as tx:
            await self._get_mailbox_row(tx.conn, account_id, mailbox_id=mailbox_id)
            dest = await self._get_mailbox_row(tx.conn, account_id, mailbox_id=dest_mailbox_id)
            rows = await self._select_entries(tx.conn, mailbox_id, uids, self._COPY_COLUMNS)
            self._check_quota(tx, sum(r.size for r in rows))
            pairs = await self._copy_entries(tx, rows, dest)
        return CopyResult(dest.uidvalidity, tuple(pairs))

    async def move(
        self, account_id: int, mailbox_id: int, uids: UidSet, dest_mailbox_id: int
    ) -> CopyResult:
        """Copy then expunge from the source in one transaction (RFC 6851).
        Into the source mailbox itself the messages take new UIDs (RFC 6851
        section 3.3), as from anywhere else."""
        async with self._write(account_id) as tx:
            await self._get_mailbox_row(tx.conn, account_id, mailbox_id=mailbox_id)
            dest = await self._get_mailbox_row(tx.conn, account_id, mailbox_id=dest_mailbox_id)
            rows = await self._select_entries(tx.conn, mailbox_id, uids, self._COPY_COLUMNS)
            pairs = await self._copy_entries(tx, rows, dest)
            # Read after the copy: into itself, the copy took a modseq already.
            src = await self._get_mailbox_row(tx.conn, account_id, mailbox_id=mailbox_id)
            await self._remove_entries(tx, src, [r.uid for r in rows], gc=False)
        return CopyResult(dest.uidvalidity, tuple(pairs))

    async def expunge(
        self,
        account_id: int,
        mailbox_id: int,
        uids: UidSet | None = None,
        *,
        flagged_only: bool = True,
    ) -> list[int]:
        """Removes entries flagged \\Deleted (within ``uids`` if given, RFC 4315
        UID EXPUNGE), records tombstones, returns the expunged UIDs ascending.
        Durable and published on return. ``flagged_only=False`` (``uids``
        required): every entry in ``uids``, flagged or not, in this one
        write (the originals of a MOVE across accounts, RFC 6851 section
        3.3: no \\Deleted flag is set and seen first)."""
        if not flagged_only and uids is None:
            raise ValueError("removing entries whatever their flags needs their UIDs")
        deleted = crit.FLAG_BITS[DELETED]

        def write(conn: Connection) -> tuple[list[int], list[int], list[Change]]:
            tx, mbox = self._begin_in_mailbox_sync(conn, account_id, mailbox_id)
            rows = _select_entries_sync(conn, mailbox_id, uids, _ENTRY_FLAGS)
            gone = [r.uid for r in rows if not flagged_only or r.sysflags & deleted]
            dropped = self._remove_entries_sync(tx, mbox, gone)
            return gone, dropped, tx.flush_sync(conn)

        async def published(outcome: tuple[list[int], list[int], list[Change]]) -> None:
            for mid in outcome[1]:
                self._parsed_cache.pop(mid, None)
            await self._publish(outcome[2])

        gone, _, _ = await self.db.write_batched(
            write, published, durable=False, key=account_id
        )
        return gone

    @staticmethod
    def _remove_entries_sync(tx: _Tx, mbox: Any, uids: Sequence[int]) -> list[int]:
        """:meth:`_remove_entries` in a write function, orphans dropped;
        returns the ids of the message rows that went with them (for the
        caller to forget after the commit)."""
        if not uids:
            return []
        removed = uids
        conn = tx.conn
        modseq = mbox.highestmodseq + 1
        msg_ids: set[int] = set()
        if conn.dialect.name == "sqlite" and len(uids) <= _FEW_EXPUNGED:
            # A few, as a busy mailbox's EXPUNGE has: a compiled statement
            # per UID (a call on SQLite), no statement built per expunge.
            for u in uids:
                for r in execute(conn, _DELETE_ENTRY, {"b_box": mbox.id, "b_uid": u}).all():
                    msg_ids.add(r.message_id)
                    tx.used_delta -= r.size
            uids = ()  # done
        for chunk_start in range(0, len(uids), 500):
            chunk = list(uids[chunk_start : chunk_start + 500])
            gone = conn.execute(
                select(E.c.message_id, E.c.size).where(
                    E.c.mailbox_id == mbox.id, E.c.uid.in_(chunk)
                )
            ).all()
            msg_ids.update(r.message_id for r in gone)
            tx.used_delta -= sum(r.size for r in gone)
            conn.execute(delete(E).where(E.c.mailbox_id == mbox.id, E.c.uid.in_(chunk)))
        execute(
            conn,
            _INSERT_EXPUNGED,
            [{"mailbox_id": mbox.id, "uid": u, "modseq": modseq} for u in removed],
        )
        execute(conn, _SET_HIGHESTMODSEQ, {"b_id": mbox.id, "b_modseq": modseq})
        for u in removed:
            tx.change(ChangeKind.EXPUNGE, mbox.id, u, modseq)
        # Message rows no entry refers to any more; blobs are left to garbage
        # collection (other shards may share the same bytes).
        ids = sorted(msg_ids)
        if conn.dialect.name == "sqlite" and len(ids) <= _FEW_EXPUNGED:
            for mid in ids:
                execute(conn, _DELETE_ORPHAN, {"b_id": mid})
            return ids
        for i in range(0, len(ids), 500):
            conn.execute(
                delete(messages).where(
                    messages.c.id.in_(ids[i : i + 500]),
                    ~exists().where(E.c.message_id == messages.c.id),
                )
            )
        return ids

    # --- state ------------------------------------------------------------------

    async def status(self, account_id: int, mailbox_id: int) -> MailboxStatus:
        """RFC 3501 section 6.3.10 counters plus HIGHESTMODSEQ and SIZE."""
        seen_bit = crit.FLAG_BITS[SEEN]

        def read(conn: Connection) -> tuple[Any, Any]:
            mbox = self._mailbox_row_sync(conn, account_id, mailbox_id)
            params = {"b_box": mailbox_id, "b_seen": seen_bit}
            return mbox, execute(conn, _STATUS_COUNTS, params).one()

        mbox, row = await self.db.read_sync(read)
        count, seen_sum, size = int(row[0]), int(row[1]), int(row[2])
        return MailboxStatus(
            messages=count,
            unseen=count - seen_sum // seen_bit,
            uidnext=mbox.uidnext,
            uidvalidity=mbox.uidvalidity,
            highestmodseq=mbox.highestmodseq,
            size=size,
        )

    async def status_all(self, account_id: int) -> dict[int, MailboxStatus]:
        """:meth:`status` of every mailbox of the account, by mailbox id, from
        one grouped query (a folder list). An optional extra of the SQL store."""
        seen_bit = crit.FLAG_BITS[SEEN]
        params = {"b_account": account_id, "b_seen": seen_bit}
        rows = await self.db.read_sync(lambda conn: execute(conn, _STATUS_ALL, params).all())
        found = {}
        for box_id, uidnext, uidvalidity, highestmodseq, count, seen_sum, size in rows:
            found[int(box_id)] = MailboxStatus(
                messages=int(count),
                unseen=int(count) - int(seen_sum) // seen_bit,
                uidnext=uidnext,
                uidvalidity=uidvalidity,
                highestmodseq=highestmodseq,
                size=int(size),
            )
        return found

    async def changes_since(self, account_id: int, mailbox_id: int, modseq: int) -> MailboxChanges:
        """Entries with modseq > ``modseq`` and UIDs expunged after it
        (RFC 7162 CHANGEDSINCE and QRESYNC VANISHED)."""

        def read(conn: Connection) -> MailboxChanges:
            mbox = self._mailbox_row_sync(conn, account_id, mailbox_id)
            params = {"b_box": mailbox_id, "b_modseq": modseq}
            changed = tuple(_entry(r) for r in execute(conn, _CHANGED_ENTRIES, params).all())
            gone = execute(conn, _VANISHED, params).all()
            vanished = tuple(sorted({r[0] for r in gone}))
            floor = int(mbox.recent_floor)
            return MailboxChanges(mbox.highestmodseq, changed, vanished, floor)

        return await self.db.read_sync(read)

    async def claim_recent(self, account_id: int, mailbox_id: int) -> int:
        """Moves the recent floor to UIDNEXT atomically, returns the old floor."""

        def write(conn: Connection) -> int:
            # Serialised with the account's writes.
            _, mbox = self._begin_in_mailbox_sync(conn, account_id, mailbox_id)
            execute(conn, _SET_RECENT_FLOOR, {"b_id": mbox.id, "b_floor": mbox.uidnext})
            return int(mbox.recent_floor)

        return await self.db.write_batched(write, durable=False, key=account_id)

    async def peek_recent(self, account_id: int, mailbox_id: int) -> int:
        """Entries with UID >= the recent floor, read without moving the floor
        (RFC 3501 sections 6.3.2 and 6.3.10: EXAMINE and STATUS RECENT)."""

        def read(conn: Connection) -> int:
            mbox = self._mailbox_row_sync(conn, account_id, mailbox_id)
            params = {"b_box": mbox.id, "b_floor": mbox.recent_floor}
            return int(execute(conn, _RECENT_COUNT, params).scalar() or 0)

        return await self.db.read_sync(read)

    async def account_changes(
        self, account_id: int, after_id: int, limit: int = 1000
    ) -> list[Change]:
        """The change log after ``after_id``, oldest first."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(change_log)
                .where(change_log.c.account_id == account_id, change_log.c.id > after_id)
                .order_by(change_log.c.id)
                .limit(limit)
            )
            return [
                Change(
                    id=r.id,
                    account_id=r.account_id,
                    kind=ChangeKind(r.kind),
                    mailbox_id=r.mailbox_id,
                    uid=r.uid,
                    modseq=r.modseq,
                    at=dt.datetime.fromtimestamp(r.at, dt.UTC),
                    data=json.loads(r.data),
                )
                for r in rows
            ]

    async def last_change_id(self, account_id: int) -> int:
        """The id of the account's newest change (0 if none): where a new
        subscriber starts reading."""
        params = {"b_account": account_id}
        value = await self.db.read_sync(lambda conn: execute(conn, _LAST_CHANGE, params).scalar())
        return int(value or 0)

    async def mailbox_keywords(self, account_id: int, mailbox_id: int) -> list[str]:
        """Keywords set on any entry of the mailbox, for the IMAP FLAGS and
        PERMANENTFLAGS lists (RFC 3501 section 7.2.6). An optional extra."""

        def read(conn: Connection) -> list[Any]:
            self._mailbox_row_sync(conn, account_id, mailbox_id)
            return execute(conn, _KEYWORD_TEXTS, {"b_box": mailbox_id}).all()

        return _keyword_names(text for (text,) in await self.db.read_sync(read))

    async def quota_used(self, account_id: int) -> int:
        """Octets of every message in every mailbox of the account (RFC 9208 STORAGE)."""
        async with self.db.read() as conn:
            return await self._quota_used(conn, account_id)

    async def prune_change_log(self, account_id: int, before: dt.datetime) -> int:
        """Drops change-log rows and tombstones older than ``before``; returns rows removed."""
        cutoff = before.timestamp()
        async with self.db.write() as conn:
            result = await conn.execute(
                delete(change_log).where(
                    change_log.c.account_id == account_id, change_log.c.at < cutoff
                )
            )
            return int(result.rowcount or 0)

    # --- the built-in anti-spam engine's counts (storage/sql/spamtokens.py) ------

    async def spam_counts(self, account_id: int, tokens: Sequence[int]) -> SpamCounts:
        """The account's Bayes counts for ``tokens``, in one query."""
        return await self.db.read_sync(
            lambda conn: spamtokens.read_counts(conn, account_id, tokens)
        )

    async def learn_spam(
        self, account_id: int, blob_key: str, tokens: Sequence[int], spam: bool
    ) -> bool:
        """Teaches the account the message ``blob_key`` (its ``tokens``) as
        spam or ham; False if it was already learned so."""

        def write(conn: Connection) -> bool:
            self._begin_sync(conn, account_id)  # serialised with the account's writes
            return spamtokens.learn(conn, account_id, blob_key, tokens, spam)

        return await self.db.write_batched(write, durable=False, key=account_id)

    # --- leases ------------------------------------------------------------------

    async def acquire_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """True if ``owner`` now holds ``name`` until ttl expires (renewal by
        the same owner extends it); an expired lease may be taken over."""
        now = _now()
        expires = now + ttl_seconds
        async with self.db.write() as conn:
            result = await conn.execute(
                update(locks)
                .where(
                    locks.c.name == name,
                    or_(locks.c.owner == owner, locks.c.expires <= now),
                )
                .values(owner=owner, expires=expires)
            )
            if result.rowcount:
                return True
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(locks).values(name=name, owner=owner, expires=expires)
                    )
            except IntegrityError:
                return False  # held by someone else, unexpired
            return True

    async def release_lock(self, name: str, owner: str) -> None:
        """Releases the lease if ``owner`` holds it; otherwise does nothing."""
        async with self.db.write() as conn:
            await conn.execute(delete(locks).where(locks.c.name == name, locks.c.owner == owner))

    # --- garbage collection ------------------------------------------------------

    async def referenced_blobs(self) -> set[str]:
        """Every blob key a message row of this shard refers to."""
        async with self.db.read() as conn:
            return {r[0] for r in await conn.execute(select(messages.c.blob_key).distinct())}


__all__ = ["SqlMailStore", "normalize_mailbox_name", "split_flags"]

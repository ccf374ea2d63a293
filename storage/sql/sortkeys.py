"""The stored RFC 5256 sort and thread keys of ``mailbox_entries`` (issue
#24; the keys themselves: storage.sortkeys), on either SQL backend.

- :func:`order_by`: the ORDER BY of an IMAP SORT over the stored keys,
  served by the indexes of schema step ``_v31_sort_keys`` for the common
  single keys (ARRIVAL, DATE, SUBJECT, FROM, SIZE); on PostgreSQL those
  of SUBJECT and FROM are on the keys' prefix columns of step
  ``_v37_pg_sort_key_heads`` (:func:`pg_head`).
- :data:`THREAD_COLUMNS`: what THREAD reads of each entry (compact: no
  parsed form, no message row).
- :func:`backfill_sync`: fills the keys of entries written before the
  step, in bounded batches (the step calls it). Entries an older process
  writes after the step have none: their mailbox is sorted and threaded
  by the in-memory path (:data:`MISSING_KEYS`); nothing fills them lazily.
- :data:`PICKED_SQLITE` / :data:`PICKED_PG`: the few fields of the stored
  parsed form that the keys (and storage.sortrows.sort_row) need, picked
  by the database as one JSON array.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, literal_column, select, text, tuple_, update
from sqlalchemy.engine import Connection

from storage.sortkeys import KEY_COLUMNS, ThreadRow, entry_keys
from storage.sortrows import SORT_PATHS, SortRow, sort_row
from storage.sql.db import execute
from storage.sql.schema import mailbox_entries as E
from storage.sql.schema import messages


def _sqlite_path(path: tuple[str | int, ...]) -> str:
    """A SORT_PATHS path as SQLite JSON path text: ``$.env[2]``."""
    return "$" + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in path)


def _pg_path(path: tuple[str | int, ...]) -> str:
    """The same as PostgreSQL ``->`` steps on ``j`` (SORT_PATHS' own
    constant keys only: no client text reaches this SQL)."""
    return "j" + "".join(f"->{x}" if isinstance(x, int) else f"->'{x}'" for x in path)


# Constant paths, no bind parameters (db.execute precompiles). SQLite: with
# several paths json_extract answers one JSON array of them. PostgreSQL
# parses the text once per row (the scalar subquery), not once per path.
PICKED_SQLITE = literal_column(
    "json_extract(messages.parsed, " + ", ".join(f"'{_sqlite_path(p)}'" for p in SORT_PATHS) + ")"
).label("picked")
PICKED_PG = literal_column(
    "(SELECT json_build_array("
    + ", ".join(map(_pg_path, SORT_PATHS))
    + ")::text FROM (SELECT messages.parsed::json AS j) AS sort_doc)"
).label("picked")

# SORT criteria (RFC 5256 section 3, RFC 5957 section 3) -> entry column.
SORT_COLUMNS: dict[str, Any] = {
    "ARRIVAL": E.c.internal_date,  # epoch microseconds: the order of the seconds
    "DATE": E.c.sort_date,
    "SIZE": E.c.size,
    "SUBJECT": E.c.sort_subject,
    "FROM": E.c.sort_from,
    "TO": E.c.sort_to,
    "CC": E.c.sort_cc,
    "DISPLAYFROM": E.c.sort_display_from,
    "DISPLAYTO": E.c.sort_display_to,
}

# PostgreSQL: a B-tree entry may not pass about 2,700 octets, and a base
# subject or address can be longer; its indexes hold a prefix of the
# string keys (octet order of the prefix agrees with the whole key's), and
# the ORDER BY names the prefix first, then the whole key.
PG_PREFIX = 200
INDEXED = ("ARRIVAL", "DATE", "SIZE", "SUBJECT", "FROM")
PREFIXED = ("SUBJECT", "FROM")


def pg_head(column: Any) -> str:
    """The PostgreSQL-only column holding the first PG_PREFIX octets of the
    string key ``column`` (schema step ``_v37_pg_sort_key_heads``: a stored
    generated column, so no writer names it), which its index holds."""
    return f"{column.name}_head"


def pg_prefix(column: Any) -> ColumnElement[Any]:
    """The indexed prefix of a string key on PostgreSQL: a plain column
    (:func:`pg_head`), not an expression, so that a read naming only it,
    the mailbox and the UID is an index-only scan (the planner takes none
    from an expression index whose column the query names)."""
    return literal_column(f"mailbox_entries.{pg_head(column)}")


def order_by(criteria: Sequence[tuple[str, bool]], dialect: str) -> list[Any]:
    """The ORDER BY of a SORT by ``criteria`` ((key, reverse) pairs, most
    significant first): each distinct key once, DESC when reversed, then
    the UID ascending (RFC 5256 section 3: exact ties keep mailbox order
    whatever REVERSE says). Octet order of the string keys (bytes), as
    i;ascii-casemap compares them."""
    seen: dict[str, bool] = {}
    for name, reverse in criteria:
        seen.setdefault(name, reverse)
    terms: list[Any] = []
    for name, reverse in seen.items():
        col = SORT_COLUMNS[name]
        parts = [col]
        if dialect == "postgresql" and name in PREFIXED:
            parts = [pg_prefix(col), col]
        terms.extend(p.desc() if reverse else p for p in parts)
    terms.append(E.c.uid)
    return terms


def _order_sql(criteria: Sequence[tuple[str, bool]], dialect: str) -> str:
    """:func:`order_by` as SQL text (column names and the prefix length
    are this module's constants: no client text)."""
    return ", ".join(
        str(term.compile(dialect=_DIALECTS[dialect], compile_kwargs={"literal_binds": True}))
        for term in order_by(criteria, dialect)
    )


def _dialect(name: str) -> Any:
    if name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.dialect()
    from sqlalchemy.dialects import postgresql

    return postgresql.dialect()


_DIALECTS = {name: _dialect(name) for name in ("sqlite", "postgresql")}


@functools.lru_cache(maxsize=64)
def _sorted_uids_sql(criteria: tuple[tuple[str, bool], ...], dialect: str) -> Any:
    """The one-row query of :func:`read_sorted_uids` (cached: a few shapes).

    SQLite: the UIDs joined by spaces, one string (``group_concat`` over
    the ordered subquery; its LIMIT keeps SQLite from dropping the
    subquery's ORDER BY, so the rows reach the aggregate in that order).
    PostgreSQL: one ``int[]`` (``ARRAY(subquery)`` keeps the subquery's
    order). 100,000 rows through SQLAlchemy cost 60-70 ms of CPU; one
    value costs a few (bench/README.md, issue #24).

    PostgreSQL, a single SUBJECT or FROM key: ORDER BY the indexed prefix
    and the UID only, so the index gives the order (with the whole key as
    a middle term the planner read the table and sorted it: 9 MB, an
    external sort); a key longer than the prefix is flagged by a negative
    UID, for :func:`_order_long_keys` to order those exactly. The query
    names the prefix column alone, not the key, so the index answers it
    without reading the table (an index-only scan, as DATE's: reading
    100,000 entries in subject order cost 150-200 ms, bench/README.md).
    """
    table = "mailbox_entries"
    where = f"FROM {table} WHERE {table}.mailbox_id = :b_box"
    if dialect == "sqlite":
        order = _order_sql(criteria, dialect)
        return text(
            f"SELECT group_concat(uid, ' ') FROM "
            f"(SELECT {table}.uid AS uid {where} ORDER BY {order} LIMIT -1)"
        )
    name, reverse = criteria[0]
    if _prefix_only(criteria):
        # The prefix is the key's first PG_PREFIX octets: it is that long
        # exactly when the key is at least that long (the flag as before).
        prefix = str(pg_prefix(SORT_COLUMNS[name]))
        flagged = (
            f"CASE WHEN octet_length({prefix}) >= {PG_PREFIX} "
            f"THEN -{table}.uid ELSE {table}.uid END"
        )
        order = f"{prefix} {'DESC' if reverse else 'ASC'}, {table}.uid"
        return text(f"SELECT ARRAY(SELECT {flagged} {where} ORDER BY {order})")
    order = _order_sql(criteria, dialect)
    return text(f"SELECT ARRAY(SELECT {table}.uid {where} ORDER BY {order})")


def _prefix_only(criteria: Sequence[tuple[str, bool]]) -> bool:
    """Whether the PostgreSQL query orders by a string key's prefix alone
    (one criterion, or the same key repeated: RFC 5256 section 3 uses a
    key's first occurrence)."""
    return len({name for name, _ in criteria}) == 1 and criteria[0][0] in PREFIXED


def read_sorted_uids(
    conn: Connection, mailbox_id: int, criteria: Sequence[tuple[str, bool]]
) -> list[int]:
    """Every UID of the mailbox in SORT order (:func:`order_by`), read as
    one value (:func:`_sorted_uids_sql`); the caller's transaction."""
    dialect = conn.dialect.name
    value = conn.execute(_sorted_uids_sql(tuple(criteria), dialect), {"b_box": mailbox_id}).scalar()
    if not value:
        return []
    if dialect == "sqlite":
        return list(map(int, value.split()))
    uids = list(value)
    if _prefix_only(criteria) and min(uids) < 0:
        _order_long_keys(conn, mailbox_id, criteria[0], uids)
    return uids


def _order_long_keys(
    conn: Connection, mailbox_id: int, criterion: tuple[str, bool], uids: list[int]
) -> None:
    """Puts the flagged (negative) UIDs of ``uids``, ordered by the key's
    prefix and UID, in the exact order (whole key, then UID ascending),
    in place. Entries of one prefix are adjacent and all flagged (a key
    shorter than the prefix is its own prefix, never equal to a full
    one), and prefix order agrees with the whole keys' order, so sorting
    the flagged ones among their own places is the exact order."""
    name, reverse = criterion
    places = [i for i, u in enumerate(uids) if u < 0]
    for i in places:
        uids[i] = -uids[i]
    col = SORT_COLUMNS[name]
    flagged = [uids[i] for i in places]
    rows = conn.execute(
        select(E.c.uid, col).where(E.c.mailbox_id == mailbox_id, E.c.uid.in_(flagged))
    ).all()
    key = {uid: bytes(value) for uid, value in rows}
    # One expunged since the first read keeps its place (the view drops it).
    places = [i for i in places if uids[i] in key]
    ordered = sorted(uids[i] for i in places)  # UID ascending in ties, either direction
    ordered.sort(key=key.__getitem__, reverse=reverse)  # stable
    for i, uid in zip(places, ordered, strict=True):
        uids[i] = uid


# An entry written without keys (by a process older than the step): its
# mailbox is sorted by the in-memory path (the caller's fallback).
MISSING_KEYS = (
    select(E.c.uid).where(E.c.mailbox_id == bindparam("b_box"), E.c.sort_date.is_(None)).limit(1)
)

THREAD_COLUMNS = (E.c.uid, E.c.sort_date, E.c.sort_subject, E.c.sort_reply, E.c.thread_ids)
_THREAD_SQL = (
    "SELECT " + ", ".join(c.name for c in THREAD_COLUMNS) + " FROM mailbox_entries "
    "WHERE mailbox_id = {box:d} ORDER BY uid"
)


def read_thread_rows(conn: Connection, mailbox_id: int) -> list[ThreadRow]:
    """Every entry's THREAD_COLUMNS (storage.sortkeys.ThreadRow), UID
    order, as the driver makes them: plain tuples (SQLite; PostgreSQL's
    records are made tuples, to be pickled), no SQLAlchemy row and result
    processing per entry (for 100,000 entries that took more CPU than the
    read, issue #24). ``sort_reply`` may be 0/1 (SQLite): read it as a
    truth value. The mailbox id is an int of ours, formatted in."""
    result = conn.exec_driver_sql(_THREAD_SQL.format(box=int(mailbox_id)))
    try:
        rows = result.cursor.fetchall()  # type: ignore[union-attr]
    finally:
        result.close()
    return list(map(tuple, rows))


BACKFILL_BATCH = 2000


def _backfill_query(dialect: str) -> Any:
    return (
        select(
            E.c.mailbox_id,
            E.c.uid,
            E.c.internal_date,
            E.c.size,
            messages.c.sent_date,
            messages.c.subject,
            PICKED_SQLITE if dialect == "sqlite" else PICKED_PG,
        )
        .select_from(E.join(messages, messages.c.id == E.c.message_id))
        .where(
            E.c.sort_date.is_(None),
            tuple_(E.c.mailbox_id, E.c.uid) > tuple_(bindparam("b_box"), bindparam("b_uid")),
        )
        .order_by(E.c.mailbox_id, E.c.uid)
        .limit(BACKFILL_BATCH)
    )


_BACKFILL_SQLITE = _backfill_query("sqlite")
_BACKFILL_PG = _backfill_query("postgresql")
_SET_KEYS = (
    update(E)
    .where(and_(E.c.mailbox_id == bindparam("b_box"), E.c.uid == bindparam("b_uid")))
    .values({k: bindparam(f"k_{k}") for k in KEY_COLUMNS})
)


def _row(r: Any) -> SortRow:
    """The sort row of a backfilled entry; from its message's columns
    alone (no addresses, no IDs) when the stored parsed form cannot be
    read (a form older than any this version reads): keys for it still,
    rather than a failed migration."""
    try:
        return sort_row(r.uid, r.internal_date, r.size, r.sent_date, r.subject, r.picked)
    except (ValueError, TypeError):
        return SortRow(
            r.uid,
            r.internal_date / 1_000_000,
            r.size,
            r.sent_date,
            r.subject or "",
            (),
            (),
            (),
            None,
            None,
            (),
        )


def backfill_sync(conn: Connection, mailbox_id: int | None = None) -> int:
    """Fills the keys of every entry (of ``mailbox_id`` only, if given)
    that has none, :data:`BACKFILL_BATCH` entries per read and update, in
    (mailbox, UID) order; the caller's transaction. Returns how many."""
    query = _BACKFILL_SQLITE if conn.dialect.name == "sqlite" else _BACKFILL_PG
    if mailbox_id is not None:
        query = query.where(E.c.mailbox_id == mailbox_id)
    after = (-1, -1) if mailbox_id is None else (mailbox_id, -1)
    done = 0
    while True:
        rows = conn.execute(query, {"b_box": after[0], "b_uid": after[1]}).all()
        if not rows:
            return done
        params = []
        for r in rows:
            keys = entry_keys(_row(r))
            params.append(
                {"b_box": r.mailbox_id, "b_uid": r.uid}
                | {f"k_{k}": v for k, v in zip(KEY_COLUMNS, keys, strict=True)}
            )
        execute(conn, _SET_KEYS, params)
        done += len(rows)
        after = (rows[-1].mailbox_id, rows[-1].uid)

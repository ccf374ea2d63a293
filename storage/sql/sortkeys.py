"""The stored RFC 5256 sort and thread keys of ``mailbox_entries`` (issue
#24; the keys themselves: storage.sortkeys), on either SQL backend.

- :func:`order_by`: the ORDER BY of an IMAP SORT over the stored keys,
  served by the indexes of schema step ``_v31_sort_keys`` for the common
  single keys (ARRIVAL, DATE, SUBJECT, FROM, SIZE).
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

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, literal_column, select, tuple_, update
from sqlalchemy.engine import Connection

from storage.sortkeys import KEY_COLUMNS, entry_keys
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


def pg_prefix(column: Any) -> ColumnElement[Any]:
    """The indexed prefix of a string key on PostgreSQL (the expression of
    the step's index: keep them alike)."""
    return literal_column(f"substring(mailbox_entries.{column.name} from 1 for {PG_PREFIX})")


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


def sorted_uids_query(criteria: Sequence[tuple[str, bool]], dialect: str) -> Any:
    """Every UID of mailbox ``b_box`` in SORT order (:func:`order_by`)."""
    return (
        select(E.c.uid)
        .where(E.c.mailbox_id == bindparam("b_box"))
        .order_by(*order_by(criteria, dialect))
    )


# An entry written without keys (by a process older than the step): its
# mailbox is sorted by the in-memory path (the caller's fallback).
MISSING_KEYS = (
    select(E.c.uid).where(E.c.mailbox_id == bindparam("b_box"), E.c.sort_date.is_(None)).limit(1)
)

THREAD_COLUMNS = (E.c.uid, E.c.sort_date, E.c.sort_subject, E.c.sort_reply, E.c.thread_ids)
THREAD_ROWS = select(*THREAD_COLUMNS).where(E.c.mailbox_id == bindparam("b_box")).order_by(E.c.uid)

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

"""Blobs garbage collection is deleting, recorded where writers see them.

Why a record in the database: a blob store cannot be trusted to delete a
blob only if it was not stored again since garbage collection looked (S3
has no such delete: a HEAD then a DELETE lets a put in between, and
``If-Match`` would not tell, since a put of the same bytes has the same
ETag). So the writers that store a blob and then commit rows naming it
learn of the deletion from the database their rows go to, in the same
transaction, and store the blob again before they commit.

The table ``blob_deletions`` (schema step 25) is in every database:
a row per blob being deleted (``done_at`` NULL) or deleted lately.

Garbage collection, for the candidates of one blob store
(``storage/blob/gc.py``): :func:`mark` commits their rows in every
database (PostgreSQL: under the exclusive advisory lock :data:`PG_LOCK`),
then it reads the references again, deletes, and :func:`finish` sets
``done_at``. Rows are purged ``keep`` seconds after (:func:`start_pass`).

A writer (a delivery, a queued message, a moved message) whose
transaction names blobs reads their rows before it commits, holding
:data:`PG_LOCK` shared on PostgreSQL: a batched delivery from its BEGIN
(``Database.write_batched``'s ``blob_keys``, :func:`found_sync`), a
writer's own transaction from :func:`check`. Any row newer than the ones it already
answered: it rolls back (:class:`BlobsBeingDeleted`), waits until those
deletions are done (:func:`wait_done`), stores its blobs again and tries
once more, answering those rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.errors import BlobsBeingDeleted, ErrorKind, StorageError
from storage.sql.db import PG_BLOB_LOCK, execute
from storage.sql.schema import blob_deletions

__all__ = ["BlobsBeingDeleted"]  # raised here, defined with the other errors

# pg_advisory_xact_lock key: shared by every batched write transaction,
# exclusive while garbage collection marks blobs.
PG_LOCK = PG_BLOB_LOCK
IN_CLAUSE = 500
# How long a writer waits for a deletion to end before it gives up
# (TEMPORARY: an SMTP client tries again later).
WAIT_SECONDS = 120.0
_POLL = 0.05


# found_sync's reads (storage.sql.db.execute: constant statements); up to
# _FEW_KEYS keys on SQLite are looked up one by one (each a call, where
# building an IN-list statement per delivery batch cost more than the read).
_FOUND_ANY = select(blob_deletions.c.id, blob_deletions.c.key).where(
    blob_deletions.c.id > bindparam("b_after")
)
_FOUND_KEY = _FOUND_ANY.where(blob_deletions.c.key == bindparam("b_key"))
_FEW_KEYS = 8
# PostgreSQL: any number of keys in one prepared statement (an array), beside
# the IN list that SQLite gets; the same rows.
_FOUND_KEYS_PG = text(
    "SELECT blob_deletions.id, blob_deletions.key FROM blob_deletions "
    "WHERE blob_deletions.id > :b_after AND blob_deletions.key = ANY(CAST(:b_keys AS TEXT[]))"
)


def found_sync(
    conn: Connection, keys: Collection[str] | None, after: int = 0
) -> list[tuple[int, str]]:
    """(id, key) of the rows newer than ``after`` for ``keys`` (None: any
    key), in the caller's transaction."""
    if keys is None:
        return [(r[0], r[1]) for r in execute(conn, _FOUND_ANY, {"b_after": after}).all()]
    out: list[tuple[int, str]] = []
    if conn.dialect.name == "postgresql":
        params = {"b_after": after, "b_keys": sorted(keys)}
        return [(r[0], r[1]) for r in execute(conn, _FOUND_KEYS_PG, params).all()]
    if conn.dialect.name == "sqlite" and len(keys) <= _FEW_KEYS:
        for key in sorted(keys):
            params = {"b_after": after, "b_key": key}
            out += [(r[0], r[1]) for r in execute(conn, _FOUND_KEY, params).all()]
        return out
    query = select(blob_deletions.c.id, blob_deletions.c.key).where(blob_deletions.c.id > after)
    ordered = sorted(keys)
    for at in range(0, len(ordered), IN_CLAUSE):
        chunk = ordered[at : at + IN_CLAUSE]
        rows = conn.execute(query.where(blob_deletions.c.key.in_(chunk)))
        out += [(r[0], r[1]) for r in rows]
    return out


def raise_if_found(rows: Sequence[tuple[int, str]]) -> None:
    """:class:`BlobsBeingDeleted` for the rows :func:`found_sync` found."""
    if rows:
        raise BlobsBeingDeleted({k for _, k in rows}, max(i for i, _ in rows))


async def check(conn: AsyncConnection, keys: Collection[str] | None, after: int = 0) -> None:
    """For a writer's own write transaction (``Database.write``): takes
    :data:`PG_LOCK` shared on PostgreSQL, then raises
    :class:`BlobsBeingDeleted` if any of ``keys`` has a row newer than
    ``after``. Call it after the blobs were stored, before the commit."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"SELECT pg_advisory_xact_lock_shared({PG_LOCK})"))
    raise_if_found(await conn.run_sync(found_sync, keys, after))


async def start_pass(databases: Iterable[Any], store: str, keep: float) -> None:
    """At the start of a pass over ``store`` (its lease held): rows left
    in progress by an earlier holder (it died; the lease lapsed, so it
    deletes no more) are done now, and rows done more than ``keep``
    seconds ago go."""
    now = time.time()
    for db in databases:
        async with db.write() as conn:
            await conn.execute(
                update(blob_deletions)
                .where(blob_deletions.c.store == store, blob_deletions.c.done_at.is_(None))
                .values(done_at=now)
            )
            await conn.execute(
                delete(blob_deletions).where(
                    blob_deletions.c.store == store, blob_deletions.c.done_at < now - keep
                )
            )


async def mark(databases: Iterable[Any], store: str, keys: Collection[str]) -> None:
    """Commits a row in progress for each of ``keys`` in every database,
    each under :data:`PG_LOCK` exclusive on PostgreSQL: a writer's
    transaction holding it shared has committed before, or sees the rows."""
    now = time.time()
    rows = [{"store": store, "key": k, "marked_at": now, "done_at": None} for k in sorted(keys)]
    for db in databases:
        async with db.write() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({PG_LOCK})"))
            for at in range(0, len(rows), IN_CLAUSE):
                await conn.execute(insert(blob_deletions), rows[at : at + IN_CLAUSE])


async def finish(databases: Iterable[Any], store: str, keys: Collection[str]) -> None:
    """The deletions of ``keys`` in ``store`` are over: no delete of them
    will follow. Their rows stay, done, until :func:`start_pass` purges them."""
    now = time.time()
    ordered = sorted(keys)
    for db in databases:
        async with db.write() as conn:
            for at in range(0, len(ordered), IN_CLAUSE):
                await conn.execute(
                    update(blob_deletions)
                    .where(
                        blob_deletions.c.store == store,
                        blob_deletions.c.key.in_(ordered[at : at + IN_CLAUSE]),
                        blob_deletions.c.done_at.is_(None),
                    )
                    .values(done_at=now)
                )


async def wait_done(db: Any, keys: Collection[str], timeout: float = WAIT_SECONDS) -> None:
    """Until no deletion of ``keys`` recorded in ``db`` is in progress;
    TEMPORARY after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    ordered = sorted(keys)
    while True:
        async with db.read() as conn:
            pending = False
            for at in range(0, len(ordered), IN_CLAUSE):
                found = await conn.execute(
                    select(blob_deletions.c.id)
                    .where(
                        blob_deletions.c.key.in_(ordered[at : at + IN_CLAUSE]),
                        blob_deletions.c.done_at.is_(None),
                    )
                    .limit(1)
                )
                pending = pending or found.first() is not None
        if not pending:
            return
        if time.monotonic() > deadline:
            raise StorageError(ErrorKind.TEMPORARY, "a blob is being collected, try again later")
        await asyncio.sleep(_POLL)


def store_name(blobs: Any) -> str:
    """The blob store as its rows name it: its folder or bucket and prefix."""
    return str(getattr(blobs, "root", ""))[:255]

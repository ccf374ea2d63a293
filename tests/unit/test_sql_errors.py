"""Backend failures are classified once (``storage.sql.db.classify``): what a
retry can cure is TEMPORARY (IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP],
SMTP 451, HTTP 503); anything else stays a bug and is not disguised.

The driver exceptions are the real classes, wrapped the way SQLAlchemy's
asyncpg and pysqlite dialects wrap them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import (
    AsyncAdapt_asyncpg_connection,
    PGDialect_asyncpg,
)

from storage.errors import ErrorKind, StorageError
from storage.sql.db import Database, classify

PG = asyncpg.exceptions


def through_sqlalchemy(error: Exception) -> sa_exc.DBAPIError:
    """``error`` (from asyncpg) as SQLAlchemy's asyncpg dialect raises it."""
    dbapi = PGDialect_asyncpg.import_dbapi()
    try:
        AsyncAdapt_asyncpg_connection._handle_exception_no_connection(dbapi, error)
    except dbapi.Error as translated:
        return sa_exc.DBAPIError.instance("SELECT 1", None, translated, dbapi.Error)
    raise AssertionError("not translated")


RETRYABLE_POSTGRES = [
    PG.CannotConnectNowError("the database system is starting up"),  # 57P03
    PG.AdminShutdownError("terminating connection due to administrator command"),  # 57P01
    PG.CrashShutdownError("terminating connection because of crash of another process"),
    PG.ConnectionDoesNotExistError("connection was closed in the middle of operation"),  # 08003
    PG.ConnectionFailureError("connection failure"),  # 08006
    PG.ClientCannotConnectError("could not connect"),  # 08001
    PG.ConnectionRejectionError("rejected"),  # 08004
    PG.TooManyConnectionsError("sorry, too many clients already"),  # 53300
    PG.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    PG.SerializationError("could not serialize access due to concurrent update"),  # 40001
    PG.DeadlockDetectedError("deadlock detected"),  # 40P01
    PG.LockNotAvailableError("canceling statement due to lock timeout"),  # 55P03
    PG.QueryCanceledError("canceling statement due to statement timeout"),  # 57014
]

NOT_RETRYABLE_POSTGRES = [
    PG.UniqueViolationError("duplicate key value violates unique constraint"),
    PG.PostgresSyntaxError('syntax error at or near "SELEC"'),
    PG.UndefinedTableError('relation "nope" does not exist'),
    PG.NumericValueOutOfRangeError("bigint out of range"),
]


@pytest.mark.parametrize("error", RETRYABLE_POSTGRES, ids=lambda e: type(e).__name__)
def test_postgres_failures_a_retry_cures_are_temporary(error: Exception) -> None:
    for raised in (through_sqlalchemy(error), error):
        classified = classify(raised)
        assert isinstance(classified, StorageError), raised
        assert classified.kind is ErrorKind.TEMPORARY
        assert classified.__cause__ is raised
        assert "storage" in str(classified)  # nothing of the backend's message


@pytest.mark.parametrize("error", NOT_RETRYABLE_POSTGRES, ids=lambda e: type(e).__name__)
def test_postgres_bugs_are_not_disguised_as_outages(error: Exception) -> None:
    wrapped = through_sqlalchemy(error)
    assert classify(wrapped) is wrapped
    assert classify(error) is error


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out connecting"),
        OSError(113, "No route to host"),
        sa_exc.TimeoutError("QueuePool limit of size 10 overflow 20 reached"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_network_failures_and_pool_timeouts_are_temporary(error: Exception) -> None:
    classified = classify(error)
    assert isinstance(classified, StorageError) and classified.kind is ErrorKind.TEMPORARY


def _sqlite_error(path: Path, sql: str, *, locked: bool) -> sqlite3.Error:
    """A real pysqlite error from running ``sql``, while another connection
    holds the write lock if ``locked``."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    if locked:
        holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute(sql)
    except sqlite3.Error as err:
        return err
    finally:
        other.close()
        if locked:
            holder.execute("ROLLBACK")
        holder.close()
    raise AssertionError(f"{sql} did not fail")


def _wrapped(error: sqlite3.Error) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError.instance("SELECT 1", None, error, sqlite3.Error)


def test_a_locked_sqlite_database_is_temporary(tmp_path: Path) -> None:
    locked = _sqlite_error(tmp_path / "db", "INSERT INTO t VALUES (1)", locked=True)
    assert "locked" in str(locked)
    classified = classify(_wrapped(locked))
    assert isinstance(classified, StorageError) and classified.kind is ErrorKind.TEMPORARY


def test_sqlite_io_errors_are_temporary() -> None:
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = 522  # type: ignore[attr-defined]  # SQLITE_IOERR_SHORT_READ
    classified = classify(_wrapped(error))
    assert isinstance(classified, StorageError) and classified.kind is ErrorKind.TEMPORARY


def test_an_sqlite_bug_is_not_disguised_as_an_outage(tmp_path: Path) -> None:
    missing = _sqlite_error(tmp_path / "db", "SELECT * FROM no_such_table", locked=False)
    wrapped = _wrapped(missing)
    assert isinstance(wrapped, sa_exc.OperationalError)  # pysqlite's class for both
    assert classify(wrapped) is wrapped


async def test_a_storage_call_on_a_broken_statement_is_not_temporary(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'shard.db'}")
    try:
        with pytest.raises(sa_exc.OperationalError):
            async with db.read() as conn:
                await conn.exec_driver_sql("SELECT * FROM no_such_table")
    finally:
        await db.close()

"""One SQL database (a shard) behind SQLAlchemy 2 async Core.

The same code path serves SQLite (aiosqlite) and PostgreSQL (asyncpg); this
module hides the few places they differ: connection setup, how a write
transaction is serialised, and how backend failures are classified.

Hot writes (message delivery) can also be written as one synchronous
function over a SQLAlchemy ``Connection`` and handed to
:meth:`Database.write_batched`. On SQLite such functions run in one writer
thread, several per transaction (group commit), which spares a thread hop
per statement and an fsync per delivery; the WAL's fsync then runs in a
second thread, outside the cross-process write lock, while the writer goes
on with the next batch (see :meth:`Database._sync_wal`). On PostgreSQL the
same queue, batches and savepoint rules apply (one code path): a batch runs
on one held connection through ``AsyncConnection.run_sync``, one
transaction and one WAL flush for the lot, and :func:`execute` sends the
hot statements straight to asyncpg (prepared once per connection). Hot
reads likewise go to :meth:`Database.read_sync`: on SQLite the whole
function runs in one of a few reader threads with their own connections
(WAL readers never block the writer); on PostgreSQL on held connections
without the pool's ping, each read watched instead (``pgreaders``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import fcntl
import logging
import os
import threading
import uuid
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, NoReturn, TypeVar

import asyncpg
import asyncpg.exceptions as asyncpg_errors
from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    MultipleResultsFound,
    NoResultFound,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as SaTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from storage.errors import ErrorKind, StorageError
from storage.sql import fts, schema
from storage.sql.pgreaders import PgReaders
from storage.tasks import stop_task
from storage.walsync import WalFile

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Most write functions one SQLite group commit runs: bounds the latency a
# delivery waits behind others and the work one failed COMMIT undoes.
MAX_GROUP_COMMIT = 128
# Batch jobs handed to the writer thread at once: the running one and the
# next, so the writer never waits for the event loop between two batches.
PIPELINED_BATCHES = 2
# Reader threads of :meth:`Database.read_sync` on SQLite, one connection each.
# WAL readers never wait for the writer; the GIL makes more of them pointless.
SQLITE_READERS = 3
# PostgreSQL batches running at once, each on its own held connection. A
# batch is a chain of round trips (each a wakeup of the server and of this
# process) and mostly waits: one connection at a time left the STORE bench
# latency-bound at 0.4x SQLite's rate with both processes half idle. Calls
# with a ``key`` (an account) run beside batches of other keys only, so
# two of them never wait for each other's row locks (see _take_pg_batch).
PG_WRITERS = 4
# A writer connection whose COMMIT AND CHAIN began a transaction no batch
# used within this many seconds ends it (Database._end_chains).
CHAIN_IDLE_SECONDS = 1.0
# A PostgreSQL batch that failed as a whole on a deadlock or serialization
# failure (nothing committed: another process's batch locked the same
# accounts in the other order) runs again, at most this many times in all.
PG_BATCH_ATTEMPTS = 3
_PG_CONFLICTS = frozenset({"40001", "40P01"})

T = TypeVar("T")


# How long one host of a multi-host PostgreSQL URL may take to accept a
# session before the next is tried (libpq's connect_timeout, per host).
# asyncpg's own timeout (60 s) covers every host together, and a powered-off
# host leaves SYNs unanswered for two minutes: listed first, it would keep
# every new connection from reaching the promoted replica after it.
CONNECT_TIMEOUT_PER_HOST = 5.0
# How long a pooled connection may take to answer the ping before it is
# used. A server that hangs, or whose host died without a word (no reset:
# the kernel retransmits for some 15 minutes), must not hold up requests
# once a replica has taken over; longer than any pause of a loaded server.
PING_TIMEOUT = 5.0
# The trigram index's pending-list merge (merge_search_index): the key of
# the advisory lock that lets one session per database merge at a time,
# and how long one merge may run before PostgreSQL cancels it.
MERGE_LOCK_KEY = 0x73686D_6D657267  # "shm" "merg"
MERGE_TIMEOUT_SECONDS = 60.0
# A durable PostgreSQL batch writes a random token into ``commit_marks`` (schema step 22)
# in its BEGIN's round trip. When its COMMIT fails without a verdict (the connection or the
# server died while the COMMIT was on the wire: it may have committed, on the primary and on a
# synchronous replica that is then promoted), the writer fences the token on a new connection
# for up to COMMIT_IN_DOUBT_SECONDS: if the batch committed, its callers are told so (SMTP gets
# its 250, not a 451 that makes the sender send again); if not, the fence row keeps it from ever
# committing and the callers get the temporary error. Marks older than
# COMMIT_MARK_KEEP_SECONDS are deleted by the search index's merger (one process at a time).
COMMIT_IN_DOUBT_SECONDS = 30.0
COMMIT_MARK_KEEP_SECONDS = 600
# How long a durable batch's COMMIT may go without a reply before it is in doubt (as above).
# A synchronous standby that stopped answering holds every COMMIT on the primary: without a
# bound the callers would wait for ever (a sender's DATA, a client's APPEND), where the
# outage should be a temporary failure (a 451, NO [UNAVAILABLE]) they can retry.
COMMIT_WAIT_SECONDS = 30.0
# Failures of one host after which the next is tried: out of reach (refused,
# timed out), not the primary (a standby), starting up or in recovery (57P03).
# Others (a wrong password, a missing database) stop at once, as asyncpg does.
_NEXT_HOST = (
    OSError,
    asyncpg_errors.TargetServerAttributeNotMatched,
    asyncpg_errors.CannotConnectNowError,
)

# read_only_sql_transaction: a write reached a server that is no primary
# (a failover is under way, see ``_setup_postgresql``).
READ_ONLY_TRANSACTION = "25006"
# SQLSTATEs a retry can cure (PostgreSQL manual, appendix A "Error Codes"):
# whole classes, then single codes. 08: connection exception; 53:
# insufficient resources (53300 too many connections, disk full, memory).
_RETRY_SQLSTATE_CLASSES = frozenset({"08", "53"})
_RETRY_SQLSTATES = frozenset(
    {
        READ_ONLY_TRANSACTION,  # a write reached a standby or a fenced old primary
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout)
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, shutting down, recovery)
        "57P05",  # idle_session_timeout
    }
)
# SQLite primary result codes a retry can cure (https://sqlite.org/rescode.html):
# BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL. Others
# (SQLITE_ERROR: a missing table, bad SQL; CORRUPT; CONSTRAINT) are not.
_RETRY_SQLITE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})


async def connect_each_host(**kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect(**kwargs)``, but with a list of hosts (a
    multi-host URL) each gets :data:`CONNECT_TIMEOUT_PER_HOST` in turn, in
    order; the first that takes the session (and matches
    ``target_session_attrs``) wins. Raises the last host's error. The
    engine's connections and the LISTEN bus's are made here."""
    hosts, ports = kwargs.pop("host", None), kwargs.pop("port", None)
    if not isinstance(hosts, list) or len(hosts) < 2:
        return await asyncpg.connect(host=hosts, port=ports, **kwargs)
    if not isinstance(ports, list):
        ports = [ports] * len(hosts)
    kwargs["timeout"] = min(float(kwargs.get("timeout", 60)), CONNECT_TIMEOUT_PER_HOST)
    for host, port in zip(hosts[:-1], ports[:-1], strict=True):
        with suppress(*_NEXT_HOST):
            return await asyncpg.connect(host=host, port=int(port), **kwargs)
    return await asyncpg.connect(host=hosts[-1], port=int(ports[-1]), **kwargs)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps (SQLAlchemy's ``orig``, else ``__cause__``)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = getattr(link, "orig", None) or link.__cause__


def _sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of a PostgreSQL error, wrapped or not; "" if none."""
    for link in _chain(exc):
        code = getattr(link, "sqlstate", None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return ""


def _lost_connection(exc: BaseException) -> bool:
    """asyncpg's own errors (no SQLSTATE) for a server out of reach: no
    listed host takes writes yet (a failover in progress), or the
    connection died under the call."""
    if isinstance(exc, asyncpg_errors.TargetServerAttributeNotMatched):
        return True
    # A held connection whose server went away while it was idle: asyncpg
    # took the server's unsolicited FATAL (57P01, shutdown) and the next
    # statement finds the protocol still "consuming" that error.
    if isinstance(exc, asyncpg_errors.InternalClientError):
        return "another operation" in str(exc)
    return isinstance(exc, asyncpg_errors.InterfaceError) and "connection is closed" in str(exc)


def _retry_cures(exc: BaseException) -> bool | None:
    """What ``exc`` itself says: True (transient), False (a code that
    says it is not), None (no verdict: look at its cause)."""
    if isinstance(exc, StorageError):
        return False
    if isinstance(exc, (OSError, SaTimeoutError, DisconnectionError)):
        return True  # refused, reset, timed out (TimeoutError is an OSError); pool timeout
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if _lost_connection(exc):
        return True
    sqlstate = getattr(exc, "sqlstate", None)  # asyncpg, and SQLAlchemy's adapter of it
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return sqlstate[:2] in _RETRY_SQLSTATE_CLASSES or sqlstate in _RETRY_SQLSTATES
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _RETRY_SQLITE_CODES  # the primary code of an extended one
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a retry later can cure ``exc``: the driver's own code first
    (SQLAlchemy's ``orig``, then ``__cause__``), else the class of the
    outermost error: an ``OperationalError`` without a code is an outage."""
    for link in _chain(exc):
        verdict = _retry_cures(link)
        if verdict is not None:
            return verdict
    return isinstance(exc, OperationalError)


def classify(exc: Exception) -> Exception:
    """The error a caller should see for a backend failure, decided here
    and nowhere else: what a retry can cure (:func:`is_transient`: outages,
    failovers, lock and serialization conflicts) is TEMPORARY, caused by
    ``exc``; anything else (an integrity error a store did not expect, a
    bad statement) is a bug and is returned as it is."""
    if not is_transient(exc):
        return exc
    log.warning("database unavailable: %s", exc)
    err = StorageError(ErrorKind.TEMPORARY, "storage temporarily unavailable")
    err.__cause__ = exc
    return err


class _CallFailed(Exception):
    """A batched call raised: its transaction rolls back and the batch runs
    again with a savepoint per call."""


class _Batched:
    """One queued :meth:`Database.write_batched` call."""

    __slots__ = (
        "after_commit", "blob_keys", "durable", "fn", "future", "key", "ready", "settles",
    )

    def __init__(
        self,
        fn: Callable[[Connection], Any],
        after_commit: Callable[[Any], Awaitable[None]] | None,
        future: asyncio.Future[Any],
        durable: bool,
        ready: concurrent.futures.Future[Any] | None,
        key: int | None = None,
        blob_keys: BlobKeys | None = None,
        settles: bool = False,
    ) -> None:
        self.fn = fn
        self.blob_keys = blob_keys
        self.settles = settles
        self.after_commit = after_commit
        self.future = future
        self.durable = durable
        self.ready = ready
        self.key = key

    def can_run(self) -> bool:
        """Whether the call may join a group commit now: its ``ready`` (the
        blob it depends on) has ended, or it has none."""
        return self.ready is None or self.ready.done()


def _as_storage_error(exc: BaseException) -> BaseException:
    """A failed ``ready`` as the caller sees it: OSError and outages are
    TEMPORARY; a StorageError stays itself."""
    if isinstance(exc, StorageError) or not isinstance(exc, Exception):
        return exc
    err = classify(exc)
    if err is exc:  # not an outage: still nothing was committed, try again later
        err = StorageError(ErrorKind.TEMPORARY, "storage write failed")
        err.__cause__ = exc
    return err


class _CommitInDoubt(Exception):
    """A PostgreSQL COMMIT failed without saying whether it committed (its
    cause is the error it raised). ``token`` is the batch's commit mark;
    ``outcomes`` its calls' results, true if it did commit."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.token = token
        self.outcomes: list[tuple[bool, Any]] = []


class _NotReady(Exception):
    """A batched call's ``ready`` failed: its transaction must not commit."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index)
        self.index = index
        self.error = error


# What a batched call's rows name (see ``Database.write_batched``): the blob
# keys (None: unknown, any) and the newest ``blob_deletions`` row it answered.
BlobKeys = Callable[[], tuple["Collection[str] | None", int]]
# (fn, ready, blob_keys, settles) of one call in a batch.
_Item = tuple[
    Callable[[Connection], Any],
    "concurrent.futures.Future[Any] | None",
    "BlobKeys | None",
    bool,
]


class _Prepared:
    """A statement compiled once for the SQLite driver (qmark parameters)."""

    __slots__ = ("names", "row", "sql", "stmt")

    def __init__(self, stmt: Any, sql: str, names: Sequence[str]) -> None:
        self.stmt = stmt  # held: the cache is keyed by its identity
        self.sql = sql
        self.names = tuple(names)
        self.row: Any = None  # a namedtuple type, made at the first result


class _DriverResult:
    """The part of SQLAlchemy's ``Result`` the write functions use."""

    __slots__ = ("_rows", "inserted_primary_key")

    def __init__(self, rows: list[Any], lastrowid: int | None) -> None:
        self._rows = rows
        self.inserted_primary_key = (lastrowid,)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if not self._rows:
            raise NoResultFound("No row was found when one was required")
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when exactly one was required")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def all(self) -> list[Any]:
        return list(self._rows)


_prepared: dict[tuple[int, tuple[str, ...], str], _Prepared] = {}


def execute(conn: Connection, stmt: Any, params: Any = None) -> Any:
    """``conn.execute(stmt, params)`` for the hot write functions.

    On SQLite's writer and reader connections (pysqlite), and on
    PostgreSQL inside ``run_sync`` (asyncpg, see :func:`_execute_asyncpg`),
    the statement is compiled once and run straight on the driver
    connection, skipping SQLAlchemy's per-execution work (several times
    the cost of the statement itself); elsewhere it is ``conn.execute``. Only
    for module-level constant statements (cached by identity) whose
    parameters and columns need no type conversion (numbers, strings,
    None). ``params``: a dict, or a list of dicts for executemany. The
    result offers ``first()``, ``one()``, ``scalar()``, ``all()`` and
    ``inserted_primary_key``; rows are named tuples.
    """
    driver_name = conn.dialect.driver
    if driver_name == "asyncpg":
        return _execute_asyncpg(conn, stmt, params)
    if driver_name != "pysqlite":
        return conn.execute(stmt, params)
    many = isinstance(params, list)
    first = (params[0] if params else {}) if many else (params or {})
    prepared = _prepared_for(conn, stmt, tuple(first))
    driver = conn.connection.driver_connection
    assert driver is not None
    names = prepared.names
    if many:
        cursor = driver.executemany(prepared.sql, [[p[n] for n in names] for p in params])
        cursor.close()
        return _DriverResult([], None)
    cursor = driver.execute(prepared.sql, [first[n] for n in names])
    try:
        if cursor.description is None:
            return _DriverResult([], cursor.lastrowid)
        if prepared.row is None:
            prepared.row = namedtuple(  # type: ignore[misc]
                "Row", [d[0] for d in cursor.description], rename=True
            )
        make = prepared.row._make
        return _DriverResult([make(r) for r in cursor.fetchall()], None)
    finally:
        cursor.close()


def _prepared_for(conn: Connection, stmt: Any, keys: tuple[str, ...]) -> _Prepared:
    """``stmt`` compiled once per dialect and parameter names (cached by
    the statement's identity: module-level constants only)."""
    key = (id(stmt), keys, conn.dialect.name)
    prepared = _prepared.get(key)
    if prepared is None or prepared.stmt is not stmt:
        compiled = stmt.compile(dialect=conn.dialect, column_keys=list(keys))
        prepared = _Prepared(stmt, compiled.string, compiled.positiontup or ())
        _prepared[key] = prepared
    return prepared


def _execute_asyncpg(conn: Connection, stmt: Any, params: Any) -> _DriverResult:
    """:func:`execute` on a PostgreSQL connection inside ``run_sync``: the
    statement goes straight to asyncpg (which prepares it once per
    connection and keeps it), one round trip, without SQLAlchemy's
    per-execution work. It runs in whatever transaction the connection is
    in (the batch writer's ``BEGIN``, see :meth:`Database._pg_batch`).
    asyncpg's errors are raised as SQLAlchemy's (``IntegrityError``...),
    as ``conn.execute`` would."""
    many = isinstance(params, list)
    first = (params[0] if params else {}) if many else (params or {})
    prepared = _prepared_for(conn, stmt, tuple(first))
    fairy = conn.connection
    raw = fairy.driver_connection
    names = prepared.names
    try:
        if many:
            await_only(raw.executemany(prepared.sql, [[p[n] for n in names] for p in params]))
            return _DriverResult([], None)
        records = await_only(raw.fetch(prepared.sql, *[first[n] for n in names]))
    except Exception as exc:
        _raise_as_sqlalchemy(conn, fairy, exc, prepared.sql)
    if not records:
        return _DriverResult([], None)
    if prepared.row is None:
        prepared.row = namedtuple(  # type: ignore[misc]
            "Row", list(records[0].keys()), rename=True
        )
    make = prepared.row._make
    return _DriverResult([make(r.values()) for r in records], None)


def _raise_as_sqlalchemy(conn: Connection, fairy: Any, exc: Exception, sql: str) -> NoReturn:
    """Raises ``exc`` (from asyncpg) as SQLAlchemy would have: the
    adapter's DBAPI error, wrapped in its ``sqlalchemy.exc`` class."""
    try:
        fairy.dbapi_connection._handle_exception(exc)
    except Exception as dbapi_exc:
        if not isinstance(dbapi_exc, conn.dialect.loaded_dbapi.Error):
            raise
        raise DBAPIError.instance(
            sql, None, dbapi_exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
        ) from exc
    raise exc


# Where a batch's deferred statements wait (Connection.info, the writer's).
_DEFERRED = "shardmail_deferred"


class _Deferred:
    """The statements the calls of one batch deferred (:func:`execute_later`),
    by statement in first-deferred order, their parameter lists joined, and
    the keys whose rows they write."""

    __slots__ = ("keys", "pending")

    def __init__(self) -> None:
        self.keys: set[int] = set()
        self.pending: dict[int, tuple[Any, dict[str, list[Any]]]] = {}

    def add(self, stmt: Any, params: dict[str, list[Any]], key: int) -> None:
        held = self.pending.get(id(stmt))
        if held is None:
            self.pending[id(stmt)] = (stmt, {k: list(v) for k, v in params.items()})
        else:
            joined = held[1]
            if joined.keys() != params.keys():
                raise ValueError("deferred parameters differ from the statement's first")
            for name, values in params.items():
                joined[name].extend(values)
        self.keys.add(key)

    def run(self, conn: Connection) -> None:
        """Runs what is pending (one round trip per statement), then forgets it."""
        pending, self.pending = self.pending, {}
        self.keys = set()
        for stmt, params in pending.values():
            execute(conn, stmt, params)


def execute_later(conn: Connection, stmt: Any, params: dict[str, list[Any]], key: int) -> None:
    """:func:`execute` of a statement whose parameters are all lists (rows
    passed as arrays, one per column, that ``unnest`` takes apart), writing
    rows of account ``key`` only, whose result nobody reads. In a batch
    whose calls declare ``settles`` (:meth:`Database.write_batched`) it may
    run at the batch's end instead, once for the batch's calls of the same
    statement object, their lists joined in call order (so ``stmt`` must
    mean the same for the joined rows as for each call's: an UPDATE of
    distinct accounts' rows, INSERTs); it runs earlier when a later call
    calls :func:`settle` with ``key``. Anywhere else it runs now."""
    deferred = conn.info.get(_DEFERRED)
    if deferred is None:
        execute(conn, stmt, params)
    else:
        deferred.add(stmt, params, key)


def settle(conn: Connection, key: int) -> None:
    """Runs the statements the batch deferred (:func:`execute_later`) now if
    one of them writes rows of ``key``: a ``settles`` call calls it before
    it reads or locks that account's rows, and sees them written."""
    deferred = conn.info.get(_DEFERRED)
    if deferred is not None and key in deferred.keys:
        deferred.run(conn)


class _PgTransaction:
    """The statements :func:`_transaction` sends, on PostgreSQL: straight
    to asyncpg (simple protocol, one round trip each)."""

    __slots__ = ("_conn", "_raw")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._raw = conn.connection.driver_connection

    @property
    def raw(self) -> asyncpg.Connection:
        return self._raw

    @classmethod
    def of(cls, conn: AsyncConnection) -> _PgTransaction:
        """The same for a held writer connection, between batches."""
        return cls(conn.sync_connection)  # type: ignore[arg-type]

    @property
    def in_transaction(self) -> bool:
        # A closed asyncpg connection has no protocol to ask (AttributeError).
        return not self._raw.is_closed() and bool(self._raw.is_in_transaction())

    def execute(self, sql: str, timeout: float | None = None) -> None:
        """``sql`` on the connection; past ``timeout`` seconds asyncpg cancels
        it and this raises (a COMMIT's outcome is then in doubt)."""
        try:
            await_only(self._raw.execute(sql, timeout=timeout))
        except Exception as exc:
            _raise_as_sqlalchemy(self._conn, self._conn.connection, exc, sql)


def _fails_batch(exc: BaseException) -> bool:
    """Whether a call's error is the database's (the whole batch fails,
    TEMPORARY) rather than the call's own (only it fails): SQLite's
    OperationalError (busy, I/O), a lost connection, a COMMIT in doubt."""
    if isinstance(exc, (OperationalError, _CommitInDoubt)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OSError) or _sqlstate(exc)[:2] == "08":
        return True
    # A connection that died under the call (its server was killed, a
    # failover): the held writer connection must go, not only this call.
    return lost_connection(exc)


def lost_connection(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it wraps, is asyncpg saying the
    connection was already gone (closed, or the server's FATAL unread):
    the statement was not sent."""
    return any(_lost_connection(link) for link in _chain(exc))


def connection_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is the connection's failure rather than the
    statement's: :func:`lost_connection`, a reset socket, or the server
    ending the session (SQLSTATE class 08; 57P01-57P03, a shutdown). The
    statement may have been sent: only a read may simply run again."""
    if lost_connection(exc) or _sqlstate(exc) in {"57P01", "57P02", "57P03"}:
        return True
    return _sqlstate(exc)[:2] == "08" or any(isinstance(link, OSError) for link in _chain(exc))


def _is_conflict(exc: BaseException) -> bool:
    """A deadlock or serialization failure: the transaction may run again."""
    return _sqlstate(exc) in _PG_CONFLICTS


class Database:
    """An engine plus the transaction discipline every store uses.

    ``write()`` yields a connection inside a transaction that commits when the
    block exits normally (durably: SQLite runs with ``synchronous=FULL``) and
    rolls back on any exception. On SQLite writes are serialised twice: an
    asyncio lock inside this process, ``BEGIN IMMEDIATE`` across processes.
    On PostgreSQL writers serialise on row locks they take themselves.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            if ":memory:" in url or url.rstrip("/").endswith("sqlite+aiosqlite:"):
                raise StorageError(ErrorKind.INVALID, "an in-memory SQLite database is not shared")
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        else:
            # At most 30 connections as before, but 20 kept: with 10, a
            # burst of concurrent reads (16 HTTP clients) opened and closed
            # overflow connections per read, a connect (and its TLS attempt)
            # costing more than the read itself.
            kwargs["pool_size"] = 20
            kwargs["max_overflow"] = 10
            # No pool_pre_ping: its ping has no time limit (see _setup_postgresql).
            kwargs["connect_args"] = {"async_creator_fn": connect_each_host}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self._write_lock = asyncio.Lock()
        # PostgreSQL group commit: the connections batches run on, held
        # between batches (no pool checkout and ping per batch); the keys
        # of the batches running, how many run, and whether one runs alone.
        self._pg_idle: list[AsyncConnection] = []
        self._pg_busy: set[int] = set()
        self._pg_running = 0
        self._pg_exclusive = False
        self._pg_lanes: set[asyncio.Task[None]] = set()
        # When each held writer connection came back, and the task ending
        # the transactions left open on idle ones (see _end_chains).
        self._pg_returned: dict[int, float] = {}
        self._chain_ender: asyncio.Task[None] | None = None
        # SQLite group commit: the queue, the task draining it, the writer
        # thread and its connection (opened in that thread on first use).
        self._batch_queue: list[_Batched] = []
        self._flusher: asyncio.Task[None] | None = None
        self._batch_wake = asyncio.Event()  # a call queued, or a queued call's ``ready`` ended
        self._queue_lock = threading.Lock()  # the queue: the loop adds, the writer takes
        self._write_waiters = 0  # write() calls waiting for _write_lock
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer_engine: Engine | None = None
        self._writer_conn: Connection | None = None
        self._lock_fd: int | None = None
        # The WAL's fsync after a batch commit (``_sync_wal``): its thread,
        # the WAL file, the commits counted and how many are durable,
        # and the task telling callers, batch by batch in commit order.
        self._syncer: concurrent.futures.ThreadPoolExecutor | None = None
        self._wal: WalFile | None = None
        self._commits = 0
        self._synced = 0
        self._settling: asyncio.Task[None] | None = None
        # SQLite synchronous reads: a few threads, each with its own connection.
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_engine: Engine | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[Connection] = []
        self._reader_conns_lock = threading.Lock()
        # SQLite's full-text index file and its indexer, or PostgreSQL's
        # merger of the trigram index's pending list (``storage/sql/fts.py``).
        self.file: str | None = None
        self._indexer: fts.FtsIndexer | fts.PendingListMerger | None = None
        # PostgreSQL's read_sync: held connections, watched (see pgreaders).
        self._pg_readers: PgReaders | None = None
        if not self.is_sqlite:
            _setup_postgresql(self.engine.sync_engine)
            self._pg_readers = PgReaders(self.engine, PING_TIMEOUT, is_transient, self._connect_raw)
            readers = self._pg_readers

            # A connection the engine finds gone (or on a fenced old
            # primary, see _setup_postgresql) retires the held readers too.
            @event.listens_for(self.engine.sync_engine, "handle_error")
            def on_disconnect(context: Any) -> None:
                if context.is_disconnect:
                    readers.generation += 1

        if self.is_sqlite:
            _setup_sqlite(self.engine.sync_engine)
            path = make_url(url).database
            if path and path != ":memory:":
                self.file = os.path.abspath(path)
                self._wal = WalFile(self.file)

    async def _connect_raw(self) -> asyncpg.Connection:
        """A new asyncpg connection outside the pool, as the pool makes them."""
        from storage.events import asyncpg_connect_args

        return await connect_each_host(**asyncpg_connect_args(self.url))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def write(self, *, foreign_keys: bool = True) -> AsyncIterator[AsyncConnection]:
        """A read-write transaction; commit on normal exit.

        ``foreign_keys=False`` (schema migrations only): SQLite does not
        enforce foreign keys in this transaction, so a step may rebuild a
        table others refer to; the step checks them itself before it ends
        (``PRAGMA foreign_key_check``). Ignored on PostgreSQL."""
        if self.is_sqlite:
            self._write_waiters += 1  # the batch writer lets the lock go (see _flush_batches)
            try:
                await self._write_lock.acquire()
            finally:
                self._write_waiters -= 1
            try:
                async with self._translate(), self.engine.connect() as conn:
                    conn = await conn.execution_options(
                        sqlite_begin="IMMEDIATE", sqlite_foreign_keys=foreign_keys
                    )
                    try:
                        async with conn.begin():
                            yield conn
                    finally:
                        if not foreign_keys:
                            # Never back to the pool without enforcement: the
                            # next connection is made with it (``_setup_sqlite``).
                            await conn.invalidate()
            finally:
                self._write_lock.release()
        else:
            async with self._translate(), self.engine.begin() as conn:
                yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only snapshot transaction (rolled back at the end)."""
        async with self._translate(), self.engine.connect() as conn:
            async with conn.begin():
                yield conn

    @asynccontextmanager
    async def _translate(self) -> AsyncIterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # drivers raise more than DBAPIError (asyncpg, OSError)
            err = classify(exc)
            if err is exc:
                raise
            raise err from exc

    # --- synchronous read functions, one thread hop on SQLite ---------------

    async def read_sync(self, fn: Callable[[Connection], T]) -> T:
        """Runs ``fn(conn)`` in a read-only snapshot transaction (rolled back
        at the end) and returns its result.

        ``fn`` is synchronous and must only read through ``conn`` (it may use
        :func:`execute`). On SQLite it runs whole in one of a few reader
        threads, each with its own pysqlite connection: one thread hop per
        call instead of one per statement. It sees every write committed
        before the call started (WAL snapshot at its first read). On
        PostgreSQL it runs through ``AsyncConnection.run_sync`` outside any
        transaction: each statement sees what was committed when it
        started (as READ COMMITTED would). Backend outages raise TEMPORARY.
        """
        if self._pg_readers is not None:
            # No BEGIN and ROLLBACK around it (two round trips): under READ
            # COMMITTED, PostgreSQL's default, each statement takes its own
            # snapshot inside a transaction as well as outside one. On a
            # held connection, without the pool's checkout and ping; a
            # server that stops answering is TEMPORARY within seconds
            # (``storage/sql/pgreaders.py``).
            async with self._translate():
                return await self._pg_readers.run(fn)
        loop = asyncio.get_running_loop()
        async with self._translate():
            return await loop.run_in_executor(self._reader_pool(), self._run_read, fn)

    def _reader_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._readers is None:
            self._readers = concurrent.futures.ThreadPoolExecutor(
                max_workers=SQLITE_READERS, thread_name_prefix="sqlite-reader"
            )
        return self._readers

    def _run_read(self, fn: Callable[[Connection], T]) -> T:
        # Runs in a reader thread.
        conn: Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            with self._reader_conns_lock:
                if self._reader_engine is None:
                    url = make_url(self.url).set(drivername="sqlite+pysqlite")
                    self._reader_engine = create_engine(
                        url,
                        connect_args={
                            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                            "check_same_thread": False,  # closed from close()
                        },
                    )
                    _setup_sqlite(self._reader_engine)
                    if self.file is not None:
                        _attach_fts(self._reader_engine, self.file)
                engine = self._reader_engine
            conn = engine.connect()
            with self._reader_conns_lock:
                self._reader_conns.append(conn)
            self._reader_local.conn = conn
        # BEGIN and ROLLBACK on the driver, as the batch writer does
        # (``_transaction``): SQLAlchemy's begin() dispatches its events and
        # runs BEGIN through an execution context, a sixth of a one-row
        # read's cost. A statement ``fn`` runs through SQLAlchemy finds the
        # driver in the transaction and adds no BEGIN (``_setup_sqlite``).
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            driver.execute("BEGIN")
        except Exception:
            self._drop_reader(conn)
            raise
        try:
            return fn(conn)
        finally:
            if conn.invalidated:  # its driver connection is gone
                self._drop_reader(conn)
            else:
                try:
                    if driver.in_transaction:
                        driver.execute("ROLLBACK")
                    if conn.in_transaction():
                        conn.rollback()  # SQLAlchemy's side only: the driver's has ended
                except Exception:
                    self._drop_reader(conn)
                    raise

    def _drop_reader(self, conn: Connection) -> None:
        # A broken reader connection: the next read in this thread opens anew.
        self._reader_local.conn = None
        with self._reader_conns_lock:
            if conn in self._reader_conns:
                self._reader_conns.remove(conn)
        try:
            conn.invalidate()
        except Exception:
            pass

    def _close_readers(self) -> None:
        with self._reader_conns_lock:
            conns, self._reader_conns = self._reader_conns, []
            engine, self._reader_engine = self._reader_engine, None
        for conn in conns:
            try:
                conn.close()
            except Exception:
                log.exception("closing a reader connection failed")
        if engine is not None:
            engine.dispose()

    # --- synchronous write functions, group-committed on SQLite -------------

    async def write_batched(
        self,
        fn: Callable[[Connection], T],
        after_commit: Callable[[T], Awaitable[None]] | None = None,
        *,
        durable: bool = True,
        ready: concurrent.futures.Future[Any] | None = None,
        key: int | None = None,
        blob_keys: BlobKeys | None = None,
        settles: bool = False,
    ) -> T:
        """Runs ``fn(conn)`` in a write transaction and returns its result
        once that transaction has committed (durably, as :meth:`write`).

        ``ready``: work the written rows depend on, still running in another
        thread (the ingest path's blob write). Its writes commit only once it
        has succeeded; if it fails, the call fails with that error (TEMPORARY
        for an OSError) and commits nothing, and the rest of its batch
        commits without it. This lets the blob's fsync overlap the wait for
        the group commit, while the metadata still never points at a blob
        that is not durable.

        ``durable=False`` (flag changes, expunges, \\Recent) lets SQLite skip
        the WAL fsync of a batch made only of such calls: the commit survives
        a process crash but may roll back on power loss, as Dovecot's
        ``mail_fsync=optimized`` treats flags. Any durable call in the batch
        (a delivery) fsyncs it, and with it every earlier commit.

        ``fn`` is synchronous and must only use ``conn``. If it raises, none
        of its writes commit and the exception reaches the caller (a backend
        outage as TEMPORARY). ``after_commit(result)`` runs after the commit
        and before this returns (publish events there).

        On SQLite a call joins a group commit once its ``ready`` has ended;
        the commit is visible to readers as soon as it is written, and the
        caller is told once the WAL's fsync after it is done (a failed fsync
        refuses it as TEMPORARY). Concurrent calls share one transaction in
        the writer thread, so one call's failure undoes only its own writes
        (the batch then runs again, each call inside its own SAVEPOINT:
        ``fn`` may run more than once, its earlier writes rolled back); a
        failed BEGIN or COMMIT fails all of them (TEMPORARY).
        They are serialised with :meth:`write` by the same lock. A caller
        cancelled while its call waits in the queue drops it (nothing is
        written); once the call runs it commits, and ``after_commit`` runs,
        whether or not its caller is still there.

        On PostgreSQL the same: calls queued while a batch commits form
        the next batch, one transaction on one held connection (see
        :meth:`_flush_pg`), told after its COMMIT returned (durable with
        ``synchronous_commit`` on; a batch of only ``durable=False`` calls
        commits with it off, as on SQLite). No lock against :meth:`write`:
        row locks order them. ``fn`` runs inside ``run_sync`` and may use
        :func:`execute` (asyncpg straight) and ``conn.execute``.

        ``key`` (PostgreSQL; ignored on SQLite): the one account whose rows
        ``fn`` locks, and it writes no row another account's calls may
        write too (a delivery's blob, shared by content, has none). Up to
        :data:`PG_WRITERS` batches run at once whose keys differ; calls of
        one key run in queue order. A call without a key may lock anything:
        its batch runs alone.

        ``blob_keys()`` (called once ``ready`` has succeeded, in the
        writer): the blob keys the call's rows name, or None for "any", and
        the newest ``blob_deletions`` row the caller already answered. If
        one of them is being deleted or was lately (a newer row), the call
        fails with ``BlobsBeingDeleted`` and commits nothing: the caller
        stores its blobs again and retries (``storage/blob/deleting.py``).
        A batch transaction on PostgreSQL holding such a call holds
        :data:`PG_BLOB_LOCK` shared from its first round trip, so a marking
        either committed before that lookup or waits for this commit.

        ``settles``: ``fn`` calls :func:`settle` with an account before it
        reads or locks any of that account's rows, and reads or writes no
        other row that a statement :func:`execute_later` defers writes (rows
        of other accounts). Such calls may leave those statements to the end
        of their batch, where the batch's calls of one statement run as one
        (a round trip per batch instead of one per call, see
        :func:`execute_later`); before a call without it the deferred
        statements run.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._queue_lock:
            self._batch_queue.append(
                _Batched(fn, after_commit, future, durable, ready, key, blob_keys, settles)
            )
        self._batch_wake.set()
        if ready is not None and not ready.done():
            ready.add_done_callback(lambda _: loop.call_soon_threadsafe(self._batch_wake.set))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_batches())
        return await future

    async def _flush_pg(self) -> None:
        """PostgreSQL's group commit: up to :data:`PG_WRITERS` batches at
        once, each on a held writer connection of its own
        (:meth:`_take_pg_batch` says which calls may go now); the calls
        queued while they commit (their WAL flush) form the next ones."""
        loop = asyncio.get_running_loop()
        while self._batch_queue or self._pg_running:
            self._batch_wake.clear()
            if self._pg_running < PG_WRITERS and not self._pg_exclusive:
                with self._queue_lock:
                    batch, keys, alone = self._take_pg_batch()
                if batch:
                    self._pg_running += 1
                    self._pg_busy |= keys
                    self._pg_exclusive = alone
                    lane = loop.create_task(self._pg_lane(loop, batch, keys, alone))
                    self._pg_lanes.add(lane)
                    lane.add_done_callback(self._pg_lanes.discard)
                    continue
            # Until a call is queued, a ``ready`` ends or a batch commits.
            await self._batch_wake.wait()

    async def _end_chains(self) -> None:
        """While writer connections wait idle in a transaction that a
        COMMIT AND CHAIN began (see _transaction): those idle for
        CHAIN_IDLE_SECONDS end it (ROLLBACK), so none stays idle in a
        transaction for long (a site's ``idle_in_transaction_session_timeout``
        would cut it, and a transaction's ``now()`` would grow old)."""
        loop = asyncio.get_running_loop()
        while any(_PgTransaction.of(c).in_transaction for c in self._pg_idle):
            await asyncio.sleep(CHAIN_IDLE_SECONDS)
            now = loop.time()
            for conn in list(self._pg_idle):
                idle = now - self._pg_returned.get(id(conn), now)
                if idle < CHAIN_IDLE_SECONDS or not _PgTransaction.of(conn).in_transaction:
                    continue
                if conn not in self._pg_idle:
                    continue  # a batch took it, or it was dropped, during an earlier ROLLBACK
                self._pg_idle.remove(conn)  # no batch takes it meanwhile
                try:
                    await _PgTransaction.of(conn).raw.execute("ROLLBACK", timeout=PING_TIMEOUT)
                except Exception:
                    await self._drop_pg_writer(conn)
                else:
                    self._pg_idle.insert(0, conn)  # taken last (batches pop the end)

    def _take_pg_batch(self) -> tuple[list[_Batched], set[int], bool]:
        """The next PostgreSQL batch (its calls, their keys, and whether it
        must run alone): :meth:`_take_batch`'s calls, less those whose key
        a running batch holds (so no two batches wait for each other's row
        locks, and calls of one key commit in queue order). A call without
        a key runs in a batch alone; while others run it waits, and every
        call queued after it waits with it (so it is not starved)."""
        batch: list[_Batched] = []
        waiting: list[_Batched] = []
        keys: set[int] = set()
        alone = blocked = False
        for b in self._batch_queue:
            if b.future.done():
                continue
            if blocked or len(batch) >= MAX_GROUP_COMMIT or not b.can_run():
                waiting.append(b)
            elif b.key is None and self._pg_running:
                blocked = True
                waiting.append(b)
            elif b.key is not None and b.key in self._pg_busy:
                waiting.append(b)
            else:
                batch.append(b)
                if b.key is None:
                    alone = True
                else:
                    keys.add(b.key)
        self._batch_queue[:] = waiting
        return batch, keys, alone

    async def _pg_lane(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Batched],
        keys: set[int],
        alone: bool,
    ) -> None:
        """Runs one batch taken by :meth:`_flush_pg` and tells its callers;
        then frees its keys and wakes the dispatcher."""
        try:
            outcomes = await self._pg_batch(batch)
            if not isinstance(outcomes, BaseException):
                self._commits += 1
            self._committed(loop, batch, outcomes, self._commits)
        finally:
            self._pg_running -= 1
            self._pg_busy -= keys
            if alone:
                self._pg_exclusive = False
            self._batch_wake.set()

    async def _pg_batch(self, batch: list[_Batched]) -> list[tuple[bool, Any]] | BaseException:
        """Runs one batch (:meth:`_run_batch`) on an idle writer connection
        (a new one if none is idle): the outcomes, or the exception if
        nothing committed. A deadlock or serialization failure of the whole
        transaction runs it again."""
        items = [(b.fn, b.ready, b.blob_keys, b.settles) for b in batch]
        durable = any(b.durable for b in batch)
        attempt = 1
        may_reconnect = True
        while True:
            conn = self._pg_idle.pop() if self._pg_idle else None
            reused = conn is not None
            try:
                if conn is None:
                    fresh = await self.engine.connect()
                    # SQLAlchemy sends no BEGIN: ``_transaction`` does.
                    conn = await fresh.execution_options(isolation_level="AUTOCOMMIT")
                outcomes = await conn.run_sync(self._run_batch, items, durable)
            except BaseException as exc:
                await self._drop_pg_writer(conn)
                if isinstance(exc, _CommitInDoubt):
                    if await self._commit_landed(exc.token):
                        return exc.outcomes
                    return exc.__cause__ or exc
                if reused and may_reconnect and isinstance(exc, Exception) and lost_connection(exc):
                    # The server closed the held connection while it was idle
                    # (a restart, a failover): asyncpg sent nothing on it, so
                    # nothing of the batch committed. The other idle ones are
                    # as old; the batch runs again on a new connection.
                    may_reconnect = False
                    stale, self._pg_idle = self._pg_idle, []
                    for old in stale:
                        await self._drop_pg_writer(old)
                    continue
                if attempt < PG_BATCH_ATTEMPTS and _is_conflict(exc):
                    attempt += 1
                    continue
                return exc
            self._pg_idle.append(conn)
            loop = asyncio.get_running_loop()
            if len(self._pg_returned) > 4 * PG_WRITERS:  # forget dropped connections
                kept = self._pg_returned
                self._pg_returned = {id(c): kept.get(id(c), 0.0) for c in self._pg_idle}
            self._pg_returned[id(conn)] = loop.time()
            if self._chain_ender is None or self._chain_ender.done():
                self._chain_ender = loop.create_task(self._end_chains())
            return outcomes

    async def _commit_landed(self, token: str) -> bool:
        """After a COMMIT that failed without a verdict: whether the batch
        that wrote commit mark ``token`` committed, as durably as its COMMIT
        would have made it. Fences it first (:meth:`_fence`). False if it
        did not commit, or if no server could tell within
        COMMIT_IN_DOUBT_SECONDS (the callers then get a temporary error: a
        sender sends again, possibly a second copy, which RFC 5321 section
        6.1 prefers to a loss)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMMIT_IN_DOUBT_SECONDS
        delay = 0.1
        while True:
            try:
                landed = await self._fence(token, deadline)
            except Exception as exc:
                if loop.time() + delay > deadline:
                    log.warning("commit of batch %s in doubt, no server could tell: %r",
                                token, exc)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            log.warning("a COMMIT failed without a verdict; batch %s %s", token,
                        "had committed" if landed else "did not commit")
            return landed

    async def _fence(self, token: str, deadline: float) -> bool:
        """One try of :meth:`_commit_landed`, raising past ``deadline`` (the
        loop's clock). The token goes in on a new connection (to whichever
        server now takes writes) as a *fence* row: the insert waits while
        the batch's COMMIT is still in progress and, once in, keeps it from
        ever committing. Whose row holds the token then tells: the batch's
        (it committed) or a fence, this try's or an earlier one's whose
        reply was lost (it did not, and never will). When the batch did
        commit, a write of our own must commit too: where commits wait for
        synchronous standbys, that one returning tells that they hold the
        batch as well (its WAL comes first)."""
        async with asyncio.timeout_at(deadline):
            conn = await self.engine.connect()
            try:
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None
                # asyncpg outside a transaction: each statement commits alone.
                await raw.execute(
                    "INSERT INTO commit_marks (token, fence) VALUES ($1, true) "
                    "ON CONFLICT DO NOTHING",
                    token,
                )
                fence = await raw.fetchval(
                    "SELECT fence FROM commit_marks WHERE token = $1", token
                )
                if fence is not False:
                    return False
                await raw.execute(
                    "INSERT INTO commit_marks (token, fence) VALUES ($1, true)", uuid.uuid4().hex
                )
                return True
            except BaseException:
                with suppress(Exception):
                    await conn.invalidate()
                raise
            finally:
                with suppress(Exception):
                    await conn.close()

    @staticmethod
    async def _drop_pg_writer(conn: AsyncConnection | None) -> None:
        if conn is not None:
            with suppress(Exception):
                await conn.invalidate()
            with suppress(Exception):
                await conn.close()

    async def _flush_batches(self) -> None:
        if not self.is_sqlite:
            await self._flush_pg()
            return
        loop = asyncio.get_running_loop()
        writer = self._writer_thread()
        while self._batch_queue:
            # Only calls still waiting for their blob: wait, the lock free.
            await self._wait_for_ready()
            async with self._write_lock:
                # Two jobs in the writer thread: the one running and the next,
                # which takes its calls from the queue when it starts (those
                # queued meanwhile, if any), so the writer goes from one batch
                # to the next without waiting for this loop (_pull_and_run).
                jobs: collections.deque[asyncio.Future[Any]] = collections.deque()
                while True:
                    # A write() waiting for the lock gets it once these end.
                    if self._has_ready() and not self._write_waiters:
                        while len(jobs) < PIPELINED_BATCHES:
                            jobs.append(loop.run_in_executor(writer, self._pull_and_run))
                    if not jobs:
                        break
                    pulled = await jobs.popleft()
                    if pulled is not None:
                        self._committed(loop, *pulled)

    def _has_ready(self) -> bool:
        with self._queue_lock:
            return any(not b.future.done() and b.can_run() for b in self._batch_queue)

    def _pull_and_run(
        self,
    ) -> tuple[list[_Batched], list[tuple[bool, Any]] | BaseException, int] | None:
        """In the writer thread: takes the writers' file lock, then the calls
        that can run now from the queue, and runs them as one group commit.
        None if another job took them first; the exception instead of
        outcomes if nothing committed.

        The batch is taken only once the lock is held: calls queued while
        this process waited for another process's writer join it, instead
        of waiting behind it for the next batch (with several processes on
        one database that wait is about as long as a batch)."""
        try:
            conn = self._connect_writer()
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except BaseException as exc:
            with self._queue_lock:
                batch = self._take_batch()
            if batch:
                return batch, exc, 0
            if not isinstance(exc, Exception):
                raise
            classify(exc)  # logs an outage; the job that took the calls refuses them
            return None
        try:
            with self._queue_lock:
                batch = self._take_batch()
            if not batch:
                return None
            try:
                items = [(b.fn, b.ready, b.blob_keys, b.settles) for b in batch]
                outcomes = self._run_batch(conn, items)
            except BaseException as exc:
                return batch, exc, 0
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._commits += 1
        return batch, outcomes, self._commits

    def _committed(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Batched],
        outcomes: list[tuple[bool, Any]] | BaseException,
        commit: int,
    ) -> None:
        """A batch came back: start its WAL fsync and the telling of its
        callers (:meth:`_settle`), or refuse them all if nothing committed."""
        if isinstance(outcomes, BaseException):
            # Nothing committed: every call of the batch is refused as
            # temporary (an outage, or a bug in the batch runner).
            exc = outcomes
            if isinstance(exc, Exception):
                classify(exc)  # logs an outage
            for item in batch:
                if not item.future.done():
                    err = StorageError(ErrorKind.TEMPORARY, "storage write failed")
                    err.__cause__ = exc
                    item.future.set_exception(err)
            if not isinstance(exc, Exception):
                raise exc
            return
        synced: asyncio.Future[None] | None = None
        # PostgreSQL's COMMIT returned once durable; SQLite's WAL needs its fsync.
        if self.is_sqlite and any(b.durable for b in batch) and any(ok for ok, _ in outcomes):
            synced = loop.run_in_executor(self._syncer_thread(), self._sync_wal, commit)
        self._settling = loop.create_task(self._settle(self._settling, batch, outcomes, synced))

    def _take_batch(self) -> list[_Batched]:
        """The next group commit: queued calls whose ``ready`` has ended (so
        no commit waits for a blob still being written while later calls
        queue behind it), in queue order, up to MAX_GROUP_COMMIT. Calls
        whose callers gave up meanwhile are dropped unwritten."""
        batch: list[_Batched] = []
        waiting: list[_Batched] = []
        for b in self._batch_queue:
            if b.future.done():
                continue
            if len(batch) < MAX_GROUP_COMMIT and b.can_run():
                batch.append(b)
            else:
                waiting.append(b)
        self._batch_queue[:] = waiting
        return batch

    async def _wait_for_ready(self) -> None:
        """Returns once a queued call can run or the queue is empty: at once
        if so, else when a ``ready`` ends or a call is queued."""
        self._batch_wake.clear()
        with self._queue_lock:
            # Calls whose callers gave up are dropped unwritten here too.
            self._batch_queue[:] = [b for b in self._batch_queue if not b.future.done()]
            waiting = bool(self._batch_queue) and not any(b.can_run() for b in self._batch_queue)
        if waiting:
            await self._batch_wake.wait()

    async def _settle(
        self,
        previous: asyncio.Task[None] | None,
        batch: list[_Batched],
        outcomes: list[tuple[bool, Any]],
        synced: asyncio.Future[None] | None,
    ) -> None:
        """Tells a committed batch's callers, after the batches committed
        before it (so events go out in commit order) and, when it holds a
        durable call, once its WAL fsync is done. A failed fsync refuses
        the batch's calls as TEMPORARY: their rows are written but not
        known to be on disk, so the client must not be told they are."""
        if previous is not None:
            await asyncio.wait([previous])
        if synced is not None:
            try:
                await synced
            except Exception as exc:
                log.error("%s: fsync of the write-ahead log failed: %s", self.safe_url, exc)
                failed = StorageError(ErrorKind.TEMPORARY, "storage write not durable")
                failed.__cause__ = exc
                outcomes = [(False, failed)] * len(batch)
        for item, (ok, value) in zip(batch, outcomes, strict=True):
            if ok and item.after_commit is not None:
                try:
                    await item.after_commit(value)
                except Exception:  # committed already: never fail the write
                    log.exception("after-commit action failed")
            if item.future.done():  # the caller was cancelled
                continue
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)

    def _writer_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sqlite-writer"
            )
        return self._writer

    def _connect_writer(self) -> Connection:
        # Runs in the writer thread.
        if self._writer_conn is None:
            if self._writer_engine is None:
                url = make_url(self.url).set(drivername="sqlite+pysqlite")
                self._writer_engine = create_engine(
                    url,
                    connect_args={
                        "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                        "check_same_thread": False,  # closed from close(), after the thread
                    },
                )
                _setup_sqlite(self._writer_engine)
            conn = self._writer_engine.connect()
            # Commits write the WAL without the fsync; ``_sync_wal`` does it
            # afterwards, outside the writers' lock, before callers are told.
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute("PRAGMA synchronous=NORMAL")
            self._writer_conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            self._lock_fd = self._writers_lock(conn)
        return self._writer_conn

    def _syncer_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._syncer is None:
            self._syncer = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sqlite-wal-sync"
            )
        return self._syncer

    def _sync_wal(self, commit: int) -> None:
        """In the sync thread: makes the writer's commit number ``commit``
        (and every one before it) durable by fsyncing the WAL file (why
        that is enough: ``storage/walsync.py``). A commit that an fsync
        already covered costs none; a failed fsync raises, and the batch's
        callers are refused."""
        if commit <= self._synced:
            return
        covered = self._commits  # read before the fsync: all of these are in the file
        assert self._wal is not None  # a SQLite database always has its file
        self._wal.sync()
        self._synced = max(self._synced, covered)

    def _close_syncer(self) -> None:
        if self._wal is not None:
            self._wal.close()

    def _writers_lock(self, conn: Connection) -> int | None:
        """A file beside the database that the writer threads of every
        process using it lock around their transactions. SQLite's own lock
        makes a waiting writer poll with sleeps of up to 100 ms; a waiter on
        this lock wakes as soon as it is free (several mtad processes on one
        host). None for a database without a file."""
        if self._lock_fd is not None:
            return self._lock_fd
        path = conn.engine.url.database
        if not path or path == ":memory:":
            return None
        return os.open(f"{path}-writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _run_batch(
        self, conn: Connection, items: list[_Item], durable: bool = True
    ) -> list[tuple[bool, Any]]:
        """In the writer thread, under the writers' file lock (see
        :meth:`_writers_lock`): the batch's transaction, committed but not
        yet fsynced (:meth:`_sync_wal` does that). Every call's ``ready``
        has ended (:meth:`_take_batch` takes no other); when one failed,
        that call fails alone and the transaction (rolled back) runs again
        without it.
        Returns (True, result) or (False, exception) per call, in order;
        raises if the transaction as a whole failed (nothing committed).
        On PostgreSQL it runs inside ``run_sync`` on the writer connection
        (no file lock: row locks serialise writers); ``durable=False``: a
        batch of only such calls commits without waiting for its WAL flush."""
        outcomes: dict[int, tuple[bool, Any]] = {}
        live = list(range(len(items)))
        while live:
            try:
                done = self._run_transaction(conn, [items[i] for i in live], durable)
            except _NotReady as failed:
                index = live.pop(failed.index)
                outcomes[index] = (False, _as_storage_error(failed.error))
                continue
            except _CommitInDoubt as doubt:
                outcomes.update(zip(live, doubt.outcomes, strict=True))
                doubt.outcomes = [outcomes[i] for i in range(len(items))]
                raise
            outcomes.update(zip(live, done, strict=True))
            break
        return [outcomes[i] for i in range(len(items))]

    @staticmethod
    def _await_ready(
        conn: Connection, items: list[_Item], outcomes: list[tuple[bool, Any]]
    ) -> None:
        """Before the commit: every call that wrote waits for its ``ready``;
        a failure raises :class:`_NotReady` (rolling the transaction back).
        Then the blobs the calls name are looked up in ``blob_deletions``
        (one statement for the batch): a call naming one being deleted, or
        deleted lately, fails with :class:`deleting.BlobsBeingDeleted` the
        same way (``storage/blob/deleting.py``)."""
        from storage.blob import deleting  # it imports the schema, which imports this

        named: list[tuple[int, Collection[str] | None, int]] = []
        for index, ((_, ready, blob_keys, _), (ok, _)) in enumerate(
            zip(items, outcomes, strict=True)
        ):
            if not ok:
                continue
            if ready is not None:
                try:
                    ready.result()
                except BaseException as exc:
                    raise _NotReady(index, exc) from exc
            if blob_keys is not None:
                named.append((index, *blob_keys()))
        if not named:
            return
        wanted: set[str] | None = set()
        for _, keys, _ in named:
            if keys is None or wanted is None:
                wanted = None
            else:
                wanted |= set(keys)
        rows = deleting.found_sync(conn, wanted, min(after for _, _, after in named))
        for index, keys, after in named:
            mine = [(i, k) for i, k in rows if i > after and (keys is None or k in keys)]
            if mine:
                try:
                    deleting.raise_if_found(mine)
                except deleting.BlobsBeingDeleted as exc:
                    raise _NotReady(index, exc) from exc

    def _run_transaction(
        self, conn: Connection, items: list[_Item], durable: bool = True
    ) -> list[tuple[bool, Any]]:
        """One transaction, a SAVEPOINT per function when there are several."""
        fns = [fn for fn, _, _, _ in items]
        outcomes: list[tuple[bool, Any]] = []
        # PostgreSQL: the blob lock only where a call's blobs are looked up
        # (_await_ready), and the next batch begun by this one's COMMIT
        # (see _transaction).
        opts = {
            "blob_lock": any(keys is not None for _, _, keys, _ in items),
            "chain": not self.is_sqlite,
        }
        try:
            if len(fns) == 1:
                try:
                    with _transaction(conn, durable, **opts):
                        outcomes.append((True, fns[0](conn)))
                        self._await_ready(conn, items, outcomes)
                except _NotReady:
                    raise
                except Exception as exc:  # rolled back: only this call's writes
                    if _fails_batch(exc):
                        raise
                    outcomes.append((False, classify(exc)))
                return outcomes
            # First without savepoints: calls rarely fail, and every statement
            # costs the writer a wait for the GIL while the loop is busy. If
            # one fails, all roll back and run again, each in a SAVEPOINT.
            # Here only, the calls' deferrable statements run once at the end
            # (execute_later): a failure among them cannot be told apart, so
            # it fails them all the same way (each then runs its own).
            try:
                with _transaction(conn, durable, **opts):
                    deferred = conn.info[_DEFERRED] = _Deferred()
                    try:
                        for fn, _, _, settles in items:
                            if not settles:
                                deferred.run(conn)
                            outcomes.append((True, fn(conn)))
                        deferred.run(conn)
                    except Exception as exc:
                        if _fails_batch(exc):
                            raise
                        raise _CallFailed from exc
                    finally:
                        del conn.info[_DEFERRED]
                    self._await_ready(conn, items, outcomes)
                return outcomes
            except _CallFailed:
                outcomes = []
            # Plain SAVEPOINT statements on the driver connection: SQLAlchemy's
            # begin_nested() costs several times more, once per delivery.
            with _transaction(conn, durable, **opts) as driver:
                for fn in fns:
                    driver.execute("SAVEPOINT batched")
                    try:
                        result = fn(conn)
                    except Exception as exc:
                        if _fails_batch(exc):
                            raise  # the database itself is in trouble: fail them all
                        driver.execute("ROLLBACK TO batched")
                        driver.execute("RELEASE batched")
                        outcomes.append((False, classify(exc)))
                    else:
                        driver.execute("RELEASE batched")
                        outcomes.append((True, result))
                self._await_ready(conn, items, outcomes)
        except _NotReady:
            raise  # rolled back cleanly by ``_transaction``: the connection is fine
        except BaseException as exc:
            if isinstance(exc, _CommitInDoubt):
                exc.outcomes = list(outcomes)  # the results, if it did commit
            # Start afresh next time: the connection may be half-broken.
            self._writer_conn = None
            try:
                conn.invalidate()
            except Exception:
                pass
            raise
        return outcomes

    def _close_writer(self) -> None:
        if self._writer_conn is not None:
            self._writer_conn.close()
            self._writer_conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._writer_engine is not None:
            self._writer_engine.dispose()
            self._writer_engine = None

    async def migrate(self) -> int:
        """Applies pending migrations in order; returns the schema version."""
        for version in range(1, schema.SCHEMA_VERSION + 1):
            async with self.write(foreign_keys=False) as conn:
                await schema.lock_for_migration(conn)
                if await schema.apply_step(conn, version):
                    log.info("%s: migrated schema to version %d", self.safe_url, version)
        if self.file is not None and await asyncio.to_thread(fts.create_index, self.file):
            # A new (or lost) index file: everything stored is queued for it,
            # and deletions queued for the old one are dropped (asking a
            # contentless FTS5 table to delete a row it lacks corrupts it).
            async with self.write() as conn:
                await conn.exec_driver_sql(
                    "INSERT INTO fts_pending (message_id) SELECT id FROM messages "
                    "WHERE id NOT IN (SELECT message_id FROM fts_pending)"
                )
                await conn.exec_driver_sql("DELETE FROM fts_deleted")
        async with self.read() as conn:
            return await schema.current_version(conn)

    def start_indexer(self) -> fts.FtsIndexer | fts.PendingListMerger | None:
        """Start the search index's background work (the daemons call this
        once storage is open): SQLite fills its full-text index (until then
        queued messages are still found by search, only more slowly),
        PostgreSQL merges its trigram index's pending list. Returns the
        indexer, or None where there is none to run."""
        indexer = self.indexer()
        if indexer is not None:
            indexer.start()
        return indexer

    def indexer(self) -> fts.FtsIndexer | fts.PendingListMerger | None:
        """The search index's background worker, made if needed but not
        started (``run_once`` runs one batch or merge): SQLite's
        :class:`fts.FtsIndexer`, PostgreSQL's :class:`fts.PendingListMerger`.
        None for a SQLite database without a file."""
        if self._indexer is None and not self.is_sqlite:
            self._indexer = fts.PendingListMerger(self.merge_search_index)
        if self._indexer is None and self.file is not None:
            self._indexer = fts.FtsIndexer(self.file, self._clear_fts_queue)
        return self._indexer

    async def merge_search_index(self) -> int:
        """PostgreSQL: fills the word hashes of rows written without them
        (``fts.index_unindexed``: an account move's copies), then merges the
        word index's pending list into the index (schema steps 17 and 20);
        returns how many pending pages that merged; 0 with nothing
        pending, and on SQLite. Benchmarks call it to count the deferred
        work. It also deletes the commit marks older than
        COMMIT_MARK_KEEP_SECONDS."""
        if self.is_sqlite:
            return 0
        # gin_clean_pending_list waits for any merge in progress, so with
        # every instance merging each second the calls piled up behind one
        # another and held connections for minutes. One merge per database
        # at a time, site-wide: whoever holds the advisory lock merges, the
        # others return 0 at once. A merge is cut off after
        # MERGE_TIMEOUT_SECONDS (what it merged so far stays merged).
        async with self._translate(), self.engine.begin() as conn:
            await conn.exec_driver_sql(
                f"SET LOCAL statement_timeout = {int(MERGE_TIMEOUT_SECONDS * 1000)}"
            )
            locked = await conn.exec_driver_sql(
                f"SELECT pg_try_advisory_xact_lock({MERGE_LOCK_KEY})"
            )
            if not locked.scalar():
                return 0
            await conn.exec_driver_sql(
                "DELETE FROM commit_marks WHERE at < now() - "
                f"interval '{COMMIT_MARK_KEEP_SECONDS} seconds'"
            )
            await fts.index_unindexed(conn)  # one batch a merge
            merged = await conn.exec_driver_sql(
                "SELECT gin_clean_pending_list(to_regclass('messages_search_words'))"
            )
            return int(merged.scalar() or 0)

    async def _clear_fts_queue(self, pending_seq: int | None, deleted_rowid: int | None) -> None:
        def clear(conn: Connection) -> None:
            driver = conn.connection.driver_connection
            assert driver is not None
            if pending_seq is not None:
                driver.execute("DELETE FROM fts_pending WHERE seq <= ?", (pending_seq,))
            if deleted_rowid is not None:
                driver.execute("DELETE FROM fts_deleted WHERE rowid <= ?", (deleted_rowid,))

        # Not durable: after a power cut the queue may name messages the
        # index holds already, and they are indexed again (harmless).
        await self.write_batched(clear, durable=False)

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return self.engine.url.render_as_string(hide_password=True)

    async def close(self) -> None:
        """Stops the full-text indexer, finishes queued batched writes, then
        closes every connection."""
        if self._indexer is not None:
            indexer, self._indexer = self._indexer, None
            await indexer.close()
        if self._flusher is not None and not self._flusher.done():
            try:
                await asyncio.shield(self._flusher)
            except Exception:
                log.exception("pending writes failed at close")
        if self._settling is not None:
            await asyncio.wait([self._settling])
        if self._chain_ender is not None:
            await stop_task(self._chain_ender)
        while self._pg_idle:
            conn = self._pg_idle.pop()
            try:
                # Bounded: the pool's reset on return is a round trip that a
                # hung server never answers; then the connection is dropped.
                async with asyncio.timeout(PING_TIMEOUT):
                    if _PgTransaction.of(conn).in_transaction:  # chained
                        await _PgTransaction.of(conn).raw.execute("ROLLBACK")
                    await conn.close()
            except Exception:
                with suppress(Exception):
                    await conn.invalidate()
        if self._pg_readers is not None:
            await self._pg_readers.close()
        if self._syncer is not None:
            syncer, self._syncer = self._syncer, None
            await asyncio.get_running_loop().run_in_executor(syncer, self._close_syncer)
            syncer.shutdown(wait=False)
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.get_running_loop().run_in_executor(writer, self._close_writer)
            writer.shutdown(wait=False)
        if self._readers is not None:
            readers, self._readers = self._readers, None
            loop = asyncio.get_running_loop()
            # Reads still running finish first; then their connections close.
            await loop.run_in_executor(None, readers.shutdown, True)
            self._close_readers()
        await self.engine.dispose()


@contextmanager
def _transaction(
    conn: Connection,
    durable: bool = True,
    *,
    blob_lock: bool = True,
    chain: bool = False,
) -> Iterator[Any]:
    """``BEGIN IMMEDIATE`` .. ``COMMIT`` (``ROLLBACK`` on an exception) on
    the writer's driver connection, which it yields (on PostgreSQL
    ``BEGIN``, through :class:`_PgTransaction`).

    SQLAlchemy's ``begin()`` and its commit cost a quarter of the writer
    thread's GIL time in the STORE bench. A write function may still run
    statements through SQLAlchemy: its autobegin finds the driver already
    in a transaction and adds no BEGIN (see ``_setup_sqlite``), and its
    bookkeeping is reset here once the driver's transaction has ended.

    PostgreSQL only: ``blob_lock``, the batch looks up blobs being deleted
    and holds :data:`PG_BLOB_LOCK` shared from its first round trip;
    ``chain``, the COMMIT begins the connection's next transaction
    (``COMMIT AND CHAIN``, PostgreSQL manual, COMMIT), so that the next
    batch on it sends no BEGIN of its own: one round trip of the four of a
    STORE batch (a connection left idle in it is rolled back within
    seconds, ``Database._end_chains``). The commit mark (durable) or
    ``synchronous_commit`` off (not) goes in the COMMIT's round trip: both
    act at the commit."""
    driver: Any
    token: str | None = None
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute("BEGIN IMMEDIATE")
    else:
        # The batch writer's connection is in autocommit mode for
        # SQLAlchemy (no BEGIN of its own): this BEGIN, or the last
        # batch's COMMIT AND CHAIN, is the transaction.
        driver = _PgTransaction(conn)
        begin = [] if driver.in_transaction else ["BEGIN"]
        if blob_lock:
            begin.append(_BLOB_LOCK)
        if begin:
            driver.execute("; ".join(begin))
    try:
        yield driver
        if conn.dialect.name == "sqlite":
            driver.execute("COMMIT")
        else:
            commit = "COMMIT AND CHAIN" if chain else "COMMIT"
            if not durable:
                # COMMIT returns before the WAL flush (a crash of the server
                # may lose the commit, never corrupt it).
                driver.execute(f"SET LOCAL synchronous_commit TO OFF; {commit}")
            else:
                # The batch's commit mark (see COMMIT_IN_DOUBT_SECONDS), its
                # time this statement's (a chained transaction began earlier).
                token = uuid.uuid4().hex
                try:
                    driver.execute(
                        "INSERT INTO commit_marks (token, at) VALUES "
                        f"('{token}', statement_timestamp()); {commit}",
                        timeout=COMMIT_WAIT_SECONDS,
                    )
                except Exception as exc:
                    # Even an error reply may come after the local commit (a cancelled
                    # wait for a synchronous replica): only the mark can tell.
                    raise _CommitInDoubt(token) from exc
    except _CommitInDoubt:
        # No ROLLBACK: the connection may not answer (it is dropped), and
        # the outcome is for the mark to tell (Database._commit_landed).
        raise
    except BaseException:
        if driver.in_transaction:
            with suppress(Exception):
                driver.execute("ROLLBACK")
        raise
    finally:
        if conn.in_transaction():
            conn.rollback()  # SQLAlchemy's side only: the driver's has ended


# pg_advisory_xact_lock key: held shared by every batch transaction (in
# its BEGIN's round trip), exclusive while garbage collection marks the
# blobs it is about to delete (``Database.write_batched``'s ``blob_keys``,
# ``storage/blob/deleting.py``).
PG_BLOB_LOCK = 0x73686D_626C6F62  # "shm" "blob"
_BLOB_LOCK = f"SELECT pg_advisory_xact_lock_shared({PG_BLOB_LOCK})"


def _attach_fts(engine: Engine, file: str) -> None:
    """Reader connections see the full-text index as schema ``fts``."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        fts.attach(dbapi_conn, file)


def _setup_postgresql(engine: Engine) -> None:
    """After a failover, every pooled connection to the old primary is
    dropped at the first sign of it, so the next ones find the new primary
    (the URL lists every host with ``target_session_attrs=read-write``).

    A primary fenced read-only, or a standby that a connection reached,
    still answers the pool's ping, yet refuses every write with SQLSTATE
    25006 (read_only_sql_transaction, PostgreSQL manual appendix A): the
    error is treated as a disconnect, which invalidates the connection and
    the pool's older ones. The caller still gets TEMPORARY (``classify``)."""

    @event.listens_for(engine, "handle_error")
    def on_error(context: Any) -> None:
        if _sqlstate(context.original_exception) == READ_ONLY_TRANSACTION:
            context.is_disconnect = True

    # Before each use a pooled connection must answer a ping within
    # PING_TIMEOUT, else the pool drops it and connects anew (up to three
    # times, SQLAlchemy's "pessimistic disconnect handling").
    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        try:
            await_only(asyncio.wait_for(dbapi_conn.driver_connection.fetchval(";"), PING_TIMEOUT))
        except Exception as exc:
            raise DisconnectionError(f"no answer to the ping: {exc!r}") from exc


def _setup_sqlite(engine: Engine) -> None:
    """WAL, durable commits, a busy timeout, and our own BEGIN statements
    (the pysqlite default of implicit transactions breaks BEGIN IMMEDIATE)."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that returned survives power loss ("no mail is lost").
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Any) -> None:
        if getattr(conn.connection.driver_connection, "in_transaction", False):
            return  # begun on the driver by the batch writer (``_transaction``)
        options = conn.get_execution_options()
        if options.get("sqlite_foreign_keys") is False:
            # A no-op once the transaction has begun, hence here.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql(f"BEGIN {options.get('sqlite_begin', 'DEFERRED')}")

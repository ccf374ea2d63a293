"""One SQL database (a shard) behind SQLAlchemy 2 async Core.

The same code path serves SQLite (aiosqlite) and PostgreSQL (asyncpg); this
module hides the few places they differ: connection setup, how a write
transaction is serialised, and how backend failures are classified.

Hot writes (message delivery) can also be written as one synchronous
function over a SQLAlchemy ``Connection`` and handed to
:meth:`Database.write_batched`. On SQLite such functions run in one writer
thread, several per transaction (group commit), which spares a thread hop
per statement and an fsync per delivery; on PostgreSQL each runs in its own
transaction through ``AsyncConnection.run_sync``. Hot reads likewise go to
:meth:`Database.read_sync`: on SQLite the whole function runs in one of a
few reader threads with their own connections (WAL readers never block the
writer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
import threading
from collections import namedtuple
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from storage.errors import ErrorKind, StorageError
from storage.sql import fts, schema

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Most write functions one SQLite group commit runs: bounds the latency a
# delivery waits behind others and the work one failed COMMIT undoes.
MAX_GROUP_COMMIT = 128
# Reader threads of :meth:`Database.read_sync` on SQLite, one connection each.
# WAL readers never wait for the writer; the GIL makes more of them pointless.
SQLITE_READERS = 3

T = TypeVar("T")


def classify(exc: Exception) -> Exception:
    """The error a caller should see for a backend failure: outages and
    lock timeouts are retryable (TEMPORARY, caused by ``exc``); anything
    else (an integrity error a store did not expect) is a bug and is
    returned as it is."""
    if isinstance(exc, OperationalError):
        log.warning("database unavailable: %s", exc)
        err = StorageError(ErrorKind.TEMPORARY, "storage temporarily unavailable")
    elif isinstance(exc, DBAPIError) and exc.connection_invalidated:
        err = StorageError(ErrorKind.TEMPORARY, "storage connection lost")
    elif isinstance(exc, (OSError, ConnectionError)):
        err = StorageError(ErrorKind.TEMPORARY, "storage temporarily unavailable")
    else:
        return exc
    err.__cause__ = exc
    return err


class _CallFailed(Exception):
    """A batched call raised: its transaction rolls back and the batch runs
    again with a savepoint per call."""


class _Batched:
    """One queued :meth:`Database.write_batched` call."""

    __slots__ = ("after_commit", "durable", "fn", "future", "ready")

    def __init__(
        self,
        fn: Callable[[Connection], Any],
        after_commit: Callable[[Any], Awaitable[None]] | None,
        future: asyncio.Future[Any],
        durable: bool,
        ready: concurrent.futures.Future[Any] | None,
    ) -> None:
        self.fn = fn
        self.after_commit = after_commit
        self.future = future
        self.durable = durable
        self.ready = ready


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


class _NotReady(Exception):
    """A batched call's ``ready`` failed: its transaction must not commit."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index)
        self.index = index
        self.error = error


# (fn, ready) of one call in a batch.
_Item = tuple[Callable[[Connection], Any], "concurrent.futures.Future[Any] | None"]


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


_prepared: dict[tuple[int, tuple[str, ...]], _Prepared] = {}


def execute(conn: Connection, stmt: Any, params: Any = None) -> Any:
    """``conn.execute(stmt, params)`` for the hot write functions.

    On SQLite's writer connection (pysqlite) the statement is compiled once
    and run straight on the driver connection, skipping SQLAlchemy's
    per-execution work (several times the cost of the statement itself);
    elsewhere it is ``conn.execute``. Only
    for module-level constant statements (cached by identity) whose
    parameters and columns need no type conversion (numbers, strings,
    None). ``params``: a dict, or a list of dicts for executemany. The
    result offers ``first()``, ``one()``, ``scalar()``, ``all()`` and
    ``inserted_primary_key``; rows are named tuples.
    """
    if conn.dialect.driver != "pysqlite":
        return conn.execute(stmt, params)
    many = isinstance(params, list)
    first = (params[0] if params else {}) if many else (params or {})
    keys = tuple(first)
    prepared = _prepared.get((id(stmt), keys))
    if prepared is None or prepared.stmt is not stmt:
        compiled = stmt.compile(dialect=conn.dialect, column_keys=list(keys))
        prepared = _Prepared(stmt, compiled.string, compiled.positiontup or ())
        _prepared[(id(stmt), keys)] = prepared
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
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 20
            kwargs["pool_pre_ping"] = True
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self._write_lock = asyncio.Lock()
        # SQLite group commit: the queue, the task draining it, the writer
        # thread and its connection (opened in that thread on first use).
        self._batch_queue: list[_Batched] = []
        self._flusher: asyncio.Task[None] | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer_engine: Engine | None = None
        self._writer_conn: Connection | None = None
        self._writer_durable = True  # the writer connection's synchronous mode is FULL
        self._lock_fd: int | None = None
        # SQLite synchronous reads: a few threads, each with its own connection.
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_engine: Engine | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[Connection] = []
        self._reader_conns_lock = threading.Lock()
        # SQLite's full-text index file and its indexer (``storage/sql/fts.py``).
        self.file: str | None = None
        self._indexer: fts.FtsIndexer | None = None
        if self.is_sqlite:
            _setup_sqlite(self.engine.sync_engine)
            path = make_url(url).database
            if path and path != ":memory:":
                self.file = os.path.abspath(path)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A read-write transaction; commit on normal exit."""
        if self.is_sqlite:
            async with self._write_lock:
                async with self._translate(), self.engine.connect() as conn:
                    conn = await conn.execution_options(sqlite_begin="IMMEDIATE")
                    async with conn.begin():
                        yield conn
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
        except (DBAPIError, OSError, ConnectionError) as exc:
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
        PostgreSQL it runs through ``AsyncConnection.run_sync`` inside
        :meth:`read`. Backend outages raise TEMPORARY.
        """
        if not self.is_sqlite:
            async with self.read() as conn:
                return await conn.run_sync(fn)
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
        tx = conn.begin()
        try:
            return fn(conn)
        finally:
            try:
                tx.rollback()  # a no-op when the connection was invalidated
            except Exception:
                self._drop_reader(conn)
                raise
            if conn.invalidated:
                self._drop_reader(conn)

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
    ) -> T:
        """Runs ``fn(conn)`` in a write transaction and returns its result
        once that transaction has committed (durably, as :meth:`write`).

        ``ready``: work the written rows depend on, still running in another
        thread (the ingest path's blob write). ``fn`` may run before it ends,
        but its writes commit only once it has succeeded; if it fails, the
        call fails with that error (TEMPORARY for an OSError) and commits
        nothing, and the rest of its batch commits without it. This lets
        the blob's fsync overlap the wait for the group commit, while the
        metadata still never points at a blob that is not durable.

        ``durable=False`` (flag changes, expunges, \\Recent) lets SQLite skip
        the WAL fsync of a batch made only of such calls: the commit survives
        a process crash but may roll back on power loss, as Dovecot's
        ``mail_fsync=optimized`` treats flags. Any durable call in the batch
        (a delivery) fsyncs it, and with it every earlier commit.

        ``fn`` is synchronous and must only use ``conn``. If it raises, none
        of its writes commit and the exception reaches the caller (a backend
        outage as TEMPORARY). ``after_commit(result)`` runs after the commit
        and before this returns (publish events there).

        On SQLite concurrent calls share one transaction in the writer thread,
        so one call's failure undoes only its own writes (the batch then runs
        again, each call inside its own SAVEPOINT: ``fn`` may run more than
        once, its earlier writes rolled back); a failed BEGIN or COMMIT fails
        all of them (TEMPORARY).
        They are serialised with :meth:`write` by the same lock. A caller
        cancelled while its call waits in the queue drops it (nothing is
        written); once the call runs it commits, and ``after_commit`` runs,
        whether or not its caller is still there.
        """
        if not self.is_sqlite:
            if ready is not None:
                try:
                    await asyncio.wrap_future(ready)
                except Exception as exc:
                    raise _as_storage_error(exc) from exc
            async with self.write() as conn:
                result = await conn.run_sync(fn)
            if after_commit is not None:
                await after_commit(result)
            return result
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._batch_queue.append(_Batched(fn, after_commit, future, durable, ready))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_batches())
        return await future

    async def _flush_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while self._batch_queue:
            async with self._write_lock:
                # Whatever queued while the lock was busy joins this commit;
                # calls whose callers gave up meanwhile are dropped unwritten.
                batch = [b for b in self._batch_queue[:MAX_GROUP_COMMIT] if not b.future.done()]
                del self._batch_queue[:MAX_GROUP_COMMIT]
                if not batch:
                    continue
                try:
                    outcomes = await loop.run_in_executor(
                        self._writer_thread(),
                        self._run_batch,
                        [(b.fn, b.ready) for b in batch],
                        any(b.durable for b in batch),
                    )
                except BaseException as exc:
                    # Nothing committed: every call of the batch is refused
                    # as temporary (an outage, or a bug in the batch runner).
                    if isinstance(exc, Exception):
                        classify(exc)  # logs an outage
                    for item in batch:
                        if not item.future.done():
                            err = StorageError(ErrorKind.TEMPORARY, "storage write failed")
                            err.__cause__ = exc
                            item.future.set_exception(err)
                    if not isinstance(exc, Exception):
                        raise
                    continue
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
            self._writer_conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            self._writer_durable = True  # a new connection starts with synchronous=FULL
            self._lock_fd = self._writers_lock(conn)
        return self._writer_conn

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

    def _run_batch(self, items: list[_Item], durable: bool = True) -> list[tuple[bool, Any]]:
        """In the writer thread, under the writers' file lock (see
        :meth:`_writers_lock`)."""
        conn = self._connect_writer()
        if durable != self._writer_durable:
            # Between transactions: WAL + NORMAL commits without the fsync.
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._writer_durable = durable
        if self._lock_fd is None:
            return self._run_batch_locked(conn, items)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            return self._run_batch_locked(conn, items)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _run_batch_locked(self, conn: Connection, items: list[_Item]) -> list[tuple[bool, Any]]:
        """The batch's transaction; when a call's ``ready`` fails, that call
        fails alone and the transaction (rolled back) runs again without it.
        Returns (True, result) or (False, exception) per call, in order;
        raises if the transaction as a whole failed (nothing committed)."""
        outcomes: dict[int, tuple[bool, Any]] = {}
        live = list(range(len(items)))
        while live:
            try:
                done = self._run_transaction(conn, [items[i] for i in live])
            except _NotReady as failed:
                index = live.pop(failed.index)
                outcomes[index] = (False, _as_storage_error(failed.error))
                continue
            outcomes.update(zip(live, done, strict=True))
            break
        return [outcomes[i] for i in range(len(items))]

    @staticmethod
    def _await_ready(items: list[_Item], outcomes: list[tuple[bool, Any]]) -> None:
        """Before the commit: every call that wrote waits for its ``ready``;
        a failure raises :class:`_NotReady` (rolling the transaction back)."""
        for index, ((_, ready), (ok, _)) in enumerate(zip(items, outcomes, strict=True)):
            if ready is None or not ok:
                continue
            try:
                ready.result()
            except BaseException as exc:
                raise _NotReady(index, exc) from exc

    def _run_transaction(self, conn: Connection, items: list[_Item]) -> list[tuple[bool, Any]]:
        """One transaction, a SAVEPOINT per function when there are several."""
        fns = [fn for fn, _ in items]
        outcomes: list[tuple[bool, Any]] = []
        try:
            if len(fns) == 1:
                try:
                    with conn.begin():
                        outcomes.append((True, fns[0](conn)))
                        self._await_ready(items, outcomes)
                except (OperationalError, _NotReady):
                    raise
                except Exception as exc:  # rolled back: only this call's writes
                    outcomes.append((False, classify(exc)))
                return outcomes
            # First without savepoints: calls rarely fail, and every statement
            # costs the writer a wait for the GIL while the loop is busy. If
            # one fails, all roll back and run again, each in a SAVEPOINT.
            try:
                with conn.begin():
                    for fn in fns:
                        try:
                            outcomes.append((True, fn(conn)))
                        except OperationalError:
                            raise
                        except Exception as exc:
                            raise _CallFailed from exc
                    self._await_ready(items, outcomes)
                return outcomes
            except _CallFailed:
                outcomes = []
            # Plain SAVEPOINT statements on the driver connection: SQLAlchemy's
            # begin_nested() costs several times more, once per delivery.
            driver = conn.connection.driver_connection
            assert driver is not None
            with conn.begin():
                for fn in fns:
                    driver.execute("SAVEPOINT batched")
                    try:
                        result = fn(conn)
                    except OperationalError:
                        raise  # the database itself is in trouble: fail them all
                    except Exception as exc:
                        driver.execute("ROLLBACK TO batched")
                        driver.execute("RELEASE batched")
                        outcomes.append((False, classify(exc)))
                    else:
                        driver.execute("RELEASE batched")
                        outcomes.append((True, result))
                self._await_ready(items, outcomes)
        except _NotReady:
            raise  # rolled back cleanly by ``conn.begin()``: the connection is fine
        except BaseException:
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
            async with self.write() as conn:
                await schema.lock_for_migration(conn)
                if await schema.apply_step(conn, version):
                    log.info("%s: migrated schema to version %d", self.safe_url, version)
        if self.file is not None and await asyncio.to_thread(fts.create_index, self.file):
            # A new (or lost) index file: everything stored is queued for it.
            async with self.write() as conn:
                await conn.exec_driver_sql(
                    "INSERT INTO fts_pending (message_id) SELECT id FROM messages "
                    "WHERE id NOT IN (SELECT message_id FROM fts_pending)"
                )
        async with self.read() as conn:
            return await schema.current_version(conn)

    def start_indexer(self) -> fts.FtsIndexer | None:
        """SQLite: start filling the full-text index in the background (the
        daemons call this once storage is open; until then queued messages
        are still found by search, only more slowly). Returns the indexer,
        or None where there is none to run (PostgreSQL)."""
        indexer = self.indexer()
        if indexer is not None:
            indexer.start()
        return indexer

    def indexer(self) -> fts.FtsIndexer | None:
        """The SQLite full-text indexer, made if needed but not started
        (:meth:`FtsIndexer.run_once` runs a batch). None on PostgreSQL."""
        if self.file is None:
            return None
        if self._indexer is None:
            self._indexer = fts.FtsIndexer(self.file, self._clear_fts_queue)
        return self._indexer

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


def _attach_fts(engine: Engine, file: str) -> None:
    """Reader connections see the full-text index as schema ``fts``."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        fts.attach(dbapi_conn, file)


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
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

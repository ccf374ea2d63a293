"""PostgreSQL's hot reads (``Database.read_sync``) on held connections.

A read through the engine's pool pays a checkout and its ping (a statement
with a time limit, so a hung or failed-over primary is found before use):
about as much as the read itself. Here, as the batch writer does, reads run
on connections this process keeps (up to :data:`PG_READERS` idle ones)
without a ping. What the ping was for is kept by a watchdog of each read
instead: a read still unanswered after :data:`READ_CHECK_AFTER` seconds
makes the server prove it is alive (one probe at a time, shared by every
read waiting: a ping within :data:`PING_TIMEOUT`, on an idle connection of
the same servers, else on a new one). If it does not, every read waiting
ends at once with a TEMPORARY error (HTTP 503, IMAP NO [UNAVAILABLE]) and
its connection is cut; a slow read on a live server just goes on waiting.

A connection that failed in a way a retry can cure (reset, failover,
timeout: ``is_transient``), and every idle one made before that failure
(the same server, likely gone too), is dropped: the next read connects
anew, through the pool (with its ping and the per-host connect limits), to
whichever listed host takes the session now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.errors import ErrorKind, StorageError
from storage.tasks import stop_task

log = logging.getLogger(__name__)

T = TypeVar("T")

# Idle reader connections kept; more reads at once borrow from the pool and
# give the connection back after (the pool holds 20, at most 30: see
# ``Database``; the batch writer holds up to PG_WRITERS of them).
PG_READERS = 16
# How long a read may wait for its answer before the server must prove it
# is alive (a probe). Short: the probe costs one round trip, and only reads
# this slow pay it.
READ_CHECK_AFTER = 2.0


class _Reader:
    """One held connection: SQLAlchemy's, asyncpg's under it, and the
    generation it was made in (see :attr:`PgReaders.generation`)."""

    __slots__ = ("conn", "generation", "raw")

    def __init__(self, conn: AsyncConnection, raw: Any, generation: int) -> None:
        self.conn = conn
        self.raw = raw
        self.generation = generation


class _Watch:
    """The watchdog of one read: its time limit (ended at once when a
    probe fails) and the timer of its next check."""

    __slots__ = ("active", "handle", "limit")

    def __init__(self, limit: asyncio.Timeout) -> None:
        self.limit = limit
        self.active = True
        self.handle: asyncio.TimerHandle | None = None


def _read_on(fn: Callable[[Connection], T]) -> Callable[[Connection], T]:
    """``fn`` run by ``run_sync``, leaving SQLAlchemy's side of the
    connection outside any transaction (the connection is in autocommit
    mode: there is nothing to roll back on the server)."""

    def run(conn: Connection) -> T:
        try:
            return fn(conn)
        finally:
            if conn.in_transaction():
                conn.rollback()

    return run


class PgReaders:
    """The held reader connections of one PostgreSQL engine.

    :meth:`run` is ``Database.read_sync`` on PostgreSQL: ``fn(conn)`` on a
    held connection in autocommit mode (each statement sees what was
    committed when it started, as READ COMMITTED would), its result or its
    error. A server that stops answering gives a TEMPORARY error within
    READ_CHECK_AFTER + PING_TIMEOUT seconds, never a hang."""

    def __init__(
        self,
        engine: AsyncEngine,
        ping_timeout: float,
        is_transient: Callable[[BaseException], bool],
        connect: Callable[[], Coroutine[Any, Any, Any]],
    ) -> None:
        self._engine = engine
        self._ping_timeout = ping_timeout
        self._is_transient = is_transient
        self._connect = connect  # a raw asyncpg connection outside the pool (the probe's)
        self._idle: list[_Reader] = []
        # Raised whenever a connection is found dead or hung: the idle ones
        # made before are not used again (they reach the same server).
        self.generation = 0
        self._probe: asyncio.Task[bool] | None = None
        self._closed = False
        # Connections being given back in the background (a reference keeps
        # each task alive until it ends).
        self._releasing: set[asyncio.Task[None]] = set()

    async def run(self, fn: Callable[[Connection], T]) -> T:
        reader = self._take()
        if reader is not None:
            try:
                return await self._run_on(reader, fn, reused=True)
            except _DroppedWhileIdle:
                # The server closed this connection while it sat idle (a
                # restart, a failover, an idle timeout), perhaps before
                # asyncpg saw it go: ``fn`` only reads, so it is read again
                # on a new connection, as a pool's checkout ping would have
                # found before use.
                pass
        return await self._run_on(None, fn, reused=False)

    async def _run_on(
        self, reader: _Reader | None, fn: Callable[[Connection], T], reused: bool
    ) -> T:
        """``fn`` on ``reader`` (None: a new connection) under the watchdog.
        Raises :class:`_DroppedWhileIdle` when a ``reused`` connection
        failed as a connection (not the statement, not a hang)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as limit:
            watch = _Watch(limit)
            watch.handle = loop.call_later(READ_CHECK_AFTER, self._check, watch)
            try:
                if reader is None:
                    reader = await self._open_retrying()
                result = await reader.conn.run_sync(_read_on(fn))
            except BaseException as exc:
                watch.active = False
                watch.handle.cancel()
                if reader is not None:
                    self._after_failure(reader, exc, limit.expired())
                if limit.expired():
                    raise _unanswered() from exc
                if reused and isinstance(exc, Exception) and _dropped(exc):
                    raise _DroppedWhileIdle from exc
                if _client_state_error(exc):
                    # The driver's own state, not the read's: a 503, not a 500.
                    # Its text (with the statement) goes to the log only.
                    log.warning("a read lost its database connection: %r", exc)
                    raise StorageError(ErrorKind.TEMPORARY, "database connection lost") from exc
                raise
            watch.active = False
            watch.handle.cancel()
        self._give_back(reader)
        return result

    def _take(self) -> _Reader | None:
        while self._idle:
            reader = self._idle.pop()
            if reader.generation == self.generation:
                return reader
            self._cut(reader)
        return None

    async def _open_retrying(self) -> _Reader:
        """:meth:`_open`, once more if the first checkout failed on a broken
        pooled connection (the pool drops it): no statement of the read has
        run yet, so trying again is safe; a second failure is the read's."""
        try:
            return await self._open()
        except Exception as exc:
            if not (_client_state_error(exc) or self._is_transient(exc)):
                raise
            self.generation += 1
            return await self._open()

    async def _open(self) -> _Reader:
        """A new held connection, through the pool (its checkout ping, the
        per-host connect limits), in autocommit mode."""
        generation = self.generation
        conn = await self._engine.connect()
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            raw = (await conn.get_raw_connection()).driver_connection
        except BaseException:
            with suppress(Exception):
                await conn.close()
            raise
        return _Reader(conn, raw, generation)

    def _give_back(self, reader: _Reader) -> None:
        if (
            self._closed
            or reader.generation != self.generation
            or reader.conn.invalidated
            or len(self._idle) >= PG_READERS
        ):
            self._release(reader)
        else:
            self._idle.append(reader)

    def _after_failure(self, reader: _Reader, exc: BaseException, hung: bool) -> None:
        """A read failed: its connection goes back if it is sound (the
        read's own error, a missing mailbox, a bad statement); it is cut if
        the server hung or the connection may be broken, and with a
        curable failure the idle ones made before it are not used again."""
        if hung or (isinstance(exc, Exception) and self._is_transient(exc)):
            self.generation += 1
            self._cut(reader)
        elif not isinstance(exc, Exception) or reader.conn.invalidated or _client_state_error(exc):
            self._cut(reader)  # cancelled mid-statement: its state is unknown
        else:
            self._give_back(reader)

    def _check(self, watch: _Watch) -> None:
        """A read still waits after READ_CHECK_AFTER: the server must answer
        a probe, else the read ends (TEMPORARY)."""
        if not watch.active:
            return
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._alive())
        self._probe.add_done_callback(lambda probe: self._checked(watch, probe))

    def _checked(self, watch: _Watch, probe: asyncio.Task[bool]) -> None:
        if not watch.active:
            return
        loop = asyncio.get_running_loop()
        if not probe.cancelled() and probe.result():
            watch.handle = loop.call_later(READ_CHECK_AFTER, self._check, watch)
        else:
            watch.limit.reschedule(loop.time())

    async def _alive(self) -> bool:
        """Whether the server answers a ping within the ping's time limit:
        on an idle connection of this generation (the servers the reads
        wait on), else on a new one. False also drops every idle one."""
        reader = self._take()
        try:
            async with asyncio.timeout(self._ping_timeout):
                if reader is not None:
                    await reader.raw.fetchval(";")
                else:
                    raw = await self._connect()
                    try:
                        await raw.fetchval(";")
                    finally:
                        with suppress(Exception):
                            await raw.close(timeout=self._ping_timeout)
        except Exception as exc:
            log.warning("the database did not answer a ping in time: %r", exc)
            self.generation += 1
            if reader is not None:
                self._cut(reader)
            return False
        if reader is not None:
            self._give_back(reader)
        return True

    def _cut(self, reader: _Reader) -> None:
        """Closes ``reader`` at once, without a word to the server (which may
        not answer), and tells the pool its connection is gone."""
        with suppress(Exception):
            reader.raw.terminate()
        self._release(reader, invalidate=True)

    def _release(self, reader: _Reader, invalidate: bool = False) -> None:
        async def release() -> None:
            # Bounded: giving a connection back to the pool runs its reset
            # (a ROLLBACK) on the server, which a hung or half-broken
            # connection would never answer; then it is cut instead.
            try:
                async with asyncio.timeout(self._ping_timeout):
                    if invalidate:
                        await reader.conn.invalidate()
                    await reader.conn.close()
            except Exception:
                with suppress(Exception):
                    reader.raw.terminate()
                with suppress(Exception):
                    async with asyncio.timeout(self._ping_timeout):
                        await reader.conn.invalidate()

        task = asyncio.get_running_loop().create_task(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def close(self) -> None:
        """Closes the idle connections; reads still running close theirs
        when they end."""
        self._closed = True
        if self._probe is not None:
            await stop_task(self._probe)
        while self._idle:
            self._release(self._idle.pop())
        while self._releasing:  # each bounded by the ping's time limit (_release)
            await asyncio.wait(list(self._releasing))


def _client_state_error(exc: BaseException) -> bool:
    """An error of the driver's connection state (asyncpg's InterfaceError,
    InternalClientError: "another operation is in progress", a closed
    connection), which the connection may keep: it is not used again."""
    from sqlalchemy import exc as sa_exc

    return isinstance(exc, (sa_exc.InterfaceError, sa_exc.InternalError))


class _DroppedWhileIdle(Exception):
    """A held connection the server had closed while it was idle."""


def _dropped(exc: Exception) -> bool:
    from storage.sql.db import connection_failed  # db builds PgReaders: no cycle at import

    return connection_failed(exc)


def _unanswered() -> StorageError:
    return StorageError(ErrorKind.TEMPORARY, "the database did not answer")

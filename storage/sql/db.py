"""One SQL database (a shard) behind SQLAlchemy 2 async Core.

The same code path serves SQLite (aiosqlite) and PostgreSQL (asyncpg); this
module hides the few places they differ: connection setup, how a write
transaction is serialised, and how backend failures are classified.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from storage.errors import ErrorKind, StorageError
from storage.sql import schema

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


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
        if self.is_sqlite:
            _setup_sqlite(self.engine)

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
        # Backend outages and lock timeouts are retryable: TEMPORARY. Anything
        # else (integrity errors the stores did not expect) is a bug and surfaces.
        try:
            yield
        except OperationalError as exc:
            log.warning("database unavailable: %s", exc)
            raise StorageError(ErrorKind.TEMPORARY, "storage temporarily unavailable") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise StorageError(ErrorKind.TEMPORARY, "storage connection lost") from exc
            raise
        except (OSError, ConnectionError) as exc:
            raise StorageError(ErrorKind.TEMPORARY, "storage temporarily unavailable") from exc

    async def migrate(self) -> int:
        """Applies pending migrations in order; returns the schema version."""
        for version in range(1, schema.SCHEMA_VERSION + 1):
            async with self.write() as conn:
                await schema.lock_for_migration(conn)
                if await schema.apply_step(conn, version):
                    log.info("%s: migrated schema to version %d", self.safe_url, version)
        async with self.read() as conn:
            return await schema.current_version(conn)

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return self.engine.url.render_as_string(hide_password=True)

    async def close(self) -> None:
        await self.engine.dispose()


def _setup_sqlite(engine: AsyncEngine) -> None:
    """WAL, durable commits, a busy timeout, and our own BEGIN statements
    (the pysqlite default of implicit transactions breaks BEGIN IMMEDIATE)."""

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that returned survives power loss ("no mail is lost").
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

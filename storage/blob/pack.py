"""Small blobs packed into one SQLite table (``blobs``).

Where the table lives: on a one-host (SQLite) site, in the default shard's
own database file, so a delivery writes its message's bytes in the same
transaction as the row that names them (``MailStore.deliver``'s
``blob_data``); elsewhere, in ``pack.sqlite`` in the blob folder.

Each blob written to its own file costs two fsyncs (the file, then its
directory after the rename) and about nine system calls, each a wait for
the GIL in a busy daemon; timers showed a 5 KB message's blob taking 7-9 ms
from ingest to durable. Here a writer thread takes every blob queued
meanwhile into one transaction: one WAL fsync makes all of them durable.

Durability: the pack runs in WAL mode. The writer commits with
``synchronous=NORMAL`` and then fsyncs the WAL itself (``storage/walsync.py``
says why that is as durable as ``FULL``); a put's future is resolved only
after that fsync. Several processes share the file: their writer threads
take a file lock beside it (``<pack>-writers``) around each transaction,
as the metadata database's writers do, instead of SQLite's busy-wait (in a
database file it is that database's own writers' lock). The
fsync runs after the lock is released, so one process's fsync never holds
up another's transaction (with ``FULL`` it ran inside the COMMIT, under
the lock: the pack's writers then took turns at the disk's pace).

Blobs stay content-addressed and immutable: storing bytes already present
only refreshes their ``stored`` time, which garbage collection reads as
the blob's age (so a blob an ingest in progress is about to reference is
never collected as old and unreferenced).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
import time
from typing import Any

from sqlalchemy import text

from storage.walsync import WalFile

PACK_FILE = "pack.sqlite"
# Most writes one transaction takes: bounds what one failed commit undoes.
MAX_BATCH = 256
_BUSY_TIMEOUT_S = 30.0
# The table, made by the pack in its own file and by the shard schema's
# migrations in a database file (``storage/sql/schema.py``).
SCHEMA_SQL = (
    "CREATE TABLE IF NOT EXISTS blobs ("
    " key TEXT PRIMARY KEY, data BLOB NOT NULL, stored REAL NOT NULL)"
)
# The same table in a PostgreSQL shard database (schema step 18). Its
# blobs are written only by deliveries, in their own transaction. Stored
# uncompressed (EXTERNAL): mail is mostly compressed already (base64 of
# images and archives), and a blob's bytes are read far more often than
# written.
PG_SCHEMA_SQL = (
    "CREATE TABLE IF NOT EXISTS blobs ("
    " key text PRIMARY KEY, data bytea NOT NULL, stored double precision NOT NULL)",
    "ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL",
)
# Storing bytes already present refreshes their ``stored`` time only; a
# delivery writing its blob inline uses the same statement.
_PUT = (
    "INSERT INTO blobs (key, data, stored) VALUES ({}) "
    "ON CONFLICT (key) DO UPDATE SET stored = excluded.stored"
)
PUT_SQL = _PUT.format("?, ?, ?")
PUT_SQL_NAMED = _PUT.format(":key, :data, :stored")  # for sqlalchemy.text, any dialect


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    # The commit skips the WAL's fsync; the writer does it after the lock
    # (``WalFile.sync``) before any put is told its blob is durable.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class _Op:
    """One queued write: a put (``data`` set) or a delete."""

    __slots__ = ("data", "future", "key", "stored_before")

    def __init__(self, key: str, data: bytes | None) -> None:
        self.key = key
        self.data = data
        self.stored_before: float | None = None
        self.future: concurrent.futures.Future[str] = concurrent.futures.Future()


class BlobPack:
    """The pack at ``path``. Writes go through one writer thread per process
    (group commit); reads through a few reader threads. Blocking methods
    (``*_sync``) are for worker threads; the async store wraps them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: list[_Op] = []
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closing = False
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._generation = 0

    # --- writes -----------------------------------------------------------

    def put_started(self, key: str, data: bytes) -> concurrent.futures.Future[str]:
        """Queues ``data`` under ``key`` (its SHA-256 hex digest); the
        future's result is the key once the bytes are durable."""
        return self._submit(_Op(key, bytes(data)))

    def delete_started(
        self, key: str, stored_before: float | None = None
    ) -> concurrent.futures.Future[str]:
        """Queues the blob's removal; with ``stored_before`` (a Unix time)
        only if it was not stored again since (garbage collection)."""
        op = _Op(key, None)
        op.stored_before = stored_before
        return self._submit(op)

    def _submit(self, op: _Op) -> concurrent.futures.Future[str]:
        with self._cond:
            if self._closing:
                raise RuntimeError("blob pack closed")
            self._queue.append(op)
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="blob-pack-writer", daemon=True
                )
                self._writer.start()
            self._cond.notify()
        return op.future

    def _write_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        lock_fd: int | None = None
        wal = WalFile(self.path)
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        return  # closing, nothing left
                    batch = self._queue[:MAX_BATCH]
                    del self._queue[:MAX_BATCH]
                # A put whose caller gave up (its future cancelled) is not
                # written; the others can no longer be cancelled.
                batch = [op for op in batch if op.future.set_running_or_notify_cancel()]
                if not batch:
                    continue
                try:
                    if lock_fd is None:
                        lock_fd = os.open(
                            f"{self.path}-writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                        )
                    if conn is None:
                        # Under the writers' lock: switching a new file to WAL
                        # can fail at once, busy timeout or not, while another
                        # process makes the same file.
                        fcntl.flock(lock_fd, fcntl.LOCK_EX)
                        try:
                            conn = _connect(self.path)
                            conn.execute(SCHEMA_SQL)
                        finally:
                            fcntl.flock(lock_fd, fcntl.LOCK_UN)
                    self._commit(conn, lock_fd, batch)
                    wal.sync()  # outside the writers' lock, before anyone is told
                except BaseException as exc:
                    # Nothing of the batch committed, or its fsync failed: no
                    # caller is told it is durable (a blob written anyway is
                    # unreferenced; garbage collection removes it).
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                        conn = None
                    for op in batch:
                        op.future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for op in batch:
                        op.future.set_result(op.key)
        finally:
            wal.close()
            if conn is not None:
                conn.close()
            if lock_fd is not None:
                os.close(lock_fd)

    @staticmethod
    def _commit(conn: sqlite3.Connection, lock_fd: int | None, batch: list[_Op]) -> None:
        now = time.time()
        puts = [(op.key, op.data, now) for op in batch if op.data is not None]
        deletes = [
            (op.key, float("inf") if op.stored_before is None else op.stored_before)
            for op in batch
            if op.data is None
        ]
        if lock_fd is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Deletes first: a delete and a put of one key in one batch
                # come from GC and a new ingest; the blob must stay.
                if deletes:
                    conn.executemany("DELETE FROM blobs WHERE key = ? AND stored < ?", deletes)
                if puts:
                    conn.executemany(PUT_SQL, puts)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                raise
        finally:
            if lock_fd is not None:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)

    # --- reads --------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection | None:
        """The calling thread's read connection (reads run in worker threads);
        None while the pack has no file or no table yet (nothing was ever
        packed). Connections are remade after :meth:`close_sync`."""
        local = self._reader_local
        if getattr(local, "generation", -1) == self._generation:
            return local.conn  # type: ignore[no-any-return]
        if not os.path.exists(self.path):
            return None
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA query_only=ON")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'blobs'").fetchone() is None:
            conn.close()
            return None
        with self._reader_lock:
            self._reader_conns.append(conn)
        local.conn, local.generation = conn, self._generation
        return conn

    def row_sync(self, sql: str, args: tuple[object, ...]) -> tuple[object, ...] | None:
        """The first row of ``sql`` (a SELECT on ``blobs``), or None."""
        conn = self._reader()
        if conn is None:
            return None
        return conn.execute(sql, args).fetchone()  # type: ignore[no-any-return]

    def keys_sync(self) -> list[str]:
        conn = self._reader()
        if conn is None:
            return []
        return [r[0] for r in conn.execute("SELECT key FROM blobs")]

    # --- lifecycle ----------------------------------------------------------

    def close_sync(self) -> None:
        """Writes everything queued, then stops the threads and closes the
        connections. Blocking."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join()
        with self._reader_lock:
            self._generation += 1
            conns, self._reader_conns = self._reader_conns, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()


@functools.cache
def _row_statement(columns: str) -> Any:
    """``TablePack.row``'s statement for ``columns``: one object per
    columns string, kept, as ``storage.sql.db.execute`` caches by identity."""
    return text(f"SELECT {columns} FROM blobs WHERE key = :key")


class TablePack:
    """The ``blobs`` table of a PostgreSQL database (``database``: a
    ``storage.sql.db.Database``), read and garbage-collected through the
    blob store like :class:`BlobPack`; written only by deliveries, each
    blob in the transaction of the rows that name it
    (``MailStore.deliver``'s ``blob_data``), so a small message costs no
    blob file and no fsync of its own."""

    def __init__(self, database: Any) -> None:
        self.database = database

    async def row(self, columns: str, key: str) -> tuple[object, ...] | None:
        """``columns`` (SQL) of the blob's row, or None. One round trip on a
        held connection (``Database.read_sync``), the statement prepared
        once per connection: a message's first FETCH reads its blob here."""
        from storage.sql.db import execute  # the schema imports this module

        stmt = _row_statement(columns)
        params = {"key": key}
        return await self.database.read_sync(  # type: ignore[no-any-return]
            lambda conn: execute(conn, stmt, params).first()
        )

    async def keys(self) -> list[str]:
        async with self.database.read() as conn:
            return [r[0] for r in await conn.execute(text("SELECT key FROM blobs"))]

    async def delete(self, key: str, stored_before: float | None) -> None:
        """Removes the blob; with ``stored_before`` only if not stored since."""
        before = float("inf") if stored_before is None else stored_before
        async with self.database.write() as conn:
            await conn.execute(
                text("DELETE FROM blobs WHERE key = :key AND stored < :before"),
                {"key": key, "before": before},
            )

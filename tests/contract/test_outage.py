"""A PostgreSQL that cannot serve now is a TEMPORARY storage error (a 4xx,
NO [UNAVAILABLE], -ERR [SYS/TEMP], 503), never a bug's reply: a backend
terminated under a transaction, a database that became read-only (a
failover to a standby), a server that refuses connections."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import asyncpg
import pytest

from storage.errors import ErrorKind, StorageError
from storage.sql.db import Database
from tests.contract.conftest import _Pg


@pytest.fixture
async def own_database(pg_server: _Pg) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A migrated database of its own (these tests alter it) and an admin
    connection to the server."""
    server = pg_server.server
    url = await server.create_database()
    db = Database(url)
    await db.migrate()
    await db.close()
    admin = await asyncpg.connect(
        host="127.0.0.1", port=server.port, user=server.user, database="postgres"
    )
    try:
        yield url, admin
    finally:
        await admin.close()
        await server.drop_database(url)


def _name(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def _failure(url: str, sql: str) -> StorageError:
    """The storage error a write transaction running ``sql`` on ``url`` raises."""
    db = Database(url)
    try:
        with pytest.raises(StorageError) as err:
            async with db.write() as conn:
                await conn.exec_driver_sql(sql)
        return err.value
    finally:
        await db.close()


async def test_a_backend_terminated_mid_transaction_is_temporary(
    own_database: tuple[str, asyncpg.Connection],
) -> None:
    url, admin = own_database
    db = Database(url)
    try:
        with pytest.raises(StorageError) as err:
            async with db.write() as conn:
                await conn.exec_driver_sql("SELECT count(*) FROM domains")
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    _name(url),
                )
                await conn.exec_driver_sql("INSERT INTO domains (name) VALUES ('example.org')")
        assert err.value.kind is ErrorKind.TEMPORARY
        # The pool recovers: the next call gets a new connection.
        async with db.read() as conn:
            assert (await conn.exec_driver_sql("SELECT count(*) FROM domains")).scalar() == 0
    finally:
        await db.close()


async def test_a_read_only_database_after_failover_is_temporary(
    own_database: tuple[str, asyncpg.Connection],
) -> None:
    """A write landing on a standby just promoted away from (or on a
    primary demoted to read-only) fails with SQLSTATE 25006."""
    url, admin = own_database
    await admin.execute(f'ALTER DATABASE "{_name(url)}" SET default_transaction_read_only = on')
    error = await _failure(url, "INSERT INTO domains (name) VALUES ('example.org')")
    assert error.kind is ErrorKind.TEMPORARY


async def test_a_server_refusing_connections_is_temporary() -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = await _failure(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/shardmail", "SELECT 1")
    assert error.kind is ErrorKind.TEMPORARY

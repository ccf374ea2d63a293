"""PostgreSQL's reads on held connections (``storage/sql/pgreaders.py``):
no ping before each read, yet a slow read on a live server is left to
finish, and connections the server dropped while idle cost no read an
error: each such read runs again on a new connection. The batch writer's
held connections do the same for a write (nothing was sent on them). (A hung server: see
``tests/integration/http/test_http_pg_reads.py``.)"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Connection, text

from storage.sql import pgreaders
from storage.sql.db import Database, execute


@pytest.fixture
async def db(pg_server: Any) -> AsyncIterator[tuple[Database, str]]:
    url = await pg_server.database()
    database = Database(url)
    try:
        await database.migrate()
        yield database, url.rsplit("/", 1)[1]
    finally:
        await database.close()


_SLEEP_THEN = text("SELECT CAST(:v AS integer) FROM pg_sleep(CAST(:s AS float8))")


def _sleep_then(value: int, seconds: float, direct: bool = False) -> Any:
    """A read of ``value`` after ``seconds``: through SQLAlchemy, or
    ``direct`` through ``execute`` (asyncpg straight, as the hot reads)."""

    def read(conn: Connection) -> int:
        params = {"v": value, "s": seconds}
        if direct:
            return int(execute(conn, _SLEEP_THEN, params).scalar())
        return int(conn.execute(_SLEEP_THEN, params).scalar_one())

    return read


async def test_a_slow_read_on_a_live_server_is_not_cut(db: tuple[Database, str]) -> None:
    database, _ = db
    value = random.randint(1, 10**6)
    # Past the watchdog's wait twice: the probe finds the server alive.
    seconds = 2 * pgreaders.READ_CHECK_AFTER + 0.5
    assert await database.read_sync(_sleep_then(value, seconds)) == value


async def test_connections_the_server_dropped_cost_no_read(
    db: tuple[Database, str], pg_server: Any
) -> None:
    database, name = db
    held = random.randint(3, 8)
    values = await asyncio.gather(*(database.read_sync(_sleep_then(n, 0.3)) for n in range(held)))
    assert values == list(range(held))
    ended = await _drop_connections(pg_server, name)
    assert ended >= held
    # Every read is answered: a held connection found closed is read
    # again on a new one (a read changes nothing, so it may run twice).
    for n in range(held + 2):
        assert await database.read_sync(_sleep_then(n, 0, direct=True)) == n


async def _drop_connections(pg_server: Any, name: str) -> int:
    """Ends every server process of database ``name`` (each gone when this
    returns); how many."""
    server = pg_server.server
    admin = await asyncpg.connect(
        host="127.0.0.1", port=server.port, user=server.user, database="postgres"
    )
    try:
        return int(
            await admin.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid, 5000) "
                "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()) t",
                name,
            )
        )
    finally:
        await admin.close()


def _insert_domain(name: str) -> Any:
    def write(conn: Connection) -> int:
        return int(
            execute(
                conn, text("INSERT INTO domains (name) VALUES (:n) RETURNING id"), {"n": name}
            ).scalar()
        )

    return write


async def test_a_write_after_the_server_dropped_its_connections_commits(
    db: tuple[Database, str], pg_server: Any
) -> None:
    database, name = db
    tag = random.randbytes(6).hex()
    # Several writes at once: the writer holds more than one connection.
    first = random.randint(2, 6)
    await asyncio.gather(
        *(database.write_batched(_insert_domain(f"a{n}-{tag}.test")) for n in range(first))
    )
    assert await _drop_connections(pg_server, name) >= 1
    # Idle a moment, as after a restart: asyncpg has seen its sockets close.
    # (A write sent to a server process as it dies stays a TEMPORARY error:
    # only a read may simply run again.)
    await asyncio.sleep(0.2)
    later = [f"b{n}-{tag}.test" for n in range(random.randint(2, 6))]
    for domain in later:
        assert await database.write_batched(_insert_domain(domain)) > 0
    names = await database.read_sync(
        lambda conn: {
            r[0]
            for r in conn.execute(
                text("SELECT name FROM domains WHERE name LIKE :t"), {"t": f"%-{tag}.test"}
            )
        }
    )
    assert names == {f"a{n}-{tag}.test" for n in range(first)} | set(later)

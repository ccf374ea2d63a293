"""PostgreSQL's reads on held connections (``storage/sql/pgreaders.py``):
no ping before each read, yet a slow read on a live server is left to
finish, and connections the server dropped cost at most one read a
TEMPORARY error, not one per connection held. (A hung server: see
``tests/integration/http/test_http_pg_reads.py``.)"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Connection, text

from storage.errors import ErrorKind, StorageError
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


async def test_dropped_connections_cost_at_most_the_first_reads(
    db: tuple[Database, str], pg_server: Any
) -> None:
    database, name = db
    held = random.randint(3, 8)
    values = await asyncio.gather(*(database.read_sync(_sleep_then(n, 0.3)) for n in range(held)))
    assert values == list(range(held))
    server = pg_server.server
    admin = await asyncpg.connect(
        host="127.0.0.1", port=server.port, user=server.user, database="postgres"
    )
    try:
        ended = await admin.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()) t",
            name,
        )
    finally:
        await admin.close()
    assert ended >= held
    outcomes = []
    for n in range(held + 2):
        try:
            assert await database.read_sync(_sleep_then(n, 0, direct=True)) == n
            outcomes.append(True)
        except StorageError as err:
            assert err.kind is ErrorKind.TEMPORARY, err  # a 503, never a 500
            outcomes.append(False)
    # The dead connections cost the first read or two (one in about four
    # runs, two: a broken pooled connection met at checkout), never more:
    # from then on every read is answered.
    first_ok = outcomes.index(True)
    assert first_ok <= 2 and all(outcomes[first_ok:]), outcomes

"""Backends for the contract suites: every test taking ``storage`` runs once
on SQLite (a file in tmp_path) and once on PostgreSQL (a fresh database on
a throwaway server started once per session). If PostgreSQL cannot start
the postgres tests fail: they are never skipped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from storage.backend import SqlStorage, open_storage_from_url
from storage.sql.db import Database
from tests.pgserver import PgServer

BACKENDS = ["sqlite", "postgres"]

# Cheap argon2 parameters: the contract is the same, the tests are faster.
TEST_HASHER = PasswordHasher.from_parameters(CHEAPEST)


class _Pg:
    """The session's server plus one migrated database, emptied per test."""

    def __init__(self, server: PgServer) -> None:
        self.server = server
        self.url: str | None = None

    async def database(self) -> str:
        if self.url is None:
            url = await self.server.create_database()
            db = Database(url)
            await db.migrate()
            await db.close()
            self.url = url
        else:
            await self.server.reset_database(self.url)
        return self.url


@pytest.fixture(scope="session")
def pg_server() -> Iterator[_Pg]:
    server = PgServer.start()  # raises (the test errors) if PostgreSQL cannot run
    try:
        yield _Pg(server)
    finally:
        server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'shardmail.db'}"
        return
    pg: _Pg = request.getfixturevalue("pg_server")
    yield await pg.database()


@pytest.fixture
async def storage(database_url: str, tmp_path: Path) -> AsyncIterator[SqlStorage]:
    store = await open_storage_from_url(
        database_url, tmp_path / "blobs", password_hasher=TEST_HASHER
    )
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def quiet_storage(database_url: str, tmp_path: Path) -> AsyncIterator[SqlStorage]:
    """``storage`` without its search index's background worker (SQLite's
    indexer, PostgreSQL's pending-list merger): tests run it themselves
    (``Database.indexer().run_once()``)."""
    store = await open_storage_from_url(
        database_url, tmp_path / "blobs", password_hasher=TEST_HASHER, fts_indexer=False
    )
    try:
        yield store
    finally:
        await store.close()

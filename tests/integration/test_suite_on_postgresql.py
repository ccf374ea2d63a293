"""SHARDMAIL_TEST_BACKEND=postgresql puts the suites' sites on PostgreSQL
(tests/conftest.py): what makes "the integration suite runs on PostgreSQL
as well as SQLite" true is that each site then really is a database of its
own there, and that a site copied from a populated template carries the
template's accounts along."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from argon2 import PasswordHasher, profiles

import tests.conftest as shared
from storage import open_storage
from tests.conftest import copy_test_storage, make_settings, storage_url

HASHER = PasswordHasher.from_parameters(profiles.CHEAPEST)


@pytest.fixture
def on_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared, "TEST_BACKEND", "postgresql")


async def test_each_site_gets_its_own_postgresql_database(
    on_postgresql: None, tmp_path: Path
) -> None:
    first = make_settings(tmp_path / "one" / "data")
    second = make_settings(tmp_path / "two" / "data")
    assert first.storage.url.startswith("postgresql+asyncpg://")
    assert first.storage.url != second.storage.url
    # The same data dir names the same database (a fixture opening storage
    # beside make_settings's daemons).
    assert storage_url(tmp_path / "one" / "data") == first.storage.url
    login = f"u{random.randrange(10**6)}@example.org"
    store = await open_storage(first.storage, password_hasher=HASHER)
    try:
        assert store.databases["default"].dialect == "postgresql"
        await store.directory.add_domain("example.org")
        await store.directory.add_account(login, "pw")
    finally:
        await store.close()
    (tmp_path / "one" / "data").mkdir(parents=True, exist_ok=True)
    copy = make_settings(tmp_path / "three" / "data")
    copy_test_storage(tmp_path / "one" / "data", copy)
    assert copy.storage.url not in (first.storage.url, second.storage.url)
    store = await open_storage(copy.storage, password_hasher=HASHER)
    try:
        assert (await store.directory.get_account(login)).address == login
    finally:
        await store.close()
    store = await open_storage(second.storage, password_hasher=HASHER)
    try:
        assert await store.directory.list_domains() == []
    finally:
        await store.close()

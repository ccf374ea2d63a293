"""POP3 protocol fixtures: a fresh SQLite storage with one account holding
MSG1 and MSG2, and a running POP3 service on loopback (plain + implicit TLS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.protocol.pop3.harness import (
    MSG1,
    MSG2,
    OTHER_USER,
    PASSWORD,
    USER,
    deliver,
    make_settings,
    open_test_storage,
    running_pop3,
)


@pytest.fixture
async def pop3_storage(tmp_path: Path) -> AsyncIterator[object]:
    store = await open_test_storage(tmp_path)
    try:
        await store.directory.add_domain("example.org")
        await store.directory.add_account(USER, PASSWORD)
        await store.directory.add_account(OTHER_USER, PASSWORD)
        yield store
    finally:
        await store.close()


@pytest.fixture
async def account(pop3_storage):
    return await pop3_storage.directory.get_account(USER)


@pytest.fixture
async def filled(pop3_storage, account):
    """The two sample messages in the INBOX; their UIDs."""
    return [await deliver(pop3_storage, account, MSG1), await deliver(pop3_storage, account, MSG2)]


@pytest.fixture
def pop3_settings(tmp_path: Path):
    return make_settings(tmp_path / "data")


@pytest.fixture
async def pop3(pop3_settings, pop3_storage, tls_context, filled):
    async with running_pop3(pop3_settings, pop3_storage, tls_context) as service:
        yield service

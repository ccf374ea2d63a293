"""A PostgreSQL COMMIT that fails without a verdict (``storage/sql/db.py``,
COMMIT_IN_DOUBT_SECONDS).

What a user would notice: when the database server (or the connection to
it) dies while a delivery's COMMIT is on the wire, as when a primary is
killed and its synchronous replica promoted, the commit may have happened.
Then the delivery is reported done if and only if it was stored: a sender
told 451 for a message that was in fact stored sends it again, and the
recipient gets it twice.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.errors import ErrorKind, StorageError
from storage.model import Account, UidSet
from storage.sql import db as db_module
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build


@pytest.fixture
async def site(pg_server: Any, tmp_path: Path) -> AsyncIterator[tuple[SqlStorage, Account]]:
    url = await pg_server.server.create_database()
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        await storage.directory.add_domain("example.org")
        yield storage, await storage.directory.add_account("bob@example.org", "pw")
    finally:
        await storage.close()


@pytest.fixture
def lost_commit(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The next COMMIT's connection dies: ``trap["when"]`` = "after" (the
    server committed, its reply was lost) or "before" (the COMMIT never
    reached the server, which rolls the transaction back)."""
    trap = {"when": ""}
    real = db_module._PgTransaction.execute

    def execute(self: Any, sql: str, timeout: float | None = None) -> None:
        when, trap["when"] = trap["when"], ""
        # The COMMIT, alone or last of its round trip (after the commit mark).
        if not sql.rpartition("; ")[2].startswith("COMMIT") or not when:
            trap["when"] = when
            real(self, sql, timeout)
            return
        if when == "after":
            real(self, sql, timeout)
        self._raw.terminate()
        real(self, sql, timeout)  # raises the driver's own error for a dead connection

    monkeypatch.setattr(db_module._PgTransaction, "execute", execute)
    yield trap


async def _deliver(storage: SqlStorage, account: Account, subject: str) -> int:
    raw, parsed = build(subject=subject, body="x" * random.randint(1, 5000))
    key = await storage.blobs.put(raw)
    results = await storage.mail(account).deliver(account.id, key, parsed, [("INBOX", (), None)])
    return results[0].uid


async def _subjects(storage: SqlStorage, account: Account) -> list[str]:
    mail = storage.mail(account)
    box = await mail.get_mailbox(account.id, "INBOX")
    stored = await mail.fetch(account.id, box.id, UidSet.all())
    return sorted(m.parsed.subject for m in stored)


async def test_a_commit_whose_reply_was_lost_is_reported_done(
    site: tuple[SqlStorage, Account], lost_commit: dict[str, str]
) -> None:
    storage, account = site
    lost_commit["when"] = "after"
    uid = await _deliver(storage, account, "committed, reply lost")
    assert uid >= 1
    assert lost_commit["when"] == "", "the trap never fired"
    await _deliver(storage, account, "the next one")
    assert await _subjects(storage, account) == ["committed, reply lost", "the next one"]


async def test_a_commit_that_never_arrived_is_a_temporary_failure(
    site: tuple[SqlStorage, Account], lost_commit: dict[str, str]
) -> None:
    storage, account = site
    lost_commit["when"] = "before"
    with pytest.raises(StorageError) as failed:
        await _deliver(storage, account, "never committed")
    assert failed.value.kind is ErrorKind.TEMPORARY, failed.value
    await _deliver(storage, account, "the next one")
    assert await _subjects(storage, account) == ["the next one"]

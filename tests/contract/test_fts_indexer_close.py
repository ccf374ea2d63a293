"""SQLite's full-text indexer stops without waiting for a batch in
progress (``storage/sql/fts.py``, ``FtsIndexer.close``): the batch is
interrupted and rolls back, its messages stay queued, and the next
indexer indexes every one of them. Before, closing waited for the whole
batch (hundreds of big bodies), which held up a daemon's shutdown long
enough for systemd to kill it."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import string
from pathlib import Path

from storage.backend import open_storage_from_url
from storage.ingest import Delivery, ingest
from storage.sql import fts
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build


def _prose(words: int) -> str:
    letters = string.ascii_lowercase
    line_words = ["".join(random.choices(letters, k=random.randint(3, 12))) for _ in range(words)]
    return "\n".join(" ".join(line_words[i : i + 8]) for i in range(0, words, 8))


def _indexed(db_file: str) -> int:
    conn = sqlite3.connect(fts.index_file(db_file))
    try:
        return int(conn.execute("SELECT count(*) FROM messages_fts").fetchone()[0])
    finally:
        conn.close()


async def test_close_interrupts_a_batch_and_loses_nothing(tmp_path: Path) -> None:
    db_file = tmp_path / "mail.sqlite"
    storage = await open_storage_from_url(
        f"sqlite+aiosqlite:///{db_file}",
        tmp_path / "blobs",
        password_hasher=TEST_HASHER,
        fts_indexer=False,
    )
    try:
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw")
        count = random.randint(fts.BATCH - 60, fts.BATCH)
        for _ in range(count):
            raw, _ = build(subject="big", body=_prose(random.randint(6000, 9000)))
            await ingest(storage, [Delivery(bob)], raw)
        indexer = storage.databases["default"].indexer()
        assert isinstance(indexer, fts.FtsIndexer)
        batch = asyncio.create_task(indexer.run_once())
        # Wait until the batch's transaction is open in the indexer's thread.
        for _ in range(2000):
            conn = indexer._conn
            if conn is not None and conn.in_transaction:
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("the batch never started")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await indexer.close()
        closing = loop.time() - started
        batch.cancel()
        await asyncio.gather(batch, return_exceptions=True)
        # Rolled back, not finished: nothing of it reached the index file.
        assert _indexed(str(db_file)) == 0, f"close waited {closing:.2f} s for the batch"
        # The queue kept every message: a new indexer indexes them all.
        again = fts.FtsIndexer(str(db_file), storage.databases["default"]._clear_fts_queue)
        try:
            assert await again.run_once() == count
            assert await again.run_once() == 0
        finally:
            await again.close()
        assert _indexed(str(db_file)) == count
    finally:
        await storage.close()

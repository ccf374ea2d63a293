"""Which SQLite group commits fsync: deliveries always; a batch made only of
flag changes, expunges and \\Recent claims commits without the WAL fsync
(durable against a process crash, not against power loss)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from storage.sql.db import Database

FULL, NORMAL = 2, 1


def synchronous(conn) -> int:
    return int(conn.exec_driver_sql("PRAGMA synchronous").scalar())


async def test_durable_and_relaxed_batches(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    try:
        assert await db.write_batched(synchronous) == FULL
        assert await db.write_batched(synchronous, durable=False) == NORMAL
        assert await db.write_batched(synchronous) == FULL
        # Sharing a commit with a delivery makes a flag change durable too.
        await db.write_batched(synchronous)  # the writer is idle again
        mixed = await asyncio.gather(
            db.write_batched(synchronous, durable=False),
            db.write_batched(synchronous, durable=True),
            db.write_batched(synchronous, durable=False),
        )
        assert mixed == [FULL, FULL, FULL]
    finally:
        await db.close()

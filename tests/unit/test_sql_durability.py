"""Which SQLite group commits fsync: deliveries always; a batch made only of
flag changes, expunges and \\Recent claims commits without the WAL fsync
(durable against a process crash, not against power loss).

The writer commits with ``synchronous=NORMAL`` and the WAL's fsync runs
afterwards in its own thread (``Database._sync_wal``), so a durable call
returns only after an fsync of the WAL file that began after its commit.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from storage.sql.db import Database

NORMAL = 1


def synchronous(conn) -> int:
    return int(conn.exec_driver_sql("PRAGMA synchronous").scalar())


def wal_fsyncs(monkeypatch: pytest.MonkeyPatch, db: Database) -> list[int]:
    """Counts fsyncs of the database's WAL file (os.fsync is process-wide)."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        try:
            if os.fstat(fd).st_ino == os.stat(f"{db.file}-wal").st_ino:
                calls.append(fd)
        except FileNotFoundError:
            pass
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


async def test_durable_and_relaxed_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    fsyncs = wal_fsyncs(monkeypatch, db)
    try:
        # The commit itself never waits for the disk: the fsync comes after.
        assert await db.write_batched(synchronous) == NORMAL
        assert len(fsyncs) == 1
        assert await db.write_batched(synchronous, durable=False) == NORMAL
        assert len(fsyncs) == 1
        assert await db.write_batched(synchronous) == NORMAL
        assert len(fsyncs) == 2
        # Sharing a commit with a delivery makes a flag change durable too.
        await db.write_batched(synchronous)  # the writer is idle again
        before = len(fsyncs)
        mixed = await asyncio.gather(
            db.write_batched(synchronous, durable=False),
            db.write_batched(synchronous, durable=True),
            db.write_batched(synchronous, durable=False),
        )
        assert mixed == [NORMAL] * 3
        assert len(fsyncs) == before + 1
    finally:
        await db.close()

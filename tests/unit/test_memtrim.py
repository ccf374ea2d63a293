"""runtime.memtrim: a spooled upload's end gives freed heap back (once per burst)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from delivery.spool import SpoolFile
from runtime import memtrim


async def test_removing_spool_files_trims_once_per_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memtrim, "trim_now", lambda: calls.append(1))
    monkeypatch.setattr(memtrim, "TRIM_DELAY_SECONDS", 0.05)
    spools = [SpoolFile(tmp_path) for _ in range(5)]
    for spool in spools:
        spool.write(b"x" * 70_001)
    for spool in spools:
        spool.remove()
    assert calls == []  # not on the event loop's time of the release itself
    await asyncio.sleep(0.2)
    assert calls == [1]  # one trim for the five releases
    SpoolFile(tmp_path).remove()
    await asyncio.sleep(0.2)
    assert calls == [1, 1]


def test_trim_now_runs_where_glibc_has_malloc_trim() -> None:
    memtrim.trim_now()  # must not raise, with or without glibc
    assert memtrim._malloc_trim() is not None  # Debian: glibc

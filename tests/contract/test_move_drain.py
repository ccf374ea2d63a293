"""``drain_shard`` places the accounts it moves as placement does (issue
#19): by accounts per unit of weight, never on a shard of weight 0 unless
named (a shard being emptied is given weight 0 first)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from storage import move as mv
from storage.backend import ShardSpec, open_storage_from_url
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import deliver


async def test_drain_fills_by_weight_and_skips_weight_zero(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'main.db'}"
    shards = {
        name: ShardSpec(f"sqlite+aiosqlite:///{tmp_path / name}.db", weight=weight)
        for name, weight in (("east", 2.0), ("west", 1.0), ("closing", 0.0))
    }
    storage = await open_storage_from_url(
        url, tmp_path / "blobs", shards, password_hasher=TEST_HASHER
    )
    try:
        await storage.directory.add_domain("example.org")
        for i in range(6):
            account = await storage.directory.add_account(
                f"u{i}@example.org", "pw", shard="default"
            )
            await deliver(storage, account, "INBOX", subject=f"for u{i}")
        moved = await mv.drain_shard(storage, "default")
        assert len(moved) == 6
        placed = Counter(a.shard for a in await storage.directory.list_accounts())
        assert placed == {"east": 4, "west": 2}
        # Named explicitly, a shard of weight 0 is a target after all.
        assert len(await mv.drain_shard(storage, "west", to=["closing"])) == 2
    finally:
        await storage.close()

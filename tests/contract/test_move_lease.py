"""Two movers of one account (``storage/move.py``'s lease): running the
command again while the first still runs (it looked stuck) must not
interleave two movers; the second stands aside."""

from __future__ import annotations

import asyncio
import random

import pytest

from storage import move as mv
from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from tests.contract.test_move import TARGET, _assert_moved, _populate, _snapshot
from tests.contract.test_move import sharded as sharded  # the fixture, by name


async def test_a_second_mover_of_the_same_account_stands_aside(
    sharded: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running the command again while the first still runs (it looked
    stuck) must not interleave two movers: the second gives up, IN_USE."""
    bob = await _populate(sharded, random.Random())
    before = await _snapshot(sharded, bob)
    monkeypatch.setattr(mv, "LEASE_SECONDS", 0.6)
    started = asyncio.Event()
    real_round = mv.AccountMove.sync_round

    async def slow_round(self: mv.AccountMove) -> int:
        started.set()
        await asyncio.sleep(3 * mv.LEASE_SECONDS)  # renewed meanwhile
        return await real_round(self)

    monkeypatch.setattr(mv.AccountMove, "sync_round", slow_round)
    first = asyncio.create_task(mv.move_account(sharded, bob.address, TARGET))
    await started.wait()
    with pytest.raises(StorageError) as info:
        await mv.move_account(sharded, bob.address, TARGET)
    assert info.value.kind is ErrorKind.IN_USE
    await first
    monkeypatch.undo()
    await _assert_moved(sharded, bob, before)

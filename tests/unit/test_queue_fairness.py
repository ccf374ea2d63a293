"""PartitionedQueue over scripted partitions: fair shares, and a partition
that fails is logged once, skipped, and asked again at the next poll."""

from __future__ import annotations

import logging
import random

import pytest

from storage.errors import ErrorKind, StorageError
from storage.queue import PartitionedQueue, fair_shares


class ScriptedPartition:
    """Leases ``due`` numbers; raises TEMPORARY while ``down``."""

    def __init__(self, name: str, due: int) -> None:
        self.name = name
        self.due = list(range(1, due + 1))
        self.down = False
        self.listeners: list = []
        self.asked = 0

    async def enqueue(self, sender, recipients, blob_key, *, expires_in=None, now=None):
        if self.down:
            raise StorageError(ErrorKind.TEMPORARY, "storage temporarily unavailable")
        self.due.append(len(self.due) + 1)
        return (self.name, len(self.due))

    async def lease_due(self, owner, limit, lease_seconds, *, now=None):
        self.asked += 1
        if self.down:
            raise StorageError(ErrorKind.TEMPORARY, "storage temporarily unavailable")
        taken, self.due = self.due[:limit], self.due[limit:]
        return [(self.name, n) for n in taken]


@pytest.mark.parametrize("total", [0, 1, 2, 7, 10, 99])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_fair_shares_split_evenly(total: int, parts: int) -> None:
    shares = fair_shares(total, parts)
    assert sum(shares) == total and len(shares) == parts
    assert max(shares) - min(shares) <= 1


async def test_a_failing_partition_is_logged_once_and_asked_again(caplog) -> None:
    a, b = ScriptedPartition("a", random.randint(30, 40)), ScriptedPartition("b", 5)
    queue = PartitionedQueue({"a": a, "b": b})  # type: ignore[dict-item]
    b.down = True
    caplog.set_level(logging.WARNING, logger="storage.queue")
    polls = random.randint(3, 6)
    for _ in range(polls):
        leased = await queue.lease_due("w", 4, 60)
        assert len(leased) == 4 and {p for p, _n in leased} == {"a"}
    assert b.asked >= polls  # asked at every poll, not given up on
    messages = [r.getMessage() for r in caplog.records]
    assert sum("partition b unavailable" in m for m in messages) == 1
    b.down = False
    leased = await queue.lease_due("w", 4, 60)
    assert sum(p == "b" for p, _n in leased) == 2  # its fair half again
    messages = [r.getMessage() for r in caplog.records]
    assert sum("partition b available again" in m for m in messages) == 1


async def test_every_partition_down_leases_nothing_and_raises_nothing() -> None:
    parts = {n: ScriptedPartition(n, 3) for n in ("a", "b", "c")}
    for p in parts.values():
        p.down = True
    queue = PartitionedQueue(parts)  # type: ignore[arg-type]
    assert await queue.lease_due("w", 5, 60) == []


async def test_enqueues_alternate_even_when_workers_poll_in_between() -> None:
    """Each enqueue wakes the workers, who lease at once: the enqueues must
    still take the partitions in turn."""
    parts = {n: ScriptedPartition(n, 0) for n in ("a", "b")}
    queue = PartitionedQueue(parts)  # type: ignore[arg-type]
    count = random.randint(6, 15)
    placed = []
    for _ in range(count):
        placed.append((await queue.enqueue("s@x.test", ["r@y.test"], "key"))[0])
        await queue.lease_due("w", 1, 60)
    assert sorted([placed.count("a"), placed.count("b")]) == [count // 2, count - count // 2]


async def test_a_shard_of_weight_zero_takes_new_entries_only_when_no_other_can() -> None:
    """Weight 0 retires a shard (no new accounts): its partition must empty,
    so new mail goes elsewhere while any other partition is up."""
    parts = {n: ScriptedPartition(n, 0) for n in ("a", "b", "c")}
    queue = PartitionedQueue(parts, closed={"b"})  # type: ignore[arg-type]
    count = random.randint(5, 12)
    placed = [(await queue.enqueue("s@x.test", ["r@y.test"], "k"))[0] for _ in range(count)]
    assert "b" not in placed and {"a", "c"} <= set(placed)
    parts["a"].down = parts["c"].down = True
    assert (await queue.enqueue("s@x.test", ["r@y.test"], "k"))[0] == "b"
    # Its entries are still leased: the partition drains.
    parts["a"].down = parts["c"].down = False
    assert ("b", 1) in await queue.lease_due("w", 30, 60)

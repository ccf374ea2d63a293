"""OutboundQueue.hold_sender (delivery/limits.py's first trip), on every
backend: one call holds a sender's queued entries, any case, with the
reason, and nothing else."""

from __future__ import annotations

import random

from storage.backend import SqlStorage

NOW = 1_800_000_000.0


async def test_hold_sender_holds_only_that_senders_queued_entries(storage: SqlStorage) -> None:
    q = storage.queue
    key = await storage.blobs.put(b"Subject: held\r\n\r\nbody\r\n")

    async def entry(sender: str) -> int:
        return await q.enqueue(sender, [f"r{random.randint(0, 99)}@remote.test"], key, now=NOW)

    mine = [await entry(random.choice(["alice@example.net", "Alice@Example.NET"]))
            for _ in range(random.randint(2, 6))]
    bobs = [await entry("bob@example.net") for _ in range(random.randint(1, 3))]
    already = await q.enqueue("alice@example.net", ["x@remote.test"], key, now=NOW,
                              held_for="held by hand")
    failed = await entry("alice@example.net")
    await q.move_to_errors(failed, "invalid address: bad")
    reason = f"sending limit: alice@example.net: over user_messages_per_hour = {len(mine)}"

    assert await q.hold_sender("ALICE@example.net", reason) == len(mine)
    for qid in mine:
        got = await q.get(qid)
        assert got.held and got.error == reason and got.status == "queued"
    assert not any([(await q.get(qid)).held for qid in bobs])
    assert (await q.get(already)).error == "held by hand"
    assert not (await q.get(failed)).held
    # No worker leases a held entry; Bob's go out.
    leased = await q.lease_due("w", 100, 60, now=NOW + 1)
    assert sorted(m.id for m in leased) == sorted(bobs)
    assert await q.hold_sender("alice@example.net", reason) == 0

"""OutboundQueue.hold_sender, flag, is_flagged and release_account
(delivery/limits.py's first trip and ``mailctl queue release --account``),
on every backend: one call holds a sender's queued entries, any case, with
the reason, and nothing else; the flag is kept beside them."""

from __future__ import annotations

import random

from sqlalchemy import select

from storage.backend import SqlStorage
from storage.sql.schema import queue_held_senders

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


async def _flags(storage: SqlStorage) -> list[tuple[str, str, float]]:
    """The rows of the default partition's ``queue_held_senders``."""
    async with storage.queue.partitions["default"].db.read() as conn:
        rows = await conn.execute(select(queue_held_senders))
        return [(r.address, r.reason, r.since) for r in rows]


def _reason(account: str, why: str) -> str:
    return f"sending limit: {account}: {why}"


async def test_flag_holds_and_release_account_clears_in_one_go(storage: SqlStorage) -> None:
    """The sending-limit flag beside the queue: flagging holds the account's
    queued entries; it is seen in any case; a second flag keeps the first
    reason; ``release_account`` releases only that account's limit holds
    (a LIKE wildcard in the address matches nothing else) and clears it."""
    q = storage.queue
    key = await storage.blobs.put(random.randbytes(random.randint(10, 3000)))
    odd = "a_l%ce@example.net"  # "_" and "%" are LIKE wildcards
    look_alike = "axlyyce@example.net"

    async def entry(sender: str, held_for: str | None = None) -> int:
        rcpt = f"r{random.randint(0, 99)}@remote.test"
        return await q.enqueue(sender, [rcpt], key, now=NOW, held_for=held_for)

    mine = [await entry(random.choice([odd, odd.upper()])) for _ in range(random.randint(2, 6))]
    by_hand = await entry(odd, held_for="held by hand")
    theirs = await entry(look_alike, held_for=_reason(look_alike, "over user_messages_per_day"))
    bob = await entry("bob@example.net")
    assert not await q.is_flagged(odd)

    first = _reason(odd, "over user_messages_per_hour = 3")
    assert await q.flag(odd.upper(), first, now=NOW) == len(mine)
    assert await q.is_flagged(odd) and await q.is_flagged(odd.upper())
    assert not await q.is_flagged(look_alike) and not await q.is_flagged("bob@example.net")
    for qid in mine:
        got = await q.get(qid)
        assert got.held and got.error == first
    assert not (await q.get(bob)).held
    # Flagged again (another instance tripping too): nothing more to hold, the flag stays.
    later = await entry(odd, held_for=_reason(odd, "account held after going over a limit"))
    assert await q.flag(odd, _reason(odd, "over user_recipients_per_day = 9")) == 0
    assert await _flags(storage) == [(odd, first, NOW)]
    # No worker leases what the flag holds; Bob's goes out.
    assert [m.id for m in await q.lease_due("w", 100, 60, now=NOW + 1)] == [bob]

    answers = await q.release_account(odd, _reason(odd, ""))
    assert answers == {"default": (len(mine) + 1, True)}
    assert not await q.is_flagged(odd)
    for qid in [*mine, later]:
        got = await q.get(qid)
        assert not got.held and got.error is None and got.status == "queued"
    assert (await q.get(by_hand)).held and (await q.get(theirs)).held
    leased = await q.lease_due("w2", 100, 60, now=NOW + 2)
    assert {m.id for m in leased} == {*mine, later}
    assert await q.release_account(odd, _reason(odd, "")) == {"default": (0, False)}
    assert await _flags(storage) == []

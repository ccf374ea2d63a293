"""OutboundQueue contract: enqueue is durable on return, list shows it."""

from __future__ import annotations

import datetime as dt

import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.errors import ErrorKind, StorageError


async def test_enqueue_and_list(storage: SqlStorage, database_url: str, tmp_path) -> None:
    key = await storage.blobs.put(b"Subject: hi\r\n\r\nbody\r\n")
    before = dt.datetime.now(dt.UTC)
    qid = await storage.queue.enqueue(
        "bob@example.org", ["a@remote.test", "b@remote.test", "a@remote.test"], key
    )
    qid2 = await storage.queue.enqueue("", ["postmaster@remote.test"], key)
    assert qid2 > qid
    # A second process sees it: the row is committed.
    other = await open_storage_from_url(database_url, tmp_path / "blobs")
    try:
        items = await other.queue.list()
    finally:
        await other.close()
    assert [m.id for m in items] == [qid, qid2]
    first = items[0]
    assert first.sender == "bob@example.org" and first.blob_key == key
    assert [r.address for r in first.recipients] == ["a@remote.test", "b@remote.test"]
    assert all(r.status == "pending" for r in first.recipients)
    assert first.attempts == 0 and first.lease_owner is None
    assert first.next_attempt >= before - dt.timedelta(seconds=1)
    assert first.expires - first.created == dt.timedelta(days=5)
    assert items[1].sender == ""
    with pytest.raises(StorageError) as err:
        await storage.queue.enqueue("bob@example.org", [], key)
    assert err.value.kind is ErrorKind.INVALID


async def test_dsn_parameters_kept_per_entry_and_recipient(
    storage: SqlStorage, database_url: str, tmp_path
) -> None:
    """RFC 3461's RET and ENVID with the entry, NOTIFY and ORCPT with each
    recipient, as given (xtext undecoded), at their longest (ENVID 100,
    ORCPT 500 characters); what was not given reads back as None."""
    from storage.sql.queue import DsnEnvelope, DsnRecipient

    key = await storage.blobs.put(b"Subject: dsn\r\n\r\nbody\r\n")
    envelope = DsnEnvelope("HDRS", "Q" * 97 + "+2B")
    per_rcpt = {
        "a@remote.test": DsnRecipient("SUCCESS,FAILURE,DELAY", "rfc822;" + "x" * 493),
        "b@remote.test": DsnRecipient("NEVER", None),
    }
    rcpts = [*per_rcpt, "c@remote.test"]
    qid = await storage.queue.enqueue(
        "bob@example.org", rcpts, key, dsn=envelope, recipient_dsn=per_rcpt
    )
    plain = await storage.queue.enqueue("bob@example.org", ["d@remote.test"], key)
    other = await open_storage_from_url(database_url, tmp_path / "blobs")
    try:
        entry, without = await other.queue.get(qid), await other.queue.get(plain)
    finally:
        await other.close()
    assert entry.dsn == envelope
    assert {r.address: r.dsn for r in entry.recipients} == {
        **per_rcpt,
        "c@remote.test": DsnRecipient(None, None),
    }
    assert without.dsn == DsnEnvelope() and without.recipients[0].dsn == DsnRecipient()


@pytest.mark.parametrize("flags", [(True, False), (False, True), (True, True)])
async def test_envelope_flags_kept_per_entry(
    storage: SqlStorage, database_url: str, tmp_path, flags: tuple[bool, bool]
) -> None:
    """REQUIRETLS (RFC 8689 section 4.1) and the TLS-RPT report flag (RFC
    8460 section 3) read back from another connection as they were queued."""
    from storage.sql.queue import DsnEnvelope

    key = await storage.blobs.put(b"Subject: flags\r\n\r\nbody\r\n")
    envelope = DsnEnvelope(require_tls=flags[0], tls_report=flags[1])
    qid = await storage.queue.enqueue("bob@example.org", ["a@remote.test"], key, dsn=envelope)
    other = await open_storage_from_url(database_url, tmp_path / "blobs")
    try:
        assert (await other.queue.get(qid)).dsn == envelope
    finally:
        await other.close()


# --- leasing, outcomes, admin operations (the workers' side) ----------------

NOW = 1_800_000_000.0


async def _entry(storage: SqlStorage, rcpts=("a@remote.test", "b@remote.test"), now=NOW) -> int:
    key = await storage.blobs.put(b"Subject: lease\r\n\r\nbody\r\n")
    return await storage.queue.enqueue("bob@example.org", list(rcpts), key, now=now)


async def test_lease_is_exclusive_until_it_expires(storage: SqlStorage) -> None:
    qid = await _entry(storage)
    q = storage.queue
    [leased] = await q.lease_due("w1", 10, 60, now=NOW)
    assert leased.id == qid and leased.lease_owner == "w1" and leased.attempts == 1
    assert await q.lease_due("w2", 10, 60, now=NOW + 1) == []
    # The holder crashed: after the lease expires another worker takes it.
    [again] = await q.lease_due("w2", 10, 60, now=NOW + 61)
    assert again.lease_owner == "w2" and again.attempts == 2


async def test_concurrent_leasing_hands_each_entry_to_one_owner(
    storage: SqlStorage, database_url: str, tmp_path
) -> None:
    import asyncio

    ids = {await _entry(storage, (f"r{i}@remote.test",)) for i in range(12)}
    other = await open_storage_from_url(database_url, tmp_path / "blobs")
    try:
        got = await asyncio.gather(
            *(
                (storage if i % 2 else other).queue.lease_due(f"w{i}", 3, 60, now=NOW)
                for i in range(8)
            )
        )
    finally:
        await other.close()
    leased = [m.id for batch in got for m in batch]
    assert sorted(leased) == sorted(ids)  # each exactly once


async def test_records_leases_and_enqueues_sharing_one_commit(storage: SqlStorage) -> None:
    """The relay's calls commit in groups (``Database.write_batched``):
    records of many entries, a lease and new entries issued at once each
    land as if alone. A record whose lease another owner took over still
    completes the entry (a delivery that happened is a fact)."""
    import asyncio
    import random

    from storage.sql.queue import Outcome

    q = storage.queue
    rng = random.Random()
    ids = [
        await _entry(storage, [f"r{i}-{j}@remote.test" for j in range(rng.randint(1, 4))])
        for i in range(12)
    ]
    # w1's lease of the first entry runs out and w2 takes it; w1 then
    # records it. The others stay w1's throughout (600 s).
    [first_leased] = await q.lease_due("w1", 1, 60, now=NOW)
    leased = {m.id: m for m in await q.lease_due("w1", 11, 600, now=NOW)}
    leased[first_leased.id] = first_leased
    assert sorted(leased) == sorted(ids)
    stale = first_leased.id
    [taken] = await q.lease_due("w2", 1, 600, now=NOW + 61)
    assert taken.id == stale
    plan = {
        qid: {r.address: rng.choice(["delivered", "deferred", "failed"]) for r in m.recipients}
        for qid, m in leased.items()
    }
    plan[stale] = dict.fromkeys(plan[stale], "delivered")
    key = await storage.blobs.put(rng.randbytes(rng.randint(100, 5000)))
    results = await asyncio.gather(
        *(
            q.record_attempt(
                qid,
                "w1",
                {a: Outcome(s, f"{s} reply") for a, s in outcomes.items()},
                NOW + 600,
                now=NOW + 62,
            )
            for qid, outcomes in plan.items()
        ),
        *(q.enqueue("s@example.org", [f"n{i}@remote.test"], key, now=NOW + 62) for i in range(5)),
        q.lease_due("w3", 20, 60, now=NOW + 62),
    )
    new_ids = results[len(plan) : len(plan) + 5]
    assert len(set(new_ids)) == 5 and not set(new_ids) & set(ids)
    for qid, outcomes in plan.items():
        entry = await q.get(qid)
        assert {r.address: r.status for r in entry.recipients} == outcomes
        left = "deferred" in outcomes.values()
        assert entry.status == ("queued" if left else "done"), qid
        if left:
            assert entry.next_attempt.timestamp() == NOW + 600 and entry.lease_owner is None
    # The new entries are due; none was leased twice (w3 may have some).
    first = [m.id for m in results[-1]]
    rest = [m.id for m in await q.lease_due("w4", 20, 60, now=NOW + 63)]
    assert sorted(first + rest) == sorted(new_ids)


async def test_record_attempt_retries_only_deferred(storage: SqlStorage) -> None:
    from storage.sql.queue import Outcome

    qid = await _entry(storage, ("a@remote.test", "b@remote.test", "c@remote.test"))
    q = storage.queue
    await q.lease_due("w1", 1, 60, now=NOW)
    after = await q.record_attempt(
        qid,
        "w1",
        {
            "a@remote.test": Outcome("delivered", "250 ok"),
            "b@remote.test": Outcome("deferred", "451 4.3.0 try later"),
            "c@remote.test": Outcome("failed", "550 5.1.1 no such user"),
        },
        NOW + 300,
        now=NOW,
    )
    assert after.status == "queued" and after.lease_owner is None
    assert after.next_attempt.timestamp() == NOW + 300
    assert {r.address: r.status for r in after.recipients} == {
        "a@remote.test": "delivered",
        "b@remote.test": "deferred",
        "c@remote.test": "failed",
    }
    assert [r.address for r in after.retryable] == ["b@remote.test"]
    assert await q.lease_due("w1", 1, 60, now=NOW + 299) == []
    [again] = await q.lease_due("w1", 1, 60, now=NOW + 300)
    done = await q.record_attempt(
        again.id, "w1", {"b@remote.test": Outcome("delivered", "250 ok")}, None, now=NOW + 300
    )
    assert done.status == "done"
    assert [m.id for m in await q.list(include_done=False)] == []
    assert await q.lease_due("w1", 1, 60, now=NOW + 10_000) == []


async def test_hold_release_retry_delete(storage: SqlStorage) -> None:
    qid = await _entry(storage)
    q = storage.queue
    await q.hold(qid)
    assert (await q.get(qid)).held
    assert await q.lease_due("w", 5, 60, now=NOW + 1) == []
    await q.release_hold(qid)
    [_leased] = await q.lease_due("w", 5, 60, now=NOW + 1)
    from storage.sql.queue import Outcome

    await q.record_attempt(
        qid, "w", {"a@remote.test": Outcome("deferred", "421 busy")}, NOW + 9999, now=NOW + 1
    )
    await q.retry_now(qid, now=NOW + 2)
    assert [m.id for m in await q.lease_due("w", 5, 60, now=NOW + 2)] == [qid]
    await q.delete(qid)
    with pytest.raises(StorageError) as err:
        await q.get(qid)
    assert err.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(StorageError):
        await q.hold(qid)


async def test_error_queue_keeps_entry_with_reason(storage: SqlStorage) -> None:
    qid = await _entry(storage)
    q = storage.queue
    await q.lease_due("w", 5, 60, now=NOW)
    await q.move_to_errors(qid, "invalid address: bad")
    entry = await q.get(qid)
    assert entry.status == "error" and entry.error == "invalid address: bad"
    assert [m.id for m in await q.list(include_done=False)] == [qid]
    assert await q.lease_due("w", 5, 60, now=NOW + 10_000) == []
    assert await q.retry_now(qid, now=NOW + 1) == 1
    assert (await q.get(qid)).status == "queued"


async def test_suppression_after_repeated_hard_bounces(storage: SqlStorage) -> None:
    from storage.sql.queue import Outcome

    qid = await _entry(storage, ("gone@remote.test",))
    q = storage.queue
    await q.lease_due("w", 1, 60, now=NOW)
    await q.record_attempt(
        qid, "w", {"gone@remote.test": Outcome("delivered", "250 ok")}, None, now=NOW
    )
    first = await q.record_bounce("Gone@remote.test", True, "5.1.1", "550", suppress_after=2)
    assert not first.suppressed and first.hard_bounces == 1
    assert (await q.get(qid)).recipients[0].feedback == "hard"
    await q.record_bounce("gone@remote.test", False, "4.2.2", "452 full", suppress_after=2)
    assert await q.suppressed(["gone@remote.test"]) == set()
    second = await q.record_bounce("gone@remote.test", True, "5.1.1", "550", suppress_after=2)
    assert second.suppressed and second.soft_bounces == 1
    assert await q.suppressed(["GONE@remote.test", "x@remote.test"]) == {"gone@remote.test"}
    assert [s.address for s in await q.list_suppressions()] == ["gone@remote.test"]
    await q.unsuppress("gone@remote.test")
    assert await q.suppressed(["gone@remote.test"]) == set()


async def test_purge_done_keeps_recent_and_unfinished(storage: SqlStorage) -> None:
    from storage.sql.queue import Outcome

    old = await _entry(storage, ("a@remote.test",))
    waiting = await _entry(storage, ("b@remote.test",))
    q = storage.queue
    await q.lease_due("w", 5, 60, now=NOW)
    await q.record_attempt(old, "w", {"a@remote.test": Outcome("delivered", "250")}, None, now=NOW)
    assert await q.purge_done(3600, now=NOW + 10) == 0
    assert await q.purge_done(3600, now=NOW + 7200) == 1
    assert [m.id for m in await q.list()] == [waiting]

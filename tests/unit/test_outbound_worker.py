"""The queue runner over real storage, scripted peers and a fake clock:
retry schedule, bounces, expiry, suppression, DKIM signing, error queue."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path

import dkim
import pytest

from mtad.dns import MxRecord
from mtad.outbound.signing import generate_key
from mtad.outbound.worker import QueueRunner, retry_delay
from tests.conftest import make_settings
from tests.integration.outbound.sink import SinkServer, dead_host
from tests.ports import free_port
from tests.unit.test_outbound_mx import FakeResolver

SENDER = "alice@example.net"
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def port() -> int:
    return free_port(("127.0.0.1", "127.0.0.2"))


@pytest.fixture
async def world(tmp_path: Path, port: int):
    from argon2 import PasswordHasher
    from argon2.profiles import CHEAPEST

    from storage import open_storage_from_url

    settings = make_settings(
        tmp_path / "data",
        queue={
            "workers": 4,
            "smtp_port": port,
            "retry_schedule_seconds": [60, 120],
            "max_lifetime_seconds": 3600,
            "delay_warning_seconds": 0,
            "connect_timeout_seconds": 2,
            "command_timeout_seconds": 5,
            "dkim_key_dir": str(tmp_path / "dkim"),
        },
    )
    storage = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        tmp_path / "blobs",
        password_hasher=PasswordHasher.from_parameters(CHEAPEST),
    )
    await storage.directory.add_domain("example.net")
    await storage.directory.add_account(SENDER, "pw")
    resolver = FakeResolver(
        mx={"d.test": [MxRecord(10, "mx.d.test")], "null.test": [MxRecord(0, "")]},
        a={"mx.d.test": ["127.0.0.2"]},
    )
    clock = Clock()
    runner = QueueRunner(settings, storage, resolver, owner="test", clock=clock)
    try:
        yield settings, storage, runner, clock
    finally:
        await runner.close()
        await storage.close()


def message(subject: str = "Hello") -> bytes:
    return (
        f"From: {SENDER}\r\nTo: x@d.test\r\nSubject: {subject}\r\n"
        "Message-ID: <m1@example.net>\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\nHi.\r\n"
    ).encode()


async def enqueue(storage, rcpts, sender=SENDER, now=T0, subject="Hello") -> int:
    import datetime as dt

    key = await storage.blobs.put(message(subject))
    return await storage.queue.enqueue(
        sender, rcpts, key, now=now, expires_in=dt.timedelta(hours=1)
    )


async def inbox(storage, address=SENDER) -> list[bytes]:
    from tests.protocol.smtp.support import mailbox_messages

    return await mailbox_messages(storage, address)


def test_retry_schedule_last_step_repeats() -> None:
    assert [retry_delay([60, 120], n) for n in (1, 2, 3, 9)] == [60, 120, 120, 120]


async def test_temporary_failure_retried_per_schedule(world, port) -> None:
    _settings, storage, runner, clock = world
    async with SinkServer("127.0.0.2", port, data_replies=["451 4.3.0 later"]) as sink:
        qid = await enqueue(storage, ["x@d.test"])
        await runner.drain()
        entry = await storage.queue.get(qid)
        assert entry.recipients[0].status == "deferred"
        assert entry.next_attempt.timestamp() == T0 + 60
        clock.now = T0 + 59
        assert await runner.run_once() == 0  # not due yet
        clock.now = T0 + 60
        await runner.drain()
    entry = await storage.queue.get(qid)
    assert entry.status == "done" and entry.attempts == 2
    assert entry.recipients[0].status == "delivered"
    assert len(sink.received) == 1 and sink.transactions == 2


async def test_only_deferred_recipients_are_retried(world, port) -> None:
    _settings, storage, runner, clock = world
    replies = iter(["450 4.2.1 busy", "250 ok"])

    def rcpt(address: str) -> str:
        return next(replies) if address == "busy@d.test" else "250 ok"

    async with SinkServer("127.0.0.2", port, rcpt_reply=rcpt) as sink:
        await enqueue(storage, ["ok@d.test", "busy@d.test"])
        await runner.drain()
        clock.now = T0 + 60
        await runner.drain()
    assert [r.rcpt_to for r in sink.received] == [["ok@d.test"], ["busy@d.test"]]


async def test_permanent_failure_bounces_to_local_sender(world, port) -> None:
    _settings, storage, runner, _clock = world
    async with SinkServer("127.0.0.2", port, rcpt_reply=lambda a: "550 5.1.1 no such user"):
        qid = await enqueue(storage, ["gone@d.test"], subject="Doomed")
        await runner.drain()
    assert (await storage.queue.get(qid)).status == "done"
    [bounce] = await inbox(storage)
    assert bounce.startswith(b"Return-Path: <>\r\n")
    msg = email.message_from_bytes(bounce, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    status = msg.get_payload()[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; gone@d.test"
    assert status["Action"] == "failed" and status["Status"] == "5.1.1"
    assert "550 5.1.1 no such user" in status["Diagnostic-Code"]
    assert b"Subject: Doomed" in msg.get_payload()[2].get_payload(decode=True)
    # The remote 5.1.1 counts as a hard bounce.
    [s] = await storage.queue.list_suppressions()
    assert s.address == "gone@d.test" and s.hard_bounces == 1


async def test_null_mx_fails_at_once_and_null_sender_never_bounces(world) -> None:
    _settings, storage, runner, _clock = world
    qid = await enqueue(storage, ["x@null.test"], sender="")
    await runner.drain()
    entry = await storage.queue.get(qid)
    assert entry.status == "done" and entry.attempts == 1
    assert "5.1.10" in entry.recipients[0].last_reply
    assert await inbox(storage) == []
    assert [m.id for m in await storage.queue.list()] == [qid]  # no bounce queued


async def test_expiry_bounces_deferred_recipients(world, port) -> None:
    _settings, storage, runner, clock = world
    dead = dead_host("127.0.0.2", port)  # nothing listens: deferred
    qid = await enqueue(storage, ["x@d.test"])
    await runner.drain()
    clock.now = T0 + 60
    await runner.drain()
    assert (await storage.queue.get(qid)).next_attempt.timestamp() == T0 + 180
    clock.now = T0 + 3600
    await runner.drain()
    dead.close()
    entry = await storage.queue.get(qid)
    assert entry.status == "done" and entry.recipients[0].status == "failed"
    [bounce] = await inbox(storage)
    assert b"Status: 4.4.7" in bounce and b"Action: failed" in bounce


async def test_delay_warning_sent_once(world, port) -> None:
    settings, storage, runner, clock = world
    settings.queue.delay_warning_seconds = 100
    await enqueue(storage, ["x@d.test"])
    with dead_host("127.0.0.2", port):
        for step in (0, 60, 180, 300):
            clock.now = T0 + step
            await runner.drain()
    [warning] = await inbox(storage)
    assert b"Subject: Delayed Mail" in warning and b"Action: delayed" in warning


async def test_suppressed_recipient_fails_without_attempt(world, port) -> None:
    _settings, storage, runner, _clock = world
    for _ in range(2):
        await storage.queue.record_bounce("gone@d.test", True, "5.1.1", "550", suppress_after=2)
    async with SinkServer("127.0.0.2", port) as sink:
        qid = await enqueue(storage, ["gone@d.test"])
        await runner.drain()
    assert sink.connections == 0
    assert (await storage.queue.get(qid)).recipients[0].status == "failed"
    assert len(await inbox(storage)) == 1


async def test_invalid_entry_goes_to_error_queue(world) -> None:
    _settings, storage, runner, _clock = world
    qid = await enqueue(storage, ["not an address"])
    await runner.drain()
    entry = await storage.queue.get(qid)
    assert entry.status == "error" and "invalid address" in entry.error


async def test_dkim_signature_verifies(world, port, tmp_path) -> None:
    settings, storage, runner, _clock = world
    _path, record = generate_key(settings.queue.dkim_key_dir, "example.net", "shardmail", 1024)
    async with SinkServer("127.0.0.2", port) as sink:
        await enqueue(storage, ["x@d.test"])
        await runner.drain()
    data = sink.received[0].data
    assert data.startswith(b"DKIM-Signature:")
    assert b"d=example.net" in data and b"s=shardmail" in data

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"shardmail._domainkey.example.net."
        return record.encode()

    assert dkim.verify(data, dnsfunc=dnsfunc)


async def test_per_domain_concurrency_is_bounded(world, port) -> None:
    settings, storage, runner, _clock = world
    settings.queue.per_domain_concurrency = 2
    async with SinkServer("127.0.0.2", port, data_delay=0.2) as sink:
        for i in range(6):
            await enqueue(storage, [f"r{i}@d.test"])
        await runner.drain()
    assert len(sink.received) == 6
    assert sink.max_active == 2  # 4 workers, but at most 2 sessions to d.test


async def test_lease_is_renewed_during_a_slow_delivery(world, port) -> None:
    settings, storage, runner, clock = world
    settings.queue.lease_seconds = 1  # renewed every third of a second
    async with SinkServer("127.0.0.2", port, data_delay=2.0) as sink:
        qid = await enqueue(storage, ["slow@d.test"])
        await runner.run_once()
        for _ in range(15):  # 1.5 s of (fake and real) time: past the first lease
            await asyncio.sleep(0.1)
            clock.now += 0.1
        assert await storage.queue.lease_due("other", 5, 60, now=clock.now) == []
        await runner.drain()
    assert len(sink.received) == 1
    assert (await storage.queue.get(qid)).status == "done"


async def test_incoming_dsn_feeds_the_suppression_list(world) -> None:
    from mtad.outbound.dsn import RecipientStatus, build_dsn
    from mtad.outbound.feedback import process_incoming_dsn

    _settings, storage, _runner, _clock = world
    import datetime as dt

    def dsn(status: str) -> bytes:
        return build_dsn(
            reporting_mta="mx.d.test",
            to=SENDER,
            original=message(),
            arrival=dt.datetime.now(dt.UTC),
            recipients=[RecipientStatus("gone@d.test", "failed", status, f"550 {status} gone")],
        )

    assert await process_incoming_dsn(storage, message()) == []  # not a DSN
    [soft] = await process_incoming_dsn(storage, dsn("4.2.2"), suppress_after=2)
    assert soft.soft_bounces == 1 and not soft.suppressed
    await process_incoming_dsn(storage, dsn("5.1.1"), suppress_after=2)
    [hard] = await process_incoming_dsn(storage, dsn("5.1.1"), suppress_after=2)
    assert hard.hard_bounces == 2 and hard.suppressed
    assert await storage.queue.suppressed(["gone@d.test"]) == {"gone@d.test"}


async def test_per_domain_concurrency_holds_across_queue_partitions(
    world, port, tmp_path: Path
) -> None:
    """One runner leases from every shard's partition; its per-domain bound
    counts the sessions of all of them together."""
    from storage import open_storage_from_url

    settings, _storage, _runner, clock = world
    settings.queue.per_domain_concurrency = 2
    sharded = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        tmp_path / "blobs",
        {"b": f"sqlite+aiosqlite:///{tmp_path / 'shard-b.sqlite'}"},
    )
    resolver = FakeResolver(
        mx={"d.test": [MxRecord(10, "mx.d.test")]}, a={"mx.d.test": ["127.0.0.2"]}
    )
    runner = QueueRunner(settings, sharded, resolver, owner="sharded", clock=clock)
    try:
        key = await sharded.blobs.put(message())
        for name in ("default", "b"):
            for i in range(3):
                await sharded.queue.partitions[name].enqueue(
                    SENDER, [f"{name}{i}@d.test"], key, now=T0
                )
        async with SinkServer("127.0.0.2", port, data_delay=0.2) as sink:
            await runner.drain()
    finally:
        await runner.close()
        await sharded.close()
    assert sorted(r.rcpt_to[0] for r in sink.received) == sorted(
        f"{n}{i}@d.test" for n in ("default", "b") for i in range(3)
    )
    assert sink.max_active == 2  # 4 workers over 2 partitions, at most 2 sessions to d.test

"""RFC 3461 in the queue runner, over real storage and scripted peers:
which notices go out (NOTIFY), what they carry (ENVID, ORCPT, RET), and
the parameters passed on to a next hop that offers DSN."""

from __future__ import annotations

import datetime as dt
import email
import email.policy

from mtad.outbound.dsn import parse_dsn
from storage.sql.queue import DsnEnvelope, DsnRecipient
from tests.integration.outbound.sink import SinkServer, dead_host
from tests.unit import test_outbound_worker as runner_tests
from tests.unit.test_outbound_worker import SENDER, T0, inbox, message

# The queue runner's world (real storage, fake clock) and its peer's port.
world = runner_tests.world
port = runner_tests.port

SINK_EXTENSIONS = ["PIPELINING", "SIZE 10000000", "8BITMIME"]


async def enqueue(storage, rcpts: dict[str, DsnRecipient], envelope: DsnEnvelope) -> object:
    key = await storage.blobs.put(message("dsn test"))
    return await storage.queue.enqueue(
        SENDER,
        list(rcpts),
        key,
        now=T0,
        expires_in=dt.timedelta(hours=1),
        dsn=envelope,
        recipient_dsn=rcpts,
    )


def refuse(bad: set[str]):
    return lambda address: "550 5.1.1 no such user" if address in bad else "250 2.1.5 ok"


async def test_failure_bounce_carries_envid_and_orcpt_headers_only(world, port) -> None:
    _settings, storage, runner, _clock = world
    rcpts = {
        "gone@d.test": DsnRecipient("SUCCESS,FAILURE", "rfc822;a+2Bb@orig.example"),
        "never@d.test": DsnRecipient("NEVER", None),
        "success-only@d.test": DsnRecipient("SUCCESS", None),
        "plain@d.test": DsnRecipient(),
    }
    async with SinkServer("127.0.0.2", port, rcpt_reply=refuse(set(rcpts))):
        await enqueue(storage, rcpts, DsnEnvelope("HDRS", "x+3Dy"))
        await runner.drain()
    [bounce] = await inbox(storage)
    report = parse_dsn(bounce)
    assert report is not None and report.envelope_id == "x=y"
    by_rcpt = {r.final_recipient: r for r in report.recipients}
    # NEVER, and a NOTIFY without FAILURE, are named in no failure notice.
    assert set(by_rcpt) == {"gone@d.test", "plain@d.test"}
    assert by_rcpt["gone@d.test"].original_recipient == "rfc822;a+b@orig.example"
    assert by_rcpt["plain@d.test"].original_recipient is None
    assert by_rcpt["gone@d.test"].action == "failed"
    assert b"text/rfc822-headers" in bounce and b"Subject: dsn test" in bounce
    assert b"Hi." not in bounce.split(b"Content-Type: message/delivery-status")[1]


async def test_ret_full_returns_the_whole_message(world, port) -> None:
    _settings, storage, runner, _clock = world
    rcpts = {"gone@d.test": DsnRecipient("FAILURE", None)}
    async with SinkServer("127.0.0.2", port, rcpt_reply=refuse(set(rcpts))):
        await enqueue(storage, rcpts, DsnEnvelope("FULL", None))
        await runner.drain()
    [bounce] = await inbox(storage)
    parsed = email.message_from_bytes(bounce, policy=email.policy.default)
    [returned] = [p for p in parsed.walk() if p.get_content_type() == "message/rfc822"]
    assert returned.get_payload()[0]["Subject"] == "dsn test"
    assert bounce.endswith(b"Hi.\r\n\r\n" + bounce.rsplit(b"\r\n", 2)[-2] + b"\r\n")


async def test_no_notice_at_all_for_never(world, port) -> None:
    _settings, storage, runner, _clock = world
    rcpts = {"gone@d.test": DsnRecipient("NEVER", None)}
    async with SinkServer("127.0.0.2", port, rcpt_reply=refuse(set(rcpts))):
        qid = await enqueue(storage, rcpts, DsnEnvelope())
        await runner.drain()
    assert (await storage.queue.get(qid)).recipients[0].status == "failed"
    assert await inbox(storage) == []


async def test_delay_notices_follow_notify(world, port) -> None:
    """A delay warning names the recipients whose NOTIFY has DELAY or who
    gave no NOTIFY; FAILURE alone, or NEVER, gets none."""
    settings, storage, runner, clock = world
    settings.queue.delay_warning_seconds = 100
    rcpts = {
        "delay@d.test": DsnRecipient("DELAY", "rfc822;delay@d.test"),
        "failure@d.test": DsnRecipient("FAILURE", None),
        "never@d.test": DsnRecipient("NEVER", None),
        "default@d.test": DsnRecipient(),
    }
    await enqueue(storage, rcpts, DsnEnvelope(None, "E1"))
    with dead_host("127.0.0.2", port):
        for step in (0, 60, 180, 300):
            clock.now = T0 + step
            await runner.drain()
    [warning] = await inbox(storage)
    report = parse_dsn(warning)
    assert report is not None and report.envelope_id == "E1"
    assert {r.final_recipient: r.action for r in report.recipients} == {
        "delay@d.test": "delayed",
        "default@d.test": "delayed",
    }


async def test_next_hop_with_dsn_gets_the_parameters_and_reports_itself(world, port) -> None:
    """RFC 3461 section 5.2.1: the parameters go on unchanged; we send no
    success notice (the next hop will)."""
    _settings, storage, runner, _clock = world
    rcpts = {
        "a@d.test": DsnRecipient("SUCCESS,FAILURE", "rfc822;a+2Bx@orig.example"),
        "b@d.test": DsnRecipient("NEVER", None),
        "c@d.test": DsnRecipient(),
    }
    async with SinkServer("127.0.0.2", port, extensions=[*SINK_EXTENSIONS, "DSN"]) as sink:
        await enqueue(storage, rcpts, DsnEnvelope("HDRS", "ID+2B1"))
        await runner.drain()
    [got] = sink.received
    assert got.mail_params.split()[1:] == ["RET=HDRS", "ENVID=ID+2B1"]
    assert got.rcpt_params == {
        "a@d.test": "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bx@orig.example",
        "b@d.test": "NOTIFY=NEVER",
        "c@d.test": "",
    }
    assert await inbox(storage) == []


async def test_next_hop_without_dsn_makes_us_report_relayed(world, port) -> None:
    """RFC 3461 section 5.2.2: no parameters to a host that does not offer
    DSN, and a "relayed" notice for the recipient that asked for SUCCESS."""
    _settings, storage, runner, _clock = world
    rcpts = {
        "a@d.test": DsnRecipient("SUCCESS", "rfc822;a@orig.example"),
        "b@d.test": DsnRecipient("FAILURE", None),
    }
    async with SinkServer("127.0.0.2", port, extensions=SINK_EXTENSIONS) as sink:
        await enqueue(storage, rcpts, DsnEnvelope("FULL", "R1"))
        await runner.drain()
    [got] = sink.received
    assert "RET=" not in got.mail_params and "ENVID=" not in got.mail_params
    assert got.rcpt_params == {"a@d.test": "", "b@d.test": ""}
    [notice] = await inbox(storage)
    report = parse_dsn(notice)
    assert report is not None and report.envelope_id == "R1"
    [status] = report.recipients
    assert (status.final_recipient, status.action, status.original_recipient) == (
        "a@d.test",
        "relayed",
        "rfc822;a@orig.example",
    )
    assert b"Hi." not in notice  # RET applies to failures only (section 4.3)

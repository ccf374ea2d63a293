"""Mail submitted on 587 leaves through the outbound queue to real peers.

The sender is a shardmail mtad with queue workers; the receivers are a
second shardmail mtad, Debian's Postfix and scripted sinks, all found through
MX records in a dnsmasq on loopback (see conftest.py).
"""

from __future__ import annotations

import email
import email.policy
import re
import ssl
from collections.abc import Sequence

import aiosmtplib
import dkim

from conf.settings import DnsSettings
from mtad.dns import Resolver
from tests.dnsserver import DnsServer
from tests.integration.outbound.conftest import (
    ALICE,
    ALICE_PW,
    BACKUP_IP,
    CAROL,
    FLAKY_IP,
    Node,
    eventually,
)
from tests.integration.outbound.sink import SinkServer
from tests.postfixpeer import PostfixPeer
from tests.protocol.smtp.support import mailbox_messages


def outgoing(to: str, subject: str) -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <{abs(hash(subject))}.relay@example.net>\r\n\r\n"
        "Line one.\r\n.A line starting with a dot.\r\n"
    ).encode()


async def submit(
    node: Node,
    ctx: ssl.SSLContext,
    rcpts: list[str],
    subject: str = "",
    message: bytes | None = None,
    mail_options: Sequence[str] = (),
) -> bytes:
    """Submit as alice on the sender's 587 (STARTTLS + AUTH), like a mail
    client: ``message``, or a small one with ``subject``."""
    message = message or outgoing(", ".join(rcpts), subject)
    await aiosmtplib.send(
        message,
        sender=ALICE,
        recipients=rcpts,
        hostname="127.0.0.1",
        port=node.service.port("submission"),
        start_tls=True,
        tls_context=ctx,
        username=ALICE,
        password=ALICE_PW,
        mail_options=list(mail_options),
        timeout=10,
    )
    return message


async def inbox(node: Node, address: str) -> list[bytes]:
    return await mailbox_messages(node.storage, address)


async def settled(node: Node):
    """The queue entries once none is waiting (a bounce goes out before the
    attempt is recorded, so wait for the record)."""

    async def check():
        entries = await node.storage.queue.list()
        return entries if entries and all(e.status == "done" for e in entries) else None

    return await eventually(check)


def dsn_parts(raw: bytes):
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, headers = msg.get_payload()
    per_message, *per_rcpt = status.get_payload()
    return msg, human, per_message, per_rcpt, headers


async def test_reaches_shardmail_and_postfix_with_valid_dkim(
    sender: Node,
    peer: Node,
    postfix: PostfixPeer,
    relay_dns: DnsServer,
    client_tls_context: ssl.SSLContext,
) -> None:
    # mtad.service starts the workers only where queue.workers > 0.
    assert sender.service.queue_runner is not None
    assert not hasattr(peer.service, "queue_runner")
    before = len(postfix.messages())
    sent = await submit(sender, client_tls_context, [CAROL, "dave@postfix.test"], "Two peers")

    async def carol_got() -> list[bytes]:
        return await inbox(peer, CAROL)

    [at_peer] = await eventually(carol_got)
    # The second shardmail verified our signature against the test DNS.
    head = at_peer.split(b"\r\n\r\n", 1)[0]
    results = [line for line in email.message_from_bytes(at_peer).get_all("Authentication-Results")]
    assert any("dkim=pass" in r and "header.d=example.net" in r for r in results), head
    assert b".A line starting with a dot." in at_peer
    assert at_peer.endswith(sent.split(b"\r\n\r\n", 1)[1])

    found = await eventually(lambda: len(postfix.messages()) > before and postfix.messages())
    at_postfix = found[-1]
    assert b"Delivered-To: dave@postfix.test" in at_postfix
    assert b"Subject: Two peers" in at_postfix
    resolver = Resolver(DnsSettings(**relay_dns.settings()))
    assert dkim.verify(at_postfix.replace(b"\n", b"\r\n"), dnsfunc=resolver.dkim_txt_sync)
    # Postfix offers CHUNKING: the message went as BDAT (RFC 3030), as its
    # smtpd counts when the session ends (a cached one, within seconds).
    assert await eventually(lambda: re.search(r"disconnect from .* bdat=[1-9]", postfix.log()))

    [entry] = await settled(sender)
    assert entry.attempts == 1
    assert {r.address: r.status for r in entry.recipients} == {
        CAROL: "delivered",
        "dave@postfix.test": "delivered",
    }


async def test_4xx_then_250_delivers_on_a_later_attempt(
    sender: Node, client_tls_context: ssl.SSLContext, relay_port: int
) -> None:
    async with SinkServer(
        FLAKY_IP, relay_port, data_replies=["451 4.7.1 greylisted, come back later"]
    ) as sink:
        await submit(sender, client_tls_context, ["eve@flaky.test"], "Greylisted")
        await eventually(lambda: sink.received)
    assert sink.transactions == 2 and len(sink.received) == 1
    # retry_schedule_seconds = [1]: the second attempt waited for it.
    assert sink.received_at[1] - sink.received_at[0] >= 0.9
    [entry] = await settled(sender)
    assert entry.attempts == 2
    assert entry.recipients[0].status == "delivered"
    assert await inbox(sender, ALICE) == []  # no bounce, no warning


async def test_5xx_bounces_into_the_senders_inbox(
    sender: Node, peer: Node, client_tls_context: ssl.SSLContext
) -> None:
    await submit(sender, client_tls_context, ["nobody@peer.test"], "Lost letter")

    async def bounced() -> list[bytes]:
        return await inbox(sender, ALICE)

    [bounce] = await eventually(bounced)
    assert bounce.startswith(b"Return-Path: <>\r\n")
    msg, human, per_message, [rcpt], headers = dsn_parts(bounce)
    assert msg["From"].addresses[0].username == "MAILER-DAEMON"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "nobody@peer.test" in human.get_content()
    assert per_message["Reporting-MTA"] == "dns; mail.test"
    assert per_message["Arrival-Date"]
    assert rcpt["Final-Recipient"] == "rfc822; nobody@peer.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx.peer.test"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    returned = headers.get_payload(decode=True)
    assert b"Subject: Lost letter" in returned and b"A line starting" not in returned
    [entry] = await settled(sender)
    assert entry.attempts == 1  # permanent: not retried


async def test_null_mx_fails_at_once(sender: Node, client_tls_context: ssl.SSLContext) -> None:
    await submit(sender, client_tls_context, ["x@nullmx.test"], "Nowhere")

    async def bounced() -> list[bytes]:
        return await inbox(sender, ALICE)

    [bounce] = await eventually(bounced)
    _msg, _human, _pm, [rcpt], _headers = dsn_parts(bounce)
    assert rcpt["Status"] == "5.1.10" and rcpt["Action"] == "failed"
    [entry] = await settled(sender)
    assert entry.attempts == 1 and entry.recipients[0].status == "failed"


async def test_dead_primary_falls_over_to_secondary(
    sender: Node, client_tls_context: ssl.SSLContext, relay_port: int
) -> None:
    async with SinkServer(BACKUP_IP, relay_port) as backup:
        await submit(sender, client_tls_context, ["frank@failover.test"], "Failover")
        [got] = await eventually(lambda: backup.received)
    assert got.rcpt_to == ["frank@failover.test"] and got.mail_from == ALICE
    assert got.data.startswith(b"DKIM-Signature:")
    [entry] = await settled(sender)
    assert entry.attempts == 1 and entry.recipients[0].status == "delivered"
    assert "backup.failover.test" in entry.recipients[0].last_reply

"""REQUIRETLS and "TLS-Required: No" (RFC 8689) against real peers on loopback.

The world (dnsmasq for MX and ``_mta-sts`` TXT, the test CA, an HTTPS
policy server as in test_tls_security.py):

=================  ===========  =============================================
domain             MX address   peer
=================  ===========  =============================================
secure.test        127.0.0.41   shardmail mtad, test-CA certificate for its MX
plain.test         127.0.0.41   the same host (MX mx.secure.test), no MTA-STS
wrongcert.test     127.0.0.42   shardmail mtad, certificate for another name
stsbad.test        127.0.0.42   the same, with an MTA-STS enforce policy
norequire.test     127.0.0.43   scripted sink: valid certificate, STARTTLS,
                                no REQUIRETLS keyword
=================  ===========  =============================================

Every domain but plain.test publishes an MTA-STS policy listing its MX
(wrongcert.test in testing mode, the others enforce): with no DNSSEC here,
that is what validates an MX for REQUIRETLS (RFC 8689 section 4.2.1).

The sender is a shardmail mtad with queue workers; mail is submitted with
smtplib on 587 (STARTTLS, AUTH), with ``mail_options=["REQUIRETLS"]``.
stsbad.test and secure.test publish TLS-RPT records (``_smtp._tls``) naming
alice's mailbox and an HTTPS endpoint at reports.test (test_tlsrpt.py).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import smtplib
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trustme

from tests.dnsserver import DnsServer, Zone, dns_server
from tests.integration.outbound.conftest import (
    ALICE,
    ALICE_PW,
    SELECTOR,
    SENDER_DOMAIN,
    DkimSetup,
    Node,
    eventually,
)
from tests.integration.outbound.policyserver import PolicyServer, policy_response
from tests.integration.outbound.sink import SinkServer
from tests.integration.outbound.test_relay import inbox
from tests.integration.outbound.test_tls_security import (
    entry_of,
    receiver_settings,
    server_context,
    start_node,
    start_sender,
    stop_node,
)
from tests.ports import free_port

SECURE_IP = "127.0.0.41"
WRONG_IP = "127.0.0.42"
SINK_IP = "127.0.0.43"
RCPT_HDR = "user@x.test"
STS_MODES = {
    "stsbad.test": "enforce",
    "secure.test": "enforce",
    "norequire.test": "enforce",
    "wrongcert.test": "testing",
}
STS_POLICIES = {
    d: f"version: STSv1\r\nmode: {mode}\r\nmx: mx.{d}\r\nmax_age: 86400\r\n"
    for d, mode in STS_MODES.items()
}
REPORTED = ("stsbad.test", "secure.test")


@pytest.fixture(scope="module")
def port() -> int:
    return free_port(("127.0.0.1", SECURE_IP, WRONG_IP, SINK_IP))


@pytest.fixture(scope="module")
def report_port() -> int:
    """The port of the test's HTTPS TLS-RPT endpoint (https://reports.test:<port>/)."""
    return free_port(("127.0.0.1",))


@pytest.fixture(scope="module")
def rt_dns(dkim_setup: DkimSetup, report_port: int) -> Iterator[DnsServer]:
    zone = Zone()
    zone.txt(SENDER_DOMAIN, "v=spf1 ip4:127.0.0.0/8 -all")
    zone.txt(f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", dkim_setup.record)
    for domain, ip in (
        ("secure.test", SECURE_IP),
        ("wrongcert.test", WRONG_IP),
        ("stsbad.test", WRONG_IP),
        ("norequire.test", SINK_IP),
    ):
        zone.a(f"mx.{domain}", ip).mx(domain, f"mx.{domain}", 10)
    zone.mx("plain.test", "mx.secure.test", 10)
    for domain in STS_POLICIES:
        zone.a(f"mta-sts.{domain}", "127.0.0.1")
        zone.txt(f"_mta-sts.{domain}", "v=STSv1; id=20261207T0200")
    zone.a("reports.test", "127.0.0.1")
    rua = f"mailto:{ALICE},https://reports.test:{report_port}/tlsrpt"
    text = f"v=TLSRPTv1; rua={rua}".encode()
    for domain in REPORTED:
        # A raw TXT record (type 16): --txt-record cannot hold the comma.
        zone.options.append(f"--dns-rr=_smtp._tls.{domain},16,{(bytes([len(text)]) + text).hex()}")
    with dns_server(zone) as server:
        yield server


@pytest.fixture
def lifetime() -> int:
    """The sender's ``queue.max_lifetime_seconds`` (a test parametrizes it)."""
    return 5 * 24 * 3600


@dataclass
class World:
    sender: Node
    secure: Node
    wrong: Node
    sink: SinkServer


@pytest.fixture
async def world(
    tmp_path: Path,
    rt_dns: DnsServer,
    port: int,
    dkim_setup: DkimSetup,
    tls_ca: trustme.CA,
    tls_context: ssl.SSLContext,
    ca_file: Path,
    lifetime: int,
) -> AsyncIterator[World]:
    nodes: list[Node] = []
    policy_cert = tls_ca.issue_cert(*(f"mta-sts.{d}" for d in STS_POLICIES))
    routes = {f"mta-sts.{d}": policy_response(p) for d, p in STS_POLICIES.items()}
    sink = SinkServer(SINK_IP, port, tls=server_context(tls_ca.issue_cert("mx.norequire.test")))
    async with PolicyServer(server_context(policy_cert), routes) as policies, sink:
        try:
            for name, ip, leaf, domains in (
                (
                    "secure",
                    SECURE_IP,
                    tls_ca.issue_cert("mx.secure.test"),
                    ("secure.test", "plain.test"),
                ),
                (
                    "wrong",
                    WRONG_IP,
                    tls_ca.issue_cert("wrong-name.test"),
                    ("wrongcert.test", "stsbad.test"),
                ),
            ):
                settings = receiver_settings(tmp_path / name, rt_dns, ip, port, domains)
                nodes.append(await start_node(settings, server_context(leaf), domains))
            sender = await start_sender(
                tmp_path,
                rt_dns,
                port,
                dkim_setup,
                tls_context,
                ca_file,
                policies.port,
                max_lifetime_seconds=lifetime,
            )
            nodes.append(sender)
            yield World(sender, nodes[0], nodes[1], sink)
        finally:
            for node in nodes:
                await stop_node(node)


def message(to: str, token: str, *, tls_required_no: bool = False) -> bytes:
    extra = "TLS-Required: No\r\n" if tls_required_no else ""
    return (
        f"From: Alice <{ALICE}>\r\nTo: {to}\r\nSubject: confidential {token}\r\n"
        f"Date: Mon, 07 Dec 2026 00:00:00 +0000\r\n{extra}"
        f"Message-ID: <{token}@example.net>\r\n\r\n"
        f"The secret body {token}\r\n" + os.urandom(300).hex() + "\r\n"
    ).encode()


async def submit(node: Node, ctx: ssl.SSLContext, to: str, body: bytes, options: list[str]) -> None:
    """Submission as a mail client does it: smtplib, STARTTLS, AUTH."""

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", node.service.port("submission"), timeout=10) as client:
            client.starttls(context=ctx)
            client.login(ALICE, ALICE_PW)
            refused = client.sendmail(ALICE, [to], body, mail_options=options)
            assert refused == {}

    await asyncio.to_thread(send)


async def bounce_for(node: Node, token: str) -> email.message.EmailMessage:
    """The DSN in alice's INBOX about the message carrying ``token``."""

    async def check():
        for raw in await inbox(node, ALICE):
            if token.encode() in raw and b"multipart/report" in raw:
                return raw
        return None

    raw = await eventually(check, timeout=30)
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def statuses(report: email.message.EmailMessage) -> list[str]:
    _human, status, _original = report.get_payload()  # type: ignore[misc]
    _per_message, *per_rcpt = status.get_payload()
    return [str(block["Status"]) for block in per_rcpt]


async def test_requiretls_only_over_tls(world: World, client_tls_context) -> None:
    """RFC 8689 section 2: the keyword only on a TLS session; MAIL FROM with
    REQUIRETLS refused in clear (530 5.7.10), accepted after STARTTLS."""
    port = world.secure.service.port("mx")

    def session() -> tuple[bool, tuple[int, bytes], bool, tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP(SECURE_IP, port, timeout=10) as client:
            client.ehlo("client.test")
            plain_offer = client.has_extn("requiretls")
            refused = client.mail("someone@example.org", ["REQUIRETLS"])
            client.rset()
            client.starttls(context=ssl._create_unverified_context())
            client.ehlo("client.test")
            tls_offer = client.has_extn("requiretls")
            bad = client.mail("someone@example.org", ["REQUIRETLS=YES"])
            client.rset()
            accepted = client.mail("someone@example.org", ["REQUIRETLS"])
            return plain_offer, refused, tls_offer, bad, accepted

    plain_offer, refused, tls_offer, bad, accepted = await asyncio.to_thread(session)
    assert not plain_offer
    assert refused[0] == 530 and refused[1].startswith(b"5.7.10"), refused
    assert tls_offer
    assert bad[0] == 501, bad
    assert accepted[0] == 250, accepted


async def test_requiretls_relayed_to_a_qualified_host(world: World, client_tls_context) -> None:
    """A validated certificate and REQUIRETLS offered: delivered, and the next
    hop saw REQUIRETLS on MAIL (its Received field says so)."""
    token = os.urandom(8).hex()
    await submit(
        world.sender,
        client_tls_context,
        "user@secure.test",
        message(RCPT_HDR, token),
        ["REQUIRETLS"],
    )
    entry = await eventually(partial(entry_of, world.sender, "user@secure.test"))
    assert entry.dsn.require_tls  # carried through the queue

    [raw] = await eventually(partial(inbox, world.secure, "user@secure.test"), timeout=30)
    assert token.encode() in raw
    header = raw.split(b"\r\n\r\n", 1)[0]
    received = [h for h in header.split(b"\r\nReceived:") if b"by mx.secure.test" in h]
    assert received and b"REQUIRETLS" in received[0] and b"ESMTPS" in received[0], header

    # Without REQUIRETLS the same path works and the hop does not claim it.
    token2 = os.urandom(8).hex()
    await submit(
        world.sender, client_tls_context, "user@secure.test", message(RCPT_HDR, token2), []
    )

    async def second():
        return [m for m in await inbox(world.secure, "user@secure.test") if token2.encode() in m]

    [raw2] = await eventually(second, timeout=30)
    header2 = raw2.split(b"\r\n\r\n", 1)[0]
    hop = next(h for h in header2.split(b"\r\nReceived:") if b"by mx.secure.test" in h)
    assert b"REQUIRETLS" not in hop


@pytest.mark.parametrize("lifetime", [8])
async def test_requiretls_not_met_bounces_5_7_30(world: World, client_tls_context) -> None:
    """A host without REQUIRETLS: never sent, a 5.7.30 bounce at once. A
    certificate that does not validate, or an MX that neither DNSSEC nor
    MTA-STS validates (plain.test: its host would meet everything else):
    deferred (4.7.30), never sent, and bounced with 5.7.30 when the entry
    expires. No bounce holds the content (RFC 8689 section 5)."""
    ctx = client_tls_context
    tokens = {d: os.urandom(8).hex() for d in ("wrongcert.test", "norequire.test", "plain.test")}
    for domain, token in tokens.items():
        await submit(world.sender, ctx, f"user@{domain}", message(RCPT_HDR, token), ["REQUIRETLS"])
    report = await bounce_for(world.sender, tokens["norequire.test"])
    assert statuses(report) == ["5.7.30"]
    assert "does not offer REQUIRETLS" in report.as_string()
    assert b"The secret body" not in report.as_bytes()
    # The other waits for a host with validated TLS: deferred with 4.7.30.
    entry = await eventually(partial(entry_of, world.sender, "user@wrongcert.test"))
    [state] = await eventually(partial(_after_attempts, world.sender, entry.id, 2), timeout=30)
    assert state.status == "deferred" and state.last_reply.startswith("451 4.7.30"), state
    report = await bounce_for(world.sender, tokens["wrongcert.test"])  # expired
    assert statuses(report) == ["5.7.30"]
    assert b"The secret body" not in report.as_bytes()
    assert await inbox(world.wrong, "user@wrongcert.test") == []
    assert world.sink.received == []
    assert world.sink.transactions == 0
    # RFC 8689 section 4.2.1 item 2: the MX itself not validated.
    report = await bounce_for(world.sender, tokens["plain.test"])
    assert statuses(report) == ["5.7.30"]
    said = " ".join(report.as_string().split())
    assert "MX of plain.test neither DNSSEC-validated nor listed by an MTA-STS policy" in said
    assert b"The secret body" not in report.as_bytes()
    assert await inbox(world.secure, "user@plain.test") == []

    # The same messages without REQUIRETLS go out (opportunistic TLS).
    plain = os.urandom(8).hex()
    await submit(world.sender, ctx, "user@wrongcert.test", message(RCPT_HDR, plain), [])
    await submit(world.sender, ctx, "user@norequire.test", message(RCPT_HDR, plain), [])
    await submit(world.sender, ctx, "user@plain.test", message(RCPT_HDR, plain), [])
    await eventually(partial(inbox, world.wrong, "user@wrongcert.test"), timeout=30)
    await eventually(partial(inbox, world.secure, "user@plain.test"), timeout=30)
    await eventually(lambda: world.sink.received, timeout=30)
    assert world.sink.received[0].tls and "REQUIRETLS" not in world.sink.received[0].mail_params


async def test_tls_required_no_overrides_mta_sts(world: World, client_tls_context) -> None:
    """RFC 8689 section 4.2.2: "TLS-Required: No" ignores the enforce
    policy that would refuse the certificate; REQUIRETLS overrides the
    header field (section 4.1)."""
    ctx = client_tls_context
    rcpt = "user@stsbad.test"
    relaxed, strict, both = (os.urandom(8).hex() for _ in range(3))
    await submit(world.sender, ctx, rcpt, message(rcpt, relaxed, tls_required_no=True), [])

    async def arrived(token: str):
        return [m for m in await inbox(world.wrong, rcpt) if token.encode() in m]

    await eventually(partial(arrived, relaxed), timeout=30)

    # Without the field: the MTA-STS policy holds, deferred and never sent.
    await submit(world.sender, ctx, rcpt, message(rcpt, strict), [])

    entry = await eventually(partial(entry_with, world.sender, strict))
    [rcpt_state] = await eventually(partial(_after_attempts, world.sender, entry.id, 2), timeout=30)
    assert rcpt_state.status == "deferred" and "4.7.5" in (rcpt_state.last_reply or "")
    assert await arrived(strict) == []

    # REQUIRETLS and the field: the field is ignored, the certificate still
    # fails: deferred for REQUIRETLS (4.7.30), never sent.
    await submit(world.sender, ctx, rcpt, message(rcpt, both, tls_required_no=True), ["REQUIRETLS"])
    entry = await eventually(partial(entry_with, world.sender, both))
    [rcpt_state] = await eventually(partial(_after_attempts, world.sender, entry.id, 2), timeout=30)
    assert rcpt_state.status == "deferred", rcpt_state
    assert (rcpt_state.last_reply or "").startswith("451 4.7.30"), rcpt_state
    assert await arrived(both) == []


async def entry_with(node: Node, token: str):
    """The queue entry whose message holds ``token``."""
    for entry in await node.storage.queue.list():
        if token.encode() in await node.storage.blobs.get(entry.blob_key):
            return entry
    return None


async def _after_attempts(node: Node, queue_id, attempts: int):
    entry = await node.storage.queue.get(queue_id)
    return entry.recipients if entry.attempts >= attempts else None


def test_tls_required_header_parsing() -> None:
    from mtad.outbound.delivery import tls_required_no

    assert tls_required_no(b"Subject: x\r\nTLS-Required:  no \r\n\r\nbody")
    assert tls_required_no(b"Subject: x\r\ntls-required:\r\n No\r\n\r\nbody")
    assert not tls_required_no(b"Subject: x\r\n\r\nTLS-Required: No\r\n")  # in the body
    assert not tls_required_no(b"TLS-Required: Yes\r\n\r\n")
    assert not tls_required_no(b"X-TLS-Required: No\r\n\r\n")

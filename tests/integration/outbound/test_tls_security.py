"""Outbound TLS security against real peers on loopback: MTA-STS (RFC 8461)
and DANE (RFC 7672).

The world:

* dnsmasq serves MX, A, TLSA (``--dns-rr``) and ``_mta-sts`` TXT records;
  in front of it :class:`tests.adresolver.AdResolver` plays the validating
  resolver and sets the AD bit (dnsmasq cannot for its own records, see
  there), except for ``insecure.test`` (an unsigned zone) and SERVFAIL for
  one TLSA name.
* An HTTPS server (PolicyServer) serves the policies with certificates of
  the test CA for each ``mta-sts.<domain>``; the sender trusts that CA
  (``queue.tls_ca_file``) and fetches on the server's port
  (``queue.mta_sts_port``, allowed only beside a test ``smtp_port``).
* Two receiving shardmail mtads: BAD_IP with a certificate for a name that
  is not its MX name, GOOD_IP with one naming its MX hosts, issued by an
  intermediate CA (the DANE-TA anchor).
* The sender is a shardmail mtad with queue workers, mail submitted on 587.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import smtplib
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from conf.settings import Settings
from mtad.outbound.dane import DANE_TA, record_for
from tests.adresolver import AdResolver
from tests.conftest import make_settings
from tests.dnsserver import DnsServer, Zone, dns_server
from tests.integration.outbound.conftest import (
    ALICE,
    ALICE_PW,
    SELECTOR,
    SENDER_DOMAIN,
    DkimSetup,
    Node,
    eventually,
    open_test_storage,
    sender_settings,
)
from tests.integration.outbound.policyserver import PolicyServer, policy_response
from tests.integration.outbound.test_relay import inbox, submit
from tests.ports import free_port

BAD_IP = "127.0.0.31"  # certificate for "wrong-name.test"
GOOD_IP = "127.0.0.32"  # certificate for its MX names, via an intermediate CA
BAD_DOMAINS = (
    "enforce-bad.test",
    "testing-bad.test",
    "dane-ok.test",
    "dane-bad.test",
    "dane-servfail.test",
    "insecure.test",
    "plain.test",
)
GOOD_DOMAINS = ("enforce-good.test", "othermx.test", "dane-ta.test")
# MTA-STS policies: domain -> (mode, mx pattern)
POLICIES = {
    "enforce-bad.test": ("enforce", "mx.enforce-bad.test"),
    "testing-bad.test": ("testing", "*.testing-bad.test"),
    "enforce-good.test": ("enforce", "*.enforce-good.test"),
    "othermx.test": ("enforce", "*.elsewhere.test"),
    # DANE goes first (RFC 8461 section 2): this policy would fail the host.
    "dane-ok.test": ("enforce", "mx.dane-ok.test"),
}


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def tlsa_hex(record) -> str:
    return f"{record.usage:02x}{record.selector:02x}{record.mtype:02x}{record.data.hex()}"


@dataclass
class Certs:
    bad: trustme.LeafCert
    good: trustme.LeafCert
    intermediate: trustme.CA
    policy: trustme.LeafCert


@pytest.fixture(scope="module")
def certs(tls_ca: trustme.CA) -> Certs:
    intermediate = tls_ca.create_child_ca()
    good = intermediate.issue_cert(*(f"mx.{d}" for d in GOOD_DOMAINS))
    return Certs(
        bad=tls_ca.issue_cert("wrong-name.test"),
        good=good,
        intermediate=intermediate,
        policy=tls_ca.issue_cert(*(f"mta-sts.{d}" for d in POLICIES)),
    )


@pytest.fixture(scope="module")
def port() -> int:
    return free_port(("127.0.0.1", BAD_IP, GOOD_IP))


@pytest.fixture(scope="module")
def world_dns(certs: Certs, dkim_setup: DkimSetup) -> Iterator[tuple[DnsServer, AdResolver]]:
    zone = Zone()
    zone.txt(SENDER_DOMAIN, "v=spf1 ip4:127.0.0.0/8 -all")
    zone.txt(f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", dkim_setup.record)
    for domains, ip in ((BAD_DOMAINS, BAD_IP), (GOOD_DOMAINS, GOOD_IP)):
        for domain in domains:
            zone.a(f"mx.{domain}", ip).mx(domain, f"mx.{domain}", 10)
    for domain in POLICIES:
        zone.a(f"mta-sts.{domain}", "127.0.0.1")
        zone.txt(f"_mta-sts.{domain}", "v=STSv1; id=20261207T0100")
    bad_leaf = der(certs.bad.cert_chain_pems[0].bytes())
    anchor = der(certs.intermediate.cert_pem.bytes())
    rows = {
        "dane-ok.test": tlsa_hex(record_for(bad_leaf)),  # 3 1 1: names do not matter
        "dane-bad.test": "030101" + os.urandom(32).hex(),  # matches nothing
        "dane-servfail.test": "030101" + os.urandom(32).hex(),
        "insecure.test": "030101" + os.urandom(32).hex(),  # unsigned: not used
        "dane-ta.test": tlsa_hex(record_for(anchor, DANE_TA, 0, 1)),
    }
    for domain, row in rows.items():
        zone.options.append(f"--dns-rr=_25._tcp.mx.{domain},52,{row}")
    with dns_server(zone) as server:
        resolver = AdResolver(
            server.port,
            insecure=("insecure.test",),
            servfail=("_25._tcp.mx.dane-servfail.test",),
        )
        try:
            yield server, resolver
        finally:
            resolver.close()


def policy_text(mode: str, mx: str) -> str:
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"


def server_context(leaf: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    return ctx


@dataclass
class World:
    sender: Node
    bad: Node
    good: Node
    policies: PolicyServer
    resolver: AdResolver


async def start_node(settings, tls: ssl.SSLContext, domains: tuple[str, ...]) -> Node:
    from mtad.service import start

    storage = await open_test_storage(settings.data_dir)
    for domain in domains:
        await storage.directory.add_domain(domain)
        await storage.directory.add_account(f"user@{domain}", "user-secret")
    return Node(settings, storage, await start(settings, storage, tls))


def receiver_settings(
    data_dir: Path, dns: DnsServer, ip: str, port: int, domains: tuple[str, ...]
) -> Settings:
    """A receiving mtad for ``domains`` on ``ip:port``, no queue workers."""
    return make_settings(
        data_dir,
        server={"hostname": f"mx.{domains[0]}"},
        dns=dns.settings(),
        smtp={"mx_listen": [f"{ip}:{port}"]},
        queue={"workers": 0},
    )


async def start_sender(
    tmp_path: Path,
    dns: DnsServer,
    port: int,
    dkim: DkimSetup,
    tls: ssl.SSLContext,
    ca_file: Path,
    mta_sts_port: int,
    **queue: object,
) -> Node:
    """The sending mtad (alice at example.net), trusting the test CA and
    fetching MTA-STS policies on ``mta_sts_port``; ``queue``: more settings."""
    settings = sender_settings(
        tmp_path / "sender",
        dns,
        port,
        dkim,
        tls_ca_file=str(ca_file),
        mta_sts_port=mta_sts_port,
        **queue,
    )
    sender = await start_node(settings, tls, (SENDER_DOMAIN,))
    await sender.storage.directory.add_account(ALICE, ALICE_PW)
    return sender


async def stop_node(node: Node) -> None:
    await node.service.close()
    await node.storage.close()


@pytest.fixture
async def world(
    tmp_path: Path,
    world_dns: tuple[DnsServer, AdResolver],
    certs: Certs,
    port: int,
    dkim_setup: DkimSetup,
    tls_context: ssl.SSLContext,
    ca_file: Path,
) -> AsyncIterator[World]:
    dns, resolver = world_dns
    routes = {f"mta-sts.{d}": policy_response(policy_text(*p)) for d, p in POLICIES.items()}
    nodes: list[Node] = []
    async with PolicyServer(server_context(certs.policy), routes) as policies:
        try:
            for name, ip, leaf, domains in (
                ("bad", BAD_IP, certs.bad, BAD_DOMAINS),
                ("good", GOOD_IP, certs.good, GOOD_DOMAINS),
            ):
                settings = receiver_settings(tmp_path / name, dns, ip, port, domains)
                nodes.append(await start_node(settings, server_context(leaf), domains))
            # AdResolver stands where the DnsServer would: its settings()
            # name itself, trusted to validate (dns.trust_ad).
            sender = await start_sender(
                tmp_path,
                resolver,
                port,
                dkim_setup,
                tls_context,
                ca_file,
                policies.port,  # type: ignore[arg-type]
            )
            nodes.append(sender)
            yield World(sender, nodes[0], nodes[1], policies, resolver)
        finally:
            for node in nodes:
                await stop_node(node)


async def entry_of(node: Node, address: str):
    for entry in await node.storage.queue.list():
        if any(r.address == address for r in entry.recipients):
            return entry
    return None


async def deferred_twice(node: Node, address: str) -> str:
    """The recipient's stored reply once it was deferred on two attempts."""

    async def check():
        entry = await entry_of(node, address)
        if entry is None or entry.attempts < 2:
            return None
        [rcpt] = [r for r in entry.recipients if r.address == address]
        assert rcpt.status == "deferred", rcpt
        return rcpt.last_reply

    return await eventually(check, timeout=30)


async def delivered_with_tls(node: Node, address: str) -> bytes:
    async def arrived() -> list[bytes]:
        return await inbox(node, address)

    [message] = await eventually(arrived, timeout=30)
    received = message.split(b"\r\n\r\n", 1)[0]
    assert b"with ESMTPS" in received, received  # RFC 3848: TLS on the hop to us
    return message


def reports(node: Node) -> list[dict]:
    day = dt.datetime.now(dt.UTC).date().isoformat()
    path = node.settings.data_dir / "tlsrpt" / f"{day}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_mta_sts_enforce_testing_and_cache(world: World, client_tls_context) -> None:
    ctx = client_tls_context
    rcpts = {d: f"user@{d}" for d in ("enforce-bad.test", "testing-bad.test")}
    rcpts |= {d: f"user@{d}" for d in ("enforce-good.test", "othermx.test", "plain.test")}
    for domain, rcpt in rcpts.items():
        await submit(world.sender, ctx, [rcpt], f"To {domain}")

    # enforce, certificate not valid for the MX name: deferred, never in clear.
    reply = await deferred_twice(world.sender, rcpts["enforce-bad.test"])
    assert reply.startswith("451 4.7.5") and "MTA-STS enforce" in reply, reply
    assert "mismatch" in reply or "CERTIFICATE_VERIFY_FAILED" in reply, reply
    assert await inbox(world.bad, rcpts["enforce-bad.test"]) == []

    # enforce, the only MX is not in the policy: not a candidate (section 5).
    reply = await deferred_twice(world.sender, rcpts["othermx.test"])
    assert "4.7.5" in reply and "not in the MTA-STS policy" in reply, reply
    assert await inbox(world.good, rcpts["othermx.test"]) == []

    # testing: delivered all the same, the failure recorded for TLS-RPT.
    await delivered_with_tls(world.bad, rcpts["testing-bad.test"])  # unverified TLS
    [failure] = [r for r in reports(world.sender) if r["policy_domain"] == "testing-bad.test"][:1]
    assert failure["mode"] == "testing" and failure["policy_type"] == "sts"
    assert failure["result_type"] == "certificate-host-mismatch"
    assert failure["receiving_mx_hostname"] == "mx.testing-bad.test"

    # enforce with a valid certificate for the MX name: delivered over TLS.
    await delivered_with_tls(world.good, rcpts["enforce-good.test"])
    # No policy at all: opportunistic TLS as before (the certificate unchecked).
    await delivered_with_tls(world.bad, rcpts["plain.test"])

    # The policies were fetched once each and kept on disk (section 5.1).
    cached = json.loads(
        (world.sender.settings.data_dir / "mta-sts" / "enforce-good.test.json").read_text()
    )
    assert cached["mode"] == "enforce" and cached["mx"] == ["*.enforce-good.test"]
    assert cached["policy_id"] == "20261207T0100"
    fetched = world.policies.requests
    assert fetched.count("mta-sts.enforce-bad.test") == 1, fetched
    assert "mta-sts.plain.test" not in fetched


async def test_dane(world: World, client_tls_context) -> None:
    ctx = client_tls_context
    rcpts = {
        d: f"user@{d}"
        for d in ("dane-ok.test", "dane-bad.test", "dane-servfail.test", "dane-ta.test")
    }
    rcpts["insecure.test"] = "user@insecure.test"
    for domain, rcpt in rcpts.items():
        await submit(world.sender, ctx, [rcpt], f"To {domain}")

    # DANE-EE matching the leaf: delivered over TLS although the certificate
    # names another host, and although the domain's MTA-STS policy (enforce)
    # would refuse that certificate: DANE goes first (RFC 8461 section 2).
    await delivered_with_tls(world.bad, rcpts["dane-ok.test"])
    # DANE-TA: the intermediate CA in the chain, the leaf naming the MX host.
    await delivered_with_tls(world.good, rcpts["dane-ta.test"])

    # A TLSA record matching nothing: deferred, never delivered.
    reply = await deferred_twice(world.sender, rcpts["dane-bad.test"])
    assert reply.startswith("451 4.7.5") and "DANE" in reply, reply
    assert await inbox(world.bad, rcpts["dane-bad.test"]) == []
    # The TLSA lookup fails (SERVFAIL): the host is not used (RFC 7672 2.2).
    reply = await deferred_twice(world.sender, rcpts["dane-servfail.test"])
    assert reply.startswith("451 4.7.5") and "TLSA lookup failed" in reply, reply
    assert await inbox(world.bad, rcpts["dane-servfail.test"]) == []

    # An unsigned zone (no AD bit): its TLSA records are not believed, the
    # mismatching one is ignored and mail goes out opportunistically.
    await delivered_with_tls(world.bad, rcpts["insecure.test"])
    asked = {name for name, _ in world.resolver.queries}
    assert "_25._tcp.mx.dane-ok.test" in asked
    found = reports(world.sender)
    assert {r["policy_domain"] for r in found if r["policy_type"] == "tlsa"} >= {
        "dane-bad.test",
        "dane-servfail.test",
    }
    # RFC 8460 section 4.3.2.1: records returned, none matching the
    # certificate: tlsa-invalid; no valid answer from the resolver (SERVFAIL):
    # dnssec-invalid.
    types = {r["policy_domain"]: r["result_type"] for r in found if r["policy_type"] == "tlsa"}
    assert types["dane-bad.test"] == "tlsa-invalid", found
    assert types["dane-servfail.test"] == "dnssec-invalid", found


async def test_requiretls_to_an_mx_dnssec_validates(world: World, client_tls_context) -> None:
    """RFC 8689 section 4.2.1 item 2 met by DNSSEC alone: dane-ta.test has
    no MTA-STS policy, but its MX answer carries the AD bit of the trusted
    resolver (and DANE-TA validates the certificate), so a REQUIRETLS
    message goes there, with REQUIRETLS on MAIL. (An MX neither DNSSEC nor
    MTA-STS vouches for: test_requiretls.py, plain.test.)"""
    token = os.urandom(8).hex()
    rcpt = "user@dane-ta.test"
    body = (
        f"From: <{ALICE}>\r\nTo: <{rcpt}>\r\nSubject: {token}\r\n"
        f"Message-ID: <{token}@example.net>\r\n\r\nsecret {token}\r\n"
    ).encode()

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", world.sender.service.port("submission"), timeout=10) as c:
            c.starttls(context=client_tls_context)
            c.login(ALICE, ALICE_PW)
            assert c.sendmail(ALICE, [rcpt], body, mail_options=["REQUIRETLS"]) == {}

    await asyncio.to_thread(send)
    message = await delivered_with_tls(world.good, rcpt)
    assert token.encode() in message
    # The good node names itself after its first domain.
    header = message.split(b"\r\n\r\n", 1)[0]
    hop = next(h for h in header.split(b"\r\nReceived:") if b"by mx.enforce-good.test" in h)
    assert b"REQUIRETLS" in hop, header

"""Outbound sessions kept between deliveries (mtad/outbound/conncache.py),
against scripted loopback peers: which deliveries may share a session
(never one that needs stricter TLS than the session was set up under),
the RSET check, the message and idle limits."""

from __future__ import annotations

import asyncio
import itertools
import random
import string

import pytest

from conf.settings import QueueSettings
from mtad.dns import MxRecord
from mtad.outbound import delivery
from mtad.outbound.client import SmtpClient
from mtad.outbound.conncache import (
    CachedSession,
    ConnectionCache,
    SessionKey,
    TlsIdentity,
    may_reuse,
)
from mtad.outbound.dane import Tlsa
from mtad.outbound.delivery import Destination, TlsPolicy, deliver_domain
from mtad.outbound.tlspolicy import OPPORTUNISTIC, HostTls
from tests.integration.outbound.sink import SinkServer
from tests.ports import free_port
from tests.unit.test_outbound_mx import FakeResolver

MESSAGE = b"From: a@example.net\r\nTo: x@d.test\r\nSubject: t\r\n\r\n.leading dot\r\nbody\r\n"
ONE_MX = {"d.test": [MxRecord(10, "mx.d.test")]}
TLSA_A = (Tlsa(3, 1, 1, bytes(32)),)
TLSA_B = (Tlsa(3, 1, 1, bytes([1]) * 32),)

# From weakest to strictest: what a session set up under each guarantees.
POLICIES = {
    "none": HostTls("none", "tls_policy none"),
    "may": OPPORTUNISTIC,
    "encrypt": HostTls("encrypt", "tls_policy encrypt"),
    "sts-testing": HostTls("verify", "MTA-STS testing", report_only=True, policy_type="sts"),
    "verify": HostTls("verify", "tls_policy verify"),
    "sts-enforce": HostTls("verify", "MTA-STS enforce", policy_type="sts"),
    "dane-a": HostTls("dane", "DANE", TLSA_A, policy_type="tlsa"),
    "dane-b": HostTls("dane", "DANE", TLSA_B, policy_type="tlsa"),
}


@pytest.fixture
def port() -> int:
    return free_port(("127.0.0.2",))


def key(tls: HostTls, host: str = "mx.d.test", domain: str = "d.test") -> SessionKey:
    return SessionKey(domain, host, "127.0.0.2", 25, TlsIdentity.of(tls))


def destination(port: int, **queue) -> Destination:
    settings = QueueSettings(
        smtp_port=port, connect_timeout_seconds=2, command_timeout_seconds=5, **queue
    )
    return Destination(
        resolver=FakeResolver(mx=ONE_MX, a={"mx.d.test": ["127.0.0.2"]}),
        settings=settings,
        helo_name="mail.test",
        tls=TlsPolicy.from_settings(settings),
        connections=ConnectionCache(settings),
    )


async def test_a_session_serves_only_its_own_tls_guarantee(port: int) -> None:
    """The contract, for every pair of policies: a session made under one is
    taken only for the same one; in particular never for a stricter one
    (nor for DANE with other TLSA records, nor for another MX name or
    recipient domain)."""
    async with SinkServer("127.0.0.2", port):
        for made, wanted in itertools.product(POLICIES, POLICIES):
            cache = ConnectionCache(QueueSettings(connection_cache_seconds=30))
            client = await SmtpClient.open("127.0.0.2", port, connect_timeout=2, timeout=5)
            made_key = key(POLICIES[made])
            cache.opening("d.test")
            await cache.release(CachedSession(made_key, client))
            assert cache.take(key(POLICIES[made], host="other.d.test")) is None
            assert cache.take(key(POLICIES[made], domain="e.test")) is None
            taken = cache.take(key(POLICIES[wanted]))
            assert may_reuse(made_key, key(POLICIES[wanted])) == (made == wanted)
            assert (taken is not None) == (made == wanted), (made, wanted)
            await cache.close()
            if taken is not None:
                await taken.client.quit()


async def test_a_stricter_policy_opens_its_own_session(port: int, tls_context) -> None:
    """Through deliveries: the domain's policy goes from "none" (a plaintext
    session, though the peer offers STARTTLS) to "encrypt": the cached
    plaintext session is not used; the "encrypt" one is, for the next one."""
    async with SinkServer("127.0.0.2", port, tls=tls_context) as sink:
        dest = destination(port, connection_cache_seconds=30, tls_policy={"d.test": "none"})
        results = await deliver_domain(dest, "d.test", "a@x.test", ["r@d.test"], MESSAGE)
        assert results["r@d.test"].status == "delivered" and not sink.received[0].tls
        dest.tls.levels["d.test"] = "encrypt"
        for _ in range(2):
            results = await deliver_domain(dest, "d.test", "a@x.test", ["r@d.test"], MESSAGE)
            assert results["r@d.test"].status == "delivered"
        assert [r.tls for r in sink.received] == [False, True, True]
        assert sink.connections == 2 and dest.connections.reused == 1
        await dest.connections.close()


@pytest.mark.parametrize("how", ["421 to RSET", "no answer to RSET", "closed while idle"])
async def test_a_dead_cached_session_is_replaced_not_failed(
    port: int, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "RSET_TIMEOUT_SECONDS", 0.3)
    async with SinkServer("127.0.0.2", port) as sink:
        dest = destination(port, connection_cache_seconds=30)
        await deliver_domain(dest, "d.test", "a@x.test", ["r1@d.test"], MESSAGE)
        if how == "421 to RSET":
            sink.rset_reply = "421 4.3.2 shutting down"
        elif how == "no answer to RSET":
            sink.rset_reply = ""
        else:
            for writer in list(sink.writers):
                writer.close()
            await asyncio.sleep(0.1)
        results = await deliver_domain(dest, "d.test", "a@x.test", ["r2@d.test"], MESSAGE)
        assert results["r2@d.test"].status == "delivered"
        assert [r.rcpt_to for r in sink.received] == [["r1@d.test"], ["r2@d.test"]]
        assert sink.connections == 2
        assert sink.resets == (0 if how == "closed while idle" else 1)
        await dest.connections.close()


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
async def test_the_rset_check_is_pipelined_with_mail(port: int, chunking: bool) -> None:
    # RFC 2920 section 3.1: RSET may be pipelined; a peer offering
    # PIPELINING gets RSET, MAIL and RCPT (and DATA) in one write, so they
    # are all there when it reads RSET: no round trip of its own.
    async with SinkServer("127.0.0.2", port) as sink:
        if chunking:
            sink.extensions = [*sink.extensions, "CHUNKING"]
        dest = destination(port, connection_cache_seconds=30)
        for i in range(3):
            results = await deliver_domain(dest, "d.test", "a@x.test", [f"r{i}@d.test"], MESSAGE)
            assert results[f"r{i}@d.test"].status == "delivered"
        assert sink.connections == 1 and sink.resets == 2
        for i, followers in enumerate(sink.reset_followers, start=1):
            expected = f"MAIL FROM:<a@x.test> SIZE={len(MESSAGE)}\r\nRCPT TO:<r{i}@d.test>\r\n"
            assert followers == (expected if chunking else expected + "DATA\r\n").encode()
        assert [r.data for r in sink.received] == [MESSAGE] * 3
        await dest.connections.close()


async def test_without_pipelining_the_rset_check_waits_for_its_reply(port: int) -> None:
    async with SinkServer("127.0.0.2", port, extensions=["SIZE 10000000", "8BITMIME"]) as sink:
        dest = destination(port, connection_cache_seconds=30)
        for i in range(2):
            results = await deliver_domain(dest, "d.test", "a@x.test", [f"r{i}@d.test"], MESSAGE)
            assert results[f"r{i}@d.test"].status == "delivered"
        assert sink.connections == 1 and sink.reset_followers == [b""]
        sink.rset_reply = "421 4.3.2 shutting down"
        results = await deliver_domain(dest, "d.test", "a@x.test", ["r2@d.test"], MESSAGE)
        assert results["r2@d.test"].status == "delivered" and sink.connections == 2
        await dest.connections.close()


async def test_a_refused_pipelined_rset_sends_no_message_on_that_session(port: int) -> None:
    # A peer that refuses RSET but goes on with the pipelined MAIL, RCPT and
    # DATA (354): the session is dropped before any message data, and the
    # message goes once, on a new session.
    async with SinkServer("127.0.0.2", port) as sink:
        dest = destination(port, connection_cache_seconds=30)
        await deliver_domain(dest, "d.test", "a@x.test", ["r1@d.test"], MESSAGE)
        sink.rset_reply = "502 5.5.2 no RSET here"
        results = await deliver_domain(dest, "d.test", "a@x.test", ["r2@d.test"], MESSAGE)
        assert results["r2@d.test"].status == "delivered"
        assert [r.rcpt_to for r in sink.received] == [["r1@d.test"], ["r2@d.test"]]
        assert sink.connections == 2 and sink.resets == 1
        await dest.connections.close()


async def test_sessions_carry_at_most_max_messages(port: int) -> None:
    async with SinkServer("127.0.0.2", port) as sink:
        dest = destination(port, connection_cache_seconds=30, connection_max_messages=3)
        for i in range(7):
            results = await deliver_domain(dest, "d.test", "a@x.test", [f"r{i}@d.test"], MESSAGE)
            assert results[f"r{i}@d.test"].status == "delivered"
        assert len(sink.received) == 7
        assert sink.connections == 3  # 3 + 3 + 1
        assert sink.resets == 4  # RSET before each reuse (RFC 5321 section 4.1.1.5)
        await dest.connections.close()
        await asyncio.sleep(0.1)
        assert sink.active == 0  # the idle one got QUIT


async def test_an_idle_session_is_closed_after_its_time(port: int) -> None:
    async with SinkServer("127.0.0.2", port) as sink:
        dest = destination(port, connection_cache_seconds=0.3)
        await deliver_domain(dest, "d.test", "a@x.test", ["r@d.test"], MESSAGE)
        assert sink.active == 1 and dest.connections.idle == 1
        await asyncio.sleep(0.8)
        assert sink.active == 0 and dest.connections.idle == 0
        assert dest.connections.open_sessions("d.test") == 0


async def test_without_cache_every_delivery_has_its_own_session(port: int) -> None:
    async with SinkServer("127.0.0.2", port) as sink:
        dest = destination(port, connection_cache_seconds=0)
        for i in range(3):
            await deliver_domain(dest, "d.test", "a@x.test", [f"r{i}@d.test"], MESSAGE)
        assert sink.connections == 3 and sink.resets == 0


def test_settings_that_do_nothing_are_refused() -> None:
    with pytest.raises(ValueError, match="do nothing"):
        QueueSettings(connection_cache_seconds=0, connection_max_messages=10)
    with pytest.raises(ValueError, match="do nothing"):
        QueueSettings(connection_cache_seconds=0, connection_cache_size=10)
    with pytest.raises(ValueError):
        QueueSettings(per_domain_concurrency=0)
    assert QueueSettings(connection_cache_seconds=0).connection_cache_seconds == 0


class CountingResolver(FakeResolver):
    """A FakeResolver that counts the MX and address lookups made."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lookups = 0

    async def mx(self, domain):
        self.lookups += 1
        return await super().mx(domain)

    async def addresses(self, host):
        self.lookups += 1
        return await super().addresses(host)


def _message(rng: random.Random, n: int) -> bytes:
    """CRLF lines of random text, some starting with a dot (stuffed on the wire)."""
    lines = [
        "".join(rng.choice(string.ascii_letters + " .") for _ in range(rng.randint(0, 200)))
        for _ in range(rng.randint(1, 40))
    ]
    body = "\r\n".join(lines)
    return f"From: a@x.test\r\nTo: r{n}@d.test\r\nSubject: {n}\r\n\r\n{body}\r\n".encode()


async def test_a_cached_session_carries_mail_before_any_dns_lookup(port: int) -> None:
    """As Postfix searches its connection cache by destination name first:
    the next messages to a domain go on its idle session without MX or
    address lookups, byte for byte. A stricter policy (the session is not
    what it needs) goes the whole way: lookups, a new session."""
    rng = random.Random()
    async with SinkServer("127.0.0.2", port) as sink:
        dest = destination(port, connection_cache_seconds=30, tls_policy={"d.test": "may"})
        resolver = CountingResolver(mx=ONE_MX, a={"mx.d.test": ["127.0.0.2"]})
        dest.resolver = resolver
        sent = [_message(rng, i) for i in range(rng.randint(3, 6))]
        for i, message in enumerate(sent):
            results = await deliver_domain(dest, "d.test", "a@x.test", [f"r{i}@d.test"], message)
            assert results[f"r{i}@d.test"].status == "delivered"
        assert resolver.lookups == 2  # the MX and its addresses, once
        assert sink.connections == 1 and sink.resets == len(sent) - 1
        assert [r.data for r in sink.received] == sent
        dest.tls.levels["d.test"] = "none"
        results = await deliver_domain(dest, "d.test", "a@x.test", ["z@d.test"], sent[0])
        assert results["z@d.test"].status == "delivered"
        assert resolver.lookups == 4 and sink.connections == 2
        await dest.connections.close()


async def test_recipients_a_cached_session_defers_go_through_the_mx_hosts(port: int) -> None:
    """Undecided on the cached session (a 4yz to RCPT): looked up and tried
    on the next MX host (RFC 5321 section 5.1); the others delivered once."""
    two_mx = {"d.test": [MxRecord(10, "mx.d.test"), MxRecord(20, "backup.d.test")]}

    def busy(address: str) -> str:
        return "451 4.3.0 try later" if address.startswith("busy") else "250 2.1.5 ok"

    async with (
        SinkServer("127.0.0.2", port, rcpt_reply=busy) as primary,
        SinkServer("127.0.0.3", port) as backup,
    ):
        dest = destination(port, connection_cache_seconds=30)
        resolver = CountingResolver(
            mx=two_mx, a={"mx.d.test": ["127.0.0.2"], "backup.d.test": ["127.0.0.3"]}
        )
        dest.resolver = resolver
        await deliver_domain(dest, "d.test", "a@x.test", ["first@d.test"], MESSAGE)
        looked_up = resolver.lookups  # the MX and every host's addresses
        results = await deliver_domain(
            dest, "d.test", "a@x.test", ["ok@d.test", "busy@d.test"], MESSAGE
        )
        assert {r: v.status for r, v in results.items()} == {
            "ok@d.test": "delivered",
            "busy@d.test": "delivered",
        }
        assert [r.rcpt_to for r in primary.received] == [["first@d.test"], ["ok@d.test"]]
        assert [r.rcpt_to for r in backup.received] == [["busy@d.test"]]
        assert resolver.lookups == 2 * looked_up  # once more, for the deferred one
        await dest.connections.close()

"""Mail an alias forwards to another site passes SPF there (delivery/srs.py).

The receiver is Debian's Postfix with policyd-spf (postfix-policyd-spf-python)
checking the reverse-path's SPF record (RFC 7208 section 2.4) and refusing a
fail, as many sites run it. The original sender's domain, origin.test,
publishes ``-all`` for an address that is not ours, so the forwarded copy
fails SPF unless its reverse-path is rewritten to our domain (example.net,
whose record names 127.0.0.0/8). policyd-spf asks dnspython's default
resolver, so Postfix spawns it through a small wrapper that points that
resolver at the test's dnsmasq (any loopback port) and then runs the
packaged policyd-spf unchanged; nothing outside the test changes.

Also shown here: a bounce to a rewritten address, from our own queue or
from another site through our MX, reaches the original sender; a forged
one is refused (550); with ``srs.enabled = false`` the same forward is
refused by Postfix for SPF, so the test tells the two apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import smtplib
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path

import dkim
import pytest

from mtad.outbound.signing import generate_key
from tests.conftest import make_settings
from tests.dnsserver import DnsServer, Zone, dns_server
from tests.integration.outbound.conftest import eventually, open_test_storage
from tests.ports import free_port
from tests.postfixpeer import PostfixPeer, postfix_peer

OUR_DOMAIN = "example.net"
SELECTOR = "shardmail"
POSTFIX_IP = "127.0.0.10"
SENDER = "alice@origin.test"

POLICYD_CONF = """\
debugLevel = 1
TestOnly = 1
HELO_reject = No_Check
Mail_From_reject = Fail
PermError_reject = False
TempError_Defer = False
skip_addresses = 192.0.2.250/32
"""

# The packaged policyd-spf, with dnspython's default resolver (the one
# pyspf's lookups use) asking the test's DNS server instead of resolv.conf.
POLICYD_WRAPPER = """\
#!/usr/bin/python3
import runpy, sys
import dns.resolver
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["{host}"]
resolver.port = {port}
dns.resolver.default_resolver = resolver
sys.argv = ["policyd-spf", *sys.argv[1:]]
runpy.run_path("/usr/bin/policyd-spf", run_name="__main__")
"""

POSTFIX_EXTRA = """
mynetworks = 192.0.2.250/32
smtpd_relay_restrictions = reject_unauth_destination
virtual_mailbox_domains = postfix.test, origin.test
smtpd_recipient_restrictions = reject_unauth_destination,
    check_policy_service unix:private/policyd-spf
policyd-spf_time_limit = 3600
"""


@pytest.fixture(scope="module")
def dkim_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Our domain's DKIM key (files, as an older mailctl made them) and its record."""
    key_dir = tmp_path_factory.mktemp("dkim")
    _path, record = generate_key(key_dir, OUR_DOMAIN, SELECTOR)
    return key_dir, record


@pytest.fixture(scope="module")
def srs_dns(dkim_dir: tuple[Path, str]) -> Iterator[DnsServer]:
    zone = Zone()
    zone.txt(f"{SELECTOR}._domainkey.{OUR_DOMAIN}", dkim_dir[1])
    zone.txt(OUR_DOMAIN, "v=spf1 ip4:127.0.0.0/8 -all")
    zone.txt("origin.test", "v=spf1 ip4:192.0.2.1 -all")
    zone.a("mx.postfix.test", POSTFIX_IP)
    for domain in ("postfix.test", "origin.test", "reject.test"):
        zone.mx(domain, "mx.postfix.test", 10)
    with dns_server(zone) as server:
        yield server


@pytest.fixture(scope="module")
def smtp_port() -> int:
    return free_port(("127.0.0.1", POSTFIX_IP))


@pytest.fixture(scope="module")
def spf_postfix(srs_dns: DnsServer, smtp_port: int) -> Iterator[PostfixPeer]:
    # Outside pytest's 0700 tree: the policy server runs as nobody, and a
    # config it cannot read would fall back to the packaged one, which skips
    # loopback clients.
    conf_dir = Path(tempfile.mkdtemp(prefix="shardmail-policyd-"))
    try:
        conf_dir.chmod(0o755)
        (conf_dir / "policyd-spf.conf").write_text(POLICYD_CONF)
        (conf_dir / "policyd-spf.conf").chmod(0o644)
        wrapper = conf_dir / "policyd-spf"
        wrapper.write_text(POLICYD_WRAPPER.format(host=srs_dns.host, port=srs_dns.port))
        wrapper.chmod(0o755)
        master = (
            "policyd-spf unix - n n - 0 spawn user=nobody"
            f" argv={wrapper} {conf_dir / 'policyd-spf.conf'}\n"
        )
        with postfix_peer(
            "postfix.test",
            POSTFIX_IP,
            smtp_port,
            extra=POSTFIX_EXTRA,
            master_extra=master,
        ) as peer:
            yield peer
    finally:
        shutil.rmtree(conf_dir, ignore_errors=True)


@dataclass
class World:
    dns: DnsServer
    smtp_port: int
    postfix: PostfixPeer
    tls: ssl.SSLContext
    dkim_dir: Path


@pytest.fixture
def world(
    srs_dns: DnsServer,
    smtp_port: int,
    spf_postfix: PostfixPeer,
    tls_context: ssl.SSLContext,
    dkim_dir: tuple[Path, str],
) -> World:
    return World(srs_dns, smtp_port, spf_postfix, tls_context, dkim_dir[0])


@contextlib.asynccontextmanager
async def forwarder(data_dir: Path, world: World, **srs: object) -> AsyncIterator[int]:
    """Our mtad forwarding fwd@ and gone@ (aliases) out; yields its MX port."""
    from mtad.service import start

    settings = make_settings(
        data_dir,
        dns=world.dns.settings(),
        # The MX's own checks of origin.test are beside the point here.
        smtp={"spf": False, "dkim_verify": False, "dmarc": False},
        queue={
            "workers": 2,
            "smtp_port": world.smtp_port,
            "retry_schedule_seconds": [1],
            "poll_interval_seconds": 0.1,
            "delay_warning_seconds": 0,
            "connect_timeout_seconds": 2,
            "command_timeout_seconds": 10,
            "dkim_key_dir": str(world.dkim_dir),
        },
        srs=srs,
    )
    storage = await open_test_storage(settings.data_dir)
    await storage.directory.add_domain(OUR_DOMAIN)
    await storage.directory.add_account(f"bob@{OUR_DOMAIN}", "bob-secret")
    await storage.directory.add_alias(f"fwd@{OUR_DOMAIN}", "carol@postfix.test")
    await storage.directory.add_alias(f"gone@{OUR_DOMAIN}", "nobody@reject.test")
    service = await start(settings, storage, world.tls)
    try:
        yield service.port("mx")
    finally:
        await service.close()
        await storage.close()


def _txt_lookup(server: DnsServer):
    """dkimpy's ``dnsfunc``: TXT records from the test's DNS server."""
    import dns.message
    import dns.query

    def lookup(name: bytes | str, timeout: float = 5) -> bytes:
        text = name.decode() if isinstance(name, bytes) else name
        reply = dns.query.udp(
            dns.message.make_query(text, "TXT"), server.host, port=server.port, timeout=timeout
        )
        return b"".join(b"".join(rr.strings) for rrset in reply.answer for rr in rrset)

    return lookup


def _send(port: int, sender: str, rcpt: str, subject: str) -> None:
    body = (
        f"From: <{sender or 'mailer-daemon@elsewhere.test'}>\r\nTo: <{rcpt}>\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject}@origin.test>\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n"
        + "".join(random.choices("abcdefghij \r\n", k=random.randint(10, 3000)))
        + "\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, [rcpt], body.encode())


def _found(peer: PostfixPeer, subject: str, to: str = "carol@postfix.test") -> bytes | None:
    """The message with ``subject`` delivered to ``to`` (not a report quoting it)."""
    wanted = (f"Subject: {subject}".encode(), f"Delivered-To: {to}\n".encode())
    return next((m for m in peer.messages() if all(w in m for w in wanted)), None)


async def test_forwarded_mail_passes_spf_and_its_bounces_come_back(
    tmp_path: Path, world: World
) -> None:
    srs_dns, spf_postfix = world.dns, world.postfix
    async with forwarder(tmp_path / "on", world) as mx:
        subject = f"forwarded-{random.randrange(10**9)}"
        await asyncio.to_thread(_send, mx, SENDER, f"fwd@{OUR_DOMAIN}", subject)
        raw = await eventually(lambda: _found(spf_postfix, subject), timeout=30)
        got = message_from_bytes(raw)
        return_path = got["Return-Path"].strip("<>")
        assert re.fullmatch(
            rf"SRS0=[^=]{{4}}=[A-Z2-7]{{2}}=origin\.test=alice@{OUR_DOMAIN}", return_path
        )
        assert (got["Received-SPF"] or "").startswith("Pass"), got.items()
        # Signed by us (d= our domain, the SRS sender's) and sealed with ARC
        # (RFC 8617): the seal and the signatures verify at the receiver.
        lookup = _txt_lookup(srs_dns)
        assert dkim.verify(raw, dnsfunc=lookup)
        assert got["ARC-Seal"] and "i=1" in got["ARC-Seal"] and "cv=none" in got["ARC-Seal"]
        assert got["ARC-Authentication-Results"].startswith("i=1; mail.test")
        cv, _results, comment = dkim.arc_verify(raw, dnsfunc=lookup)
        assert cv == dkim.CV_Pass, comment

        # Postfix refuses the other alias's target (relay denied): our bounce
        # goes to the rewritten sender, which routes it to alice.
        refused = f"refused-{random.randrange(10**9)}"
        await asyncio.to_thread(_send, mx, SENDER, f"gone@{OUR_DOMAIN}", refused)

        def bounce() -> bytes | None:
            return next(
                (
                    m
                    for m in spf_postfix.messages()
                    if b"multipart/report" in m and f"<{refused}@origin.test>".encode() in m
                ),
                None,
            )

        try:
            report = message_from_bytes(await eventually(bounce, timeout=30))
        except AssertionError:
            raise AssertionError(spf_postfix.log()[-4000:]) from None
        assert report["Delivered-To"] == SENDER
        assert report["Return-Path"] == "<>"

        # Another site's bounce to the rewritten address, through our MX.
        back = f"returned-{random.randrange(10**9)}"
        await asyncio.to_thread(_send, mx, "", return_path, back)
        returned = message_from_bytes(
            await eventually(lambda: _found(spf_postfix, back, SENDER), timeout=30)
        )
        assert returned["Delivered-To"] == SENDER
        # A forged one is an unknown user.
        local, _, domain = return_path.partition("@")
        tag, hashed, rest = local.split("=", 2)
        forged = f"{tag}={'AAAA' if hashed != 'AAAA' else 'BBBB'}={rest}@{domain}"
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused_rcpt:
            await asyncio.to_thread(_send, mx, "", forged, "forged")
        assert refused_rcpt.value.recipients[forged][0] == 550


async def test_without_srs_the_same_forward_fails_spf(tmp_path: Path, world: World) -> None:
    spf_postfix = world.postfix
    async with forwarder(tmp_path / "off", world, enabled=False) as mx:
        subject = f"unrewritten-{random.randrange(10**9)}"
        await asyncio.to_thread(_send, mx, SENDER, f"fwd@{OUR_DOMAIN}", subject)
        log = await eventually(
            lambda: "5.7.23" in spf_postfix.log() and "origin.test" in spf_postfix.log(),
            timeout=30,
        )
        assert log
        assert _found(spf_postfix, subject) is None
        assert re.search(
            r"reject: RCPT from .*550 5\.7\.23 .*from=<alice@origin\.test>", spf_postfix.log()
        )

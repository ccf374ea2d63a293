"""Client autoconfiguration fetched with curl as a client would, parsed with
xml.etree and plistlib: Thunderbird's clientConfig, Outlook's POX
autodiscover and the Apple profile advertise exactly the listeners the
site enables (a random mix per run), with every value escaped."""

from __future__ import annotations

import asyncio
import plistlib
import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest

from conf.settings import Settings
from httpapi.service import HttpService
from tests.conftest import make_settings

# (settings section, key, protocol, socket type) of every listener offered.
LISTENERS = [
    ("imap", "tls_listen", "imap", "SSL"),
    ("imap", "listen", "imap", "STARTTLS"),
    ("pop3", "tls_listen", "pop3", "SSL"),
    ("pop3", "listen", "pop3", "STARTTLS"),
    ("smtp", "submissions_listen", "smtp", "SSL"),
    ("smtp", "submission_listen", "smtp", "STARTTLS"),
]
# What "off" looks like: no address, port 0, loopback only.
OFF = [[], ["127.0.0.1:0"], ["127.0.0.1:1000"], ["[::1]:1001"]]
HOSTNAME = "mail.example.test"
ADDRESS = "o'neil&co@example.test"  # quote and ampersand: must come back unharmed


def _site(rng: random.Random) -> tuple[dict[str, dict[str, list[str]]], set[tuple[str, int, str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    on: set[tuple[str, int, str]] = set()
    for i, (section, key, protocol, socket) in enumerate(LISTENERS):
        if rng.random() < 0.6:
            port = 2000 + 17 * i + rng.randint(0, 9)
            host = rng.choice(["0.0.0.0", "[::]", "192.0.2.7"])
            sections.setdefault(section, {})[key] = [*rng.choice(OFF[:2]), f"{host}:{port}"]
            on.add((protocol, port, socket))
        else:
            sections.setdefault(section, {})[key] = rng.choice(OFF)
    return sections, on


SITE, ENABLED = _site(random.Random())


@pytest.fixture
def http_settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path / "data",
        server={"hostname": HOSTNAME},
        http={"rate_limit_per_user": 10_000, "rate_limit_per_ip": 10_000},
        **SITE,
    )


async def curl(url: str, *args: str) -> tuple[int, bytes, str]:
    """(status, body, content type) as curl got them."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{content_type}", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    body, _, tail = out.rpartition(b"\n")
    status, _, ctype = tail.decode().partition(" ")
    return int(status), body, ctype


def _best(protocol: str) -> tuple[str, int, str] | None:
    """The preferred enabled endpoint of a protocol: implicit TLS first."""
    mine = [e for e in ENABLED if e[0] == protocol]
    return min(mine, key=lambda e: e[2] != "SSL") if mine else None


@pytest.fixture
async def two_domains(mailstore: Any) -> Any:
    await mailstore.directory.add_domain("second.test")
    return mailstore


def _client_config(body: bytes) -> tuple[ET.Element, set[tuple[str, int, str]]]:
    root = ET.fromstring(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None
    got = set()
    for server in [*provider.findall("incomingServer"), *provider.findall("outgoingServer")]:
        assert server.findtext("hostname") == HOSTNAME
        got.add((server.get("type") or "", int(server.findtext("port") or 0),
                 server.findtext("socketType") or ""))
    return provider, got


async def test_thunderbird_autoconfig(service: HttpService, two_domains: Any) -> None:
    base = f"http://127.0.0.1:{service.ports[0]}"
    for path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"):
        status, body, ctype = await curl(base + path, "-G", "--data-urlencode",
                                         f"emailaddress={ADDRESS}")
        assert (status, ctype.split(";")[0]) == (200, "application/xml"), body
        provider, got = _client_config(body)
        assert got == ENABLED
        assert provider.get("id") == "example.test"
        assert {u.text for u in provider.iter("username")} <= {ADDRESS}
    # Without an address (older Thunderbird): the placeholder, every domain.
    status, body, _ = await curl(base + "/mail/config-v1.1.xml")
    assert status == 200
    provider, got = _client_config(body)
    assert got == ENABLED
    assert {d.text for d in provider.findall("domain")} == {"example.test", "second.test"}
    assert {u.text for u in provider.iter("username")} <= {"%EMAILADDRESS%"}


BAD_ADDRESSES = ["not-an-address", "a@b@c", "x@unknown.test", "<x>@example.test",
                 "x@" + "a" * 300 + ".test", "", "x y@example.test"]


async def test_bad_addresses_get_400(service: HttpService, mailstore: Any) -> None:
    base = f"http://127.0.0.1:{service.ports[0]}"
    for bad in BAD_ADDRESSES:
        for path in ("/mail/config-v1.1.xml", "/apple/mobileconfig"):
            status, body, _ = await curl(base + path, "-G", "--data-urlencode",
                                         f"emailaddress={bad}")
            assert status == 400, (path, bad, body)
        request = _outlook_request(escape(bad))
        status, body, _ = await curl(base + "/autodiscover/autodiscover.xml", "--data-binary",
                                     request, "-H", "Content-Type: text/xml")
        assert status == 400, (bad, body)
    # Not XML, no address, and an entity bomb: 400, never 500.
    bomb = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
            '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><Autodiscover>&b;</Autodiscover>')
    for request in ("not xml", "<Autodiscover/>", bomb):
        status, body, _ = await curl(base + "/autodiscover/autodiscover.xml", "--data-binary",
                                     request)
        assert status == 400, (request, body)
    status, _, _ = await curl(base + "/apple/mobileconfig")
    assert status == 400


def _outlook_request(address: str) -> str:
    ns = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
    schema = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
    return (f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{ns}"><Request>'
            f"<EMailAddress>{address}</EMailAddress>"
            f"<AcceptableResponseSchema>{schema}</AcceptableResponseSchema>"
            "</Request></Autodiscover>")


async def test_outlook_autodiscover(service: HttpService, mailstore: Any) -> None:
    base = f"http://127.0.0.1:{service.ports[0]}"
    status, body, ctype = await curl(base + "/autodiscover/autodiscover.xml", "--data-binary",
                                     _outlook_request(escape(ADDRESS)),
                                     "-H", "Content-Type: text/xml")
    assert (status, ctype.split(";")[0]) == (200, "application/xml"), body
    ns = {"r": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
    root = ET.fromstring(body)
    protocols = root.findall("*/r:Account/r:Protocol", ns)
    got = set()
    for p in protocols:
        assert p.findtext("r:Server", namespaces=ns) == HOSTNAME
        assert p.findtext("r:LoginName", namespaces=ns) == ADDRESS
        enc = p.findtext("r:Encryption", namespaces=ns)
        got.add(((p.findtext("r:Type", namespaces=ns) or "").lower(),
                 int(p.findtext("r:Port", namespaces=ns) or 0),
                 "SSL" if enc == "SSL" else "STARTTLS"))
    want = {e for e in map(_best, ("imap", "pop3", "smtp")) if e is not None}
    assert got == want


async def test_apple_mobileconfig(service: HttpService, mailstore: Any) -> None:
    base = f"http://127.0.0.1:{service.ports[0]}"
    status, body, ctype = await curl(base + "/apple/mobileconfig", "-G", "--data-urlencode",
                                     f"emailaddress={ADDRESS}")
    incoming = _best("imap") or _best("pop3")
    outgoing = _best("smtp")
    if incoming is None or outgoing is None:
        assert status == 404, body  # nothing to configure: not a broken profile
        return
    assert (status, ctype) == (200, "application/x-apple-aspen-config"), body
    profile = plistlib.loads(body)
    assert profile["PayloadType"] == "Configuration"
    (account,) = profile["PayloadContent"]
    assert account["PayloadType"] == "com.apple.mail.managed"
    assert account["EmailAddress"] == ADDRESS
    assert account["IncomingMailServerUsername"] == ADDRESS
    assert account["EmailAccountType"] == (
        "EmailTypeIMAP" if incoming[0] == "imap" else "EmailTypePOP")
    assert (account["IncomingMailServerHostName"], account["IncomingMailServerPortNumber"]) == (
        HOSTNAME, incoming[1])
    assert (account["OutgoingMailServerHostName"], account["OutgoingMailServerPortNumber"]) == (
        HOSTNAME, outgoing[1])
    # The same download twice is the same profile (it replaces, not adds).
    again = plistlib.loads((await curl(base + "/apple/mobileconfig", "-G", "--data-urlencode",
                                       f"emailaddress={ADDRESS}"))[1])
    assert again["PayloadUUID"] == profile["PayloadUUID"]

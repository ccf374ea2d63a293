"""DNS block and allow lists on the MX, over real SMTP, with the lists served
by a real dnsmasq (tests/dnsserver.py) that mtad reaches through [dns].

The client connects from 127.0.0.1, so its query name is 1.0.0.127.<zone>
(RFC 5782 section 2.1). Listed in a block list: 554 5.7.1 at the end of
DATA naming the zone and carrying its TXT (RFC 5321 section 4.2.5), nothing
stored; in no list, or answered 127.255.255.254 (a list's "query refused",
not a listing): stored byte-exact; in an allow list too: stored. A zone
whose server never answers, or is not there, lists nobody: 250 within the
DNS timeout, with one warning naming the zone. Submission, where users are
authenticated, is not asked about.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conf.settings import Settings
from mtad.service import Service
from tests.conftest import make_settings
from tests.dnsserver import DnsServer, dns_server
from tests.integration.test_antivirus import random_clean, send_mx, submit
from tests.ports import free_port
from tests.protocol.smtp.conftest import (  # noqa: F401
    dkim_key,
    mta,
    populated,
    populated_template,
)
from tests.protocol.smtp.support import ALICE, BOB, DkimKey, mailbox_messages, standard_zone

CLIENT = "1.0.0.127"  # 127.0.0.1, reversed
OTHER = "127.0.0.2"  # a second client (loopback) in the lists below
REASON = "Listed since 2026: see https://listed.example/lookup?ip=127.0.0.1"
TIMEOUT = 1.0  # dns.timeout_seconds: the check's whole time


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A UDP port that takes queries and never answers (a list that is slow)."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))
        yield port


@pytest.fixture(scope="module")
def dns(dkim_key: DkimKey, silent_port: int) -> Iterator[DnsServer]:  # noqa: F811
    zone = standard_zone(dkim_key)
    zone.a(f"{CLIENT}.listed.example", "127.0.0.2").txt(f"{CLIENT}.listed.example", REASON)
    zone.a(f"{CLIENT}.other.example", "127.0.0.4")  # listed, no TXT
    zone.a(f"{CLIENT}.refused.example", "127.255.255.254")  # Spamhaus: query refused
    zone.a(f"{CLIENT}.outside.example", "192.0.2.7")  # not in 127/8: no listing
    zone.a(f"{CLIENT}.wl.example", "127.0.10.3")
    # OTHER (127.0.0.2), the second client: listed where CLIENT is not.
    for listed in ("clean", "refused", "outside", "listed"):
        zone.a(f"2.0.0.127.{listed}.example", "127.0.0.2")
    zone.forward("slow.example", silent_port)
    zone.forward("closed.example", free_port())  # nothing listens there
    with dns_server(zone) as server:
        yield server


@pytest.fixture
def lists(request: pytest.FixtureRequest) -> dict:
    """[antispam] dnsbl_zones and dnswl_zones: parametrize it (indirect)."""
    return request.param


@pytest.fixture
def settings(tmp_path: Path, dns: DnsServer, lists: dict) -> Settings:
    return make_settings(tmp_path / "data", dns=dns.settings(TIMEOUT), antispam=lists)


def lists_of(block: list[str], allow: list[str] | None = None) -> dict:
    return {"dnsbl_zones": block, "dnswl_zones": allow or []}


async def nothing_stored(storage) -> bool:
    return (await mailbox_messages(storage, ALICE) == []
            and await mailbox_messages(storage, ALICE, "Junk") == [])


@pytest.mark.parametrize(
    ("lists", "zone", "reason"),
    [
        (lists_of(["clean.example", "listed.example"]), "listed.example", REASON),
        (lists_of(["other.example", "listed.example"]), "other.example", ""),
        (lists_of(["listed.example"], ["clean.example"]), "listed.example", REASON),
        (lists_of(["slow.example", "closed.example", "listed.example"]), "listed.example",
         REASON),
    ],
    ids=["listed", "first-listing-no-txt", "allow-list-silent", "other-zones-down"],
    indirect=["lists"],
)
async def test_listed_client_is_refused_at_end_of_data(
    mta: Service, populated, zone: str, reason: str  # noqa: F811
) -> None:
    body = random_clean(random.randrange(200, 20_000), random.Random())
    reply = await send_mx(mta.port("mx"), body)
    expected = f"554 5.7.1 Service unavailable; client [127.0.0.1] blocked using {zone}"
    assert reply == (f"{expected}; {reason}" if reason else expected)
    assert await nothing_stored(populated)


@pytest.mark.parametrize(
    ("lists", "other_blocked_by"),
    [
        (lists_of(["clean.example"]), "clean.example"),
        (lists_of(["refused.example", "outside.example"]), "refused.example"),
        (lists_of(["other.example", "listed.example"], ["wl.example"]), "listed.example"),
    ],
    ids=["not-listed", "error-code-and-outside-127", "allow-listed"],
    indirect=["lists"],
)
async def test_client_not_blocked_is_stored_byte_exact(
    mta: Service, populated, lists: dict, other_blocked_by: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random()
    bodies = [random_clean(rng.randrange(200, 20_000), rng) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="delivery.dnsbl"):
        for body in bodies:
            reply = await send_mx(mta.port("mx"), body)
            assert reply.startswith("250 2.0.0"), reply
        # The same lists do refuse a client they list (so they were asked).
        reply = await send_mx(mta.port("mx"), bodies[0], source=OTHER)
    assert reply.startswith(f"554 5.7.1 Service unavailable; client [{OTHER}] blocked using"
                            f" {other_blocked_by}"), reply
    stored = await mailbox_messages(populated, ALICE)
    assert len(stored) == len(bodies)
    for raw, body in zip(stored, bodies, strict=True):
        assert raw.endswith(body)
        # The built-in anti-spam engine (on: no rspamd) counts the allow listing.
        listed = b"RCVD_IN_DNSWL(-2.00)" in raw[: -len(body)]
        assert listed == bool(lists["dnswl_zones"]), raw[: -len(body)]
    assert not [r for r in caplog.records if r.name == "delivery.dnsbl"]  # every zone answered


@pytest.mark.parametrize(
    "lists",
    [lists_of(["slow.example", "clean.example"]), lists_of(["closed.example"]),
     lists_of(["slow.example", "closed.example", "refused.example"])],
    ids=["silent", "closed-port", "both"],
    indirect=True,
)
async def test_list_down_is_not_listed_within_the_timeout(
    mta: Service, populated, lists: dict, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    body = random_clean(random.randrange(200, 20_000), random.Random())
    with caplog.at_level(logging.WARNING, logger="delivery.dnsbl"):
        started = time.monotonic()
        reply = await send_mx(mta.port("mx"), body)
        elapsed = time.monotonic() - started
    assert reply.startswith("250 2.0.0"), reply
    assert elapsed < TIMEOUT + 1.5, elapsed
    assert (await mailbox_messages(populated, ALICE))[0].endswith(body)
    warnings = [r.getMessage() for r in caplog.records if r.name == "delivery.dnsbl"]
    assert len(warnings) == 1, warnings  # once per message
    down = [z for z in lists["dnsbl_zones"] if z in ("slow.example", "closed.example")]
    assert all(z in warnings[0] for z in down), warnings
    assert "clean.example" not in warnings[0] and "refused.example" not in warnings[0]


@pytest.mark.parametrize("lists", [lists_of(["listed.example"])], indirect=True)
async def test_submission_is_not_asked_about(
    mta: Service, populated, client_tls_context  # noqa: F811
) -> None:
    body = random_clean(5_000, random.Random()).replace(
        b"From: someone@unlisted.example", f"From: {ALICE}".encode()
    )
    code, text = await asyncio.to_thread(submit, mta.port("submission"), client_tls_context,
                                         body)
    assert code == 250, text
    assert (await mailbox_messages(populated, BOB))[0].endswith(body)
    # ... while the MX, from the same address, is refused.
    reply = await send_mx(mta.port("mx"), body.replace(f"From: {ALICE}".encode(),
                                                       b"From: someone@unlisted.example"))
    assert reply.startswith("554 5.7.1 "), reply

"""The outbound relay's world, all on 127.0.0.0/8.

One port number ``relay_port`` is "port 25" for every remote MX (the
sender's ``queue.smtp_port``); each MX host has its own loopback address:

=====================  ==============  ====================================
domain                 MX address      peer
=====================  ==============  ====================================
peer.test              127.0.0.2       a second shardmail mtad (carol)
postfix.test           127.0.0.3       Debian's Postfix (any user)
flaky.test             127.0.0.4       scripted sink (4xx, then 250)
nullmx.test            --              RFC 7505 null MX
failover.test          127.0.0.6 dead  primary, nothing listens
                       127.0.0.7       secondary: scripted sink
crash.test             127.0.0.8       scripted sink that stalls
=====================  ==============  ====================================

The sender is shardmail at example.net (alice, bob), signing with a DKIM key
generated as ``mailctl dkim generate`` does, published in the test DNS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from conf.settings import Settings
from mtad.outbound.signing import generate_key
from tests.conftest import make_settings
from tests.dnsserver import DnsServer, Zone, dns_server
from tests.integration.outbound.sink import dead_host
from tests.ports import free_port
from tests.postfixpeer import PostfixPeer, postfix_peer

SENDER_DOMAIN = "example.net"
ALICE = "alice@example.net"
ALICE_PW = "alice-secret"
CAROL = "carol@peer.test"
SELECTOR = "shardmail"
HASHER = PasswordHasher.from_parameters(CHEAPEST)

PEER_IP = "127.0.0.2"
POSTFIX_IP = "127.0.0.3"
FLAKY_IP = "127.0.0.4"
DEAD_IP = "127.0.0.6"
BACKUP_IP = "127.0.0.7"
CRASH_IP = "127.0.0.8"


def _free_port_everywhere() -> int:
    """A port free on every loopback address we use."""
    return free_port(("127.0.0.1", PEER_IP, POSTFIX_IP, FLAKY_IP, DEAD_IP, BACKUP_IP, CRASH_IP))


@dataclass(frozen=True)
class DkimSetup:
    key_dir: Path
    record: str


@pytest.fixture(scope="session")
def relay_port() -> Iterator[int]:
    port = _free_port_everywhere()
    dead = dead_host(DEAD_IP, port)  # the dead primary MX: refuses connections
    try:
        yield port
    finally:
        dead.close()


@pytest.fixture(scope="session")
def dkim_setup(tmp_path_factory: pytest.TempPathFactory) -> DkimSetup:
    key_dir = tmp_path_factory.mktemp("dkim")
    _path, record = generate_key(key_dir, SENDER_DOMAIN, SELECTOR)
    return DkimSetup(key_dir, record)


@pytest.fixture(scope="session")
def relay_dns(dkim_setup: DkimSetup) -> Iterator[DnsServer]:
    zone = Zone()
    zone.txt(SENDER_DOMAIN, "v=spf1 ip4:127.0.0.0/8 -all")
    zone.txt(f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", dkim_setup.record)
    zone.a("mx.peer.test", PEER_IP).mx("peer.test", "mx.peer.test", 10)
    zone.a("mx.postfix.test", POSTFIX_IP).mx("postfix.test", "mx.postfix.test", 10)
    zone.a("mx.flaky.test", FLAKY_IP).mx("flaky.test", "mx.flaky.test", 10)
    zone.null_mx("nullmx.test")
    zone.a("dead.failover.test", DEAD_IP).mx("failover.test", "dead.failover.test", 10)
    zone.a("backup.failover.test", BACKUP_IP).mx("failover.test", "backup.failover.test", 20)
    zone.a("mx.crash.test", CRASH_IP).mx("crash.test", "mx.crash.test", 10)
    # RFC 5321 section 5.1: an exchanger that is a CNAME still gets mail.
    zone.options.append("--cname=alias.cnamed.test,mx.peer.test")
    zone.mx("cnamed.test", "alias.cnamed.test", 10)
    zone.a("implicit.test", PEER_IP)  # no MX: the implicit MX
    with dns_server(zone) as server:
        yield server


@pytest.fixture(scope="session")
def postfix(relay_port: int) -> Iterator[PostfixPeer]:
    with postfix_peer("postfix.test", POSTFIX_IP, relay_port) as peer:
        yield peer


def sender_settings(
    data_dir: Path, dns: DnsServer, relay_port: int, dkim: DkimSetup, **queue: object
) -> Settings:
    return make_settings(
        data_dir,
        dns=dns.settings(),
        queue={
            "workers": 4,
            "smtp_port": relay_port,
            "retry_schedule_seconds": [1],
            "poll_interval_seconds": 0.1,
            "lease_seconds": 30,
            "delay_warning_seconds": 0,
            "connect_timeout_seconds": 2,
            "command_timeout_seconds": 10,
            "dkim_key_dir": str(dkim.key_dir),
            **queue,
        },
    )


async def open_test_storage(data_dir: Path):
    from storage import open_storage_from_url

    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    return await open_storage_from_url(
        f"sqlite+aiosqlite:///{data_dir / 'shardmail.db'}",
        data_dir / "blobs",
        password_hasher=HASHER,
    )


@dataclass
class Node:
    settings: Settings
    storage: object
    service: object


@pytest.fixture
async def sender(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int, dkim_setup: DkimSetup, tls_context
) -> AsyncIterator[Node]:
    from mtad.service import start

    settings = sender_settings(tmp_path / "sender", relay_dns, relay_port, dkim_setup)
    storage = await open_test_storage(settings.data_dir)
    await storage.directory.add_domain(SENDER_DOMAIN)
    await storage.directory.add_account(ALICE, ALICE_PW)
    service = await start(settings, storage, tls_context)
    try:
        yield Node(settings, storage, service)
    finally:
        await service.close()
        await storage.close()


@pytest.fixture
async def peer(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int, tls_context
) -> AsyncIterator[Node]:
    """A second shardmail mtad receiving for peer.test on its own MX address."""
    from mtad.service import start

    settings = make_settings(
        tmp_path / "peer",
        server={"hostname": "mx.peer.test"},
        dns=relay_dns.settings(),
        smtp={"mx_listen": [f"{PEER_IP}:{relay_port}"]},
        queue={"workers": 0},
    )
    storage = await open_test_storage(settings.data_dir)
    await storage.directory.add_domain("peer.test")
    await storage.directory.add_account(CAROL, "carol-secret")
    service = await start(settings, storage, tls_context)
    try:
        yield Node(settings, storage, service)
    finally:
        await service.close()
        await storage.close()


async def eventually(check, timeout: float = 20.0, interval: float = 0.1):
    """Await ``check()`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check() if asyncio.iscoroutinefunction(check) else check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {getattr(check, '__name__', check)}")
        await asyncio.sleep(interval)

"""MX lookup through mtad's Resolver against the test dnsmasq (real DNS)."""

from __future__ import annotations

import pytest

from conf.settings import DnsSettings
from mtad.dns import Resolver
from mtad.outbound.mx import NoRoute, NullMx, mail_exchangers
from tests.dnsserver import DnsServer
from tests.integration.outbound.conftest import BACKUP_IP, DEAD_IP, PEER_IP


@pytest.fixture
def resolver(relay_dns: DnsServer) -> Resolver:
    return Resolver(DnsSettings(**relay_dns.settings()))


async def test_preference_order(resolver: Resolver) -> None:
    hosts = await mail_exchangers(resolver, "failover.test")
    assert [(h.name, h.preference, h.addresses) for h in hosts] == [
        ("dead.failover.test", 10, (DEAD_IP,)),
        ("backup.failover.test", 20, (BACKUP_IP,)),
    ]


async def test_exchanger_behind_a_cname(resolver: Resolver) -> None:
    [host] = await mail_exchangers(resolver, "cnamed.test")
    assert host.name == "alias.cnamed.test" and host.addresses == (PEER_IP,)


async def test_implicit_mx(resolver: Resolver) -> None:
    [host] = await mail_exchangers(resolver, "implicit.test")
    assert host.implicit and host.addresses == (PEER_IP,)


async def test_null_mx_and_nxdomain(resolver: Resolver) -> None:
    with pytest.raises(NullMx):
        await mail_exchangers(resolver, "nullmx.test")
    with pytest.raises(NoRoute):
        await mail_exchangers(resolver, "no-such-domain.test")

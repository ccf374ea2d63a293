"""MX selection (RFC 5321 section 5.1, RFC 7505) against a fake resolver."""

from __future__ import annotations

import random

import pytest

from mtad.dns import DnsTemporaryError, MxRecord
from mtad.outbound.mx import NoRoute, NullMx, mail_exchangers, order_exchangers


class FakeResolver:
    def __init__(self, mx=None, a=None, broken=()) -> None:
        self._mx = mx or {}
        self._a = a or {}
        self._broken = set(broken)

    async def mx(self, domain):
        return sorted(self._mx.get(domain, []), key=lambda m: m.preference)

    async def addresses(self, host):
        if host in self._broken:
            raise DnsTemporaryError(host)
        return list(self._a.get(host, []))

    async def txt(self, name):  # no MTA-STS record anywhere
        return []

    async def secure(self, name, rdtype):  # no DNSSEC
        return [], False


async def test_preference_order_and_addresses() -> None:
    resolver = FakeResolver(
        mx={"d.test": [MxRecord(20, "backup.d.test"), MxRecord(10, "mx.d.test")]},
        a={"mx.d.test": ["127.0.0.2"], "backup.d.test": ["127.0.0.3", "::1"]},
    )
    hosts = await mail_exchangers(resolver, "d.test")
    assert [(h.name, h.addresses) for h in hosts] == [
        ("mx.d.test", ("127.0.0.2",)),
        ("backup.d.test", ("127.0.0.3", "::1")),
    ]


def test_equal_preferences_are_shuffled_but_never_reordered_across() -> None:
    records = [MxRecord(10, f"a{i}") for i in range(4)] + [MxRecord(5, "first")]
    seen = set()
    for seed in range(30):
        order = order_exchangers(records, random.Random(seed))
        assert order[0].exchange == "first"
        seen.add(tuple(r.exchange for r in order[1:]))
    assert len(seen) > 1  # spread over the equal-preference hosts


async def test_implicit_mx_from_address_records() -> None:
    resolver = FakeResolver(a={"plain.test": ["127.0.0.9"]})
    [host] = await mail_exchangers(resolver, "plain.test")
    assert host.implicit and host.addresses == ("127.0.0.9",)


@pytest.mark.parametrize(
    ("records", "error"),
    [
        ([MxRecord(0, "")], NullMx),  # RFC 7505 "MX 0 ."
        ([MxRecord(0, ""), MxRecord(10, "mx.d.test")], NullMx),
        ([], NoRoute),  # neither MX nor A
        ([MxRecord(10, "nowhere.d.test")], NoRoute),
    ],
)
async def test_permanent_routing_failures(records, error) -> None:
    resolver = FakeResolver(mx={"d.test": records}, a={"mx.d.test": ["127.0.0.2"]})
    with pytest.raises(error):
        await mail_exchangers(resolver, "d.test")


async def test_one_exchanger_failing_dns_leaves_the_others() -> None:
    resolver = FakeResolver(
        mx={"d.test": [MxRecord(10, "broken.d.test"), MxRecord(20, "ok.d.test")]},
        a={"ok.d.test": ["127.0.0.4"]},
        broken={"broken.d.test"},
    )
    assert [h.name for h in await mail_exchangers(resolver, "d.test")] == ["ok.d.test"]
    resolver = FakeResolver(
        mx={"d.test": [MxRecord(10, "broken.d.test")]}, broken={"broken.d.test"}
    )
    with pytest.raises(DnsTemporaryError):
        await mail_exchangers(resolver, "d.test")


async def test_address_literal_needs_no_lookup() -> None:
    [host] = await mail_exchangers(FakeResolver(), "[127.0.0.5]")
    assert host.addresses == ("127.0.0.5",)

"""DNS lists without sockets: the query name of RFC 5782 sections 2.1 and 2.4
for random addresses, against an independent construction from
``ipaddress``'s reverse pointer; which answers are listings; and the
settings that turn the lists on."""

from __future__ import annotations

import ipaddress
import random

import pytest

from conf.settings import DNSL_ZONE_MAX, ConfigError, load_settings
from delivery.checks_dnsbl import is_listing, query_name

ZONE = "bl.example"


def _random_ipv4(rng: random.Random) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(rng.getrandbits(32))


@pytest.mark.parametrize("seed", range(5))
def test_ipv4_query_name_is_the_reversed_octets(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        address = _random_ipv4(rng)
        expected = address.reverse_pointer.removesuffix(".in-addr.arpa") + "." + ZONE
        assert query_name(str(address), ZONE) == expected
    # RFC 5782 section 2.1's own example.
    assert query_name("192.0.2.99", ZONE) == f"99.2.0.192.{ZONE}"


@pytest.mark.parametrize("seed", range(5))
def test_ipv6_query_name_is_the_reversed_nibbles(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        address = ipaddress.IPv6Address(rng.getrandbits(128))
        if address.ipv4_mapped:
            continue
        expected = address.reverse_pointer.removesuffix(".ip6.arpa") + "." + ZONE
        # The compressed text form (with "::") must give the same name.
        assert query_name(address.compressed, ZONE) == expected
        assert len(expected.split(".")) == 32 + len(ZONE.split("."))


def test_ipv4_mapped_ipv6_client_is_asked_as_ipv4() -> None:
    address = _random_ipv4(random.Random(9))
    mapped = f"::ffff:{address}"
    assert query_name(mapped, ZONE) == query_name(str(address), ZONE)


@pytest.mark.parametrize("bad", ["", "unix:/run/sock", "300.1.2.3", "1.2.3"])
def test_no_address_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        query_name(bad, ZONE)


def test_listings_are_127_8_but_not_the_error_codes() -> None:
    rng = random.Random(3)
    for _ in range(200):
        listed = ipaddress.IPv4Address((127 << 24) | rng.getrandbits(24))
        expected = not str(listed).startswith("127.255.255.")
        assert is_listing(str(listed)) is expected, listed
        outside = _random_ipv4(rng)
        assert is_listing(str(outside)) is str(outside).startswith("127."), outside
    assert not is_listing("127.255.255.254")  # Spamhaus: query refused
    assert is_listing("127.0.0.2")  # RFC 5782 section 5: the test entry's answer
    assert not is_listing("::1")


def test_zones_are_normalised_and_default_off() -> None:
    assert load_settings().antispam.dnsbl_zones == []
    s = load_settings(overrides=[
        "antispam.dnsbl_zones=['Zen.Example.', '0spam.bl.example']",
        "antispam.dnswl_zones=['list.DNSWL.example']",
    ])
    assert s.antispam.dnsbl_zones == ["zen.example", "0spam.bl.example"]
    assert s.antispam.dnswl_zones == ["list.dnswl.example"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["antispam.dnsbl_zones=['zen example']"], "is not a DNS zone name"),
        (["antispam.dnsbl_zones=['zen.example', 'zen..example']"], "is not a DNS zone name"),
        (["antispam.dnsbl_zones=['localhost']"], "is not a DNS zone name"),
        (["antispam.dnsbl_zones=['-bad.example']"], "is not a DNS zone name"),
        (["antispam.dnsbl_zones=['bad_.example']"], "is not a DNS zone name"),
        ([f"antispam.dnsbl_zones=['{'a' * 64}.example']"], "is not a DNS zone name"),
        ([f"antispam.dnsbl_zones=['{('a' * 60 + '.') * 3}example']"], "is not a DNS zone name"),
        (["antispam.dnsbl_zones=['a.example']", "antispam.dnswl_zones=['wl..example']"],
         "is not a DNS zone name"),
        (["antispam.dnsbl_zones=['zen.example', 'ZEN.example']"], "listed twice"),
        (["antispam.dnswl_zones=['wl.example']"], "dnswl_zones needs dnsbl_zones"),
        (["antispam.dnsbl_zones=['both.example']", "antispam.dnswl_zones=['both.example']"],
         "in both dnsbl_zones and dnswl_zones"),
    ],
)
def test_bad_zone_lists_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides=overrides)
    assert "antispam" in str(err.value)
    assert message in str(err.value)


def test_longest_zone_leaves_room_for_an_ipv6_query() -> None:
    zone = ".".join(["a" * 63, "b" * 63, "c" * (DNSL_ZONE_MAX - 2 * 64)])
    assert len(zone) == DNSL_ZONE_MAX
    s = load_settings(overrides=[f"antispam.dnsbl_zones=['{zone}']"])
    name = query_name("2001:db8::1", s.antispam.dnsbl_zones[0])
    assert len(name) == 253  # RFC 1035 section 2.3.4
    with pytest.raises(ConfigError):
        load_settings(overrides=[f"antispam.dnsbl_zones=['c.{zone}']"])

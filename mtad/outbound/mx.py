"""Where mail for a domain goes: MX lookup with the RFC 5321 section 5.1 rules.

Contract: :func:`mail_exchangers` returns the hosts to try, in order, each
with its addresses; it raises :class:`NullMx` (RFC 7505: the domain accepts
no mail, a permanent failure), :class:`NoRoute` (no MX and no address: the
domain does not exist or has no mail host, permanent) or
``DnsTemporaryError`` (try later).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from mtad.dns import DnsTemporaryError, MxRecord, Resolver


class NullMx(Exception):
    """RFC 7505 section 3: ``MX 0 .`` -- the domain accepts no mail."""


class NoRoute(Exception):
    """Neither MX nor address records: permanent (RFC 5321 section 5.1)."""


@dataclass(frozen=True)
class MailHost:
    """One mail exchanger to try: ``name`` (for TLS and logs) and its addresses."""

    name: str
    preference: int
    addresses: tuple[str, ...]
    implicit: bool = False  # the domain's own A/AAAA, no MX record


# One generator for every lookup: a new ``random.Random()`` per delivery
# seeds itself from os.urandom, a system call and a 2.5 KB state each time.
_SHUFFLE = random.Random()


def order_exchangers(records: list[MxRecord], rng: random.Random | None = None) -> list[MxRecord]:
    """Lowest preference first; records of equal preference in random order
    (RFC 5321 section 5.1: "randomize them to spread the load")."""
    rng = rng or _SHUFFLE
    by_pref: dict[int, list[MxRecord]] = {}
    for record in records:
        by_pref.setdefault(record.preference, []).append(record)
    ordered: list[MxRecord] = []
    for pref in sorted(by_pref):
        group = list(by_pref[pref])
        if len(group) > 1:
            rng.shuffle(group)
        ordered.extend(group)
    return ordered


def _literal(domain: str) -> str | None:
    """The IP of an address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


async def mail_exchangers(
    resolver: Resolver, domain: str, rng: random.Random | None = None
) -> list[MailHost]:
    """The hosts that receive mail for ``domain``, in the order to try them.

    * MX records sorted by preference, equal preferences shuffled; a CNAME
      at the domain or at an exchanger is followed by the resolver.
    * A null MX (one record, exchange ".") raises :class:`NullMx` at once
      (RFC 7505 section 3).
    * No MX: the domain itself is the implicit MX (RFC 5321 section 5.1).
    * An exchanger without addresses is skipped; if none has any,
      :class:`NoRoute`.
    """
    literal = _literal(domain)
    if literal is not None:  # RFC 5321 section 4.1.3 address literal: no lookup
        return [MailHost(literal, 0, (literal,), implicit=True)]
    records = await resolver.mx(domain)
    if any(r.exchange == "" for r in records):
        # RFC 7505 section 3: a null MX means no mail; other records alongside
        # it are a misconfiguration, and we honour the null MX all the same.
        raise NullMx(domain)
    if not records:
        addresses = await resolver.addresses(domain)
        if not addresses:
            raise NoRoute(domain)
        return [MailHost(domain, 0, tuple(addresses), implicit=True)]
    hosts: list[MailHost] = []
    temporary: DnsTemporaryError | None = None
    for record in order_exchangers(records, rng):
        exchange_literal = _literal(record.exchange)
        try:
            addresses = (
                [exchange_literal]
                if exchange_literal
                else await resolver.addresses(record.exchange)
            )
        except DnsTemporaryError as exc:  # the others may still answer
            temporary = exc
            continue
        if addresses:
            hosts.append(MailHost(record.exchange, record.preference, tuple(addresses)))
    if not hosts:
        if temporary is not None:
            raise temporary
        raise NoRoute(domain)
    return hosts

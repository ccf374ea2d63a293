"""DNS block and allow lists (RFC 5782) for the MX's clients: the first part
of the built-in anti-spam engine, which needs no rspamd.

Only the MX flow is asked about (:class:`Flow.MX`): submission and the HTTP
API's send come from authenticated users and are accepted. For the client's
IP every zone of ``[antispam] dnsbl_zones`` (block) and ``dnswl_zones``
(allow) is queried at once for the A records of the query name
(:func:`query_name`), through the resolver mtad resolves everything with
(``[dns]``, never the system's), all within ``dns.timeout_seconds``.

* RFC 5782 section 2.1: a listing is an A record in 127.0.0.0/8. Answers in
  127.255.255.0/24 are the lists' own error codes (Spamhaus answers
  127.255.255.254 to a refused query), not listings; nor is anything
  outside 127/8.
* A zone that fails or gives no answer in time lists nobody, with one
  WARNING per message naming the zones: a block list being down must not
  stop mail.
* A client in an allow list is accepted whatever the block lists say (the
  other checks, rspamd and clamd, still apply), and the built-in engine
  takes :data:`DNSWL_SYMBOL`'s 2 points off its score. A client in a block list is
  refused with 554 5.7.1 (RFC 3463 section 3.8, X.7.1 delivery not
  authorized) naming the first such zone in the order configured, with the
  zone's TXT record for the address (RFC 5782 section 2.1: the reason,
  often a URL) appended, printable ASCII and bounded.

The check stage runs at the end of DATA, so that is where the refusal is
given (RFC 5321 section 4.2.5, the reply to the end of DATA; section 3.8
allows a server to refuse a client for policy at any reply). The
connection stays open for the client's next transaction or QUIT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from conf.settings import Settings
from delivery.checks import Action, Flow, Subject, Verdict, printable

log = logging.getLogger("delivery.dnsbl")

# RFC 5782 section 2.1: an entry is an A record in 127.0.0.0/8 ...
LISTING = ipaddress.IPv4Network("127.0.0.0/8")
# ... and 127.255.255.0/24 is where lists put their error codes.
LIST_ERRORS = ipaddress.IPv4Network("127.255.255.0/24")
TXT_MAX = 200  # the list's reason, shown in the reply (RFC 5321 4.5.3.1.5: 512 a line)
# What an allow-listed client takes off the built-in engine's score
# (delivery/spamengine.py): vouched for, not exempt from the rules and Bayes.
DNSWL_SYMBOL = ("RCVD_IN_DNSWL", -2.0)


def blocked_reply(ip: str, zone: str, reason: str = "") -> tuple[int, str, str]:
    """554 5.7.1 naming the client and the zone, with the list's reason if any
    (RFC 5782 section 2.1, RFC 3463 section 3.8)."""
    text = f"Service unavailable; client [{ip}] blocked using {zone}"
    return (554, "5.7.1", f"{text}; {reason}" if reason else text)


class ZoneResolver(Protocol):
    """What the check asks of a resolver (mtad's ``mtad.dns.Resolver``; this
    package sits below mtad and names it only here). Both coroutines answer
    NXDOMAIN and "no data" with an empty list and raise for a lookup that got
    no answer (timeout, server failure)."""

    async def a(self, name: str) -> list[str]: ...

    async def txt(self, name: str) -> list[str]: ...


def query_name(ip: str, zone: str) -> str:
    """The name to query for ``ip`` in ``zone``: the IPv4 address's octets
    reversed (RFC 5782 section 2.1), an IPv6 address's 32 nibbles reversed
    (section 2.4), then the zone. An IPv4-mapped IPv6 address is its IPv4
    address. ValueError if ``ip`` is no IP address."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.version == 4:
        labels = [str(octet) for octet in address.packed]
    else:
        labels = list(address.packed.hex())
    return ".".join([*reversed(labels), zone])


def is_listing(answer: str) -> bool:
    """Whether an A record answered by a list is a listing (module docstring)."""
    try:
        address = ipaddress.IPv4Address(answer)
    except ValueError:
        return False
    return address in LISTING and address not in LIST_ERRORS


@dataclass(frozen=True)
class ZoneAnswer:
    """What one zone said of the client: ``listed`` with ``reason`` (its TXT),
    or ``failure`` (for the log) when it gave no answer."""

    zone: str
    listed: bool = False
    reason: str = ""
    failure: str = ""


class DnsblCheck:
    """The DNS lists check (module docstring). ``timeout`` bounds the whole
    check: every zone is asked at once, each within it."""

    name = "dnsbl"

    def __init__(
        self,
        resolver: ZoneResolver,
        block_zones: Sequence[str],
        allow_zones: Sequence[str] = (),
        timeout: float = 5.0,
    ) -> None:
        self.resolver = resolver
        self.block_zones = tuple(block_zones)
        self.allow_zones = tuple(allow_zones)
        self.timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings, resolver: ZoneResolver) -> DnsblCheck:
        spam = settings.antispam
        return cls(resolver, spam.dnsbl_zones, spam.dnswl_zones, settings.dns.timeout_seconds)

    async def check(self, subject: Subject) -> Verdict:
        accept = Verdict(check=self.name)
        if subject.flow is not Flow.MX:
            return accept
        zones = self.allow_zones + self.block_zones
        try:
            names = [query_name(subject.client_ip, zone) for zone in zones]
        except ValueError:  # no IP address (a Unix socket peer): nothing to ask
            return accept
        deadline = asyncio.get_running_loop().time() + self.timeout
        answers = await asyncio.gather(
            *(self._ask(name, zone, deadline, explain=zone in self.block_zones)
              for name, zone in zip(names, zones, strict=True))
        )
        if failed := [a for a in answers if a.failure]:
            log.warning(
                "client [%s]: no answer from %s; taken as not listed", subject.client_ip,
                "; ".join(f"{a.zone} ({a.failure})" for a in failed),
            )
        allowed = answers[: len(self.allow_zones)]
        blocked = [a for a in answers[len(self.allow_zones) :] if a.listed]
        if any(a.listed for a in allowed):
            return Verdict(check=self.name, symbols=(DNSWL_SYMBOL,))
        if not blocked:
            return accept
        reply = blocked_reply(subject.client_ip, blocked[0].zone, blocked[0].reason)
        return Verdict(Action.REJECT, reply, check=self.name)

    async def _ask(self, name: str, zone: str, deadline: float, explain: bool) -> ZoneAnswer:
        """``zone``'s answer for ``name``; with ``explain``, a listing's TXT
        too (a TXT lookup that fails leaves the listing without its reason)."""
        try:
            async with asyncio.timeout_at(deadline):
                listed = any(is_listing(a) for a in await self.resolver.a(name))
        except Exception as exc:  # the resolver's own errors and the deadline: no answer
            failure = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
            return ZoneAnswer(zone, failure=failure or type(exc).__name__)
        if not (listed and explain):
            return ZoneAnswer(zone, listed)
        try:
            async with asyncio.timeout_at(deadline):
                texts = await self.resolver.txt(name)
        except Exception:  # the listing stands without its reason
            texts = []
        reasons = (printable(t, TXT_MAX) for t in texts)
        return ZoneAnswer(zone, True, next((r for r in reasons if r), ""))


__all__ = ["DNSWL_SYMBOL", "DnsblCheck", "ZoneAnswer", "ZoneResolver", "blocked_reply",
           "is_listing", "query_name"]

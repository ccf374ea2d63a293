"""One DNS resolver for everything mtad looks up (SPF, DKIM, DMARC, MX, DNS lists).

Contract: a :class:`Resolver` is built once from ``settings.dns`` and shared.
Its coroutines (``a``, ``txt``, ``mx``, ``addresses``) never block the event loop;
its ``*_sync`` functions are for libraries that resolve synchronously
(pyspf, dkimpy) and must only be called from a worker thread
(``asyncio.to_thread``). Both paths use the same nameservers, port and
timeout. Lookups answer NXDOMAIN and "no data" alike with an empty list;
a timeout or server failure raises :class:`DnsTemporaryError`.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver
import spf

from conf.settings import DnsSettings


class DnsTemporaryError(Exception):
    """A lookup timed out or the servers failed; a retry may succeed."""


@dataclass(frozen=True)
class MxRecord:
    preference: int
    exchange: str  # without the trailing dot; "" for a null MX (RFC 7505)


def _configure(resolver: dns.resolver.Resolver, settings: DnsSettings) -> None:
    if settings.nameservers:
        resolver.nameservers = list(settings.nameservers)
        resolver.port = settings.port
    resolver.timeout = settings.timeout_seconds
    resolver.lifetime = settings.timeout_seconds
    resolver.cache = dns.resolver.LRUCache(10_000)
    if settings.trust_ad:
        # RFC 6840 section 5.7: AD in a query asks a validating resolver to
        # say whether it validated the answer.
        resolver.flags = dns.flags.RD | dns.flags.AD


class Resolver:
    """dnspython's async resolver configured from ``settings.dns`` (empty
    nameservers: /etc/resolv.conf), plus a synchronous twin for threads."""

    def __init__(self, settings: DnsSettings) -> None:
        configure = not settings.nameservers
        self.settings = settings
        self.async_resolver = dns.asyncresolver.Resolver(configure=configure)
        self.sync_resolver = dns.resolver.Resolver(configure=configure)
        _configure(self.async_resolver, settings)
        _configure(self.sync_resolver, settings)

    # -- async: the event loop's lookups ---------------------------------

    async def _resolve(self, name: str, rdtype: str) -> list[Any]:
        try:
            answer = await self.async_resolver.resolve(
                name, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsTemporaryError(f"{rdtype} {name}: {exc}") from exc
        return list(answer.rrset or ())

    async def secure(self, name: str, rdtype: str) -> tuple[list[Any], bool]:
        """The records of ``name`` and whether they are DNSSEC-validated: the
        AD bit of the answer (RFC 4035 section 3.2.3), believed only with
        ``dns.trust_ad`` (a validating resolver of our own, as Postfix's
        smtp_dns_support_level=dane). A validated NXDOMAIN is an empty list
        and True. SERVFAIL or a timeout raises :class:`DnsTemporaryError`."""
        try:
            answer = await self.async_resolver.resolve(
                name, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values())
            ad = bool(responses) and all(r.flags & dns.flags.AD for r in responses)
            return [], self.settings.trust_ad and ad
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsTemporaryError(f"{rdtype} {name}: {exc}") from exc
        ad = bool(answer.response.flags & dns.flags.AD)
        return list(answer.rrset or ()), self.settings.trust_ad and ad

    async def txt(self, name: str) -> list[str]:
        """TXT records of ``name``, each with its strings joined."""
        records = await self._resolve(name, "TXT")
        return [b"".join(r.strings).decode("utf-8", "replace") for r in records]

    async def mx(self, domain: str) -> list[MxRecord]:
        """MX records sorted by preference; a null MX is ``exchange == ""``."""
        records = await self._resolve(domain, "MX")
        out = [
            MxRecord(r.preference, r.exchange.to_text(omit_final_dot=True).rstrip("."))
            for r in records
        ]
        return sorted(out, key=lambda m: m.preference)

    async def a(self, name: str) -> list[str]:
        """IPv4 addresses of ``name`` (its A records alone)."""
        return [r.address for r in await self._resolve(name, "A")]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``."""
        found = [r.address for r in await self._resolve(host, "A")]
        found += [r.address for r in await self._resolve(host, "AAAA")]
        return found

    async def ptr(self, ip: str) -> list[str]:
        name = ipaddress.ip_address(ip).reverse_pointer
        return [r.target.to_text(omit_final_dot=True) for r in await self._resolve(name, "PTR")]

    # -- sync: for pyspf and dkimpy in worker threads ---------------------

    def dkim_txt_sync(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record of ``name`` or None."""
        import dkim

        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = self.sync_resolver.resolve(
                qname, "TXT", raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        for record in answer.rrset or ():
            return b"".join(record.strings)
        return None

    def spf_lookup_sync(
        self, name: str, qtype: str, strict: bool = True, timeout: float = 20
    ) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's ``DNSLookup`` interface: ``[((name, qtype), value), ...]``."""
        try:
            answer = self.sync_resolver.resolve(name, qtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        out: list[tuple[tuple[str, str], Any]] = []
        for rrset in answer.response.answer:
            rname = rrset.name.to_text(omit_final_dot=True)
            rtype = dns.rdatatype.to_text(rrset.rdtype)
            for r in rrset:
                if rtype in ("A", "AAAA"):
                    out.append(((rname, rtype), r.address))
                elif rtype == "MX":
                    out.append(((rname, rtype), (r.preference, r.exchange)))
                elif rtype == "PTR":
                    out.append(((rname, rtype), r.target.to_text(True)))
                elif rtype in ("TXT", "SPF"):
                    out.append(((rname, rtype), r.strings))
                elif rtype == "CNAME":
                    out.append(((rname, rtype), r.target.to_text(True)))
        return out


# pyspf resolves through the module global ``spf.DNSLookup``. We install one
# dispatcher that uses the Resolver of the calling context (asyncio.to_thread
# copies contextvars into the worker thread), so several services with
# different resolvers can share a process (tests) without interfering.
_current: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "mtad_spf_resolver", default=None
)
_pyspf_default = spf.DNSLookup


def _spf_dispatch(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list:
    resolver = _current.get()
    if resolver is None:
        return _pyspf_default(name, qtype, strict, timeout)
    return resolver.spf_lookup_sync(name, qtype, strict, timeout)


spf.DNSLookup = _spf_dispatch


@contextmanager
def resolving_with(resolver: Resolver) -> Iterator[None]:
    """Within this block (and threads started from it by asyncio.to_thread),
    pyspf resolves through ``resolver``."""
    token = _current.set(resolver)
    try:
        yield
    finally:
        _current.reset(token)

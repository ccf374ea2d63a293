"""Sender authentication checks for inbound mail: SPF, DKIM, DMARC.

Contract: :func:`authenticate_message` runs the checks enabled in
``settings.smtp`` and returns :class:`AuthenticationResults`, whose
``header()`` is the RFC 8601 Authentication-Results field to prepend and
whose ``dmarc.disposition`` says whether DMARC asks to reject or
quarantine. pyspf and dkimpy are synchronous: they run in
``asyncio.to_thread`` and resolve through the shared :class:`Resolver`.
A check never raises: DNS trouble is ``temperror``, junk is ``permerror``.

Memory: a spooled (large) message is checked from its header alone
(DMARC needs the From field, SPF nothing). Only a header with a
DKIM-Signature field makes the whole message be read, for dkimpy, which
takes bytes: in the verifying thread, dropped after it, and at most
``WHOLE_READS`` such messages at once in the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import dkim
import dkim.util
import spf

from delivery.address import domain_of
from delivery.headers import fold, from_domains, iter_fields
from mtad import dmarc
from mtad.dns import Resolver, resolving_with

log = logging.getLogger("mtad.checks")

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# Spooled messages read whole for DKIM at once, process-wide: each costs
# its size and dkimpy's canonical copies; the others wait their turn.
WHOLE_READS = 2
_whole_reads: asyncio.Semaphore | None = None


@dataclass(frozen=True)
class SpfResult:
    """RFC 7208 section 2.6 result for the MAIL FROM (or HELO) identity."""

    result: str
    identity: str  # the address checked: MAIL FROM, or postmaster@HELO
    scope: str  # "mailfrom" or "helo"

    @property
    def domain(self) -> str:
        return domain_of(self.identity)

    def header_value(self) -> str:
        prop = "smtp.mailfrom" if self.scope == "mailfrom" else "smtp.helo"
        value = self.identity if self.scope == "mailfrom" else self.domain
        return f"spf={self.result} {prop}={value}"


@dataclass(frozen=True)
class DkimResult:
    """One DKIM-Signature's verdict (RFC 6376 section 6, RFC 8601 2.7.1)."""

    result: str  # pass, fail, neutral, temperror, permerror
    domain: str
    selector: str
    b: str  # first 8 characters of b= (RFC 6008) to tell signatures apart

    def header_value(self) -> str:
        return (
            f"dkim={self.result} header.d={self.domain} header.s={self.selector} header.b={self.b}"
        )


@dataclass(frozen=True)
class AuthenticationResults:
    authserv_id: str
    spf: SpfResult | None
    dkim: tuple[DkimResult, ...] = ()
    dmarc: dmarc.DmarcResult | None = None
    extra: tuple[str, ...] = field(default=())

    def header(self) -> bytes:
        """The RFC 8601 section 2.2 Authentication-Results field, CRLF-terminated."""
        parts: list[str] = []
        for method in self.extra:
            parts.append(method)
        if self.spf is not None:
            parts.append(self.spf.header_value())
        if self.dkim:
            parts.extend(d.header_value() for d in self.dkim)
        elif self.spf is not None:
            parts.append("dkim=none")
        if self.dmarc is not None:
            parts.append(self.dmarc.header_value())
        if not parts:
            parts.append("none")
        joined = [p + ";" for p in parts[:-1]] + [parts[-1]]
        return fold("Authentication-Results", [f"{self.authserv_id};", *joined])


def _spf_check(ip: str, identity: str, helo: str, receiver: str, timeout: float) -> str:
    result, _code, _expl = spf.query(
        i=ip, s=identity, h=helo, receiver=receiver, timeout=timeout
    ).check()
    return result if result in SPF_RESULTS else "permerror"


async def check_spf(
    resolver: Resolver, ip: str, mail_from: str, helo: str, receiver: str
) -> SpfResult:
    """RFC 7208: check MAIL FROM; a null sender is checked as postmaster@HELO
    (section 2.4)."""
    if mail_from:
        identity, scope = mail_from, "mailfrom"
    else:
        identity, scope = f"postmaster@{helo}", "helo"
    try:
        with resolving_with(resolver):
            result = await asyncio.to_thread(
                _spf_check, ip, identity, helo, receiver, resolver.settings.timeout_seconds
            )
    except Exception:  # pyspf raises on odd input; never fail the transaction for it
        log.warning("SPF check of %s failed", identity, exc_info=True)
        result = "permerror"
    return SpfResult(result, identity, scope)


def dkim_signatures(header: bytes) -> list[bytes]:
    """The values of the DKIM-Signature fields (RFC 6376 section 3.5) of
    a message's header block (the message itself will do: only its
    header is read)."""
    return [v for name, v, _, _ in iter_fields(header) if name == "dkim-signature"]


def _dkim_verify_all(message: bytes, dnsfunc, timeout: float) -> list[DkimResult]:
    signatures = dkim_signatures(message)
    results = []
    for idx, raw_sig in enumerate(signatures):
        try:
            tags = dkim.util.parse_tag_value(raw_sig)
        except Exception:
            tags = {}
        domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
        selector = tags.get(b"s", b"").decode("ascii", "replace")
        b = b"".join(tags.get(b"b", b"").split())[:8].decode("ascii", "replace")
        verifier = dkim.DKIM(message, timeout=timeout)
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
            verdict = "pass" if ok else "fail"
        except dkim.DnsTimeoutError:
            verdict = "temperror"
        except dkim.KeyFormatError:
            verdict = "permerror"
        except dkim.ValidationError as exc:
            # dkimpy reports a body hash mismatch as a ValidationError; RFC 6376
            # section 6.1.3 makes that a failed signature, not a broken one.
            verdict = "fail" if "body hash mismatch" in str(exc) else "permerror"
        except dkim.DKIMException:
            verdict = "fail"
        except Exception:
            verdict = "permerror"
        results.append(DkimResult(verdict, domain, selector, b))
    return results


def _read_and_verify(whole: Callable[[], bytes], dnsfunc, timeout: float) -> list[DkimResult]:
    # In a worker thread: the message is read here and dropped on return.
    return _dkim_verify_all(whole(), dnsfunc, timeout)


async def check_dkim(
    resolver: Resolver, message: bytes, whole: Callable[[], bytes] | None = None
) -> tuple[DkimResult, ...]:
    """Verify every DKIM-Signature field (RFC 6376 section 6.1).
    ``message``: the message, or its header block alone when ``whole``
    reads the rest (blocking: a spooled message's ``read_all``), which is
    called only if the header has a DKIM-Signature field, in the verifying
    thread, at most ``WHOLE_READS`` at once."""
    global _whole_reads
    if not dkim_signatures(message):
        return ()  # nothing to verify: the body is never read
    timeout = resolver.settings.timeout_seconds
    try:
        if whole is None:
            results = await asyncio.to_thread(
                _dkim_verify_all, message, resolver.dkim_txt_sync, timeout
            )
        else:
            if _whole_reads is None:
                _whole_reads = asyncio.Semaphore(WHOLE_READS)
            async with _whole_reads:
                results = await asyncio.to_thread(
                    _read_and_verify, whole, resolver.dkim_txt_sync, timeout
                )
    except Exception:
        log.warning("DKIM verification crashed", exc_info=True)
        return ()
    return tuple(results)


async def authenticate_message(
    resolver: Resolver,
    *,
    authserv_id: str,
    client_ip: str,
    helo: str,
    mail_from: str,
    message: bytes,
    whole: Callable[[], bytes] | None = None,
    spf_enabled: bool = True,
    dkim_enabled: bool = True,
    dmarc_enabled: bool = True,
) -> AuthenticationResults:
    """SPF and DKIM concurrently, then DMARC from both. ``message``: the
    message, or its header block with ``whole`` reading all of it for DKIM
    (see :func:`check_dkim`). DMARC is left out
    when disabled or when neither SPF nor DKIM ran: RFC 7489 section 4.2
    passes a message only on an aligned SPF or DKIM pass, so without either
    check every domain with a policy would fail."""
    spf_result: SpfResult | None = None
    dkim_results: tuple[DkimResult, ...] = ()
    if spf_enabled and dkim_enabled:
        spf_result, dkim_results = await asyncio.gather(
            check_spf(resolver, client_ip, mail_from, helo, authserv_id),
            check_dkim(resolver, message, whole),
        )
    elif spf_enabled:  # one check alone needs no tasks
        spf_result = await check_spf(resolver, client_ip, mail_from, helo, authserv_id)
    elif dkim_enabled:
        dkim_results = await check_dkim(resolver, message, whole)
    if not dmarc_enabled or not (spf_enabled or dkim_enabled):
        return AuthenticationResults(authserv_id, spf_result, tuple(dkim_results))
    domains = from_domains(message)
    from_domain = domains[0] if len(set(domains)) == 1 and domains[0] else None
    dmarc_result = await dmarc.evaluate(
        resolver,
        from_domain,
        spf_result.result if spf_result else "none",
        spf_result.domain if spf_result else "",
        [d.domain for d in dkim_results if d.result == "pass"],
    )
    return AuthenticationResults(authserv_id, spf_result, tuple(dkim_results), dmarc_result)

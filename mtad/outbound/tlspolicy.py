"""Which TLS a delivery to a domain, and to each of its MX hosts, must have.

Contract: :class:`TlsPolicy` is built once from the settings. Its
``for_domain`` gives a :class:`DomainTls` for one delivery attempt, whose
``for_host`` gives the :class:`HostTls` of one MX host or raises
:class:`HostTlsError` (that host must not be used now: try the next; if
none is left the recipients are deferred, never sent in clear).

Levels (``queue.tls_policy``, as Postfix's smtp_tls_policy_maps):

* ``none``: no STARTTLS. ``may``: STARTTLS when offered, unverified, and
  cleartext if the handshake fails (RFC 7435). ``encrypt``: TLS required,
  unverified. ``verify``: TLS required, PKIX-valid certificate naming the MX
  host (``require_tls_domains`` means this).
* ``dane``: RFC 7672 where the MX host has DNSSEC-validated TLSA records,
  else ``may``. ``mta-sts``: the domain's RFC 8461 policy, else ``may``.
* A domain not listed: DANE where ``dns.trust_ad`` and the host has
  validated TLSA records (DANE first: RFC 8461 section 2), else MTA-STS
  when ``queue.mta_sts``, else ``may``.

Failures under DANE or MTA-STS (and every failure of an MTA-STS policy in
testing mode, where mail still goes out) are recorded by
:class:`TlsReportLog` for TLS-RPT (RFC 8460).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from conf.settings import QueueSettings
from mtad.dns import DnsTemporaryError
from mtad.outbound.dane import DaneLookup, Tlsa, tlsa_for
from mtad.outbound.mtasts import StsCache, StsPolicy
from mtad.outbound.mx import MailHost

log = logging.getLogger("mtad.outbound")

MANDATORY = ("encrypt", "verify", "dane")


class HostTlsError(Exception):
    """This MX host must not be used now (RFC 3463 code ``enhanced``)."""

    def __init__(self, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.enhanced = enhanced
        self.text = text


@dataclass(frozen=True)
class HostTls:
    """The TLS of a connection to one MX host.

    ``level``: none, may, encrypt, verify or dane; ``source`` names why
    (for replies and logs); ``records`` the TLSA records under dane;
    ``report_only``: MTA-STS testing mode, verify but on failure record it
    and deliver as ``may`` (RFC 8461 section 5)."""

    level: str
    source: str
    records: tuple[Tlsa, ...] = ()
    report_only: bool = False
    policy_type: str = "no-policy-found"  # RFC 8460 section 4.4: sts, tlsa
    # RFC 8460 section 4.4: the policy as published (policy-string) and, for
    # MTA-STS, the mx patterns (mx-host).
    policy_string: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()

    @property
    def mandatory(self) -> bool:
        return self.level in MANDATORY and not self.report_only


OPPORTUNISTIC = HostTls("may", "opportunistic")


SUCCESS = "success"  # the result_type of a successful session's line


class TlsReportLog:
    """Sessions for TLS-RPT: failures (RFC 8460 section 4.3 result types)
    and successful TLS sessions (``result_type`` "success", for the
    section 4.4 success counts), one JSON line each in ``<directory>/<UTC
    date>.jsonl``; without a directory only logged. ``recent`` keeps the
    last failures in memory."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.recent: list[dict[str, object]] = []

    async def record(
        self, domain: str, host: str, tls: HostTls, result_type: str, detail: str
    ) -> None:
        """One failed session (or policy failure) with ``host`` of ``domain``."""
        entry = self._entry(domain, host, tls, result_type)
        entry["detail"] = detail[:500]
        log.warning("TLS policy failure %s", entry)
        self.recent = [*self.recent[-99:], entry]
        await self._append(entry)

    async def record_success(self, domain: str, host: str, tls: HostTls) -> None:
        """One session with ``host`` of ``domain`` that negotiated TLS as
        ``tls`` demanded (RFC 8460 section 4.4 total-successful-session-count)."""
        await self._append(self._entry(domain, host, tls, SUCCESS))

    def _entry(self, domain: str, host: str, tls: HostTls, result_type: str) -> dict[str, object]:
        return {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "policy_domain": domain,
            "policy_type": tls.policy_type,
            "policy_string": list(tls.policy_string),
            "mx_host": list(tls.mx_host),
            "mode": "testing" if tls.report_only else "enforce",
            "receiving_mx_hostname": host,
            "result_type": result_type,
        }

    async def _append(self, entry: dict[str, object]) -> None:
        if self.directory is None:
            return
        now = dt.datetime.fromisoformat(str(entry["time"]))
        path = self.directory / f"{now.date().isoformat()}.jsonl"
        line = json.dumps(entry) + "\n"

        def append() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as out:
                out.write(line)

        try:
            await asyncio.to_thread(append)
        except OSError as exc:
            log.warning("TLS report log %s: %s", path, exc)


def certificate_result(detail: str) -> str:
    """The RFC 8460 section 4.3.1 result type of a failed verification."""
    text = detail.lower()
    if "hostname mismatch" in text or "doesn't match" in text:
        return "certificate-host-mismatch"
    if "expired" in text:
        return "certificate-expired"
    return "certificate-not-trusted"


class TlsPolicy:
    """The relay's TLS settings and the state they need (contexts, caches)."""

    def __init__(
        self,
        levels: dict[str, str],
        opportunistic: ssl.SSLContext,
        verified: ssl.SSLContext,
        *,
        mta_sts: bool = True,
        dane: bool = False,
        sts_cache: StsCache | None = None,
        reports: TlsReportLog | None = None,
    ) -> None:
        self.levels = levels
        self.opportunistic = opportunistic
        self.verified = verified
        self.mta_sts = mta_sts
        self.dane = dane
        self.sts_cache = sts_cache or StsCache(verified)
        self.reports = reports or TlsReportLog(None)

    @classmethod
    def from_settings(
        cls, queue: QueueSettings, *, trust_ad: bool = False, data_dir: Path | None = None
    ) -> TlsPolicy:
        """From ``[queue]`` (and ``dns.trust_ad``); with ``data_dir``, MTA-STS
        policies are kept in ``data_dir/mta-sts`` and failures logged in
        ``data_dir/tlsrpt``."""
        opportunistic = ssl.create_default_context()
        opportunistic.check_hostname = False
        opportunistic.verify_mode = ssl.CERT_NONE
        verified = ssl.create_default_context(cafile=queue.tls_ca_file or None)
        levels = {d.rstrip(".").lower(): "verify" for d in queue.require_tls_domains}
        levels.update(queue.tls_policy)
        cache = StsCache(
            verified,
            data_dir / "mta-sts" if data_dir is not None else None,
            port=queue.mta_sts_port,
        )
        reports = TlsReportLog(data_dir / "tlsrpt" if data_dir is not None else None)
        return cls(
            levels,
            opportunistic,
            verified,
            mta_sts=queue.mta_sts,
            dane=trust_ad,
            sts_cache=cache,
            reports=reports,
        )

    def requires(self, domain: str) -> bool:
        """The domain's configured level makes TLS mandatory."""
        return self.levels.get(domain.rstrip(".").lower()) in MANDATORY

    async def for_domain(self, resolver: object, domain: str) -> DomainTls:
        """What holds for ``domain`` in this delivery attempt (one policy
        lookup; DNS and HTTP failures never raise)."""
        domain = domain.rstrip(".").lower()
        level = self.levels.get(domain)
        sts: StsPolicy | None = None
        if level == "mta-sts" or (level is None and self.mta_sts):
            sts = await self.sts_cache.policy(resolver, domain)  # type: ignore[arg-type]
            if sts is not None and sts.mode == "none":
                sts = None  # RFC 8461 section 5: as if there were no policy
        dane = self.dane and level in (None, "dane")
        mx_secure = False
        if self.dane:  # a validating resolver is trusted: the AD bit means something
            try:
                _, mx_secure = await resolver.secure(domain, "MX")  # type: ignore[attr-defined]
            except DnsTemporaryError:
                mx_secure = False  # mail_exchangers already answered: treat as insecure
        return DomainTls(self, resolver, domain, level, sts, dane and mx_secure, mx_secure)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass
class DomainTls:
    policy: TlsPolicy
    resolver: object
    domain: str
    level: str | None
    sts: StsPolicy | None
    dane: bool  # DANE applies: enabled and the MX RRset validated (RFC 7672 2.2.1)
    mx_dnssec: bool = False  # the MX RRset validated by the trusted resolver (AD bit)

    def validates_mx(self, host: MailHost) -> bool:
        """Whether ``host`` is known to be a mail exchanger of the domain by
        more than plain DNS: the MX lookup was DNSSEC-validated, or an
        MTA-STS policy (fetched over authenticated HTTPS, any mode but
        none) lists it. RFC 8689 section 4.2.1 item 2 asks this for a
        REQUIRETLS message."""
        return self.mx_dnssec or (self.sts is not None and self.sts.allows(host.name))

    async def for_host(self, host: MailHost) -> HostTls:
        """The TLS for ``host``, or HostTlsError if it must not be used."""
        if self.level in ("none", "may", "encrypt", "verify"):
            return HostTls(self.level, f"tls_policy {self.level}")
        if self.dane and not _is_ip(host.name):
            found = await self._tlsa(host)
            if found is not None:
                return found
        if self.sts is not None:
            return await self._sts(host)
        return OPPORTUNISTIC

    async def _tlsa(self, host: MailHost) -> HostTls | None:
        try:
            _, address_secure = await self.resolver.secure(host.name, "A")  # type: ignore[attr-defined]
            if not address_secure:
                return None  # RFC 7672 section 2.2.3: no TLSA lookup for an insecure host
            lookup: DaneLookup = await tlsa_for(self.resolver, host.name)  # type: ignore[arg-type]
        except DnsTemporaryError as exc:
            # RFC 7672 section 2.2: a failed TLSA lookup means the host is not
            # used. RFC 8460 section 4.3.2.1: SERVFAIL, a timeout or a bogus
            # answer is dnssec-invalid, "no valid records were returned from
            # the recursive resolver" (tlsa-invalid is for records returned
            # of which none is valid: dane.verify_chain).
            tls = HostTls("dane", "DANE", policy_type="tlsa")
            await self.policy.reports.record(
                self.domain, host.name, tls, "dnssec-invalid", f"TLSA lookup failed: {exc}"
            )
            raise HostTlsError("4.7.5", f"{host.name}: DANE: TLSA lookup failed: {exc}") from exc
        if not lookup.secure:
            return None
        if lookup.records:
            # RFC 8460 section 4.5: policy-string, the TLSA records as presented.
            shown = tuple(
                f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in lookup.records
            )
            return HostTls("dane", "DANE", lookup.records, policy_type="tlsa", policy_string=shown)
        if lookup.unusable:
            # RFC 7672 section 3.1: TLSA present but none usable: TLS, unauthenticated.
            return HostTls("encrypt", "DANE (no usable TLSA)", policy_type="tlsa")
        return None

    async def _sts(self, host: MailHost) -> HostTls:
        sts = self.sts
        assert sts is not None
        testing = sts.mode == "testing"
        # RFC 8460 sections 4.4-4.5: the policy's lines as policy-string, its mx patterns.
        shown = (
            "version: STSv1",
            f"mode: {sts.mode}",
            *(f"mx: {mx}" for mx in sts.mx),
            f"max_age: {sts.max_age}",
        )
        tls = HostTls(
            "verify",
            f"MTA-STS {sts.mode}",
            report_only=testing,
            policy_type="sts",
            policy_string=shown,
            mx_host=sts.mx,
        )
        if not sts.allows(host.name):
            detail = f"MX {host.name} not in the MTA-STS policy of {self.domain}"
            await self.policy.reports.record(
                self.domain, host.name, tls, "validation-failure", detail
            )
            if testing:
                return HostTls("may", "MTA-STS testing (MX not in policy)", policy_type="sts")
            # RFC 8461 section 5: in enforce mode only matching MX hosts are candidates.
            raise HostTlsError("4.7.5", detail)
        return tls

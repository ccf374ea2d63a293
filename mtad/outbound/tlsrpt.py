"""Sending TLS-RPT reports (RFC 8460) from the sessions TlsReportLog kept.

Contract: :func:`build_reports` turns one UTC day's JSON lines (failures
and successes, ``data_dir/tlsrpt/<date>.jsonl``) into one RFC 8460 section
4 report per policy domain (pure). :func:`report_addresses` reads the
domain's ``_smtp._tls`` TXT record (section 3); :func:`send_reports` sends
each report, gzipped (section 5.2), by mail through our own delivery
(local INBOX or the outbound queue; section 5.3) to its ``mailto:``
addresses and by HTTPS POST (section 5.4) to its ``https:`` ones, and
returns what went where. A domain without a valid record gets no report.
:func:`run_daily` is the daily task: under a site-wide lease (the pattern of
the blob GC's, ``storage/blob/gc.py``) it reports every finished day not
reported yet, marking each ``<date>.sent`` so no day goes twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import logging
import os
import ssl
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from mtad.outbound.tlspolicy import SUCCESS
from storage.tasks import stop_task

log = logging.getLogger("mtad.outbound")

MEDIA_TYPE = "application/tlsrpt+gzip"  # RFC 8460 section 6.5
LEASE_NAME = "tlsrpt-send"
POST_TIMEOUT = 30.0
MAX_FAILURE_DETAILS = 100  # per policy: keep a report small whatever the day held


@dataclass(frozen=True)
class Report:
    """One report for one policy domain: the JSON object and its file name."""

    domain: str
    body: dict[str, Any]
    filename: str

    def gzipped(self) -> bytes:
        return gzip.compress(json.dumps(self.body, indent=1).encode())


@dataclass
class Sent:
    """Where reports went (``mailto`` and ``https`` URIs) and what failed."""

    delivered: list[tuple[str, str]] = field(default_factory=list)  # (domain, uri)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (domain, uri, why)


def parse_record(records: Iterable[str]) -> list[str]:
    """The ``rua`` URIs of the ``_smtp._tls`` TXT records (RFC 8460 section
    3): exactly one record starting ``v=TLSRPTv1``, ``rua`` a comma list of
    mailto: and https: URIs; [] when missing, ambiguous or malformed."""
    found = [r for r in records if r.replace(" ", "").startswith("v=TLSRPTv1")]
    if len(found) != 1:
        return []  # section 3: several records are as none
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            fields[name.strip().lower()] = value.strip()
    uris = [u.strip() for u in fields.get("rua", "").split(",") if u.strip()]
    return [u for u in uris if u.lower().startswith(("mailto:", "https://"))]


async def report_addresses(resolver: Any, domain: str) -> list[str]:
    """The rua URIs of ``domain`` (RFC 8460 section 3); [] if none or DNS fails."""
    from mtad.dns import DnsTemporaryError

    try:
        records = await resolver.txt(f"_smtp._tls.{domain}")
    except DnsTemporaryError as exc:
        log.info("TLS-RPT record of %s: %s", domain, exc)
        return []
    except Exception as exc:  # NXDOMAIN and the like: no record
        log.debug("TLS-RPT record of %s: %s", domain, exc)
        return []
    return parse_record(records)


def read_day(directory: Path, day: dt.date) -> list[dict[str, Any]]:
    """The JSON lines TlsReportLog wrote on ``day``; a broken line is skipped."""
    path = directory / f"{day.isoformat()}.jsonl"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            log.warning("TLS report log %s: unreadable line skipped", path)
    return entries


def build_reports(
    entries: Iterable[dict[str, Any]],
    start: dt.datetime,
    end: dt.datetime,
    *,
    submitter: str,
    contact: str,
) -> list[Report]:
    """RFC 8460 section 4 reports, one per policy domain, of ``entries``
    between ``start`` and ``end`` (UTC). Each policy (section 4.4: type,
    string, domain, mx-host) gets its success and failure counts and its
    failures grouped by result type and MX host (section 4.3)."""
    by_domain: dict[str, dict[tuple, dict[str, Any]]] = {}
    for e in entries:
        domain = str(e.get("policy_domain", ""))
        key = (
            str(e.get("policy_type", "no-policy-found")),
            tuple(e.get("policy_string") or ()),
            tuple(e.get("mx_host") or ()),
        )
        policy = by_domain.setdefault(domain, {}).setdefault(
            key, {"success": 0, "failure": 0, "details": {}}
        )
        if e.get("result_type") == SUCCESS:
            policy["success"] += 1
            continue
        policy["failure"] += 1
        where = (str(e.get("result_type")), str(e.get("receiving_mx_hostname", "")))
        detail = policy["details"].setdefault(
            where, {"count": 0, "reason": str(e.get("detail", ""))}
        )
        detail["count"] += 1
    stamp = f"{int(start.timestamp())}!{int(end.timestamp())}"
    reports = []
    for domain, policies in sorted(by_domain.items()):
        report_id = f"{start.date().isoformat()}.{domain}.{os.urandom(6).hex()}@{submitter}"
        body = {
            "organization-name": submitter,
            "date-range": {
                "start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "contact-info": contact,
            "report-id": report_id,
            "policies": [_policy(domain, key, p) for key, p in policies.items()],
        }
        # Section 5.1: sender "!" policy-domain "!" begin "!" end "." extension.
        filename = f"{submitter}!{domain}!{stamp}.json.gz"
        reports.append(Report(domain, body, filename))
    return reports


def _policy(domain: str, key: tuple, counts: dict[str, Any]) -> dict[str, Any]:
    policy_type, policy_string, mx_host = key
    policy: dict[str, Any] = {"policy-type": policy_type, "policy-domain": domain}
    if policy_string:
        policy["policy-string"] = list(policy_string)
    if mx_host:
        policy["mx-host"] = list(mx_host)
    details = [
        {
            "result-type": result_type,
            "receiving-mx-hostname": host,
            "failed-session-count": d["count"],
            "failure-reason-code": d["reason"][:200],
        }
        for (result_type, host), d in list(counts["details"].items())[:MAX_FAILURE_DETAILS]
    ]
    out: dict[str, Any] = {
        "policy": policy,
        "summary": {
            "total-successful-session-count": counts["success"],
            "total-failure-session-count": counts["failure"],
        },
    }
    if details:
        out["failure-details"] = details
    return out


def report_mail(report: Report, sender: str, to: str, submitter: str) -> bytes:
    """The report as mail (RFC 8460 section 5.3): multipart/report with
    report-type "tlsrpt", a human part and the gzipped JSON as an
    application/tlsrpt+gzip attachment named per section 5.1."""
    msg = EmailMessage(policy=SMTP)
    report_id = report.body["report-id"]
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    msg["Message-ID"] = make_msgid(domain=submitter)
    msg["Subject"] = (
        f"Report Domain: {report.domain} Submitter: {submitter} Report-ID: <{report_id}>"
    )
    msg["TLS-Report-Domain"] = report.domain
    msg["TLS-Report-Submitter"] = submitter
    msg.set_content(
        f"This is an aggregate TLS report from {submitter} for {report.domain} (RFC 8460).\n"
    )
    maintype, subtype = MEDIA_TYPE.split("/")
    msg.add_attachment(
        report.gzipped(), maintype=maintype, subtype=subtype, filename=report.filename
    )
    msg.set_type("multipart/report")  # keeps the boundary parameter
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes()


async def send_reports(
    storage: Any,
    settings: Any,
    resolver: Any,
    reports: Iterable[Report],
    *,
    verified: ssl.SSLContext | None = None,
) -> Sent:
    """Each report to its domain's rua URIs: mailto: through our own
    delivery, https: by POST (``verified`` checks the server). A failure
    to one URI is recorded and the rest still go."""
    submitter = settings.server.hostname
    sender = f"noreply-tlsrpt@{submitter}"
    sent = Sent()
    for report in reports:
        for uri in await report_addresses(resolver, report.domain):
            try:
                if uri.lower().startswith("mailto:"):
                    to = urllib.parse.unquote(uri[7:].split("?", 1)[0])
                    await _mail(
                        storage, settings, sender, to, report_mail(report, sender, to, submitter)
                    )
                else:
                    await _post(uri, report, verified, resolver)
            except Exception as exc:  # one URI's trouble is not the others'
                log.warning("TLS-RPT report for %s to %s: %s", report.domain, uri, exc)
                sent.failed.append((report.domain, uri, str(exc)))
                continue
            sent.delivered.append((report.domain, uri))
    return sent


async def _mail(storage: Any, settings: Any, sender: str, to: str, message: bytes) -> None:
    """``message`` to ``to`` through our own delivery; queued for a remote
    address with the ``tls_report`` flag: RFC 8460 section 3, "sending MTAs
    MUST deliver reports despite any TLS-related failures and SHOULD NOT
    include this SMTP session in the next report" (mtad/outbound/delivery.py)."""
    from delivery.submit import Routing, deliver, resolve_recipient
    from storage.sql.queue import DsnEnvelope

    route = await resolve_recipient(storage, to, settings=settings)
    routing = Routing.empty()
    routing.add(route, to)
    await deliver(
        storage,
        mail_from=sender,
        routing=routing,
        message=message,
        dsn=DsnEnvelope(tls_report=True),
        settings=settings,
    )


def _dns_resolver(resolver: Any) -> Any:
    """An aiohttp resolver asking our DNS (``dns`` settings), not the system's."""
    import socket

    from aiohttp.abc import AbstractResolver

    class OurDns(AbstractResolver):
        async def resolve(
            self, host: str, port: int = 0, family: int = socket.AF_INET
        ) -> list[dict[str, Any]]:
            found = await resolver.addresses(host)
            if not found:
                raise OSError(f"{host} has no address")
            return [
                {
                    "hostname": host,
                    "host": address,
                    "port": port,
                    "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
                for address in found
            ]

        async def close(self) -> None:
            return None

    return OurDns()


async def _post(uri: str, report: Report, verified: ssl.SSLContext | None, resolver: Any) -> None:
    """RFC 8460 section 5.4: POST the gzipped report; a 2xx is success."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT)
    headers = {"Content-Type": MEDIA_TYPE}
    connector = aiohttp.TCPConnector(resolver=_dns_resolver(resolver))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        kwargs: dict[str, Any] = {"ssl": verified} if verified is not None else {}
        async with session.post(uri, data=report.gzipped(), headers=headers, **kwargs) as resp:
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"HTTP {resp.status}")


def day_range(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """A UTC day (RFC 8460 section 4.1: 24 hours, UTC boundaries)."""
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    return start, start + dt.timedelta(days=1) - dt.timedelta(seconds=1)


async def report_day(
    storage: Any,
    settings: Any,
    resolver: Any,
    day: dt.date,
    *,
    until: dt.datetime | None = None,
    verified: ssl.SSLContext | None = None,
) -> Sent:
    """Build and send the reports of ``day`` (up to ``until`` if given:
    ``mailctl tlsrpt send --now`` reports the day so far)."""
    directory = Path(settings.data_dir) / "tlsrpt"
    entries = await asyncio.to_thread(read_day, directory, day)
    start, end = day_range(day)
    if until is not None:
        end = min(end, until)
    hostname = settings.server.hostname
    reports = build_reports(
        entries, start, end, submitter=hostname, contact=f"postmaster@{hostname}"
    )
    return await send_reports(storage, settings, resolver, reports, verified=verified)


async def run_daily(
    storage: Any,
    settings: Any,
    resolver: Any,
    verified: ssl.SSLContext | None,
    *,
    now: dt.datetime | None = None,
) -> list[dt.date]:
    """Report every finished day with a log and no ``.sent`` mark, under
    the site-wide lease (one instance at a time); the days reported."""
    from storage.blob.gc import gc_lease, lease_owner

    now = now or dt.datetime.now(dt.UTC)
    directory = Path(settings.data_dir) / "tlsrpt"
    done: list[dt.date] = []
    async with gc_lease(storage, lease_owner(), name=LEASE_NAME) as held:
        if not held:
            return done
        logs = sorted(directory.glob("*.jsonl")) if directory.exists() else []
        for path in logs:
            try:
                day = dt.date.fromisoformat(path.stem)
            except ValueError:
                continue
            mark = directory / f"{day.isoformat()}.sent"
            if day >= now.date() or mark.exists():
                continue
            await report_day(storage, settings, resolver, day, verified=verified)
            await asyncio.to_thread(mark.write_text, now.isoformat())
            done.append(day)
    return done


CHECK_EVERY_SECONDS = 3600.0


def start_daily(settings: Any, storage: Any, resolver: Any) -> Any:
    """Run :func:`run_daily` now and every hour (a finished day is reported
    within the hour after midnight UTC); returns the coroutine function
    that stops it."""
    cafile = settings.queue.tls_ca_file or None
    verified = ssl.create_default_context(cafile=cafile)

    async def loop() -> None:
        while True:
            try:
                await run_daily(storage, settings, resolver, verified)
            except Exception:
                log.exception("TLS-RPT daily reports failed; next try in an hour")
            await asyncio.sleep(CHECK_EVERY_SECONDS)

    task = asyncio.create_task(loop())

    async def stop() -> None:
        await stop_task(task)  # a cancellation may be lost once

    return stop

"""Our own DMARC aggregate reports (RFC 7489 section 7.2), sent once a day.

Contract: the MX counts each message whose policy record has ``rua=``
(:func:`tally_of`, one tally row per tuple per UTC day, in the directory's
database). :func:`send_reports` turns every tallied day before
``until_day`` into one report per policy domain (appendix C XML, gzipped,
section 7.2.1.1 message), sends it with a null reverse-path through our
own delivery (a local account, or the outbound queue) to each ``rua``
address that passes the section 7.1 check, and forgets the reported rows.
One instance at a time sends (the ``dmarc-reports`` row of the directory's
``locks`` table, as blob GC's lease); :func:`report_loop` runs it daily
after UTC midnight. A domain whose every destination got a temporary DNS
error keeps its rows for the next run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import gzip
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from xml.etree import ElementTree as ET

from mtad.dmarc import organizational_domain
from mtad.dns import DnsTemporaryError, Resolver
from storage.errors import StorageError
from storage.sql.dmarcreports import DmarcReports, Tally

log = logging.getLogger("mtad.dmarcsend")

LEASE_NAME = "dmarc-reports"
LEASE_SECONDS = 3600.0
DAY = 86400
# Past UTC midnight before the day's reports go (late sessions finish first).
SEND_DELAY_SECONDS = 600


def tally_of(results: Any, client_ip: str) -> Tally | None:
    """The tally tuple of one evaluated message (an
    ``mtad.checks.AuthenticationResults``), or None when no report was
    asked for (no DMARC policy, or no ``rua=`` in it)."""
    found = results.dmarc
    if found is None or found.record is None or not found.record.rua:
        return None
    record = found.record
    spf = results.spf
    return Tally(
        policy_domain=found.policy_domain[:255],
        header_from=found.from_domain[:255],
        source_ip=client_ip[:45],
        disposition=found.disposition,
        dkim="pass" if found.dkim_aligned else "fail",
        spf="pass" if found.spf_aligned else "fail",
        dkim_auth=" ".join(f"{d.domain}:{d.result}" for d in results.dkim)[:500],
        spf_auth=f"{spf.domain}:{spf.result}:{spf.scope}"[:300] if spf else "",
        policy=(
            f"p={record.p}; sp={record.sp}; pct={record.pct}; "
            f"adkim={record.adkim}; aspf={record.aspf}"
        ),
        rua=",".join(record.rua)[:500],
    )


@dataclass(frozen=True)
class SentReport:
    domain: str
    report_id: str
    begin: int
    end: int
    recipients: tuple[str, ...]


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    node = ET.SubElement(parent, tag)
    if text is not None:
        node.text = str(text)
    return node


def build_xml(
    org_name: str,
    email_address: str,
    report_id: str,
    domain: str,
    begin: int,
    end: int,
    rows: Sequence[Tally],
) -> bytes:
    """The appendix C ``<feedback>`` document of ``rows`` (one policy
    domain's; tuples of several days summed)."""
    root = ET.Element("feedback")
    _sub(root, "version", "1.0")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", org_name)
    _sub(meta, "email", email_address)
    _sub(meta, "report_id", report_id)
    span = _sub(meta, "date_range")
    _sub(span, "begin", begin)
    _sub(span, "end", end)
    published = _sub(root, "policy_published")
    _sub(published, "domain", domain)
    policy = dict(part.strip().split("=", 1) for part in rows[-1].policy.split(";") if "=" in part)
    for tag in ("adkim", "aspf", "p", "sp", "pct"):
        if tag in policy:
            _sub(published, tag, policy[tag])
    summed: dict[tuple[str, ...], int] = {}
    for row in rows:
        key = tuple(str(v) for v in row.key().values())
        summed[key] = summed.get(key, 0) + row.count
    names = [k for k in Tally.KEY if k != "day"]
    for values, count in summed.items():
        r = dict(zip(names, values, strict=True))
        record = _sub(root, "record")
        row_el = _sub(record, "row")
        _sub(row_el, "source_ip", r["source_ip"])
        _sub(row_el, "count", count)
        evaluated = _sub(row_el, "policy_evaluated")
        _sub(evaluated, "disposition", r["disposition"])
        _sub(evaluated, "dkim", r["dkim"])
        _sub(evaluated, "spf", r["spf"])
        _sub(_sub(record, "identifiers"), "header_from", r["header_from"])
        auth = _sub(record, "auth_results")
        for signature in r["dkim_auth"].split():
            d, _, result = signature.rpartition(":")
            dkim = _sub(auth, "dkim")
            _sub(dkim, "domain", d)
            _sub(dkim, "result", result)
        if r["spf_auth"]:
            d, result, scope = [*r["spf_auth"].rsplit(":", 2), "", ""][:3]
            spf = _sub(auth, "spf")
            _sub(spf, "domain", d)
            _sub(spf, "scope", scope)
            _sub(spf, "result", result)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def build_message(
    hostname: str,
    sender: str,
    to: Sequence[str],
    domain: str,
    report_id: str,
    begin: int,
    end: int,
    xml: bytes,
) -> bytes:
    """Section 7.2.1.1: the report gzipped and attached, the Subject
    naming domain, submitter and Report-ID, the file named
    ``receiver!policy-domain!begin!end.xml.gz``."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {hostname} Report-ID: <{report_id}>"
    msg.set_content(
        f"DMARC aggregate report from {hostname} for {domain}, "
        f"{dt.datetime.fromtimestamp(begin, dt.UTC):%Y-%m-%d} to "
        f"{dt.datetime.fromtimestamp(end, dt.UTC):%Y-%m-%d} (UTC).\n"
    )
    msg.add_attachment(
        gzip.compress(xml, mtime=0),
        maintype="application",
        subtype="gzip",
        filename=f"{hostname}!{domain}!{begin}!{end}.xml.gz",
    )
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def verified_destination(resolver: Resolver, domain: str, address: str) -> bool:
    """Section 7.1: a ``rua`` address outside the policy domain's
    organisational domain must be vouched for by a ``v=DMARC1`` TXT record
    at ``<policy-domain>._report._dmarc.<destination-domain>``.
    DnsTemporaryError propagates (try again on the next run)."""
    target = address.rpartition("@")[2].lower().rstrip(".")
    if organizational_domain(target) == organizational_domain(domain):
        return True
    records = await resolver.txt(f"{domain}._report._dmarc.{target}")
    return any(r.strip().startswith("v=DMARC1") for r in records)


async def send_reports(
    storage: Any, settings: Any, resolver: Resolver, *, until_day: int
) -> list[SentReport] | None:
    """Sends the reports of every tallied day before ``until_day`` (epoch
    days); see the module docstring. None if another instance holds the
    lease."""
    from mtad.outbound.notices import send_notification
    from storage.blob.gc import lease_owner

    store = storage.stores["default"]  # the directory's database
    owner = lease_owner()
    if not await store.acquire_lock(LEASE_NAME, owner, LEASE_SECONDS):
        return None
    try:
        reports = DmarcReports(storage.directory.db)
        by_domain: dict[str, list[Tally]] = {}
        for row in await reports.tallied(until_day):
            by_domain.setdefault(row.policy_domain, []).append(row)
        hostname = settings.server.hostname
        sender = f"noreply-dmarc@{hostname}"
        sent: list[SentReport] = []
        for domain, rows in by_domain.items():
            destinations, postponed = [], False
            for address in dict.fromkeys(a for a in rows[-1].rua.split(",") if a):
                try:
                    if await verified_destination(resolver, domain, address):
                        destinations.append(address)
                    else:
                        log.info("DMARC report for %s: <%s> not authorised", domain, address)
                except DnsTemporaryError:
                    postponed = True
            if postponed and not destinations:
                continue  # rows kept for the next run
            if destinations:
                begin = min(r.day for r in rows) * DAY
                end = (max(r.day for r in rows) + 1) * DAY - 1
                report_id = f"{domain}.{begin}.{secrets.token_hex(6)}"
                xml = build_xml(hostname, sender, report_id, domain, begin, end, rows)
                message = build_message(
                    hostname, sender, destinations, domain, report_id, begin, end, xml
                )
                for address in destinations:
                    await send_notification(storage, address, message, settings)
                sent.append(SentReport(domain, report_id, begin, end, tuple(destinations)))
                log.info("DMARC report %s for %s sent to %s", report_id, domain, destinations)
            await reports.forget(domain, until_day)
        return sent
    finally:
        await store.release_lock(LEASE_NAME, owner)


def seconds_to_next_run(now: float) -> float:
    """Seconds from ``now`` to the next daily run (UTC midnight plus
    :data:`SEND_DELAY_SECONDS`)."""
    next_run = (int(now) // DAY) * DAY + SEND_DELAY_SECONDS
    if next_run <= now:
        next_run += DAY
    return next_run - now


async def report_loop(storage: Any, settings: Any, resolver: Resolver) -> None:
    """Runs :func:`send_reports` for the days before today, daily, until
    cancelled; storage trouble is logged and retried at the next run."""
    while True:
        await asyncio.sleep(seconds_to_next_run(time.time()))
        try:
            await send_reports(storage, settings, resolver, until_day=int(time.time()) // DAY)
        except StorageError as exc:
            log.warning("DMARC reports not sent: %s", exc)

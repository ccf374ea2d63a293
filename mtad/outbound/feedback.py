"""Incoming bounces: DSNs about mail we sent, fed back into the queue.

Contract: :func:`process_incoming_dsn` is the hook the inbound path calls
for a message with a null reverse-path (RFC 5321 section 4.5.5: that is how
DSNs arrive). If ``raw`` is an RFC 3464 report, every recipient it reports
``failed`` is counted as a hard bounce (5.x.x) or soft bounce (4.x.x) in the
queue's suppression list, and the latest queue recipient row of that address
is marked; after ``suppress_after`` hard bounces the address is suppressed
and later mail to it fails at once. Returns what was recorded (empty if
``raw`` is not a DSN or reports only delays or successes). Never raises for
malformed input.
"""

from __future__ import annotations

import asyncio
import logging

from mtad.outbound.dsn import DsnReport, parse_dsn
from storage.sql.queue import Suppression

log = logging.getLogger("mtad.outbound.feedback")

DEFAULT_SUPPRESS_AFTER = 2


async def process_incoming_dsn(
    storage: object, raw: bytes, *, suppress_after: int = DEFAULT_SUPPRESS_AFTER
) -> list[Suppression]:
    """Record the bounces a DSN reports; see the module docstring."""
    report: DsnReport | None = parse_dsn(raw)
    if report is None:
        return []
    recorded: list[Suppression] = []
    for rcpt in report.recipients:
        if rcpt.action != "failed" or "@" not in rcpt.final_recipient:
            continue  # delayed/delivered/relayed reports change nothing
        entry = await storage.queue.record_bounce(  # type: ignore[attr-defined]
            rcpt.final_recipient,
            rcpt.hard,
            rcpt.status,
            rcpt.diagnostic,
            suppress_after=suppress_after,
        )
        log.info(
            "DSN from %s: <%s> %s bounce %s%s",
            report.reporting_mta,
            rcpt.final_recipient,
            "hard" if rcpt.hard else "soft",
            rcpt.status,
            " (now suppressed)" if entry.suppressed else "",
        )
        recorded.append(entry)
    return recorded


# RFC 3463 section 3.8 (X.7.1: delivery not authorized): how a complaint
# is recorded in the suppression list's last status.
COMPLAINT_STATUS = "5.7.1"


async def process_incoming_arf(storage: object, raw: bytes) -> list[Suppression]:
    """RFC 5965 complaint reports about mail we sent feed the suppression
    list: each complained-about recipient is suppressed at once (a
    complaint counts as a hard bounce with ``suppress_after=1``: the
    recipient said they do not want our mail).

    "Mail we sent" (the queue does not keep Message-IDs): the embedded
    original's single From address is in one of our local domains, and
    either the original carries a DKIM-Signature whose ``d=`` is one of our
    local domains (ours are signed, issue #19) or our queue has a finished
    recipient row for the complained-about address (kept
    ``queue.done_retention_seconds``). Reports of other types (``not-spam``,
    ``auth-failure``...) and about other senders change nothing. Returns
    what was recorded; never raises for malformed input.
    """
    from mtad.arf import COMPLAINT_TYPES, parse_arf

    report = await asyncio.to_thread(parse_arf, raw)  # linear, but off the event loop
    if report is None or report.feedback_type not in COMPLAINT_TYPES:
        return []
    directory = storage.directory  # type: ignore[attr-defined]
    queue = storage.queue  # type: ignore[attr-defined]
    domain = report.original_from_domain
    if not domain or not await directory.is_local_domain(domain):
        log.info("ARF %s about mail not from us (From %s): ignored", report.feedback_type, domain)
        return []
    signed = False
    for d in report.original_dkim_domains:
        if await directory.is_local_domain(d):
            signed = True
            break
    recorded: list[Suppression] = []
    for address in report.recipients:
        if not signed and not await queue.has_sent_to(address):
            log.info("ARF about <%s>: no sign we sent to it; ignored", address)
            continue
        entry = await queue.record_bounce(
            address,
            True,
            COMPLAINT_STATUS,
            f"ARF {report.feedback_type} complaint ({report.user_agent or 'unknown agent'})",
            suppress_after=1,
        )
        log.info("ARF %s complaint: <%s> suppressed", report.feedback_type, address)
        recorded.append(entry)
    return recorded


async def store_dmarc_reports(storage: object, raw: bytes) -> int:
    """Stores the RFC 7489 aggregate reports attached to ``raw`` (section
    7.2.1.1: a gzip, zip or XML part with a ``<feedback>`` root), parsed
    with the bounds of :mod:`mtad.dmarcagg` in the content pool (a 10 MB
    report is about a second of pure-Python CPU: in a thread it would hold
    this process's GIL, and so every other session, that long); refused
    attachments, and a parse past the pool's time limit, are logged.
    Returns how many new reports were stored."""
    from mtad.dmarcagg import reports_in
    from storage.contentpool import ContentTimeout, content_pool
    from storage.sql.dmarcreports import DmarcReports

    try:
        reports, refused = await content_pool().run(reports_in, raw)
    except ContentTimeout as exc:
        log.info("DMARC report not read: %s", exc)
        return 0
    for reason in refused:
        log.info("DMARC report attachment refused: %s", reason)
    store = DmarcReports(storage.directory.db)  # type: ignore[attr-defined]
    stored = 0
    for report in reports:
        if await store.save(report):
            stored += 1
            log.info(
                "DMARC aggregate report %s from %s about %s: %d rows",
                report.report_id,
                report.org_name,
                report.domain,
                len(report.rows),
            )
    return stored

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

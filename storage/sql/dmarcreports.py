"""The DMARC aggregate reports sent to us, kept in the directory's database.

Contract: :meth:`DmarcReports.save` stores one parsed report and its rows
in one transaction; the same report again (same ``org_name`` and
``report_id``, RFC 7489 appendix C: unique per reporter) is not stored
twice and returns False. :meth:`list` and :meth:`rows` read them back for
``mailctl dmarc``. :meth:`count` adds one message to the tally of what
our MX saw (one row per tuple per UTC day, not per message);
:meth:`tallied` and :meth:`forget` are the report sender's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from storage.sql.schema import DMARC_TALLY_KEY, dmarc_report_rows, dmarc_reports, dmarc_tally


@dataclass(frozen=True)
class StoredReport:
    id: int
    org_name: str
    report_id: str
    email: str | None
    domain: str
    date_begin: int
    date_end: int
    policy: str
    received: float
    messages: int  # sum of the rows' counts


@dataclass(frozen=True)
class StoredRow:
    source_ip: str
    count: int
    disposition: str
    dkim: str
    spf: str
    header_from: str
    auth: str


class DmarcReports:
    """Reads and writes the ``dmarc_reports`` tables of ``db`` (a
    ``storage.sql.db.Database``; the directory's)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    async def save(self, report: Any, *, now: float | None = None) -> bool:
        """Stores ``report`` (an ``mtad.dmarcagg.AggregateReport``); False
        if that reporter's report of that id is already stored."""
        async with self.db.write() as conn:
            try:
                async with conn.begin_nested():
                    result = await conn.execute(
                        insert(dmarc_reports).values(
                            org_name=report.org_name,
                            report_id=report.report_id,
                            email=report.email,
                            domain=report.domain,
                            date_begin=report.date_begin,
                            date_end=report.date_end,
                            policy=report.policy,
                            received=time.time() if now is None else now,
                        )
                    )
            except IntegrityError:
                return False
            key = int(result.inserted_primary_key[0])
            if report.rows:
                await conn.execute(
                    insert(dmarc_report_rows),
                    [
                        {
                            "report": key,
                            "source_ip": r.source_ip,
                            "count": r.count,
                            "disposition": r.disposition,
                            "dkim": r.dkim,
                            "spf": r.spf,
                            "header_from": r.header_from,
                            "auth": r.auth,
                        }
                        for r in report.rows
                    ],
                )
        return True

    async def list(self, domain: str | None = None) -> list[StoredReport]:
        """The stored reports (of ``domain``'s policy only, if given), oldest
        period first."""
        from sqlalchemy import func

        total = (
            select(func.coalesce(func.sum(dmarc_report_rows.c.count), 0))
            .where(dmarc_report_rows.c.report == dmarc_reports.c.id)
            .scalar_subquery()
        )
        query = select(dmarc_reports, total.label("messages")).order_by(
            dmarc_reports.c.date_begin, dmarc_reports.c.id
        )
        if domain:
            query = query.where(dmarc_reports.c.domain == domain.lower().rstrip("."))
        async with self.db.read() as conn:
            return [_report(r) for r in await conn.execute(query)]

    async def find(self, report_id: str) -> list[StoredReport]:
        """The stored reports with this ``report_id`` (one per reporter)."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(dmarc_reports).where(dmarc_reports.c.report_id == report_id)
            )
            return [_report(r, 0) for r in rows]

    async def rows(self, report: StoredReport) -> list[StoredRow]:
        async with self.db.read() as conn:
            found = await conn.execute(
                select(dmarc_report_rows)
                .where(dmarc_report_rows.c.report == report.id)
                .order_by(dmarc_report_rows.c.id)
            )
            return [
                StoredRow(r.source_ip, r.count, r.disposition, r.dkim, r.spf, r.header_from, r.auth)
                for r in found
            ]

    async def count(self, seen: Tally, *, now: float | None = None) -> None:
        """Adds one message with these results to today's (UTC) tally."""
        day = int((time.time() if now is None else now) // 86400)
        key = {**seen.key(), "day": day}
        match = and_(*(dmarc_tally.c[k] == v for k, v in key.items()))
        for _ in range(3):  # an insert raced by another instance: update it then
            async with self.db.write() as conn:
                done = await conn.execute(
                    update(dmarc_tally).where(match).values(count=dmarc_tally.c.count + 1)
                )
                if done.rowcount:
                    return
                try:
                    async with conn.begin_nested():
                        await conn.execute(
                            insert(dmarc_tally).values(
                                **key, policy=seen.policy, rua=seen.rua, count=1
                            )
                        )
                    return
                except IntegrityError:
                    continue

    async def tallied(self, before_day: int) -> list[Tally]:
        """Every tally row of a day before ``before_day`` (epoch days)."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(dmarc_tally)
                .where(dmarc_tally.c.day < before_day)
                .order_by(dmarc_tally.c.policy_domain, dmarc_tally.c.day)
            )
            return [
                Tally(
                    **{k: getattr(r, k) for k in Tally.KEY if k != "day"},
                    policy=r.policy,
                    rua=r.rua,
                    day=r.day,
                    count=r.count,
                )
                for r in rows
            ]

    async def forget(self, policy_domain: str, before_day: int) -> None:
        """Drops ``policy_domain``'s rows of days before ``before_day`` (reported)."""
        async with self.db.write() as conn:
            await conn.execute(
                delete(dmarc_tally).where(
                    dmarc_tally.c.policy_domain == policy_domain, dmarc_tally.c.day < before_day
                )
            )


@dataclass(frozen=True)
class Tally:
    """One tuple of what our MX saw for a reporting domain (section 7.2)."""

    KEY = DMARC_TALLY_KEY

    policy_domain: str
    header_from: str
    source_ip: str
    disposition: str
    dkim: str
    spf: str
    dkim_auth: str
    spf_auth: str
    policy: str
    rua: str
    day: int = 0
    count: int = 0

    def key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEY if k != "day"}


def _report(r: Any, messages: int | None = None) -> StoredReport:
    return StoredReport(
        id=r.id,
        org_name=r.org_name,
        report_id=r.report_id,
        email=r.email,
        domain=r.domain,
        date_begin=r.date_begin,
        date_end=r.date_end,
        policy=r.policy,
        received=r.received,
        messages=int(r.messages if messages is None else messages),
    )

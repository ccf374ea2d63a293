"""``mailctl dmarc ...``: DMARC aggregate reports (RFC 7489 section 7.2).

``reports [--domain D]`` lists the reports other receivers sent us, one
line each (reporter, report id, policy domain, period in UTC, messages
covered); ``show REPORT_ID`` prints one with its rows (source IP, count,
disposition, aligned DKIM and SPF results, header From, raw
authentication results). Exit 1 if no report has that id.

``send [--now]`` sends our own aggregate reports (mtad/dmarcsend.py) of the
days tallied before today, or with ``--now`` up to this moment, as mtad
does daily; exit 1 if another instance is sending.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from typing import Any

from conf.settings import Settings


def _day(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_dmarc(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``mailctl dmarc`` action; see the module docstring."""
    from mailctl.cli import with_storage
    from storage.sql.dmarcreports import DmarcReports

    async def act(storage: Any) -> int:
        store = DmarcReports(storage.directory.db)
        if args.action == "send":
            return await _send(storage, settings, args.now)
        if args.action == "reports":
            for r in await store.list(args.domain):
                print(
                    f"{r.org_name}\t{r.report_id}\t{r.domain}\t"
                    f"{_day(r.date_begin)}..{_day(r.date_end)}\tmessages={r.messages}"
                )
            return 0
        if not args.report_id:
            print("mailctl dmarc show: REPORT_ID is required", file=sys.stderr)
            return 2
        found = await store.find(args.report_id)
        if not found:
            print(f"mailctl dmarc: no report {args.report_id}", file=sys.stderr)
            return 1
        for r in found:
            print(f"Report-ID: {r.report_id}")
            print(f"Reporter: {r.org_name}" + (f" <{r.email}>" if r.email else ""))
            print(f"Domain: {r.domain}")
            print(f"Policy: {r.policy}")
            print(f"Period: {_day(r.date_begin)} .. {_day(r.date_end)}")
            print("source_ip\tcount\tdisposition\tdkim\tspf\theader_from\tauth_results")
            for row in await store.rows(r):
                print(
                    f"{row.source_ip}\t{row.count}\t{row.disposition}\t{row.dkim}\t"
                    f"{row.spf}\t{row.header_from}\t{row.auth}"
                )
        return 0

    return with_storage(settings, act)


async def _send(storage: Any, settings: Settings, now: bool) -> int:
    import time

    from mtad.dmarcsend import DAY, send_reports
    from mtad.dns import Resolver

    today = int(time.time()) // DAY
    sent = await send_reports(
        storage, settings, Resolver(settings.dns), until_day=today + 1 if now else today
    )
    if sent is None:
        print("mailctl dmarc: another instance is sending reports", file=sys.stderr)
        return 1
    for report in sent:
        print(f"{report.domain}\t{report.report_id}\t{','.join(report.recipients)}")
    return 0


def add_dmarc_parser(
    command: Callable[[str, Callable[..., int], str], argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``dmarc`` with mailctl's ``command(name, func, help)`` helper."""
    parser = command("dmarc", cmd_dmarc, "DMARC aggregate reports: received, and ours")
    parser.add_argument("action", choices=("reports", "show", "send"))
    parser.add_argument("report_id", nargs="?", help="with show: the report's id")
    parser.add_argument("--domain", help="with reports: only those about this policy domain")
    parser.add_argument("--now", action="store_true", help="with send: include today so far")
    return parser

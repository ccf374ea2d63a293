"""``mailctl tlsrpt send``: send the TLS-RPT reports (RFC 8460) now.

``send`` reports yesterday (UTC), or ``--day YYYY-MM-DD``, or with
``--now`` today so far, from this instance's ``data_dir/tlsrpt`` logs,
to every policy domain with a ``_smtp._tls`` record (mtad/outbound/tlsrpt.py).
Prints each destination; exit 1 if one failed. The daily task in mtad does
the same for finished days without being asked.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ssl
import sys
from collections.abc import Callable
from typing import Any

from conf.settings import Settings


def cmd_tlsrpt(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``mailctl tlsrpt`` action; see the module docstring."""
    from mailctl.cli import with_storage
    from mtad.dns import Resolver
    from mtad.outbound.tlsrpt import report_day

    now = dt.datetime.now(dt.UTC)
    if args.now:
        day, until = now.date(), now
    elif args.day:
        try:
            day, until = dt.date.fromisoformat(args.day), None
        except ValueError:
            print("mailctl tlsrpt: --day takes YYYY-MM-DD", file=sys.stderr)
            return 2
    else:
        day, until = now.date() - dt.timedelta(days=1), None

    async def act(storage: Any) -> int:
        verified = ssl.create_default_context(cafile=settings.queue.tls_ca_file or None)
        resolver = Resolver(settings.dns)
        sent = await report_day(storage, settings, resolver, day, until=until, verified=verified)
        for domain, uri in sent.delivered:
            print(f"{domain}: sent to {uri}")
        for domain, uri, why in sent.failed:
            print(f"{domain}: {uri} failed: {why}", file=sys.stderr)
        if not sent.delivered and not sent.failed:
            print(f"no reports to send for {day.isoformat()}")
        return 1 if sent.failed else 0

    return with_storage(settings, act)


def add_tlsrpt_parser(
    command: Callable[[str, Callable[..., int], str], argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``tlsrpt`` with mailctl's ``command(name, func, help)`` helper."""
    parser = command("tlsrpt", cmd_tlsrpt, "TLS-RPT (RFC 8460) reports of outbound TLS")
    parser.add_argument("action", choices=("send",))
    parser.add_argument("--now", action="store_true", help="report today so far")
    parser.add_argument("--day", help="report this UTC day (YYYY-MM-DD); default yesterday")
    return parser

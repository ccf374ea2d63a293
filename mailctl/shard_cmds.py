"""``mailctl shard list [--json]``: each shard's accounts, messages, bytes
and health, as the directory and the shards' own databases say; and
``mailctl shard drain NAME [--to SHARD ...]`` (``mailctl/move_cmds.py``).

It opens each database alone, without migrations and without the rest of
the storage, so that a shard which is down is listed with its error
instead of stopping the command. Exit status: 0 when the directory and
every shard answered, 1 when one did not (for monitoring), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, make_url, select, text

from conf.settings import Settings
from mailctl.move_cmds import cmd_shard as cmd_shard_drain

# How long one database may take to answer before it counts as unreachable.
SHARD_TIMEOUT_SECONDS = 10.0


@dataclass
class Health:
    """Whether a database answered ``SELECT 1``, how fast, else why not."""

    reachable: bool = False
    latency_ms: float | None = None
    error: str | None = None


@dataclass
class ShardReport:
    """One row of ``shard list``; None: not known (its database is down)."""

    name: str
    url: str  # without its password
    weight: float
    accounts: int | None
    messages: int | None
    bytes: int | None
    reachable: bool
    latency_ms: float | None
    error: str | None


def _databases(settings: Settings) -> dict[str, tuple[str, float]]:
    """Shard name -> (URL its connections use, weight), "default" first."""
    from storage.backend import DEFAULT_SHARD, failover_url

    shards = {DEFAULT_SHARD: (settings.storage.url, 1.0)}
    for name, shard in settings.storage.shards.items():
        shards[name] = (failover_url(shard.url, shard.replicas), shard.weight)
    return shards


async def _probe(url: str, query: Callable[[Any], Any] | None) -> tuple[Health, Any]:
    """Times ``SELECT 1`` on ``url``, then runs ``query(conn)``; never raises."""
    from storage.sql.db import Database

    health, found = Health(), None
    db = None
    try:
        db = Database(url)
        async with asyncio.timeout(SHARD_TIMEOUT_SECONDS):
            started = time.monotonic()
            async with db.read() as conn:
                await conn.execute(text("SELECT 1"))
            health.latency_ms = round((time.monotonic() - started) * 1000, 2)
            if query is not None:
                async with db.read() as conn:
                    found = await query(conn)
        health.reachable = True
    except Exception as exc:  # every driver failure is a report, never a traceback
        cause = exc.__cause__ or exc
        health.error = str(cause) or type(cause).__name__
    finally:
        if db is not None:
            await db.close()
    return health, found


async def _accounts_per_shard(conn: Any) -> dict[str, int]:
    from storage.sql.schema import accounts

    rows = await conn.execute(select(accounts.c.shard, func.count()).group_by(accounts.c.shard))
    return {shard: int(count) for shard, count in rows}


async def _shard_totals(conn: Any) -> tuple[int, int]:
    """Stored messages, and octets of every mailbox entry (quota usage)."""
    from storage.sql.schema import messages, shard_accounts

    count = (await conn.execute(select(func.count()).select_from(messages))).scalar()
    used = (await conn.execute(select(func.sum(shard_accounts.c.used_bytes)))).scalar()
    return int(count or 0), int(used or 0)


async def survey(settings: Settings) -> tuple[Health, list[ShardReport]]:
    """The directory's health and one report per configured shard, every
    database asked at once."""
    shards = _databases(settings)
    directory_probe = _probe(settings.storage.url, _accounts_per_shard)
    answers = await asyncio.gather(
        directory_probe, *(_probe(url, _shard_totals) for url, _weight in shards.values())
    )
    (directory, per_shard), *found = answers
    reports = []
    for (name, (url, weight)), (health, totals) in zip(shards.items(), found, strict=True):
        messages, octets = totals if totals is not None else (None, None)
        reports.append(
            ShardReport(
                name=name,
                url=make_url(url).render_as_string(hide_password=True),
                weight=weight,
                accounts=None if per_shard is None else per_shard.get(name, 0),
                messages=messages,
                bytes=octets,
                reachable=health.reachable,
                latency_ms=health.latency_ms,
                error=health.error,
            )
        )
    return directory, reports


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def format_table(directory: Health, reports: list[ShardReport]) -> str:
    """The ``shard list`` table: a row per shard; the directory's failure
    after it (then no account counts are known)."""
    header = ("SHARD", "WEIGHT", "ACCOUNTS", "MESSAGES", "BYTES", "HEALTH")
    rows = [header]
    for r in reports:
        health = f"ok {r.latency_ms} ms" if r.reachable else f"unreachable: {r.error}"
        weight = f"{r.weight:g}"
        rows.append((r.name, weight, *map(_cell, (r.accounts, r.messages, r.bytes)), health))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    if not directory.reachable:
        lines.append(f"directory unreachable: {directory.error}")
    return "\n".join(line.rstrip() for line in lines)


def cmd_shard_list(args: argparse.Namespace, settings: Settings) -> int:
    directory, reports = asyncio.run(survey(settings))
    if args.json:
        body = {"directory": asdict(directory), "shards": [asdict(r) for r in reports]}
        print(json.dumps(body, indent=2))
    else:
        print(format_table(directory, reports))
    healthy = directory.reachable and all(r.reachable for r in reports)
    if not healthy:
        print("mailctl: shard list: a database did not answer", file=sys.stderr)
    return 0 if healthy else 1


# ``mailctl shard ACTION``: action -> handler(args, settings).
SHARD_ACTIONS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "list": cmd_shard_list,
    "drain": cmd_shard_drain,  # moves every account off shard NAME
}


def cmd_shard(args: argparse.Namespace, settings: Settings) -> int:
    return SHARD_ACTIONS[args.action](args, settings)


def add_shard_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``mailctl shard list [--json]`` and ``shard drain NAME [--to SHARD ...]``."""
    p = command("shard", cmd_shard, "list the mail shards and their health, or drain one")
    p.add_argument("action", choices=tuple(SHARD_ACTIONS))
    p.add_argument("name", nargs="?", help="with drain: the shard to empty")
    p.add_argument("--json", action="store_true", help="with list: JSON instead of a table")
    p.add_argument(
        "--to", action="append", metavar="SHARD", help="with drain: only to these shards"
    )

"""Where PostgreSQL's CPU goes during smtp_bench's PostgreSQL run (issue #20).

The same load as ``smtp_bench.py --backend postgresql`` (``run_backend``: a
fresh mtad, a durable ``PgServer``, the deferred index merge counted), on a
server with pg_stat_statements loaded; prints PostgreSQL's CPU per message
by process kind (utime + stime from /proc of every server process,
classified by its title; children that ended are the postmaster's reaped
time), the WAL written per message (bytes, records, full-page images), the
commits per message (all databases: the bench's own included), the
server's CPU as a share of mtad's, and the statements by total execution
time. Never part of the test run.

    python bench/pg_cpu_breakdown.py --messages 2000 --sessions 20
    python bench/pg_cpu_breakdown.py --sql "ALTER TABLE blobs ALTER COLUMN data SET STORAGE MAIN"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import smtp_bench  # noqa: E402
from bench.storage_backend import BenchStorage  # noqa: E402
from tests.pgserver import PgServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Process titles of PostgreSQL's auxiliary processes ("postgres: walwriter").
KINDS = (
    "checkpointer", "background writer", "walwriter", "autovacuum launcher",
    "autovacuum worker", "logical replication launcher", "archiver", "walsender",
)  # fmt: skip
_WAL = (
    "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, wal_records, wal_fpi, "
    "(SELECT sum(xact_commit) FROM pg_stat_database) FROM pg_stat_wal"
)
_STATEMENTS = (
    "SELECT calls, total_exec_time, shared_blks_hit + shared_blks_read, wal_fpi, "
    "wal_bytes, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) "
    "FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT {}"
)


def _kind(pid: int) -> str:
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    rest = title.removeprefix("postgres:").strip()
    return next((k for k in KINDS if rest.startswith(k)), "backend")


def cpu_by_kind(postmaster: int) -> dict[str, float]:
    """CPU seconds so far of each kind of process of the server."""

    def times(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    own = times(postmaster)
    out = {
        "postmaster": (int(own[11]) + int(own[12])) / CLK_TCK,
        "reaped children": (int(own[13]) + int(own[14])) / CLK_TCK,
    }
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = times(int(entry))
                if int(fields[1]) == postmaster:
                    kind = _kind(int(entry))
                    seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
                    out[f"{kind}#{entry}"] = seconds
    return out


@dataclass
class ProfiledStorage(BenchStorage):
    """A BenchStorage that keeps, at each CPU reading run_backend takes
    (before the load, after it and the settle), the per-kind CPU and the
    WAL position; pg_stat_statements is reset at the first."""

    server: PgServer | None = None
    readings: list[tuple[dict[str, float], list[int]]] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        assert self.server is not None
        wal = [int(float(v)) for v in self.server.sql(_WAL).split("|")]
        self.readings.append((cpu_by_kind(self.server_pids[0]), wal))
        if len(self.readings) == 1:
            self.server.sql("SELECT pg_stat_statements_reset()")
        return super().cpu_seconds()


def report(store: ProfiledStorage, run: smtp_bench.Run, n: int, top: int) -> None:
    assert store.server is not None and run.database_cpu is not None
    (before, wal0), (after, _) = store.readings[0], store.readings[-1]
    # pg_stat_wal's counters reach the view after a backend's next flush.
    time.sleep(1.5)
    wal1 = [int(float(v)) for v in store.server.sql(_WAL).split("|")]
    print(
        f"{n / run.elapsed:.1f} msg/s, mtad {1000 * run.cpu / n:.2f} ms/msg, "
        f"PostgreSQL {1000 * run.database_cpu / n:.3f} ms/msg, load {os.getloadavg()[0]:.2f}"
    )
    kinds: dict[str, float] = {}
    for key, seconds in after.items():
        kind = key.split("#")[0]
        kinds[kind] = kinds.get(kind, 0.0) + seconds - before.get(key, 0.0)
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:30s} {1000 * seconds / n:7.3f} ms/msg")
    print(
        f"  WAL {(wal1[0] - wal0[0]) / n:.0f} B/msg, {(wal1[1] - wal0[1]) / n:.1f} records/msg, "
        f"{(wal1[2] - wal0[2]) / n:.2f} full-page images/msg, "
        f"{(wal1[3] - wal0[3]) / n:.3f} commits/msg"
    )
    # The same CPU inflation hits every process of a shared machine: the
    # server's CPU against mtad's is steadier than either (issue #20).
    print(f"  PostgreSQL / mtad CPU {run.database_cpu / run.cpu:.3f}")
    print("  calls   us/msg  us/call  blks/call  fpi  WAL B/call  statement")
    for line in store.server.sql(_STATEMENTS.format(top)).splitlines():
        calls, total, blocks, fpi, wal, query = line.split("|", 5)
        c, ms = int(calls), float(total)
        print(
            f"  {c:5d} {1000 * ms / n:8.0f} {1000 * ms / c:8.0f} {int(blocks) // c:10d} "
            f"{fpi:>4} {int(wal) // c:11d}  {query}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smtp_bench.add_load_options(parser)
    parser.add_argument("--top", type=int, default=8, help="statements listed")
    parser.add_argument(
        "--sql", action="append", default=[],
        help="a statement run on the migrated database before the load (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    # What run_backend and measure read besides these.
    args.checks, args.processes, args.overrides = False, 1, []
    server = PgServer.start(durable=True)
    try:
        server.sql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        server.restart()
        server.sql("CREATE EXTENSION pg_stat_statements")
        url = await server.create_database()
        if args.sql:
            from storage.sql.db import Database

            db = Database(url)
            await db.migrate()
            await db.close()
            server.sql(*args.sql, database=url.rsplit("/", 1)[1])
        store = ProfiledStorage("postgresql", url, (server.proc.pid,), server)
        tmp = Path(tempfile.mkdtemp(prefix="pg-cpu-"))
        try:
            run = await smtp_bench.run_backend(args, store, tmp, None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report(store, run, args.messages, args.top)
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())

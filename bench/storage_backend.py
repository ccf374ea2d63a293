"""The storage a benchmark's daemons run on: SQLite in their data dir (the
default), a PostgreSQL server the bench starts itself, or a given URL.

``--backend sqlite,postgresql`` runs the same load on each in turn, in the
same run, so their figures compare. The PostgreSQL server started here is
durable: ``fsync=on``, ``synchronous_commit=on`` and ``full_page_writes=on``
(the server defaults; the test suite's ``PgServer`` turns them off for
speed), since a benchmark of mail storage that may lose mail measures
nothing. Its CPU is the postmaster's plus every live backend's, from
/proc (``pg_cpu_seconds``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bench.dovecot_peer import proc_cpu_seconds

BACKENDS = ("sqlite", "postgresql")


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """``--backend`` (comma-separated, run in that order) and ``--storage-url``."""
    parser.add_argument(
        "--backend",
        type=lambda s: s.split(","),
        default=["sqlite"],
        help="storage to run on, comma-separated, in order: sqlite, postgresql "
        "(a durable PostgreSQL server started for the run)",
    )
    parser.add_argument(
        "--storage-url",
        default="",
        help="for --backend postgresql: this database instead of a server of our own "
        "(its CPU is then not measured)",
    )


def check_backends(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in args.backend:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")


@dataclass
class BenchStorage:
    """Where one backend's run keeps its data: ``overrides`` are the
    ``-o`` settings for the daemons (and for ``load_settings`` when the
    bench fills storage itself); ``cpu_seconds`` is the database server's
    CPU so far (0 for SQLite, which runs inside the daemons)."""

    backend: str
    url: str
    server_pids: tuple[int, ...] = ()

    @property
    def overrides(self) -> list[str]:
        return [f"storage.url='{self.url}'"] if self.url else []

    def cpu_seconds(self) -> float:
        if not self.server_pids:
            return 0.0
        postmaster = self.server_pids[0]
        total = proc_cpu_seconds(postmaster)
        for pid in _children(postmaster):
            # A backend that ended since it was listed: the postmaster's
            # children's times (above, once it is reaped) hold its CPU.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += proc_cpu_seconds(pid, with_children=False)
        return total

    async def settle(self) -> None:
        """Runs now the database work the load left for later, so that the
        CPU measured over the load includes it: on PostgreSQL, the merge of
        the trigram index's pending list (``Database.merge_search_index``,
        which the daemons' merger otherwise runs every second)."""
        if self.backend != "postgresql":
            return
        from storage.sql.db import Database

        db = Database(self.url)
        try:
            await db.merge_search_index()
        finally:
            await db.close()


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (PostgreSQL's backends and workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            raw = Path(f"/proc/{entry}/stat").read_bytes()
            if int(raw[raw.rindex(b")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


@contextlib.asynccontextmanager
async def bench_storage(backend: str, storage_url: str = "") -> AsyncIterator[BenchStorage]:
    """The storage of one backend's run; a PostgreSQL server started here
    stops (and its files go) at the end."""
    if backend == "sqlite":
        yield BenchStorage("sqlite", "")
        return
    if storage_url:
        yield BenchStorage("postgresql", storage_url)
        return
    from tests.pgserver import PgServer

    server = PgServer.start(durable=True)
    try:
        url = await server.create_database()
        yield BenchStorage("postgresql", url, (server.proc.pid,))
    finally:
        server.stop()

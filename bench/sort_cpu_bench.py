"""Server-side cost of IMAP SORT and THREAD on a kept big mailbox (issue #24).

Opens a filled store (``bench/search_bench.py --keep``; the schema step
runs at that open: ``--migrate-only`` times just it, on an unmigrated
copy) and times, in this one process, the steps SORT and THREAD take on
the account's INBOX: the ORDER BY over the stored keys
(``SqlMailStore.sorted_uids``), the read of the threading rows
(``thread_rows``), their trip to a content-pool worker (pickling) and
the REFERENCES threading, and beside them the in-memory path's
(``sort_rows`` and the Python keys). Reported: process CPU and wall ms,
median of ``--repeat`` runs. Never part of the test run::

    python -m bench.sort_cpu_bench sqlite+aiosqlite:////tmp/sortkeys-100k/shardmail.db
    python -m bench.sort_cpu_bench --migrate-only sqlite+aiosqlite:////tmp/copy/shardmail.db
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from imapd.imap.commands import sort as imap_sort
from storage.backend import open_storage_from_url
from storage.model import UidSet

LOGIN = "big@example.org"  # bench/search_bench.py's account

Timings = dict[str, list[tuple[float, float]]]


async def _timed(timings: Timings, name: str, fn: Callable[[], Awaitable[Any] | Any]) -> Any:
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    if asyncio.iscoroutine(result):
        result = await result
    spent = ((time.process_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000)
    timings.setdefault(name, []).append(spent)
    return result


async def measure(url: str, repeat: int) -> Timings:
    store = await open_storage_from_url(url, Path(tempfile.mkdtemp(prefix="sort-cpu-")))
    timings: Timings = {}
    try:
        account = await store.directory.get_account(LOGIN)
        mail = store.mail(account)
        box = await mail.get_mailbox(account.id, "INBOX")
        ids = (account.id, box.id)
        rows: list[Any] = []
        for _ in range(repeat):
            for name, criteria in (
                ("sorted_uids DATE", [("DATE", False)]),
                ("sorted_uids SUBJECT", [("SUBJECT", False)]),
                ("sorted_uids REVERSE SUBJECT", [("SUBJECT", True)]),
            ):
                await _timed(timings, name, lambda c=criteria: mail.sorted_uids(*ids, c))
            rows = await _timed(timings, "thread_rows", lambda: mail.thread_rows(*ids))
        number = {r[0]: i + 1 for i, r in enumerate(rows)}
        for _ in range(repeat):
            await _timed(
                timings,
                "pickled to a worker and back",
                lambda: pickle.loads(pickle.dumps((rows, number))),
            )
            await _timed(
                timings,
                "REFERENCES threading (worker)",
                lambda: imap_sort.stored_thread_response(rows, "REFERENCES", number),
            )
        old = await _timed(
            timings, "old path: sort_rows", lambda: mail.sort_rows(*ids, UidSet.all())
        )
        await _timed(
            timings,
            "old path: keys + sort by DATE",
            lambda: imap_sort.sorted_uids(old, {"DATE"}, (("DATE", False),)),
        )
        await _timed(
            timings,
            "old path: REFERENCES threading",
            lambda: imap_sort.thread_response(old, "REFERENCES", number),
        )
    finally:
        await store.close()
    return timings


async def migrate_only(url: str) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    store = await open_storage_from_url(url, Path(tempfile.mkdtemp(prefix="sort-cpu-")))
    print(
        f"open and migrate: wall {time.perf_counter() - wall:.1f} s, "
        f"process CPU {time.process_time() - cpu:.1f} s"
    )
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="the kept store's storage URL")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--migrate-only", action="store_true")
    args = parser.parse_args()
    if args.migrate_only:
        asyncio.run(migrate_only(args.url))
        return
    timings = asyncio.run(measure(args.url, args.repeat))
    print("| step | CPU ms | wall ms |\n|---|---:|---:|")
    for name, values in timings.items():
        cpu = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        print(f"| {name} | {cpu:.0f} | {wall:.0f} |")


if __name__ == "__main__":
    main()

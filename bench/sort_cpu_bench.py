"""Server-side cost of IMAP SORT and THREAD on a kept big mailbox (issue #24).

Opens a filled store (``bench/search_bench.py --keep``; the schema step
runs at that open: ``--migrate-only`` times just it, on an unmigrated
copy) and times, in this one process, the steps SORT and THREAD take on
the account's INBOX: the ORDER BY over the stored keys
(``SqlMailStore.sorted_uids``), the read of the threading rows
(``thread_rows``), their trip to a content-pool worker (pickling) and
the REFERENCES threading, and beside them the in-memory path's
(``sort_rows`` and the Python keys), and a whole SORT answer (the
ordered read, sequence numbers, the response line). Reported: process CPU and wall ms,
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
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from imapd.imap.commands import sort as imap_sort
from imapd.imap.mailbox_view import MailboxView
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


async def _sort_answer(
    mail: Any, ids: tuple[int, int], view: MailboxView, criteria: list[tuple[str, bool]]
) -> bytes:
    """What ``SORT (criteria) UTF-8 ALL`` does past the command's parse:
    the stored order, its sequence numbers in the view, the response."""
    everything = await mail.sorted_uids(*ids, criteria)
    return imap_sort._sort_line(imap_sort._numbered(view, list(view.uids), everything, False))


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
        view = MailboxView(box, read_only=True)
        view.uids = array("I", [r[0] for r in rows])
        for _ in range(repeat):
            for name, criteria in (("DATE", [("DATE", False)]), ("SUBJECT", [("SUBJECT", False)])):
                await _timed(
                    timings,
                    f"SORT ({name}) ALL answer: read, numbers, response line",
                    lambda c=criteria: _sort_answer(mail, ids, view, c),
                )
        numbers = list(range(1, len(rows) + 1))
        number = dict(zip([r[0] for r in rows], numbers, strict=True))
        for _ in range(repeat):
            await _timed(
                timings,
                "pickled to a worker and back",
                lambda: pickle.loads(pickle.dumps((rows, numbers))),
            )
            await _timed(
                timings,
                "REFERENCES threading (worker)",
                lambda: imap_sort.stored_thread_response(rows, "REFERENCES", numbers),
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

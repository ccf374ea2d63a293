"""CPU time of the storage's searches on a kept ``search_bench`` account.

``search_bench`` times the daemons by the wall clock, which on a shared,
loaded machine is mostly the wait for a core. This times the two searches
issue #20 is about in-process, on the data ``search_bench --keep`` left:
``MailStore.search(INBOX, BODY word)`` (what ``UID SEARCH BODY`` runs) and
``MailStore.search_account(content word, limit=51)`` (the API's first
page), the same 20 words as ``search_bench``, each run twice and the
second timed, as process CPU time (the reader threads and the database
client's work; PostgreSQL's own server time is not in it, so on
PostgreSQL the wall figures are reported too). Never part of the test run::

    python -m bench.search_cpu_bench /tmp/sb100k-sqlite
    python -m bench.search_cpu_bench /tmp/sb100k-pg postgresql+asyncpg://...
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.search_bench import LOGIN, Corpus, overrides

QUERIES = 20


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[round(0.95 * (len(ordered) - 1))]


async def main(data_dir: Path, storage_url: str) -> None:
    from conf.settings import load_settings
    from storage import open_storage, password_hasher
    from storage.search import Text

    settings = load_settings(None, overrides(data_dir, storage_url))
    storage = await open_storage(
        settings.storage, data_dir=data_dir, password_hasher=password_hasher(settings.auth)
    )
    try:
        account = await storage.directory.get_account(LOGIN)
        mail = storage.mail(account)
        inbox = (await mail.get_mailbox(account.id, "INBOX")).id
        rng = random.Random(7)  # search_bench's IMAP words
        corpus = Corpus()
        words = [rng.choice(corpus.body_words()) for _ in range(QUERIES)]
        runs: list[tuple[str, Callable[[str], Awaitable[Any]]]] = [
            ("search BODY", lambda w: mail.search(account.id, inbox, Text("body", w))),
            ("search_account", lambda w: mail.search_account(
                account.id, Text("content", w), limit=51)),
        ]
        for name, run in runs:
            cpu: list[float] = []
            wall: list[float] = []
            for w in words:
                await run(w)  # warm
                c0, t0 = time.process_time(), time.perf_counter()
                await run(w)
                cpu.append((time.process_time() - c0) * 1000)
                wall.append((time.perf_counter() - t0) * 1000)
            (c50, c95), (w50, w95) = _percentiles(cpu), _percentiles(wall)
            print(f"{name:15} CPU p50 {c50:7.1f} p95 {c95:7.1f} ms | "
                  f"wall p50 {w50:7.1f} p95 {w95:7.1f} ms", flush=True)
    finally:
        await storage.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""))

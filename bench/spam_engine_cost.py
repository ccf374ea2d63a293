"""What the built-in anti-spam engine costs per MX message.

Measures, on the test corpus (tests/spamcorpus.py, messages of 0.5-2 kB),
the engine's CPU work per message (``spamengine.scan_octets``: parse of the
first 256 KiB, header rules, tokens; it runs in a worker thread), the same
for a 25 MB message (bounded by the read cap), and on a SQLite store whose
account learned 400 messages, the one query per recipient
(``MailStore.spam_counts``) and one learn (``MailStore.learn_spam``).

    python -m bench.spam_engine_cost [--messages 600] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from delivery import spamengine
from delivery.spamrules import AuthVerdicts
from storage.backend import open_storage_from_url
from tests.spamcorpus import corpus


def _per_message(work, items) -> float:
    start = time.process_time()
    for item in items:
        work(item)
    return (time.process_time() - start) / len(items)


async def _store_costs(url: str, scans: list[spamengine.Scan], samples) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        storage = await open_storage_from_url(url or f"sqlite+aiosqlite:///{tmp}/s.db", Path(tmp))
        try:
            await storage.directory.add_domain("example.org")
            account = await storage.directory.add_account("a@example.org", "pw")
            mail = storage.mail(account)
            start = time.perf_counter()
            for i, (found, sample) in enumerate(zip(scans[:400], samples, strict=False)):
                await mail.learn_spam(account.id, f"{i:064x}", found.tokens, sample.spam)
            learn = (time.perf_counter() - start) / min(400, len(scans))
            start = time.perf_counter()
            for found in scans:
                await mail.spam_counts(account.id, found.tokens)
            read = (time.perf_counter() - start) / len(scans)
        finally:
            await storage.close()
    return learn, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--database", default="", help="storage URL (default: SQLite, temporary)")
    args = parser.parse_args()
    samples = corpus(7, args.messages // 2, "a@example.org")
    raws = [s.raw for s in samples]
    auth = AuthVerdicts()
    scan_cpu = _per_message(lambda raw: spamengine.scan_octets(raw, auth), raws)
    words = [f"w{i}" for i in range(20_000)]
    head = b"From: a@b.example\r\nSubject: big\r\nContent-Type: text/plain\r\n\r\n"
    big = head + " ".join(random.choices(words, k=4_000_000)).encode()[: 25 * 1024 * 1024]
    big_cpu = _per_message(lambda raw: spamengine.scan_octets(raw, auth), [big] * 5)
    scans = [spamengine.scan_octets(raw, auth) for raw in raws]
    learn, read = asyncio.run(_store_costs(args.database, scans, samples))
    tokens = sum(len(s.tokens) for s in scans) / len(scans)
    print(
        f"messages: {len(raws)}, {sum(map(len, raws)) / len(raws):.0f} octets and"
        f" {tokens:.0f} tokens on average"
    )
    print(f"scan (parse + rules + tokens), CPU per message: {scan_cpu * 1e3:.2f} ms")
    print(f"scan of a 25 MB message, CPU: {big_cpu * 1e3:.2f} ms")
    print(f"spam_counts (one query), wall per message: {read * 1e3:.2f} ms")
    print(f"learn_spam (one write), wall per message: {learn * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

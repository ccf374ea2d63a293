"""CPU per write on PostgreSQL, in-process (issue #20): deliveries through
the ingest path (as mtad's and an IMAP APPEND's) and STOREs of one UID
(as an IMAP client's), CLIENTS at a time, each on its own account, on a
durable server started here (``bench/storage_backend.py``).

For each phase it prints the server's CPU (postmaster and its backends,
utime+stime from /proc, the search index's pending list merged inside the
window), this process's CPU and the wall time, each per operation. Run
the trees to compare one after the other, alternated (A B A B)::

    python -m bench.pg_write_cost --deliveries 600 --stores 2000 --clients 20
    PYTHONPATH=/tmp/base python -m bench.pg_write_cost ...   # another tree
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from bench.storage_backend import bench_storage

WORDS = (
    "mail server shard message folder account delivery index search change log "
    "commit batch round trip writer reader client session flag seen answered "
    "quota blob content header body subject sender recipient domain route queue"
).split()


def _message(n: int, size: int) -> bytes:
    body: list[str] = []
    length = 0
    while length < size:
        line = " ".join(random.choices(WORDS, k=12))
        body.append(line)
        length += len(line) + 2
    head = (
        f"From: a{n}@example.net\r\nTo: u@example.org\r\nSubject: m {n} "
        f"{random.choice(WORDS)}\r\nMessage-ID: <{n}.{random.random()}@example.net>\r\n\r\n"
    )
    return (head + "\r\n".join(body) + "\r\n").encode()


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=600)
    parser.add_argument("--stores", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size", type=int, default=5000, help="message body octets")
    parser.add_argument(
        "--events", default="auto", help="storage.events: auto (NOTIFY), inprocess (none sent)"
    )
    args = parser.parse_args()

    from storage.backend import open_storage_from_url
    from storage.ingest import Delivery, ingest
    from storage.model import SEEN, StoreMode, UidSet

    async with bench_storage("postgresql") as where:
        blobs = Path(tempfile.mkdtemp(prefix="pgcost-"))
        storage = await open_storage_from_url(where.url, blobs, events=args.events)
        try:
            await storage.directory.add_domain("example.org")
            accounts = [
                await storage.directory.add_account(f"u{i}@example.org", "pw")
                for i in range(args.clients)
            ]
            messages = [_message(n, args.size) for n in range(args.deliveries)]
            # Warm up: every account's first write, every prepared statement.
            for a in accounts:
                await ingest(storage, [Delivery(a, "INBOX")], _message(-1, args.size))

            async def measure(name: str, count: int, work: object) -> None:
                cpu0, own0, t0 = where.cpu_seconds(), _own_cpu(), time.perf_counter()
                await work  # type: ignore[misc]
                await where.settle()
                cpu1, own1, t1 = where.cpu_seconds(), _own_cpu(), time.perf_counter()
                print(
                    f"{name}: {count} ops, PostgreSQL {1000 * (cpu1 - cpu0) / count:.3f} "
                    f"ms/op, this process {1000 * (own1 - own0) / count:.3f} ms/op, "
                    f"{count / (t1 - t0):.0f} ops/s",
                    flush=True,
                )

            async def deliver_all() -> None:
                async def client(i: int) -> None:
                    for raw in messages[i :: args.clients]:
                        await ingest(storage, [Delivery(accounts[i], "INBOX")], raw)

                await asyncio.gather(*(client(i) for i in range(args.clients)))

            async def store_all() -> None:
                per = args.stores // args.clients

                async def client(i: int) -> None:
                    mail = storage.mail(accounts[i])
                    box = (await mail.get_mailbox(accounts[i].id, "INBOX")).id
                    top = (await mail.status(accounts[i].id, box)).uidnext - 1
                    for n in range(per):
                        uid = random.randint(1, top)
                        mode = StoreMode.ADD if n % 2 else StoreMode.REMOVE
                        await mail.store_flags(accounts[i].id, box, UidSet.of([uid]), mode, [SEEN])

                await asyncio.gather(*(client(i) for i in range(args.clients)))

            print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
            await measure("deliver", args.deliveries, deliver_all())
            await measure("store", args.stores // args.clients * args.clients, store_all())
        finally:
            await storage.close()


if __name__ == "__main__":
    asyncio.run(main())

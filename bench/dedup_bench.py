"""Bytes stored for a corpus with repeated attachments, messages stored
whole (``storage.attachment_min_bytes = 0``, as before issue #21) and with
attachments stored once (the default, 64 KiB), and the ingest time of each.

The corpus: ``--messages`` messages to ``--accounts`` accounts, each with
its own headers and text and one to three attachments drawn from a pool of
``--pool`` attachments of random sizes (20 KB to 3 MB, base64), so that the
same attachment recurs in many messages, as forwarded and replied-to mail
does. Both runs ingest the same corpus (``storage.ingest.ingest``, the path
every entry point takes) into a fresh SQLite site with blobs on disk, and
measure what the blob folder and the database's blob pack hold (the
``mailctl blobs stats`` figures), then read every message back whole
(``BlobStore.get``, checked byte-exact). The two runs alternate
``--rounds`` times.

    python -m bench.dedup_bench --messages 300 --accounts 30 --pool 40 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import random
import shutil
import tempfile
import time
from pathlib import Path

from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from storage.backend import open_storage_from_url
from storage.blob.audit import blob_stats
from storage.ingest import Delivery, ingest


def corpus(seed: int, messages: int, accounts: int, pool: int) -> list[tuple[int, bytes]]:
    """(account number, raw message) pairs."""
    rng = random.Random(seed)
    attachments = [
        base64.encodebytes(rng.randbytes(rng.randint(20_000, 3_000_000))).replace(b"\n", b"\r\n")
        for _ in range(pool)
    ]
    out = []
    for n in range(messages):
        text = rng.randbytes(rng.randint(50, 4000)).hex().encode()
        parts = [b"Content-Type: text/plain\r\n\r\n" + text]
        for a in rng.sample(attachments, rng.randint(1, 3)):
            parts.append(
                b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" + a
            )
        head = (
            f"From: s{rng.randint(1, 99)}@example.net\r\nSubject: m {n}\r\n"
            f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b{n}"\r\n\r\n'
        ).encode()
        body = b"".join(f"--b{n}\r\n".encode() + p + b"\r\n" for p in parts)
        out.append((rng.randrange(accounts), head + body + f"--b{n}--\r\n".encode()))
    return out


async def run(mail: list[tuple[int, bytes]], accounts: int, min_bytes: int) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="dedup-bench-"))
    try:
        storage = await open_storage_from_url(
            f"sqlite+aiosqlite:///{base}/site.db",
            base / "blobs",
            password_hasher=PasswordHasher.from_parameters(CHEAPEST),
            attachment_min_bytes=min_bytes,
            fts_indexer=False,
        )
        try:
            await storage.directory.add_domain("example.org")
            users = [
                await storage.directory.add_account(f"u{n}@example.org", "pw")
                for n in range(accounts)
            ]
            start = time.perf_counter()
            for who, raw in mail:
                await ingest(storage, [Delivery(users[who])], raw)
            elapsed = time.perf_counter() - start
            keys = [hashlib.sha256(raw).hexdigest() for _, raw in mail]
            start = time.perf_counter()
            for (who, raw), key in zip(mail, keys, strict=True):
                assert await storage.blobs_for(users[who]).get(key) == raw
            read = time.perf_counter() - start
            stats = await blob_stats(storage)
        finally:
            await storage.close()
        return {
            "seconds": elapsed,
            "read": read,
            "stored": stats.stored_bytes,
            "referenced": stats.referenced_bytes,
            "blobs": stats.blobs,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--accounts", type=int, default=30)
    parser.add_argument("--pool", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    mail = corpus(seed, args.messages, args.accounts, args.pool)
    total = sum(len(raw) for _, raw in mail)
    print(f"seed {seed}: {len(mail)} messages, {total / 1e6:.1f} MB")
    for rnd in range(args.rounds):
        for label, min_bytes in (("whole", 0), ("attachments once", 65536)):
            r = asyncio.run(run(mail, args.accounts, min_bytes))
            print(
                f"round {rnd + 1} {label:>16}: {r['blobs']:.0f} blobs, "
                f"{r['stored'] / 1e6:.1f} MB stored for {r['referenced'] / 1e6:.1f} MB "
                f"referenced (ratio {r['referenced'] / r['stored']:.2f}), "
                f"ingest {len(mail) / r['seconds']:.1f} msg/s, "
                f"read back whole {len(mail) / r['read']:.1f} msg/s",
                flush=True,
            )


if __name__ == "__main__":
    main()

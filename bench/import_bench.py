"""Benchmark: `mailctl import mbox` of a 2,000-message mbox into a fresh SQLite store.

Run: python -m bench.import_bench [--messages 2000]
Prints messages/s for the whole command (process start, schema creation,
parse, blob write with fsync, metadata commit, full-text index).
"""

from __future__ import annotations

import argparse
import mailbox
import random
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

WORDS = (
    "mail server queue delivery mailbox folder message header body attachment search index "
    "thread reply forward draft archive junk trash sent inbox quota shard blob"
).split()


def make_message(rng: random.Random, n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Sender {n % 97} <sender{n % 97}@example.net>"
    msg["To"] = "alice@example.org"
    msg["Subject"] = " ".join(rng.choices(WORDS, k=6)) + f" #{n}"
    msg["Message-ID"] = f"<bench{n}@example.net>"
    msg["Date"] = "Sun, 22 Nov 2026 10:00:00 +0000"
    text = "\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(rng.randint(20, 200)))
    msg.set_content(text)
    if n % 10 == 0:
        msg.add_alternative(f"<html><body><p>{text[:2000]}</p></body></html>", subtype="html")
    if n % 25 == 0:
        msg.add_attachment(
            rng.randbytes(30_000),
            maintype="application",
            subtype="octet-stream",
            filename=f"file{n}.bin",
        )
    return bytes(msg)


def build_mbox(path: Path, count: int) -> int:
    rng = random.Random(42)
    box = mailbox.mbox(path)
    size = 0
    for n in range(count):
        raw = make_message(rng, n)
        size += len(raw)
        box.add(raw)
    box.close()
    return size


def mailctl(data: Path, *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        [sys.executable, "-m", "mailctl", args[0], "-o", f"server.data_dir={data}", *args[1:]],
        input=stdin,
        text=True,
        check=True,
        capture_output=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        mbox = tmpdir / "bench.mbox"
        size = build_mbox(mbox, args.messages)
        data = tmpdir / "data"
        mailctl(data, "domain", "add", "example.org")
        mailctl(data, "account", "add", "alice@example.org", stdin="pw\n")
        start = time.perf_counter()
        mailctl(data, "import", "mbox", "alice@example.org", "INBOX", "--from", str(mbox), "-q")
        elapsed = time.perf_counter() - start
    print(
        f"imported {args.messages} messages ({size / 1e6:.1f} MB) in {elapsed:.2f} s: "
        f"{args.messages / elapsed:.0f} messages/s"
    )


if __name__ == "__main__":
    main()

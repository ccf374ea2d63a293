"""``mailctl blobs stats`` and ``mailctl blobs verify`` (``storage/blob/audit.py``).

``stats``: how many blobs are stored and their bytes, the bytes the
messages would take without sharing (attachments stored once, identical
messages stored once), and the ratio. ``verify``: every referenced blob
(messages, their skeletons' attachment blobs, the outbound queue's) exists
and reads back as its key; a bar on a terminal, else a progress line now
and then; exit status 1 on any problem, each named on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from conf.settings import Settings
from storage.blob.audit import blob_stats, verify_blobs


def _progress(stream: Any = sys.stderr) -> Callable[[int, int], None]:
    """A bar redrawn in place on a terminal; elsewhere a line every 10 s
    and one at the end."""
    tty = stream.isatty()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        final = done >= total
        if not final and now - last[0] < (0.1 if tty else 10.0):
            return
        last[0] = now
        if tty:
            filled = 30 * done // total if total else 30
            bar = "#" * filled + "-" * (30 - filled)
            stream.write(f"\r[{bar}] {done}/{total} blobs{chr(10) if final else ''}")
        else:
            stream.write(f"verified {done}/{total} blobs\n")
        stream.flush()

    return show


def cmd_blobs(args: argparse.Namespace, settings: Settings) -> int:
    from mailctl.cli import with_storage

    async def stats(storage: Any) -> int:
        s = await blob_stats(storage)
        print(f"blobs: {s.blobs} ({s.attachment_blobs} attachment blobs)")
        print(f"bytes stored: {s.stored_bytes}")
        print(f"bytes referenced: {s.referenced_bytes} ({s.messages} messages)")
        print(f"ratio: {s.ratio:.2f}")
        return 0

    async def verify(storage: Any) -> int:
        report = await verify_blobs(storage, None if args.quiet else _progress())
        for problem in report.problems:
            print(f"mailctl: blob {problem}", file=sys.stderr)
        print(f"{report.checked} messages verified, {len(report.problems)} problems")
        return 1 if report.problems else 0

    return with_storage(settings, stats if args.action == "stats" else verify)


def add_blobs_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``blobs stats|verify [-q]``."""
    p = command("blobs", cmd_blobs, "blob store usage, and a check of every referenced blob")
    p.add_argument("action", choices=("stats", "verify"))
    p.add_argument("-q", "--quiet", action="store_true", help="verify: no progress output")

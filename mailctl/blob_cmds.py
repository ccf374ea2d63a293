"""``mailctl blobs stats|verify|gc`` (``storage/blob/audit.py``, ``storage/blob/gc.py``).

``stats``: how many blobs are stored and their bytes, the bytes the
messages would take without sharing (attachments stored once, identical
messages stored once), and the ratio. ``verify``: every referenced blob
(messages, their skeletons' attachment blobs, the outbound queue's) exists
and reads back as its key; a bar on a terminal, else a progress line now
and then; exit status 1 on any problem, each named on stderr. ``gc``: one
garbage collection pass now, under the lease the daemons take turns with
(exit status 75, EX_TEMPFAIL, if another instance holds it); ``--dry-run``
deletes nothing, ``--grace`` overrides ``storage.gc_grace_seconds``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from conf.settings import Settings
from storage.blob.audit import blob_stats, verify_blobs
from storage.blob.gc import LeaseLost, collect_once

EX_TEMPFAIL = 75  # sysexits.h


def _progress(stream: Any = sys.stderr, verb: str = "verified") -> Callable[[int, int], None]:
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
            stream.write(f"{verb} {done}/{total} blobs\n")
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

    async def gc(storage: Any) -> int:
        grace = settings.storage.gc_grace_seconds if args.grace is None else args.grace
        try:
            report = await collect_once(
                storage,
                grace,
                dry_run=args.dry_run,
                progress=None if args.quiet else _progress(verb="examined"),
            )
        except LeaseLost:
            print("mailctl: lost the GC lease; try again later", file=sys.stderr)
            return EX_TEMPFAIL
        if report is None:
            print(
                "mailctl: another instance is collecting garbage (the blob-gc lease);"
                " try again later",
                file=sys.stderr,
            )
            return EX_TEMPFAIL
        verb = "would remove" if args.dry_run else "removed"
        print(
            f"{verb} {report.removed} blobs, {report.removed_bytes} bytes;"
            f" {report.spared} unreferenced blobs younger than {grace:g} s kept"
        )
        return 0

    actions = {"stats": stats, "verify": verify, "gc": gc}
    return with_storage(settings, actions[args.action])


def add_blobs_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``blobs stats|verify|gc [-q] [--dry-run] [--grace SECONDS]``."""
    p = command(
        "blobs", cmd_blobs, "blob store usage, a check of every referenced blob, garbage collection"
    )
    p.add_argument("action", choices=("stats", "verify", "gc"))
    p.add_argument("-q", "--quiet", action="store_true", help="verify, gc: no progress output")
    p.add_argument("--dry-run", action="store_true", help="gc: report, delete nothing")
    p.add_argument(
        "--grace",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="gc: spare blobs stored this recently (default: storage.gc_grace_seconds)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be 0 or more")
    return value

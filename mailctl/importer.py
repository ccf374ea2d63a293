"""``mailctl import``: bring an mbox file or a Maildir into a mailbox.

Every message goes through the single ingest path. Flags are carried over
(mbox ``Status``/``X-Status`` headers; Maildir ``:2,`` info letters) and
the internal date is the mbox From_ line date or the Maildir file's mtime.
Line ends become CRLF, as SMTP would have stored the message: files on
disk use the local convention (LF), but the stored form is what IMAP
serves as BODY[]. An mbox's ``>From `` lines are kept as they are: mboxo
and mboxrd files cannot be told apart, so unescaping could corrupt one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import mailbox
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.api import Storage
from storage.ingest import Delivery, ingest
from storage.model import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN, Account

# Maildir info letters (https://cr.yp.to/proto/maildir.html) -> IMAP flags.
MAILDIR_FLAGS = {"S": SEEN, "R": ANSWERED, "F": FLAGGED, "T": DELETED, "D": DRAFT}
# mbox Status/X-Status letters as written by mutt, Thunderbird and UW.
MBOX_FLAGS = {"R": SEEN, "A": ANSWERED, "F": FLAGGED, "D": DELETED, "T": DRAFT}

# CRLF first, so an existing CRLF is one match and stays one line end.
_LINE_END = re.compile(rb"\r\n|\r|\n")


def crlf_line_ends(raw: bytes) -> bytes:
    """``raw`` with every line end CRLF: RFC 5322 section 2.1 (and RFC 5321
    section 2.3.8, which refuses bare CR and LF) allows no other. A lone LF
    or lone CR becomes CRLF, an existing CRLF stays; linear in the size."""
    return _LINE_END.sub(b"\r\n", raw)


@dataclass(frozen=True)
class SourceMessage:
    raw: bytes
    flags: tuple[str, ...]
    internal_date: dt.datetime | None


def _mbox_date(from_line: str) -> dt.datetime | None:
    # "From sender@example Sat Jan  3 01:05:34 1996" (asctime after the sender).
    parts = from_line.split(None, 1)
    if len(parts) < 2:
        return None
    try:
        when = dt.datetime.strptime(" ".join(parts[1].split()[-5:]), "%a %b %d %H:%M:%S %Y")
    except ValueError:
        return None
    return when.replace(tzinfo=dt.UTC)


def read_mbox(path: Path) -> tuple[int, Iterator[SourceMessage]]:
    box = mailbox.mbox(path, create=False)
    keys = box.keys()

    def messages() -> Iterator[SourceMessage]:
        for key in keys:
            msg = box.get_message(key)
            status = (msg.get("Status", "") or "") + (msg.get("X-Status", "") or "")
            flags = tuple(sorted({f for c, f in MBOX_FLAGS.items() if c in status}))
            raw = crlf_line_ends(box.get_bytes(key))
            yield SourceMessage(raw, flags, _mbox_date(msg.get_from()))

    return len(keys), messages()


def read_maildir(path: Path) -> tuple[int, Iterator[SourceMessage]]:
    box = mailbox.Maildir(path, factory=None, create=False)
    keys = box.keys()

    def messages() -> Iterator[SourceMessage]:
        for key in keys:
            msg = box.get_message(key)
            flags = tuple(sorted({MAILDIR_FLAGS[c] for c in msg.get_flags() if c in MAILDIR_FLAGS}))
            date = dt.datetime.fromtimestamp(msg.get_date(), dt.UTC)
            yield SourceMessage(crlf_line_ends(box.get_bytes(key)), flags, date)

    return len(keys), messages()


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.1:
            return
        self._last = now
        filled = int(self.width * done / self.total) if self.total else self.width
        rate = done / max(now - self.start, 1e-9)
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if final else ""
        self.stream.write(f"\r[{bar}] {done}/{self.total} {rate:.0f} msg/s{end}")
        self.stream.flush()


async def import_messages(
    storage: Storage,
    account: Account,
    mailbox_name: str,
    total: int,
    messages: Iterator[SourceMessage],
    progress: Callable[[int, bool], None] | None = None,
    concurrency: int = 8,
) -> int:
    """Ingest every message; returns the count. Stops at the first failure
    (what was imported before it stays imported)."""
    mail = storage.mail(account)
    try:
        await mail.get_mailbox(account.id, mailbox_name)
    except Exception:
        await mail.create_mailbox(account.id, mailbox_name)
    done = 0
    pending: set[asyncio.Task[object]] = set()
    iterator = iter(messages)
    while True:
        while len(pending) < concurrency:
            # Reading a message is file I/O: keep it off the loop.
            item = await asyncio.to_thread(next, iterator, None)
            if item is None:
                break
            delivery = Delivery(account, mailbox_name, item.flags, item.internal_date)
            pending.add(asyncio.create_task(ingest(storage, [delivery], item.raw)))
        if not pending:
            break
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            task.result()
            done += 1
        if progress:
            progress(done, False)
    if progress:
        progress(done, True)
    return done


def open_source(kind: str, path: Path) -> tuple[int, Iterator[SourceMessage]]:
    if kind == "mbox":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not an mbox file")
        return read_mbox(path)
    if not (path / "cur").is_dir() and not (path / "new").is_dir():
        raise FileNotFoundError(f"{path}: not a Maildir (no cur/ or new/)")
    return read_maildir(path)


"""The one ingest path: every entry point stores a message through here.

SMTP local delivery, IMAP APPEND, the HTTP send's Sent copy and
``mailctl import`` all call :func:`ingest`, so a message is parsed once,
written once as a content-addressed blob, and its parsed form is what FETCH
and the API read afterwards (never a re-serialised message).

Order of writes, and what is durable when:

1. the raw bytes go to the blob store, which returns only once they are
   fsynced and renamed into place (``BlobStore.put`` / ``put_file``);
2. then, per account, ONE transaction (``MailStore.deliver``) holding the
   message row with its parsed form and a mailbox entry for every delivery
   to that account: all of an account's copies commit together, or none.

A crash between 1 and 2 leaves only an unreferenced blob, which garbage
collection removes; metadata never points to a missing blob. When
:func:`ingest` returns, every delivery is committed and visible. When it
raises, the accounts before the failing one stay committed and the rest
were not attempted; callers needing per-delivery outcomes (an SMTP
transaction with several local recipients) use :func:`ingest_each`.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from storage.api import MailStore, Storage
from storage.errors import StorageError
from storage.mime import parse_message
from storage.model import Account, AppendResult, Mailbox, ParsedMessage


@dataclass(frozen=True)
class Delivery:
    """One copy of the message: which account, which mailbox (name or id),
    with which flags and internal date (None: storage uses "now")."""

    account: Account
    mailbox: str | int = "INBOX"
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None


def _parse_path(path: Path) -> ParsedMessage:
    # Parsed through a read-only mapping: the file is never copied whole into memory.
    with path.open("rb") as fh:
        if path.stat().st_size == 0:
            return parse_message(b"")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return parse_message(mapped)


async def parse(source: bytes | Path) -> ParsedMessage:
    """Parse a message off the event loop (in a worker thread).

    For callers that need the parse before delivering (SMTP checks, size
    and header rules); pass the result back to :func:`ingest` as
    ``parsed=`` so the message is not parsed twice. Never raises for bad
    MIME; an unreadable path raises ``OSError``.
    """
    if isinstance(source, Path):
        return await asyncio.to_thread(_parse_path, source)
    return await asyncio.to_thread(parse_message, bytes(source))


async def _mailbox(store: MailStore, account: Account, mailbox: str | int) -> Mailbox:
    # Both lookups raise StorageError(NOT_FOUND) for a missing mailbox.
    if isinstance(mailbox, int):
        return await store.get_mailbox_by_id(account.id, mailbox)
    return await store.get_mailbox(account.id, mailbox)


async def _write_blob(storage: Storage, source: bytes | Path) -> str:
    if isinstance(source, Path):
        return await storage.blobs.put_file(source)  # streamed, never all in memory
    return await storage.blobs.put(bytes(source))


async def _store(
    storage: Storage,
    deliveries: Sequence[Delivery],
    source: bytes | Path,
    parsed: ParsedMessage | None,
    stop_at_error: bool,
) -> list[AppendResult | StorageError]:
    if not deliveries:
        return []
    if parsed is None:
        parsed = await parse(source)
    blob_key = await _write_blob(storage, source)

    results: list[AppendResult | StorageError | None] = [None] * len(deliveries)
    if not stop_at_error:
        # Per-delivery outcomes: a missing mailbox fails only its delivery.
        for i, d in enumerate(deliveries):
            try:
                await _mailbox(storage.mail(d.account), d.account, d.mailbox)
            except StorageError as err:
                results[i] = err
    # Group by account, keeping each delivery's position for the results.
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(deliveries):
        if results[i] is None:
            groups.setdefault(d.account.id, []).append(i)
    for indexes in groups.values():
        account = deliveries[indexes[0]].account
        targets = [
            (deliveries[i].mailbox, deliveries[i].flags, deliveries[i].internal_date)
            for i in indexes
        ]
        try:
            outcome: list[AppendResult] | StorageError = await storage.mail(account).deliver(
                account.id, blob_key, parsed, targets
            )
        except StorageError as err:
            outcome = err
        for n, i in enumerate(indexes):
            results[i] = outcome if isinstance(outcome, StorageError) else outcome[n]
        if isinstance(outcome, StorageError) and stop_at_error:
            break
    return [r for r in results if r is not None]


async def ingest_each(
    storage: Storage,
    deliveries: Sequence[Delivery],
    source: bytes | Path,
    *,
    parsed: ParsedMessage | None = None,
) -> list[AppendResult | StorageError]:
    """Like :func:`ingest`, but one outcome per delivery, in order.

    A delivery that fails with a classified error (NOT_FOUND mailbox,
    OVER_QUOTA...) gets its :class:`StorageError` in its slot and the others
    still go ahead. Each :class:`AppendResult` slot is committed when this
    returns. A failure of the blob write (before any delivery) raises.
    """
    return await _store(storage, deliveries, source, parsed, stop_at_error=False)


async def ingest(
    storage: Storage,
    deliveries: Sequence[Delivery],
    source: bytes | Path,
    *,
    parsed: ParsedMessage | None = None,
) -> list[AppendResult]:
    """Store one message for every delivery; the single ingest path.

    ``source`` is the raw RFC 5322 message, as bytes or as a file (spooled
    DATA, an import); a file is streamed into the blob store. ``parsed`` is
    a prior :func:`parse` of the same bytes, reused instead of parsing again.

    Every mailbox is resolved before anything is written, so a missing one
    raises ``StorageError(NOT_FOUND)`` with nothing stored. Then the blob is
    written durably, then the metadata (see the module docstring). Returns
    one :class:`AppendResult` per delivery, in order; when it returns,
    every delivery is committed. Over quota raises
    ``StorageError(OVER_QUOTA)``; other accounts' deliveries committed
    before the failing account's remain committed.
    """
    # Check every mailbox first so a missing one stores nothing at all, not
    # even a blob (one account's deliveries are atomic anyway; across
    # accounts this keeps a NOT_FOUND from committing some of them).
    for d in deliveries:
        await _mailbox(storage.mail(d.account), d.account, d.mailbox)
    results = await _store(storage, deliveries, source, parsed, stop_at_error=True)
    for r in results:
        if isinstance(r, StorageError):
            raise r
    return [r for r in results if isinstance(r, AppendResult)]

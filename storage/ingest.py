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

:func:`ingest_many` stores many messages into one mailbox all or none (a
COPY or MOVE from another account): each message is staged in turn, blob
then a message row in no mailbox (committed: its blob is referenced from
then on), and ONE transaction then appends them all; if that fails, the
staged rows are deleted. A crash in between leaves staged rows that no
mailbox entry names, invisible to every client; garbage collection's
pass deletes them once older than its grace (``storage.blob.gc.
drop_stale_staged``), and then their blobs.

A crash between 1 and 2 leaves only an unreferenced blob, which garbage
collection removes; metadata never points to a missing blob. Where big
MIME parts are stored once (``storage/blob/skeleton.py``), step 1 writes
them first, each durable, and then the message's skeleton under the
message's key; reads return the original bytes.

A message small enough for every target store to keep itself
(``MailStore.inline_blob_max``: a one-host site's shard database holds
the blob pack) skips step 1: its bytes are written in step 2's
transaction, so one fsync makes blob and metadata durable together and a
refused delivery leaves nothing behind. Either way, when
:func:`ingest` returns, every delivery is committed and visible. When it
raises, the accounts before the failing one stay committed and the rest
were not attempted; callers needing per-delivery outcomes (an SMTP
transaction with several local recipients) use :func:`ingest_each`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import mmap
from collections import Counter
from collections.abc import AsyncIterable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from storage.api import BlobStore, MailStore, Storage
from storage.blob import deleting
from storage.blob.key import content_key, content_key_sync
from storage.blob.skeleton import MAGIC, SkeletonBlobStore, decode
from storage.contentpool import ContentTimeout, content_pool
from storage.errors import StorageError
from storage.mime import parse_message
from storage.model import (
    Account,
    AppendResult,
    BodyPart,
    Envelope,
    Mailbox,
    ParsedMessage,
)

log = logging.getLogger(__name__)

# Messages up to this size are parsed on the event loop: that takes well under
# a millisecond, less than handing them to a worker thread (and its GIL
# handoffs) costs. Larger ones are parsed in a thread.
INLINE_PARSE_MAX = 32 * 1024
# Above this, the parse goes to a content worker process with a time limit
# (DESIGN.md: no input may stall the process): a pure-Python parse in a
# thread still holds the GIL. Below it a parse takes milliseconds, less
# than shipping the bytes to another process.
POOL_PARSE_MIN = 1024 * 1024
# Tries of a delivery whose blobs garbage collection was deleting: each
# after the deletion ended and the blobs were stored again.
RESTORE_ATTEMPTS = 3


def _parse_and_hash(raw: bytes) -> tuple[ParsedMessage, str]:
    # In a worker thread: the parse and the blob's key.
    return parse_message(raw), content_key_sync(raw)


@dataclass(frozen=True)
class Delivery:
    """One copy of the message: which account, which mailbox (name or id),
    with which flags and internal date (None: storage uses "now").
    ``claim_recent``: the delivering IMAP session has the mailbox selected
    read-write and takes \\Recent with the delivery (``MailStore.deliver``);
    the result's ``recent_floor`` is then set."""

    account: Account
    mailbox: str | int = "INBOX"
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None
    claim_recent: bool = False


def _parse_path(path: Path, with_text: bool = True) -> ParsedMessage:
    # Parsed through a read-only mapping: the file is never copied whole into memory.
    with path.open("rb") as fh:
        if path.stat().st_size == 0:
            return parse_message(b"", with_text=with_text)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return parse_message(mapped, with_text=with_text)


def _parse_any(source: bytes | Path, with_text: bool) -> ParsedMessage:
    # In a content worker process: a path is mapped there, not pickled over.
    if isinstance(source, Path):
        return _parse_path(source, with_text)
    return parse_message(source, with_text=with_text)


def _unparsed(size: int) -> ParsedMessage:
    """What is stored when even the structure did not parse in time: one
    opaque part, no envelope, no text. The raw bytes stay byte-exact."""
    body = BodyPart(
        "application", "octet-stream", (), None, None, "7BIT", size, None, None, None, None,
        None, 0, 0, size,
    )  # fmt: skip
    env = Envelope(None, None, (), (), (), (), (), (), None, None)
    return ParsedMessage(
        size, env, body, "", "", "", "", None, None, (), None, "", "", False
    )  # fmt: skip


async def _parse_in_pool(source: bytes | Path) -> ParsedMessage:
    """The parse in a content worker with its time limit; past it, the
    structure alone (no index text), then an opaque message: a hostile
    message is delivered less searchable, never refused or stalling."""
    pool = content_pool()
    for with_text in (True, False):
        try:
            return await pool.run(_parse_any, source, with_text)
        except ContentTimeout:
            log.warning("message parse over its time limit (text=%s): degraded", with_text)
    if isinstance(source, Path):
        return _unparsed(await asyncio.to_thread(lambda: source.stat().st_size))
    return _unparsed(len(source))


async def parse(source: bytes | Path) -> ParsedMessage:
    """Parse a message off the event loop: in a worker thread, or above
    ``POOL_PARSE_MIN`` bytes (and a spooled file) in a content worker process with a time limit
    (:mod:`storage.contentpool`; degraded as ``_parse_in_pool`` says).

    For callers that need the parse before delivering (SMTP checks, size
    and header rules); pass the result back to :func:`ingest` as
    ``parsed=`` so the message is not parsed twice. Never raises for bad
    MIME; an unreadable path raises ``OSError``.
    """
    if isinstance(source, Path) or len(source) > POOL_PARSE_MIN:
        # A file is a spooled (large) message: always worth the hop.
        return await _parse_in_pool(source if isinstance(source, Path) else bytes(source))
    return await asyncio.to_thread(parse_message, bytes(source))


def _parse_and_put(put_sync: Callable[[bytes], str], raw: bytes) -> tuple[ParsedMessage, str]:
    # In a worker thread: the parse, then the durable blob write.
    return parse_message(raw), put_sync(raw)


async def _mailbox(store: MailStore, account: Account, mailbox: str | int) -> Mailbox:
    # Both lookups raise StorageError(NOT_FOUND) for a missing mailbox.
    if isinstance(mailbox, int):
        return await store.get_mailbox_by_id(account.id, mailbox)
    return await store.get_mailbox(account.id, mailbox)


def _blob_stores(storage: Storage, deliveries: Sequence[Delivery]) -> list[BlobStore]:
    """The distinct blob stores of the deliveries' shards (each shard may
    keep its blobs apart), in delivery order."""
    found: list[BlobStore] = []
    for d in deliveries:
        blobs = storage.blobs_for(d.account)
        if all(blobs is not f for f in found):
            found.append(blobs)
    return found


async def _write_blob(
    stores: Sequence[BlobStore], source: bytes | Path, parsed: ParsedMessage | None = None
) -> str:
    """Stores the message in every one of ``stores``; returns its key.
    ``parsed``: the message's parse, whose structure tells a store that
    keeps big parts apart where they are (the file is not parsed again)."""
    keys = set()
    for blobs in stores:
        if isinstance(source, Path) and isinstance(blobs, SkeletonBlobStore):
            body = parsed.body if parsed is not None else None
            keys.add(await blobs.put_file(source, body=body))  # streamed, part by part
        elif isinstance(source, Path):
            keys.add(await blobs.put_file(source))  # streamed, never all in memory
        else:
            keys.add(await blobs.put(bytes(source)))
    (key,) = keys  # content-addressed: the same bytes, the same key everywhere
    return key


async def _skeleton_of(stores: Sequence[BlobStore], data: bytes) -> bytes:
    """What a delivery writing its blob in its own transaction stores:
    the message's skeleton once its big parts are durable in every one of
    ``stores`` (``storage/blob/skeleton.py``), or the message as it is."""
    kept = data
    for blobs in stores:
        skeleton_of = getattr(blobs, "skeleton_of", None)
        if skeleton_of is not None:
            kept = await skeleton_of(data) or kept
    return kept


def _named_keys(
    stores: Sequence[BlobStore], key: str, data: bytes | None, answered: int
) -> Callable[[], tuple[Collection[str] | None, int]]:
    """``MailStore.deliver``'s ``blob_keys``: what a delivery's rows name,
    once its blobs are stored (the message's key and its parts', from the
    skeleton ``data`` written with the rows or from what the stores
    remember storing; None if a store cannot tell: any deletion then
    counts), and ``answered``, the newest deletion already answered."""

    def keys() -> Collection[str] | None:
        found = {key}
        if data is not None:
            if data.startswith(MAGIC):
                try:
                    found |= {r.key for r in decode(data).refs}
                except StorageError:
                    return None
            return found
        for blobs in stores:
            parts_of = getattr(blobs, "parts_of", None)
            if parts_of is None:
                continue
            parts = parts_of(key)
            if parts is None:
                return None
            found |= parts
        return found

    return lambda: (keys(), answered)


async def _store(
    storage: Storage,
    deliveries: Sequence[Delivery],
    source: bytes | Path,
    parsed: ParsedMessage | None,
    stop_at_error: bool,
) -> list[AppendResult | StorageError]:
    if not deliveries:
        return []
    if parsed is None and not isinstance(source, Path) and len(source) <= INLINE_PARSE_MAX:
        parsed = parse_message(bytes(source))  # cheaper here than a thread hop
    elif parsed is None and (isinstance(source, Path) or len(source) > POOL_PARSE_MIN):
        parsed = await parse(source)  # in a content worker, with its time limit
    stores = _blob_stores(storage, deliveries)
    # The fast paths below write one blob store; several take the plain path.
    one = stores[0] if len(stores) == 1 else None
    put_sync = getattr(one, "put_sync", None)
    put_started = getattr(one, "put_started", None)
    blob_ready: concurrent.futures.Future[str] | None = None
    blob_data: bytes | None = None
    if not isinstance(source, Path) and all(
        len(source) <= storage.mail(d.account).inline_blob_max for d in deliveries
    ):
        # Every store keeps the blob in its own transaction: no separate
        # blob write and fsync to wait for (``MailStore.deliver``).
        blob_data = bytes(source)
        if parsed is None:  # over INLINE_PARSE_MAX: both in one thread hop
            parsed, blob_key = await asyncio.to_thread(_parse_and_hash, blob_data)
        else:
            blob_key = await content_key(blob_data)
        blob_data = await _skeleton_of(stores, blob_data)
    elif parsed is not None and put_started is not None and not isinstance(source, Path):
        # The key is the content's SHA-256; the blob's write and fsyncs run
        # while the metadata waits for its group commit, which commits only
        # once the blob is durable (``MailStore.deliver``'s ``blob_ready``).
        data = bytes(source)
        blob_key = await content_key(data)
        blob_ready = put_started(data, blob_key)
    elif parsed is None and put_sync is not None and not isinstance(source, Path):
        # A blob store that can write from a worker thread: one hop for both.
        parsed, blob_key = await asyncio.to_thread(_parse_and_put, put_sync, bytes(source))
    else:
        if parsed is None:
            parsed = await parse(source)
        blob_key = await _write_blob(stores, source, parsed)

    results: list[AppendResult | StorageError | None] = [None] * len(deliveries)
    if not stop_at_error and len(deliveries) > 1:
        # Per-delivery outcomes: a missing mailbox fails only its delivery.
        # An account's deliveries commit together, so only an account with
        # several of them needs its mailboxes checked first; for one alone,
        # ``deliver`` gives the same NOT_FOUND (the usual SMTP case).
        per_account = Counter(d.account.id for d in deliveries)
        for i, d in enumerate(deliveries):
            if per_account[d.account.id] < 2:
                continue
            try:
                await _mailbox(storage.mail(d.account), d.account, d.mailbox)
            except StorageError as err:
                results[i] = err
    # Group by account, keeping each delivery's position for the results.
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(deliveries):
        if results[i] is None:
            groups.setdefault(d.account.id, []).append(i)

    async def deliver(indexes: list[int]) -> list[AppendResult] | StorageError:
        account = deliveries[indexes[0]].account
        targets = [
            (deliveries[i].mailbox, deliveries[i].flags, deliveries[i].internal_date)
            for i in indexes
        ]
        ready, data, answered = blob_ready, blob_data, 0
        try:
            for attempt in range(1, RESTORE_ATTEMPTS + 1):
                try:
                    return await storage.mail(account).deliver(
                        account.id,
                        blob_key,
                        parsed,
                        targets,
                        blob_ready=ready,
                        claim_recent=any(deliveries[i].claim_recent for i in indexes),
                        blob_data=data,
                        blob_keys=_named_keys(stores, blob_key, data, answered),
                    )
                except deleting.BlobsBeingDeleted as err:
                    if attempt == RESTORE_ATTEMPTS:
                        raise
                    # Garbage collection deletes (or deleted) a blob this
                    # message names: once that is over, store it again.
                    db = getattr(storage.mail(account), "db", None)
                    if db is not None:
                        await deleting.wait_done(db, err.keys)
                    ready, answered = None, err.last_id
                    if data is not None and not isinstance(source, Path):
                        data = await _skeleton_of(stores, bytes(source))
                    else:
                        await _write_blob(stores, source, parsed)
            raise AssertionError("unreachable")
        except StorageError as err:
            return err

    def record(indexes: list[int], outcome: list[AppendResult] | StorageError) -> None:
        for n, i in enumerate(indexes):
            results[i] = outcome if isinstance(outcome, StorageError) else outcome[n]

    if stop_at_error:
        for indexes in groups.values():
            outcome = await deliver(indexes)
            record(indexes, outcome)
            if isinstance(outcome, StorageError):
                break
    elif len(groups) == 1:
        (indexes,) = groups.values()
        record(indexes, await deliver(indexes))
    elif groups:
        # Independent accounts go concurrently: they can share a commit.
        outcomes = await asyncio.gather(
            *(deliver(indexes) for indexes in groups.values()), return_exceptions=True
        )
        for indexes, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, StorageError):
                raise outcome  # a bug, not a classified refusal
            record(indexes, outcome)
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
    The accounts are written concurrently (on SQLite, in one group commit).
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

    A missing mailbox raises ``StorageError(NOT_FOUND)`` with no delivery
    committed: with several accounts every mailbox is resolved before
    anything is written; with one account its deliveries commit together or
    not at all, so the check is the transaction's own (the blob may then be
    written already: unreferenced, garbage collection removes it). The blob
    is written durably, then the metadata (see the module docstring).
    Returns one :class:`AppendResult` per delivery, in order; when it
    returns, every delivery is committed. Over quota raises
    ``StorageError(OVER_QUOTA)``; other accounts' deliveries committed
    before the failing account's remain committed.
    """
    if len({d.account.id for d in deliveries}) > 1:
        # Across accounts, this keeps a NOT_FOUND from committing some of them.
        for d in deliveries:
            await _mailbox(storage.mail(d.account), d.account, d.mailbox)
    results = await _store(storage, deliveries, source, parsed, stop_at_error=True)
    for r in results:
        if isinstance(r, StorageError):
            raise r
    return [r for r in results if isinstance(r, AppendResult)]


async def _stage(storage: Storage, account: Account, source: bytes | Path) -> int:
    """One message of :func:`ingest_many`: parsed, its blob durable in the
    account's blob store, then its message row (in no mailbox) committed;
    the row's id. The row commit answers garbage collection as a
    delivery's does (``MailStore.deliver``'s ``blob_keys``)."""
    store = storage.mail(account)
    stores = [storage.blobs_for(account)]
    if not isinstance(source, Path) and len(source) <= INLINE_PARSE_MAX:
        parsed = parse_message(bytes(source))
    else:
        parsed = await parse(source)
    key = await _write_blob(stores, source, parsed)
    answered = 0
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
        try:
            return await store.add_message(
                account.id, key, parsed, blob_keys=_named_keys(stores, key, None, answered)
            )
        except deleting.BlobsBeingDeleted as err:
            if attempt == RESTORE_ATTEMPTS:
                raise
            db = getattr(store, "db", None)
            if db is not None:
                await deleting.wait_done(db, err.keys)
            answered = err.last_id
            await _write_blob(stores, source, parsed)  # stored again, after the deletion
    raise AssertionError("unreachable")


async def ingest_many(
    storage: Storage,
    account: Account,
    mailbox_id: int,
    messages: AsyncIterable[tuple[bytes | Path, tuple[str, ...], datetime | None]],
    *,
    claim_recent: bool = False,
) -> list[AppendResult]:
    """Stores every message of ``messages`` (source, flags, internal date)
    into one mailbox of ``account``, all or none: when this returns, all
    are committed, in the order given (UIDs ascending); when it raises,
    the mailbox is as it was (RFC 3501 section 6.4.7: a failed COPY
    leaves the destination as before it), NOT_FOUND mailbox, OVER_QUOTA
    for their sum, TEMPORARY, or whatever ``messages`` raised.

    Memory: ``messages`` is read one at a time and each message is staged
    (:func:`_stage`) before the next is asked for, so a large COPY holds
    one message and a small row per message (id, flags, date), never all
    the bytes. The mailbox sees nothing until the one transaction
    (``MailStore.append_many``) commits; the staged rows of a failure are
    deleted before this raises (shielded from cancellation; a staged row
    that an entry names, the transaction having committed as the caller
    was cancelled, stays with its entry). ``claim_recent``: as
    ``MailStore.append_many``'s (an IMAP MULTIAPPEND to its own selected
    mailbox)."""
    store = storage.mail(account)
    await store.get_mailbox_by_id(account.id, mailbox_id)  # NOT_FOUND before any work
    staged: list[tuple[int, tuple[str, ...], datetime | None]] = []
    try:
        async for source, flags, internal_date in messages:
            staged.append((await _stage(storage, account, source), flags, internal_date))
        if not staged:
            return []
        return await store.append_many(account.id, mailbox_id, staged, claim_recent=claim_recent)
    except BaseException:
        if staged:
            await asyncio.shield(_drop_staged(store, account, [m for m, _, _ in staged]))
        raise


async def _drop_staged(store: MailStore, account: Account, message_ids: list[int]) -> None:
    """The staged rows of a failed :func:`ingest_many` deleted; a failure
    here (the shard down) is logged: the rows stay, named by no entry."""
    try:
        await store.drop_staged(account.id, message_ids)
    except Exception:
        log.exception("staged messages %s of account %d not deleted", message_ids, account.id)

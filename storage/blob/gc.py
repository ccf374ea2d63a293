"""Blob garbage collection: which blobs to delete, the site-wide lease that
lets one instance at a time delete them, and the loop every serving
process runs (``runtime/daemon.py``).

Why nothing acknowledged is lost. A writer (an ingest, a queued message,
a moved message) stores its blobs (parts, then the skeleton) and then
commits the rows naming them; storing bytes that are already there
refreshes their stored time (fs: the file's mtime, ``fs._touch``; the
packs: their ``stored`` column; S3: a new object, ``x-amz-meta-stored``).
A pass, per blob store:

1. reads the referenced keys (rows, and the parts their skeletons name),
2. lists the stored keys; each unreferenced one, if stored before
   ``now - grace``, is a candidate,
3. marks the candidates as being deleted: a row each in every database,
   committed (``storage/blob/deleting.py``; PostgreSQL: under an
   exclusive advisory lock that every writer's transaction holds shared),
4. reads the referenced keys again, *after* the marks committed,
5. deletes each candidate still unreferenced (``delete(key,
   stored_before=...)``: conditional where the store can do it
   atomically, fs and the packs; a HEAD then a DELETE on S3, which a put
   can slip between), and
6. marks them done; done rows are kept ``max(grace, KEEP_DONE_SECONDS)``.

A writer, in the transaction that commits its rows, after its blobs were
stored, looks its keys (the message's and its parts') up in the
database's marks; if one has a mark it has not answered yet, it commits
nothing, waits until that deletion is done, stores its blobs again and
tries again (answering those marks). Take any writer W whose rows name a
candidate key k, and its transaction T:

* T's lookup saw no mark of k. On PostgreSQL T held the lock shared from
  its BEGIN and step 3 takes it exclusively, so step 3's commit came
  after T's (it waited for T, or T's lookup would have seen it, READ
  COMMITTED taking each statement's snapshot anew); on SQLite the two
  are write transactions, serialised. Either way T committed before step
  3 did, so step 4 sees W's rows and k is not deleted.
* T's lookup saw the mark: T rolls back. W stores k again only once the
  mark is done, after step 5's delete of k, so that copy stays; the
  retry commits it (or meets a newer mark: the same again).
* A mark done and purged before T's lookup belongs to a pass whose
  delete came long before: more than ``KEEP_DONE_SECONDS`` (and the
  grace) before, longer than any writer takes from storing its blobs to
  its lookup; so that delete came before W stored k, and cannot have
  removed W's copy.

And a writer that stored k before ``now - grace`` and still has not
committed when step 4 reads is what ``grace`` must rule out
(``storage.gc_grace_seconds``: longer than any ingest), as before.
S3's delete is not made conditional (``If-Match``): a put of the same
bytes has the same ETag, so it could not tell a refresh, and Swift's
s3api, which the tests run, ignores conditions on DELETE.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from storage.blob import deleting
from storage.errors import ErrorKind, StorageError
from storage.tasks import stop_task

log = logging.getLogger(__name__)

LEASE_NAME = "blob-gc"  # the site's blob store's; a shard's own: lease_name()
# The lease outlives its holder by at most this long; renewed every third.
LEASE_SECONDS = 60.0
# Marks of deletions done stay at least this long (see the module docstring).
KEEP_DONE_SECONDS = 3600.0


@dataclass
class GcReport:
    """One pass: blobs (and their bytes) removed, or that would be with
    ``dry_run``; unreferenced blobs spared because they are younger than
    the grace period or were stored again during the pass."""

    removed: int = 0
    removed_bytes: int = 0
    spared: int = 0


def lease_owner() -> str:
    """This process, as named in the ``locks`` table."""
    return f"{socket.gethostname()}:{os.getpid()}:{id(asyncio.get_running_loop()):x}"


class LeaseLost(Exception):
    """The lease could not be renewed: another instance may be collecting."""


class Lease:
    """What :func:`gc_lease` yields: true while held. Its row lets another
    instance take over ``seconds`` after the last renewal that began at
    ``renewed_at`` (monotonic); :meth:`check` says whether it is still
    surely ours, with a third of that to spare (the other host's clock may
    run ahead), without asking the database. Each delete checks it first:
    the renewer's cancellation of a pass can be lost (CPython gh-86296),
    and a pass that deletes on after a successor's ``start_pass`` closed
    its marks would delete blobs writers stored again."""

    def __init__(self, held: bool, seconds: float) -> None:
        self.held = held
        self.seconds = seconds
        self.renewed_at = time.monotonic()

    def __bool__(self) -> bool:
        return self.held

    def check(self) -> None:
        """Raises :class:`LeaseLost` unless renewed within two thirds of
        the lease's length."""
        if not self.held or time.monotonic() - self.renewed_at > self.seconds * 2 / 3:
            raise LeaseLost("blob GC lease not renewed in time")


@contextlib.asynccontextmanager
async def gc_lease(
    storage: Any, owner: str, seconds: float = LEASE_SECONDS, name: str = LEASE_NAME
) -> AsyncIterator[Lease]:
    """Yields a :class:`Lease`, true if ``owner`` holds the GC lease
    ``name`` (a row of the directory database's ``locks`` table,
    ``MailStore.acquire_lock``): the site's blob store's by default,
    :func:`lease_name` for another. While held it is renewed every
    ``seconds / 3``, and released on exit. If a renewal fails the body is
    cancelled (:class:`LeaseLost` raised): its holder may no longer be
    alone; and ``Lease.check`` fails from two thirds of ``seconds`` after
    the last renewal began. A holder that dies holds it ``seconds`` at
    most."""
    store = storage.stores["default"]  # the directory's database
    started = time.monotonic()
    if not await store.acquire_lock(name, owner, seconds):
        yield Lease(False, seconds)
        return
    lease = Lease(True, seconds)
    lease.renewed_at = started
    body = asyncio.current_task()
    lost = False

    async def renew() -> None:
        nonlocal lost
        while True:
            await asyncio.sleep(seconds / 3)
            began = time.monotonic()
            try:
                held = await store.acquire_lock(name, owner, seconds)
            except StorageError:
                held = False
            if held:
                lease.renewed_at = began
            else:
                lease.held = False
                lost = True
                log.error("blob GC lease lost; stopping this pass")
                if body is not None:
                    body.cancel()
                return

    renewer = asyncio.create_task(renew())
    try:
        yield lease
    except asyncio.CancelledError:
        if lost and body is not None:
            body.uncancel()
            raise LeaseLost("blob GC lease lost") from None
        raise
    finally:
        await stop_task(renewer)
        with contextlib.suppress(StorageError):
            await store.release_lock(name, owner)


def lease_name(storage: Any, blobs: Any) -> str:
    """The GC lease of one blob store: :data:`LEASE_NAME` for the site's,
    ``blob-gc:<digest of its location>`` for a shard's own. Stores have
    leases of their own, so that one instance may collect each while
    another collects the next, and a move's cleanup of its source store
    (``storage/move.py``) excludes only that store's pass."""
    if blobs is storage.blobs:
        return LEASE_NAME
    digest = hashlib.sha256(deleting.store_name(blobs).encode()).hexdigest()
    return f"{LEASE_NAME}:{digest[:32]}"


async def collect(
    storage: Any,
    grace_seconds: float,
    *,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> GcReport:
    """One pass over every blob store of ``storage`` (see the module's
    docstring for the order that makes it safe). ``progress(done, total)``
    is called as the stored keys are examined. Deletes nothing with
    ``dry_run``. The caller holds every store's lease (:func:`gc_lease`,
    :func:`lease_name`)."""
    report = GcReport()
    for blobs in storage.blob_stores():
        await collect_store(storage, blobs, grace_seconds, report, dry_run, progress)
    return report


async def collect_store(
    storage: Any,
    blobs: Any,
    grace_seconds: float,
    report: GcReport,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    lease: Lease | None = None,
) -> None:
    """:func:`collect` for one blob store, adding to ``report``; the caller
    holds its lease (``lease``, checked before each delete, if given)."""
    before = await storage.referenced_blobs(blobs)
    cutoff = time.time() - grace_seconds
    keys = await blobs.keys()
    candidates: dict[str, float] = {}
    for done, key in enumerate(keys, 1):
        if progress is not None:
            progress(done, len(keys))
        if key in before:
            continue
        try:
            stored = await blobs.stored_at(key)
        except StorageError as err:
            if err.kind is ErrorKind.NOT_FOUND:
                continue  # deleted meanwhile
            raise
        if stored <= cutoff:
            # Deleted only if not stored again since (where the store can tell).
            candidates[key] = stored + 1e-3
        else:
            report.spared += 1
    if not candidates:
        return
    if dry_run:
        await _delete(storage, blobs, candidates, report, dry_run=True)
        return
    await delete_unreferenced(storage, blobs, candidates, report, grace_seconds, lease)


async def delete_unreferenced(
    storage: Any,
    blobs: Any,
    candidates: dict[str, float],
    report: GcReport,
    grace_seconds: float,
    lease: Lease | None = None,
) -> None:
    """Steps 3 to 6 (see the module's docstring) for ``candidates`` of the
    store ``blobs`` (key: delete only if stored before this Unix time):
    marked, the references read again, the unreferenced ones deleted, the
    marks done. The caller holds the store's lease (``lease``: checked
    before each delete; :class:`LeaseLost` stops the deletes)."""
    store = deleting.store_name(blobs)
    databases = storage.all_databases()
    await deleting.start_pass(databases, store, keep=max(grace_seconds, KEEP_DONE_SECONDS))
    await deleting.mark(databases, store, candidates)  # before the second look
    try:
        await _delete(storage, blobs, candidates, report, dry_run=False, lease=lease)
    finally:
        await deleting.finish(databases, store, candidates)


async def _delete(
    storage: Any,
    blobs: Any,
    candidates: dict[str, float],
    report: GcReport,
    *,
    dry_run: bool,
    lease: Lease | None = None,
) -> None:
    """Steps 4 and 5 for one store's ``candidates`` (key: stored before)."""
    referenced = await storage.referenced_blobs(blobs)  # after the stored times or marks
    # The bytes a blob takes (a skeleton's, not its message's).
    raw_store = getattr(blobs, "inner", blobs)
    for key, before in candidates.items():
        if key in referenced:
            continue
        try:
            size = await raw_store.size(key)
        except StorageError as err:
            if err.kind is ErrorKind.NOT_FOUND:
                continue
            raise
        if not dry_run:
            if lease is not None:
                lease.check()  # not after a successor may have closed our marks
            # Only if not stored again since we looked (an ingest of the
            # same bytes), where the store can tell; it says whether it is gone.
            await blobs.delete(key, stored_before=before)
            if await blobs.exists(key):
                report.spared += 1
                continue
        report.removed += 1
        report.removed_bytes += size


# Staged rows are left only by a process that died mid-COPY: one sweep per
# this many seconds (and per process) finds them, whatever the GC interval.
SWEEP_INTERVAL_SECONDS = 300.0
_last_sweep: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _sweep_due(storage: Any) -> bool:
    """Whether this process's pass over ``storage`` sweeps staged rows now."""
    now = time.monotonic()
    last = _last_sweep.get(storage)
    if last is not None and now - last < SWEEP_INTERVAL_SECONDS:
        return False
    _last_sweep[storage] = now
    return True


async def drop_stale_staged(storage: Any, before: float) -> None:
    """In every shard database, the message rows a COPY from another
    account staged before ``before`` and never committed (its process
    died: ``storage.ingest.ingest_many``), so that their blobs are
    unreferenced again. A shard that is down is skipped (logged)."""
    seen: set[int] = set()
    for store in getattr(storage, "stores", {}).values():
        if id(store.db) in seen or not hasattr(store, "drop_stale_staged"):
            continue
        seen.add(id(store.db))
        try:
            dropped = await store.drop_stale_staged(before)
        except StorageError as err:
            log.warning("staged messages of a shard not swept: %s", err)
            continue
        if dropped:
            log.info("dropped %d staged messages no mailbox took", dropped)


async def collect_once(
    storage: Any,
    grace_seconds: float,
    *,
    owner: str | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> GcReport | None:
    """:func:`collect` over every blob store of the site whose lease this
    instance gets (each store under its own, :func:`lease_name`); None if
    another instance held every one. Under the first lease it gets (not
    in a ``dry_run``), at most every :data:`SWEEP_INTERVAL_SECONDS`,
    :func:`drop_stale_staged` with the same grace first."""
    owner = owner or lease_owner()
    report: GcReport | None = None
    for blobs in storage.blob_stores():
        async with gc_lease(storage, owner, name=lease_name(storage, blobs)) as held:
            if not held:
                continue
            if report is None and not dry_run and _sweep_due(storage):
                await drop_stale_staged(storage, time.time() - grace_seconds)
            report = report or GcReport()
            await collect_store(
                storage, blobs, grace_seconds, report, dry_run, progress, lease=held
            )
    return report


async def gc_loop(storage: Any, interval_seconds: float, grace_seconds: float) -> None:
    """Runs forever (until cancelled): every ``interval_seconds``, one
    pass if this process gets the lease. A failing pass is logged and
    retried at the next interval; it never stops the process."""
    owner = lease_owner()
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            report = await collect_once(storage, grace_seconds, owner=owner)
        except asyncio.CancelledError:
            raise
        except (LeaseLost, StorageError) as err:
            log.warning("blob GC pass stopped: %s", err)
            continue
        except Exception:
            log.exception("blob GC pass failed")
            continue
        if report is not None and report.removed:
            log.info("blob GC removed %d blobs, %d bytes", report.removed, report.removed_bytes)

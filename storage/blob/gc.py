"""Blob garbage collection: which blobs to delete, the site-wide lease that
lets one instance at a time delete them, and the loop every serving
process runs (``runtime/daemon.py``).

Why nothing acknowledged is lost. An ingest stores its blobs (parts, then
the skeleton, then nothing else) and then commits the rows naming them;
storing bytes that are already there refreshes their stored time on every
backend (fs: the file's mtime, ``fs._touch``; the packs: their ``stored``
column; S3: a new object, ``x-amz-meta-stored``). A pass:

1. reads the referenced keys (rows, and the parts their skeletons name),
2. lists the stored keys; each unreferenced one, if stored before
   ``now - grace``, is a candidate, with its stored time,
3. reads the referenced keys again, *after* the stored times, and
4. deletes each candidate still unreferenced, only if not stored since
   (``delete(key, stored_before=...)``, atomic on every backend).

An ingest that stored (or refreshed) a blob before step 2 and committed
before step 3 is seen referenced in step 3; one that refreshed it after
step 2 is spared by the conditional delete; one that stored it before
``now - grace`` and has not committed by step 3 is what ``grace`` must
rule out (``storage.gc_grace_seconds``: longer than any ingest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from storage.errors import ErrorKind, StorageError

log = logging.getLogger(__name__)

LEASE_NAME = "blob-gc"
# The lease outlives its holder by at most this long; renewed every third.
LEASE_SECONDS = 60.0


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


@contextlib.asynccontextmanager
async def gc_lease(storage: Any, owner: str, seconds: float = LEASE_SECONDS) -> AsyncIterator[bool]:
    """Yields whether ``owner`` holds the site's GC lease (a row of the
    directory database's ``locks`` table, ``MailStore.acquire_lock``); while
    held it is renewed every ``seconds / 3``, and released on exit. If a
    renewal fails the body is cancelled (:class:`LeaseLost` raised): its
    holder may no longer be alone. A holder that dies holds it ``seconds``
    at most."""
    store = storage.stores["default"]  # the directory's database
    if not await store.acquire_lock(LEASE_NAME, owner, seconds):
        yield False
        return
    body = asyncio.current_task()
    lost = False

    async def renew() -> None:
        nonlocal lost
        while True:
            await asyncio.sleep(seconds / 3)
            try:
                held = await store.acquire_lock(LEASE_NAME, owner, seconds)
            except StorageError:
                held = False
            if not held:
                lost = True
                log.error("blob GC lease lost; stopping this pass")
                if body is not None:
                    body.cancel()
                return

    renewer = asyncio.create_task(renew())
    try:
        yield True
    except asyncio.CancelledError:
        if lost and body is not None:
            body.uncancel()
            raise LeaseLost("blob GC lease lost") from None
        raise
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        with contextlib.suppress(StorageError):
            await store.release_lock(LEASE_NAME, owner)


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
    ``dry_run``. The caller holds the lease (:func:`gc_lease`)."""
    report = GcReport()
    for blobs in storage.blob_stores():
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
                candidates[key] = stored
            else:
                report.spared += 1
        if not candidates:
            continue
        referenced = await storage.referenced_blobs(blobs)  # after the stored times
        # The bytes a blob takes (a skeleton's, not its message's).
        raw_store = getattr(blobs, "inner", blobs)
        for key, stored in candidates.items():
            if key in referenced:
                continue
            try:
                size = await raw_store.size(key)
            except StorageError as err:
                if err.kind is ErrorKind.NOT_FOUND:
                    continue
                raise
            if not dry_run:
                # Only if not stored again since we looked (an ingest of the
                # same bytes); the store says whether it is gone.
                await blobs.delete(key, stored_before=stored + 1e-3)
                if await blobs.exists(key):
                    report.spared += 1
                    continue
            report.removed += 1
            report.removed_bytes += size
    return report


async def collect_once(
    storage: Any,
    grace_seconds: float,
    *,
    owner: str | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> GcReport | None:
    """:func:`collect` under the site's lease; None if another instance
    holds it."""
    async with gc_lease(storage, owner or lease_owner()) as held:
        if not held:
            return None
        return await collect(storage, grace_seconds, dry_run=dry_run, progress=progress)


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

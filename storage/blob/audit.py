"""What the blob stores hold and whether every referenced blob is sound:
the storage side of ``mailctl blobs stats`` and ``mailctl blobs verify``.

A message's blob is referenced by its rows (every shard whose blob store it
is) or by the outbound queue; a skeleton (``storage/blob/skeleton.py``)
references its attachment blobs in turn. Verifying reads every referenced
message back through the resolving store and hashes it: its key is the
SHA-256 of the whole message, so a missing, truncated or altered part, or a
damaged skeleton, shows as a mismatch or a missing blob.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from storage.errors import ErrorKind, StorageError
from storage.sql.schema import messages


@dataclass
class BlobStats:
    """``blobs`` stored and their ``stored_bytes``; ``referenced_bytes``:
    what the messages would take without any sharing (every message row at
    its full size, and every queued message's blob)."""

    blobs: int = 0
    stored_bytes: int = 0
    referenced_bytes: int = 0
    messages: int = 0
    attachment_blobs: int = 0

    @property
    def ratio(self) -> float:
        """``referenced_bytes / stored_bytes`` (1.0 when nothing is stored)."""
        return self.referenced_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass
class VerifyReport:
    """Referenced blobs checked, and one line per problem found."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)


def _inner(blobs: Any) -> Any:
    return getattr(blobs, "inner", blobs)


async def _message_rows(storage: Any, blobs: Any) -> tuple[int, int]:
    """(rows, bytes) of the messages kept in ``blobs``, every shard once."""
    seen: set[int] = set()
    rows = total = 0
    for store in storage.stores.values():
        if store.blobs is not blobs or id(store.db) in seen:
            continue
        seen.add(id(store.db))
        async with store.db.read() as conn:
            count, size = (
                await conn.execute(select(func.count(), func.sum(messages.c.size)))
            ).one()
        rows += int(count or 0)
        total += int(size or 0)
    return rows, total


async def blob_stats(storage: Any) -> BlobStats:
    """Counts over every blob store of ``storage`` (a ``SqlStorage``)."""
    stats = BlobStats()
    for blobs in storage.blob_stores():
        keys = await blobs.keys()
        stats.blobs += len(keys)
        for key in keys:
            try:
                stats.stored_bytes += int(await _inner(blobs).size(key))
            except StorageError as err:
                if err.kind is not ErrorKind.NOT_FOUND:  # deleted meanwhile: not counted
                    raise
        rows, size = await _message_rows(storage, blobs)
        stats.messages += rows
        stats.referenced_bytes += size
        if blobs is storage.blobs:
            for key in await storage.queue.referenced_blobs():
                stats.referenced_bytes += int(await blobs.size(key))
        direct = await storage.row_blobs(blobs)
        parts = await storage.referenced_blobs(blobs, missing_ok=True) - direct
        stats.attachment_blobs += len(parts & set(keys))
    return stats


async def _hash(blobs: Any, key: str) -> str:
    """The SHA-256 of the blob as read back (a skeleton resolved)."""
    digest = hashlib.sha256()
    async for chunk in blobs.stream(key, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


async def _diagnose(blobs: Any, key: str, report: VerifyReport) -> None:
    """Names the part of a message that does not read back as its key."""
    skeleton_of = getattr(blobs, "skeleton", None)
    try:
        skeleton = await skeleton_of(key) if skeleton_of is not None else None
    except StorageError as err:
        report.problems.append(f"{key}: {err}")
        return
    for ref in skeleton.refs if skeleton else ():
        try:
            if await _hash(blobs, ref.key) != ref.key:
                report.problems.append(f"{key}: attachment blob {ref.key} is corrupt")
        except StorageError as err:
            what = "missing" if err.kind is ErrorKind.NOT_FOUND else str(err)
            report.problems.append(f"{key}: attachment blob {ref.key} {what}")


async def verify_blobs(
    storage: Any, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Reads back every referenced message (skeleton and attachment blobs
    included) in every blob store and checks it hashes to its key;
    ``progress(done, total)`` after each."""
    report = VerifyReport()
    todo = [
        (blobs, key)
        for blobs in storage.blob_stores()
        for key in sorted(await storage.row_blobs(blobs))
    ]
    for blobs, key in todo:
        problems = len(report.problems)
        try:
            if await _hash(blobs, key) != key:
                await _diagnose(blobs, key, report)
                if len(report.problems) == problems:
                    report.problems.append(f"{key}: reads back with another digest")
        except StorageError as err:
            if err.kind is ErrorKind.NOT_FOUND:
                await _diagnose(blobs, key, report)
                if len(report.problems) == problems:
                    report.problems.append(f"{key}: missing")
            else:
                await _diagnose(blobs, key, report)
                if len(report.problems) == problems:
                    report.problems.append(f"{key}: {err}")
        report.checked += 1
        if progress is not None:
            progress(report.checked, len(todo))
    return report

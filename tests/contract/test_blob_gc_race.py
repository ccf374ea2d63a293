"""Garbage collection against an ingest that stores the same blob between
GC's last look at it and its DELETE (issue #21), on the S3 server the suite
starts (Swift's s3api, where a delete cannot be made conditional) and on
the filesystem, over SQLite and PostgreSQL: the ingest's message reads
back byte for byte afterwards (``storage/blob/deleting.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from storage.backend import SqlStorage, open_storage_from_url
from storage.blob import deleting, gc
from storage.blob.audit import verify_blobs
from storage.blob.s3 import S3BlobStore
from storage.ingest import Delivery, ingest
from tests.contract.conftest import TEST_HASHER
from tests.contract.test_blob_gc import THRESHOLD, _expunge_all, _message, _read_inbox


@pytest.fixture(params=["s3", "fs"])
async def site(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> AsyncIterator[SqlStorage]:
    if request.param == "s3":
        from tests.swiftserver import SwiftServer

        server = await asyncio.to_thread(SwiftServer.shared)
        location: str | Path = server.blob_url(f"gc-race-{uuid.uuid4().hex}")
    else:
        location = tmp_path / "blobs"
    store = await open_storage_from_url(
        database_url,
        location,
        password_hasher=TEST_HASHER,
        attachment_min_bytes=THRESHOLD,
        blob_pack_max_bytes=0,  # every blob in the store under test
    )
    try:
        yield store
    finally:
        await store.close()


def _race_before_delete(
    site: SqlStorage, keys: set[str], racer: Any, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Runs ``racer()`` as a task when GC is about to delete the first of
    ``keys``: after GC's last look at the blob (S3: its HEAD; fs: its
    stat), before the delete itself. The delete goes on once the racer
    has stored that blob again and then either finished (committed) or
    waits for the deletion to end. Returns what happened."""
    inner = site.blobs.inner
    seen: dict[str, Any] = {"task": None, "stored_again": asyncio.Event()}
    waiting = asyncio.Event()
    wait_done = deleting.wait_done

    async def noted_wait(*args: Any, **kwargs: Any) -> None:
        waiting.set()
        await wait_done(*args, **kwargs)

    monkeypatch.setattr(deleting, "wait_done", noted_wait)

    async def race(key: str) -> None:
        if seen["task"] is not None or key not in keys:
            return
        seen["key"] = key
        seen["task"] = task = asyncio.create_task(racer())
        stored = asyncio.create_task(seen["stored_again"].wait())
        await asyncio.wait({task, stored}, return_when=asyncio.FIRST_COMPLETED)
        assert seen["stored_again"].is_set(), "the racing ingest did not store the blob"
        gate = asyncio.create_task(waiting.wait())
        await asyncio.wait({task, gate}, return_when=asyncio.FIRST_COMPLETED)
        gate.cancel()
        stored.cancel()

    if isinstance(inner, S3BlobStore):
        request = inner._request

        async def hooked(method: str, key: str | None, **kwargs: Any) -> Any:
            if method == "DELETE" and key is not None and "query" not in kwargs:
                await race(key)
            answer = await request(method, key, **kwargs)
            if method == "PUT" and key == seen.get("key"):
                seen["stored_again"].set()
            return answer

        monkeypatch.setattr(inner, "_request", hooked)
    else:
        delete = inner.delete
        put = inner.put_sync_as
        loop = asyncio.get_running_loop()

        def put_noted(key: str, data: bytes) -> str:
            out = put(key, data)
            if key == seen.get("key"):
                loop.call_soon_threadsafe(seen["stored_again"].set)
            return out

        async def delete_after_race(key: str, *, stored_before: float | None = None) -> None:
            await race(key)
            await delete(key, stored_before=stored_before)

        monkeypatch.setattr(inner, "put_sync_as", put_noted)
        monkeypatch.setattr(inner, "delete", delete_after_race)
    return seen


@pytest.mark.parametrize("kind", ["file", "attachment"])
async def test_an_ingest_storing_a_blob_while_gc_deletes_it_keeps_its_message(
    site: SqlStorage, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random()
    await site.directory.add_domain("example.org")
    bob = await site.directory.add_account("bob@example.org", "pw")
    raw = _message(kind, rng)
    await ingest(site, [Delivery(bob)], raw)
    key = hashlib.sha256(raw).hexdigest()
    keys = {key} | await site.blobs.references(key)
    assert len(keys) == (2 if kind == "attachment" else 1)
    await _expunge_all(site, bob)
    assert not await site.referenced_blobs(site.blobs)

    seen = _race_before_delete(site, keys, lambda: ingest(site, [Delivery(bob)], raw), monkeypatch)
    await gc.collect(site, grace_seconds=0.0)
    assert seen["task"] is not None, "GC never went to delete the blobs"
    await seen["task"]  # the racing ingest succeeded: its sender was told so
    assert await _read_inbox(site, bob) == [raw]
    assert not (await verify_blobs(site)).problems
    for k in keys:
        assert await site.blobs.exists(k)


async def test_a_message_queued_while_gc_deletes_its_blob_is_sent_whole(
    site: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race with the outbound queue's writer (a message relayed
    to another domain, ``delivery/submit.py``): the queued entry's blob
    reads back byte for byte."""
    from delivery.submit import _queue

    rng = random.Random()
    await site.directory.add_domain("example.org")
    bob = await site.directory.add_account("bob@example.org", "pw")
    raw = _message("attachment", rng)
    await ingest(site, [Delivery(bob)], raw)
    key = hashlib.sha256(raw).hexdigest()
    keys = {key} | await site.blobs.references(key)
    await _expunge_all(site, bob)

    async def relay() -> str:
        return await _queue(site, "bob@example.org", ["carol@example.com"], raw, None)

    seen = _race_before_delete(site, keys, relay, monkeypatch)
    await gc.collect(site, grace_seconds=0.0)
    assert seen["task"] is not None, "GC never went to delete the blobs"
    assert await seen["task"] == key
    (entry,) = await site.queue.list()
    assert entry.blob_key == key
    assert await site.blobs.get(key) == raw
    assert not (await verify_blobs(site)).problems

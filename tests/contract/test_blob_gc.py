"""Blob garbage collection against a concurrent ingest (``storage/blob/gc.py``),
on SQLite and PostgreSQL: an unreferenced, old blob (a whole message, an
attachment part, one kept in the database's pack) that an ingest stores
again while GC runs is never deleted; the filesystem's delete cannot lose a
blob an ingest touched between its look and its unlink; and one instance at
a time collects (the lease)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from storage.backend import SqlStorage, open_storage_from_url
from storage.blob import gc
from storage.blob.audit import verify_blobs
from storage.blob.fs import FsBlobStore, _touch
from storage.ingest import Delivery, ingest
from storage.model import DELETED, StoreMode, UidSet
from tests.contract.conftest import TEST_HASHER

THRESHOLD = 20_000  # attachment_min_bytes: parts longer are stored once
PACK = 2_000  # blob_pack_max_bytes: shorter blobs go with their rows
AGE = 1_000.0  # how far back the tests date a blob; GC's grace is below it
GRACE = 100.0


@pytest.fixture
async def site(database_url: str, tmp_path: Path) -> AsyncIterator[SqlStorage]:
    store = await open_storage_from_url(
        database_url,
        tmp_path / "blobs",
        password_hasher=TEST_HASHER,
        attachment_min_bytes=THRESHOLD,
        blob_pack_max_bytes=PACK,
    )
    try:
        yield store
    finally:
        await store.close()


def _message(kind: str, rng: random.Random) -> bytes:
    """Random bytes as a message whose blob is packed (``inline``), a file
    of its own (``file``), or a skeleton with one attachment part."""
    head = f"Subject: {rng.random()}\r\nMIME-Version: 1.0\r\n"
    if kind == "inline":
        return (head + "\r\n").encode() + rng.randbytes(rng.randint(10, PACK // 3)).hex().encode()
    if kind == "file":
        return (head + "\r\n").encode() + rng.randbytes(rng.randint(PACK, 3 * PACK)).hex().encode()
    part = rng.randbytes(rng.randint(THRESHOLD, 2 * THRESHOLD)).hex().encode()
    return (
        (
            f"{head}Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n\r\ntext\r\n"
            "--z\r\nContent-Type: application/pdf\r\n\r\n"
        ).encode()
        + part
        + b"\r\n--z--\r\n"
    )


async def _blob_keys(site: SqlStorage, raw: bytes) -> set[str]:
    """The message's key and, for a skeleton, its parts' keys."""
    key = hashlib.sha256(raw).hexdigest()
    return {key} | await site.blobs.references(key)


async def _backdate(site: SqlStorage, keys: set[str], seconds: float) -> None:
    """Makes the blobs look stored ``seconds`` earlier, wherever they are."""
    inner: FsBlobStore = site.blobs.inner
    for key in keys:
        stored = await inner.stored_at(key)
        path = inner.path(key)
        if path.exists():
            os.utime(path, (stored - seconds, stored - seconds))
        elif inner.table_pack is not None:
            async with inner.table_pack.database.write() as conn:
                await conn.execute(
                    text("UPDATE blobs SET stored = stored - :s WHERE key = :k"),
                    {"s": seconds, "k": key},
                )
        else:
            with sqlite3.connect(inner.pack.path) as conn:
                conn.execute("UPDATE blobs SET stored = stored - ? WHERE key = ?", (seconds, key))
            conn.close()
        assert await inner.stored_at(key) <= stored - seconds + 1e-3


async def _expunge_all(site: SqlStorage, account: Any) -> None:
    mail = site.mail(account)
    box = (await mail.get_mailbox(account.id, "INBOX")).id
    uids = [e.uid for e in await mail.uids(account.id, box)]
    await mail.store_flags(account.id, box, UidSet.of(uids), StoreMode.ADD, [DELETED])
    await mail.expunge(account.id, box)


async def _read_inbox(site: SqlStorage, account: Any) -> list[bytes]:
    mail = site.mail(account)
    box = (await mail.get_mailbox(account.id, "INBOX")).id
    blobs = site.blobs_for(account)
    return [await blobs.get(e.blob_key) for e in await mail.uids(account.id, box)]


def _hook_stored_at(site: SqlStorage, targets: set[str], during: Callable[[], Any]) -> list[str]:
    """Runs ``during()`` once, inside GC's first ``stored_at`` of a target
    key, after the stored time was read: an ingest racing the pass. Returns
    the keys GC asked about."""
    blobs = site.blobs
    original = blobs.stored_at
    asked: list[str] = []

    async def stored_at(key: str) -> float:
        stored = await original(key)
        first = not asked
        if key in targets:
            asked.append(key)
            if first:
                await during()
        return stored

    blobs.stored_at = stored_at
    return asked


@pytest.mark.parametrize("kind", ["inline", "file", "attachment"])
async def test_gc_spares_a_blob_that_an_ingest_stores_again(
    site: SqlStorage, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old, unreferenced blob is stored again, and its rows go to
    commit, after GC's last look at the rows, just before its delete: the
    ingest either refreshed the stored time first (a file, a skeleton
    part: the conditional delete keeps it) or finds the blob marked as
    being deleted in its transaction (``storage/blob/deleting.py``: the
    database's pack, written with the rows), waits, stores it again and
    commits. Either way the message reads back."""
    rng = random.Random()
    await site.directory.add_domain("example.org")
    bob = await site.directory.add_account("bob@example.org", "pw")
    raw = _message(kind, rng)
    await ingest(site, [Delivery(bob)], raw)
    keys = await _blob_keys(site, raw)
    assert len(keys) == (2 if kind == "attachment" else 1)
    await _expunge_all(site, bob)
    await _backdate(site, keys, AGE)
    original = site.blobs.delete
    deleting: list[str] = []
    racing: list[asyncio.Task[Any]] = []
    waits = asyncio.Event()
    wait_done = gc.deleting.wait_done

    async def noted_wait(*args: Any, **kwargs: Any) -> None:
        waits.set()
        await wait_done(*args, **kwargs)

    monkeypatch.setattr(gc.deleting, "wait_done", noted_wait)

    async def delete(key: str, **kwargs: Any) -> None:
        if not deleting:  # the racing ingest: until it commits or waits for GC
            racing.append(asyncio.create_task(ingest(site, [Delivery(bob)], raw)))
            waiting = asyncio.create_task(waits.wait())
            await asyncio.wait({racing[0], waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
        deleting.append(key)
        await original(key, **kwargs)

    site.blobs.delete = delete
    report = await gc.collect(site, GRACE)
    assert set(deleting) == keys, "GC never tried to delete the blobs"
    assert report.removed + report.spared == len(keys)
    await racing[0]
    assert await _read_inbox(site, bob) == [raw]
    assert not (await verify_blobs(site)).problems


@pytest.mark.parametrize("kind", ["inline", "file", "attachment"])
async def test_gc_rereads_references_after_the_stored_times(site: SqlStorage, kind: str) -> None:
    """An ingest that stored its blob long ago (older than the grace) and
    commits its rows while GC runs, after GC's first look at the rows: the
    pass reads the rows again after the stored times, and keeps it."""
    rng = random.Random()
    await site.directory.add_domain("example.org")
    bob = await site.directory.add_account("bob@example.org", "pw")
    raw = _message(kind, rng)
    await ingest(site, [Delivery(bob)], raw)
    keys = await _blob_keys(site, raw)
    await _expunge_all(site, bob)
    await _backdate(site, keys, AGE)

    async def commit_late() -> None:
        await ingest(site, [Delivery(bob)], raw)
        await _backdate(site, keys, AGE)  # as if its blobs were stored long ago

    _hook_stored_at(site, keys, commit_late)
    await gc.collect(site, GRACE)
    assert await _read_inbox(site, bob) == [raw]
    assert not (await verify_blobs(site)).problems


async def test_gc_counts_and_removes_expunged_blobs_of_every_kind(site: SqlStorage) -> None:
    """Expunged messages of every kind (packed, file, skeleton and part)
    are counted by a dry run, which deletes nothing, then removed with
    their exact bytes; the kept ones read back byte-exact."""
    rng = random.Random()
    await site.directory.add_domain("example.org")
    bob = await site.directory.add_account("bob@example.org", "pw")
    eve = await site.directory.add_account("eve@example.org", "pw")
    gone = [_message(kind, rng) for kind in ("inline", "file", "attachment")]
    kept = [_message(kind, rng) for kind in ("inline", "file", "attachment")]
    for raw in gone:
        await ingest(site, [Delivery(bob)], raw)
    for raw in kept:
        await ingest(site, [Delivery(eve)], raw)
    gone_keys: set[str] = set()
    for raw in gone:
        gone_keys |= await _blob_keys(site, raw)
    sizes = {key: await site.blobs.inner.size(key) for key in gone_keys}
    await _expunge_all(site, bob)
    everything = set(await site.blobs.keys())
    await _backdate(site, everything, AGE)

    dry = await gc.collect(site, GRACE, dry_run=True)
    assert (dry.removed, dry.removed_bytes) == (len(gone_keys), sum(sizes.values()))
    assert set(await site.blobs.keys()) == everything
    young = await gc.collect(site, AGE * 2)  # all younger than this grace
    assert young.removed == 0 and young.spared == len(gone_keys)
    done = await gc.collect(site, GRACE)
    assert (done.removed, done.removed_bytes) == (len(gone_keys), sum(sizes.values()))
    assert set(await site.blobs.keys()) == everything - gone_keys
    assert sorted(await _read_inbox(site, eve)) == sorted(kept)
    assert (await gc.collect(site, GRACE)).removed == 0


def test_fs_delete_keeps_a_blob_touched_between_its_look_and_its_unlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ingest finds the blob there (``_touch``) just after GC read its
    old mtime: the delete must not remove it (set aside, time read again,
    put back)."""
    store = FsBlobStore(tmp_path / "blobs", pack_max_bytes=0)
    data = random.randbytes(random.randint(1, 50_000))
    key = store.put_sync(data)
    path = store.path(key)
    old = path.stat().st_mtime - AGE
    os.utime(path, (old, old))
    original = pathlib.Path.stat
    raced: list[bool] = []

    def stat(self: pathlib.Path, **kwargs: Any) -> os.stat_result:
        result = original(self, **kwargs)
        if self == path and not raced:
            raced.append(_touch(str(path)))  # the ingest: "already stored"
        return result

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    store._delete(key, stored_before=old + 1e-3)
    monkeypatch.undo()
    assert raced == [True]
    assert path.read_bytes() == data
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".gc-")]
    # Untouched since the look: removed.
    os.utime(path, (old, old))
    store._delete(key, stored_before=old + 1e-3)
    assert not path.exists()


async def test_one_instance_collects_at_a_time(database_url: str, tmp_path: Path) -> None:
    """Two instances of one site: while one holds the GC lease the other's
    pass is refused; released, or expired (its holder died), it is taken."""
    a = await open_storage_from_url(database_url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    b = await open_storage_from_url(database_url, tmp_path / "blobs")
    try:
        async with gc.gc_lease(a, "instance-a") as held:
            assert held
            assert await gc.collect_once(b, GRACE, owner="instance-b") is None
        assert await gc.collect_once(b, GRACE, owner="instance-b") is not None
        # A holder that died: its lease expired, so it is taken over.
        assert await a.stores["default"].acquire_lock(gc.LEASE_NAME, "dead", -1.0)
        assert await gc.collect_once(b, GRACE, owner="instance-b") is not None
        # Held and unexpired by someone else: refused, whoever asks.
        assert await a.stores["default"].acquire_lock(gc.LEASE_NAME, "alive", 600.0)
        assert await gc.collect_once(a, GRACE, owner="instance-a") is None
        assert await gc.collect_once(b, GRACE, owner="instance-b") is None
    finally:
        await a.close()
        await b.close()


async def test_a_pass_stops_when_its_lease_cannot_be_renewed(site: SqlStorage) -> None:
    """Someone else took the lease (the holder stalled past its expiry):
    the renewal fails and the pass is cancelled, never running beside it."""
    store = site.stores["default"]
    with pytest.raises(gc.LeaseLost):
        async with gc.gc_lease(site, "slow", seconds=0.3) as held:
            assert held
            # Taken over in one statement: a release then an acquire would
            # let the renewer (every 0.1 s) take it back between them.
            async with store.db.write() as conn:
                await conn.execute(
                    text("UPDATE locks SET owner = 'other', expires = :e WHERE name = :n"),
                    {"e": time.time() + 600, "n": gc.LEASE_NAME},
                )
            await asyncio.Event().wait()  # a pass that would run forever
    # The other holder keeps it.
    assert not await store.acquire_lock(gc.LEASE_NAME, "slow", 600.0)


async def test_a_pass_whose_renewals_stall_deletes_nothing_more(site: SqlStorage) -> None:
    """The renewal hangs (the directory's database stopped answering) and
    the pass never sees a cancellation (the driver's lost cancel, CPython
    gh-86296): from two thirds of the lease's length after the last
    renewal began, each delete is refused (LeaseLost) before it is sent,
    since another instance may have taken over and closed this pass's
    marks. The marks are closed, and the expunged blobs stay until a pass
    that holds the lease."""
    rng = random.Random()
    await site.directory.add_domain("example.org")
    bob = await site.directory.add_account("bob@example.org", "pw")
    raws = [_message(rng.choice(["file", "attachment"]), rng) for _ in range(rng.randint(4, 7))]
    gone: set[str] = set()
    for raw in raws:
        await ingest(site, [Delivery(bob)], raw)
        gone |= await _blob_keys(site, raw)
    await _expunge_all(site, bob)
    await _backdate(site, set(await site.blobs.keys()), AGE)
    store = site.stores["default"]
    acquire = store.acquire_lock
    calls = 0

    async def stalls_after_the_first(name: str, owner: str, seconds: float) -> bool:
        nonlocal calls
        calls += 1
        if calls > 1:
            await asyncio.Event().wait()  # a renewal that never answers
        return await acquire(name, owner, seconds)

    store.acquire_lock = stalls_after_the_first  # type: ignore[method-assign]
    deletes: list[str] = []
    delete = site.blobs.delete

    async def slow_delete(key: str, **kwargs: Any) -> None:
        deletes.append(key)
        await asyncio.sleep(0.2)  # past the lease's safe window after a few
        await delete(key, **kwargs)

    site.blobs.delete = slow_delete  # type: ignore[method-assign]
    seconds = 0.6
    try:
        with pytest.raises(gc.LeaseLost):
            async with gc.gc_lease(site, "stalling", seconds=seconds) as lease:
                assert lease
                report = gc.GcReport()
                await gc.collect_store(site, site.blobs, GRACE, report, lease=lease)
    finally:
        store.acquire_lock = acquire  # type: ignore[method-assign]
        site.blobs.delete = delete  # type: ignore[method-assign]
    # Deletes began within seconds * 2/3 of the lease's start; the rest refused.
    assert len(deletes) <= int(seconds * 2 / 3 / 0.2) + 1 < len(gone)
    assert set(await site.blobs.keys()) >= gone - set(deletes)
    async with site.stores["default"].db.read() as conn:
        open_marks = await conn.execute(
            text("SELECT count(*) FROM blob_deletions WHERE done_at IS NULL")
        )
        assert open_marks.scalar() == 0

"""Small blobs packed into ``<blob_dir>/pack.sqlite`` (``storage/blob/pack.py``).

What a sysadmin relies on: a blob whose write returned is on disk even if
the daemon is killed the next instant; several daemons on the host share
the pack; turning packing off (or on) leaves every stored blob readable;
blobs over the limit are still files of their own.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from storage.blob import open_blob_store
from storage.blob.pack import PACK_FILE, BlobPack

ROOT = Path(__file__).resolve().parents[2]


async def test_concurrent_puts_share_one_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one transaction commits, the blobs queued meanwhile wait for
    the next one, which takes them all: one fsync for the group."""
    batches: list[int] = []
    gate = threading.Event()
    committing = threading.Event()
    real = BlobPack._commit

    def gated(conn, lock_fd, batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        if len(batches) == 1:
            committing.set()
            gate.wait(5)
        real(conn, lock_fd, batch)

    monkeypatch.setattr(BlobPack, "_commit", staticmethod(gated))
    store = open_blob_store(tmp_path / "blobs", pack_max_bytes=65536)
    try:
        first = asyncio.ensure_future(store.put(b"first"))
        assert await asyncio.to_thread(committing.wait, 5)
        rest = [asyncio.ensure_future(store.put(b"blob %d" % i)) for i in range(20)]
        await asyncio.sleep(0.1)  # all queued behind the held commit
        assert not first.done() and not any(r.done() for r in rest)
        gate.set()
        keys = await asyncio.gather(first, *rest)
    finally:
        gate.set()
        await store.close()
    assert batches == [1, 20]
    assert keys[1] == hashlib.sha256(b"blob 0").hexdigest()
    reopened = open_blob_store(tmp_path / "blobs", pack_max_bytes=65536)
    try:
        assert await reopened.get(keys[20]) == b"blob 19"
        assert not (tmp_path / "blobs" / keys[0][:2] / keys[0]).exists()  # packed, not a file
    finally:
        await reopened.close()


async def test_big_blobs_stay_files_and_packing_can_be_turned_off(tmp_path: Path) -> None:
    store = open_blob_store(tmp_path / "blobs", pack_max_bytes=1024)
    small_key = await store.put(b"s" * 1024)
    big_key = await store.put(b"b" * 1025)
    await store.close()
    assert (tmp_path / "blobs" / PACK_FILE).exists()
    assert (tmp_path / "blobs" / big_key[:2] / big_key).is_file()
    assert not (tmp_path / "blobs" / small_key[:2] / small_key).exists()
    off = open_blob_store(tmp_path / "blobs", pack_max_bytes=0)
    try:
        # Packed before: still found, in every read and in the key list.
        assert await off.get(small_key) == b"s" * 1024
        assert await off.get_range(small_key, 1, 3) == b"ss"
        assert await off.size(small_key) == 1024
        assert b"".join([c async for c in off.stream(small_key, 300)]) == b"s" * 1024
        newer = await off.put(b"n" * 10)
        assert (tmp_path / "blobs" / newer[:2] / newer).is_file()
        assert await off.keys() == sorted([small_key, big_key, newer])
        await off.delete(small_key)
        assert not await off.exists(small_key)
    finally:
        await off.close()


def _gate_pack_fsync(
    monkeypatch: pytest.MonkeyPatch, pack_path: Path, fail: bool = False
) -> tuple[threading.Event, threading.Event, list[bool]]:
    """Holds the first fsync of the pack's WAL until the returned gate is
    set (or fails it with EIO); records whether the pack's writers' lock
    was free meanwhile. Returns (in fsync, gate, lock free)."""
    in_fsync, gate = threading.Event(), threading.Event()
    lock_free: list[bool] = []
    real = os.fsync
    wal = f"{pack_path}-wal"

    def fsync(fd: int) -> None:
        is_wal = os.path.exists(wal) and os.fstat(fd).st_ino == os.stat(wal).st_ino
        if is_wal and not in_fsync.is_set():
            probe = os.open(f"{pack_path}-writers", os.O_RDWR)
            try:  # another process's writer would get the lock now
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock_free.append(True)
            except BlockingIOError:
                lock_free.append(False)
            finally:
                os.close(probe)
            in_fsync.set()
            gate.wait(5)
            if fail:
                raise OSError(errno.EIO, "writeback failed")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return in_fsync, gate, lock_free


def test_a_put_is_durable_before_it_returns_and_its_fsync_leaves_the_lock_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The WAL's fsync runs after the transaction, outside the writers'
    lock (so another daemon's blobs need not wait for this one's disk
    write), and the put is told only once it has ended."""
    path = tmp_path / PACK_FILE
    in_fsync, gate, lock_free = _gate_pack_fsync(monkeypatch, path)
    pack = BlobPack(str(path))
    try:
        key = hashlib.sha256(b"durable").hexdigest()
        put = pack.put_started(key, b"durable")
        assert in_fsync.wait(5), "the pack's WAL was never fsynced by the writer"
        assert lock_free == [True]
        assert not put.done()  # committed, but not yet known to be on disk
        gate.set()
        assert put.result(5) == key
        assert pack.row_sync("SELECT data FROM blobs WHERE key = ?", (key,)) == (b"durable",)
    finally:
        gate.set()
        pack.close_sync()


def test_a_failed_fsync_refuses_the_put_and_the_next_one_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / PACK_FILE
    in_fsync, gate, _ = _gate_pack_fsync(monkeypatch, path, fail=True)
    pack = BlobPack(str(path))
    try:
        first = pack.put_started(hashlib.sha256(b"one").hexdigest(), b"one")
        assert in_fsync.wait(5)
        gate.set()
        with pytest.raises(OSError):
            first.result(5)
        key = hashlib.sha256(b"two").hexdigest()
        assert pack.put_started(key, b"two").result(5) == key
    finally:
        gate.set()
        pack.close_sync()


_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from storage.blob import open_blob_store

    async def main() -> None:
        store = open_blob_store(sys.argv[1], pack_max_bytes=65536)
        tag = sys.argv[2].encode()
        for i in range(int(sys.argv[3])):
            key = await store.put(tag + b" message %d" % i)
            print(key, flush=True)
        if sys.argv[4] == "hang":
            await asyncio.sleep(60)  # killed here, the pack never closed
        await store.close()

    asyncio.run(main())
    """
)


def _child(blob_dir: Path, tag: str, count: int, end: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(blob_dir), tag, str(count), end],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_a_put_that_returned_survives_sigkill(tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    child = _child(blob_dir, "killed", 30, "hang")
    assert child.stdout is not None
    keys = [child.stdout.readline().strip() for _ in range(30)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    store = open_blob_store(blob_dir, pack_max_bytes=65536)
    try:
        for i, key in enumerate(keys):
            assert await store.get(key) == b"killed message %d" % i
    finally:
        await store.close()


async def test_processes_share_the_pack(tmp_path: Path) -> None:
    """Two daemons' writer threads take turns on the pack (its writers'
    lock), and each sees the other's blobs."""
    blob_dir = tmp_path / "blobs"
    children = [_child(blob_dir, tag, 150, "close") for tag in ("one", "two")]
    outputs = [c.communicate(timeout=120)[0].split() for c in children]
    assert [c.returncode for c in children] == [0, 0]
    store = open_blob_store(blob_dir, pack_max_bytes=65536)
    try:
        assert sorted(await store.keys()) == sorted(outputs[0] + outputs[1])
        assert await store.get(outputs[1][149]) == b"two message 149"
    finally:
        await store.close()


async def test_folders_the_daemon_makes_are_private(tmp_path: Path) -> None:
    """The README's quick start runs as root with the usual umask 022: the
    data folder and blob folder it makes hold every message and password
    hash, so they are made readable by their owner only. A folder that
    already exists keeps the mode its administrator gave it."""
    import stat

    from conf.settings import StorageSettings
    from storage.backend import open_storage

    data = tmp_path / "fresh" / "data"
    old_umask = os.umask(0o022)
    try:
        storage = await open_storage(StorageSettings(), data_dir=data)
        await storage.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "blobs").stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    storage = await open_storage(StorageSettings(), data_dir=shared)
    await storage.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750


async def test_the_folder_pack_stays_readable_once_the_pack_is_in_the_database(
    tmp_path: Path,
) -> None:
    """A site upgraded from a version that packed into ``<blob_dir>/
    pack.sqlite``: its blobs there stay readable and collectable, while new
    blobs go to the shard database's table."""
    from storage.backend import open_storage_from_url

    blob_dir = tmp_path / "blobs"
    old = open_blob_store(blob_dir, pack_max_bytes=65536)  # the earlier layout
    old_key = await old.put(b"packed before the upgrade")
    await old.close()
    db = tmp_path / "mail.db"
    site = await open_storage_from_url(f"sqlite+aiosqlite:///{db}", blob_dir)
    try:
        assert site.blobs.pack.path == str(db)
        new_key = await site.blobs.put(b"packed after it")
        assert await site.blobs.get(old_key) == b"packed before the upgrade"
        assert await site.blobs.get_range(old_key, 0, 6) == b"packed"
        assert await site.blobs.exists(old_key) and await site.blobs.size(old_key) == 25
        assert await site.blobs.keys() == sorted([old_key, new_key])
        # Neither is referenced: garbage collection removes both.
        assert await site.collect_garbage(min_age_seconds=0) == 2
        assert await site.blobs.keys() == []
    finally:
        await site.close()
    with sqlite3.connect(blob_dir / PACK_FILE) as conn:
        assert conn.execute("SELECT count(*) FROM blobs").fetchone() == (0,)

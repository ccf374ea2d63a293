"""Filesystem blob store: ``root/ab/<sha256 hex>``.

One level of 256 directories, as Git's object store: a fresh store makes
each of them once, where two levels (65,536 directories) made a directory,
and fsynced its parent, for nearly every message of its first hundred
thousand; ext4 and XFS index large directories, so millions of blobs
per directory level stay cheap to look up.

Durability: bytes go to a temporary file in the final directory, which is
fsynced, renamed into place with ``os.replace`` (atomic on POSIX) and then
the directory is fsynced, so a key once returned survives a crash. All file
I/O runs in a worker thread; the event loop never waits on the disk.

Blobs of at most ``pack_max_bytes`` go to the pack instead
(``storage/blob/pack.py``): one fsync there makes a whole group of them
durable. The pack is ``pack.sqlite`` in the root, or a table in the
database file given as ``pack_path`` (a one-host site's shard database,
where a delivery writes its blob in its own transaction). Reads look in the
pack first, then in the root's ``pack.sqlite`` if the pack is elsewhere and
that file exists (blobs packed before the pack moved), then for the file,
so blobs written before packing was turned on (or off) stay readable.

On PostgreSQL (``pack_db``: a shard's database) the pack is that database's
``blobs`` table (:class:`TablePack`): deliveries into it write their small
blobs there, in their own transaction; a blob stored any other way is a
file (never ``pack.sqlite``: a PostgreSQL site's folder may be shared over
NFS, where SQLite's locks are not to be trusted). Reads look there first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import itertools
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from storage.blob.key import content_key, content_key_sync
from storage.blob.pack import PACK_FILE, BlobPack, TablePack
from storage.errors import ErrorKind, StorageError

_KEY = re.compile(r"^[0-9a-f]{64}$")
_PREFIX = re.compile(r"^[0-9a-f]{2}$")
# In the blob root once the store is known to hold only ``ab/<key>`` blobs.
LAYOUT_MARKER = ".layout-one-level"
_CHUNK = 1 << 20
# Threads for put_started: blob writes wait on the disk, not on the CPU.
BLOB_WRITERS = 8
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _check_key(key: str) -> str:
    # Keys become paths: anything but a sha256 hex digest is refused.
    if not _KEY.match(key):
        raise StorageError(ErrorKind.INVALID, "bad blob key")
    return key


def _touch(final: str) -> bool:
    """Marks an existing blob as stored now (its mtime, :meth:`FsBlobStore.
    stored_at`), so that garbage collection and a move's cleanup, which
    spare blobs stored after they looked, spare an ingest's blob that was
    already there; False if there is none."""
    try:
        os.utime(final)
    except FileNotFoundError:
        return False
    except OSError:  # there, but not ours to touch (another user, read-only)
        pass
    # Still there after the touch: garbage collection sets a blob aside
    # before it looks at its time (FsBlobStore._delete), so it either saw
    # this touch and puts the blob back, or set it aside before this check
    # and the caller writes it again.
    return os.path.exists(final)


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsBlobStore:
    """A :class:`storage.api.BlobStore` over a local directory tree, small
    blobs (``pack_max_bytes``, 0: none) packed in one SQLite table: in
    ``root/pack.sqlite``, or in the database file ``pack_path``."""

    def __init__(
        self,
        root: Path,
        *,
        pack_max_bytes: int = 0,
        pack_path: str | None = None,
        pack_db: Any = None,
    ) -> None:
        self.root = Path(root)
        # Made by us: readable by the daemons' user only (an existing folder
        # keeps the mode its administrator gave it).
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._root = str(self.root)
        self.pack_max_bytes = pack_max_bytes
        # PostgreSQL: small blobs in the database's table, written by
        # deliveries only; this store itself packs nothing then.
        self.table_pack = TablePack(pack_db) if pack_db is not None else None
        folder_pack = os.path.join(self._root, PACK_FILE)
        self.pack = BlobPack(pack_path or folder_pack)
        self._pack_seen = pack_max_bytes > 0
        # The folder's pack once the pack lives in a database: read (and
        # emptied by garbage collection), never written.
        self._old_pack: BlobPack | None = None
        if pack_path is not None and pack_path != folder_pack and os.path.exists(folder_pack):
            self._old_pack = BlobPack(folder_pack)
        self._tmp_prefix = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._tmp_counter = itertools.count()
        self._writers: concurrent.futures.ThreadPoolExecutor | None = None

    def migrate_layout(self) -> int:
        """Moves blobs of the earlier two-level layout (``ab/cd/<key>``) to
        ``ab/<key>``; returns how many moved. Blocking (run it in a thread,
        at start). Idempotent and safe to race with another process doing
        the same: each move is one rename, and a blob already moved is
        skipped. Leftover temp files there are removed. Each blob is linked
        under its new name, that directory fsynced, and only then the old
        name removed: a crash at any point leaves it with a durable name.
        A marker file records that the store is in the current layout, so
        later starts do not list every blob again."""
        marker = os.path.join(self._root, LAYOUT_MARKER)
        if os.path.exists(marker):
            return 0
        moved = 0
        for prefix in os.scandir(self._root):
            if not (prefix.is_dir(follow_symlinks=False) and _PREFIX.match(prefix.name)):
                continue
            for sub in os.scandir(prefix.path):
                if not (sub.is_dir(follow_symlinks=False) and _PREFIX.match(sub.name)):
                    continue
                old = [b for b in os.scandir(sub.path) if _KEY.match(b.name)]
                for blob in old:
                    with contextlib.suppress(FileExistsError, FileNotFoundError):
                        os.link(blob.path, os.path.join(prefix.path, blob.name))
                        moved += 1
                _fsync_dir(prefix.path)
                for blob in os.scandir(sub.path):  # old names, and interrupted writes' temps
                    if _KEY.match(blob.name) and not os.path.exists(
                        os.path.join(prefix.path, blob.name)
                    ):
                        continue  # not linked (it appeared meanwhile): next start
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(blob.path)
                with contextlib.suppress(OSError):
                    os.rmdir(sub.path)
                _fsync_dir(prefix.path)
        with open(marker, "w") as f:
            f.write("one directory level: ab/<sha256>\n")
        _fsync_dir(self._root)
        return moved

    def path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:2] / key

    # --- writes -------------------------------------------------------------

    def _dir_of(self, key: str) -> str:
        """The key's directory, created if missing."""
        directory = os.path.join(self._root, key[:2])
        if not os.path.isdir(directory):
            self._make_dirs(directory)
        return directory

    def _make_dirs(self, directory: str) -> None:
        """Creates ``ab/`` and fsyncs the root if it did: a blob whose
        directory's entry is lost in a crash is lost mail, even if the
        blob's own rename was fsynced."""
        try:
            os.mkdir(directory)
        except FileExistsError:
            return
        _fsync_dir(self._root)

    def _install(self, tmp_path: Path | str, key: str) -> None:
        """Moves a fsynced temp file to the key's path durably."""
        directory = self._dir_of(key)
        final = os.path.join(directory, key)
        if _touch(final):  # same bytes already stored: blobs are immutable
            os.unlink(tmp_path)
            return
        os.replace(tmp_path, final)
        _fsync_dir(directory)

    def _tmp_in(self, directory: Path | str) -> tuple[int, Path]:
        os.makedirs(directory, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        return fd, Path(name)

    def _packs(self, size: int) -> bool:
        return size <= self.pack_max_bytes and self.pack_max_bytes > 0 and not self.table_pack

    def inline_max(self, database: Any) -> int:
        """Blobs up to this size a delivery into ``database`` (a shard's
        ``Database``) writes in its own transaction, because this store's
        pack is a table in it (a SQLite file, a PostgreSQL database); 0
        where it is not."""
        if self.pack_max_bytes <= 0:
            return 0
        if self.table_pack is not None:
            return self.pack_max_bytes if self.table_pack.database is database else 0
        file = getattr(database, "file", None)
        return self.pack_max_bytes if file is not None and file == self.pack.path else 0

    def _may_be_packed(self) -> bool:
        """Whether reads must look in the pack: packing is on, or the pack
        file exists (blobs packed before it was turned off)."""
        if not self._pack_seen and os.path.exists(self.pack.path):
            self._pack_seen = True
        return self._pack_seen

    def put_sync(self, data: bytes) -> str:
        """:meth:`put` for a caller already in a worker thread (the ingest
        path). Blocks on the disk. Plain ``os`` calls, as few as durability
        allows: each one also hands the GIL to another thread."""
        return self.put_sync_as(content_key_sync(data), data)

    def put_sync_as(self, key: str, data: bytes) -> str:
        """Stores ``data`` under ``key`` durably (blocking): :meth:`put_sync`
        with the key given. For a message's skeleton
        (``storage/blob/skeleton.py``), kept under its message's key."""
        _check_key(key)
        if self._packs(len(data)):
            return self.pack.put_started(key, data).result()
        directory = os.path.join(self._root, key[:2])
        final = os.path.join(directory, key)
        if _touch(final):
            return key
        # A name unique to this process and write; O_EXCL guards the rest.
        tmp = os.path.join(directory, f".tmp-{self._tmp_prefix}-{next(self._tmp_counter)}")
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o600)
        except FileNotFoundError:  # the key's first blob: make its directory
            self._make_dirs(directory)
            fd = os.open(tmp, _TMP_FLAGS, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            # A concurrent put of the same bytes may have won: replacing an
            # immutable blob with identical bytes is harmless.
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)
        return key

    def _put_file_sync(self, src: Path) -> str:
        if self._packs(os.stat(src).st_size):
            with open(src, "rb") as f:
                return self.put_sync(f.read())
        # Stream into a temp file at the root while hashing, then move it
        # under the key's directory (same filesystem: rename is atomic).
        digest = hashlib.sha256()
        fd, tmp = self._tmp_in(self.root)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while chunk := inp.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            key = digest.hexdigest()
            self._install(tmp, key)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return key

    def put_file_range_sync(
        self, key: str, src: Path, start: int, end: int, prefix: bytes = b""
    ) -> str:
        """:meth:`put_file_range`, blocking (from a worker thread)."""
        _check_key(key)
        size = len(prefix) + end - start
        if self._packs(size):
            with open(src, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            if len(data) != end - start:
                raise StorageError(ErrorKind.TEMPORARY, "the file shrank while stored")
            return self.put_sync_as(key, prefix + data)
        directory = self._dir_of(key)
        if _touch(os.path.join(directory, key)):
            return key  # the same bytes are there: an attachment stored once
        fd, tmp = self._tmp_in(directory)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                out.write(prefix)
                inp.seek(start)
                left = end - start
                while left > 0:
                    chunk = inp.read(min(_CHUNK, left))
                    if not chunk:
                        raise StorageError(ErrorKind.TEMPORARY, "the file shrank while stored")
                    out.write(chunk)
                    left -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
            self._install(tmp, key)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return key

    def put_started(self, data: bytes, key: str | None = None) -> concurrent.futures.Future[str]:
        """:meth:`put_sync` started in one of this store's writer threads;
        the future's result is the key (``sha256(data).hexdigest()``), set
        once the bytes are durable. For the ingest path, which overlaps the
        blob's fsyncs with the metadata transaction (see
        ``Database.write_batched``'s ``ready``) and has hashed the bytes
        already (``key``, so they are not hashed again on the event loop)."""
        if self._packs(len(data)):
            return self.pack.put_started(key or content_key_sync(data), data)
        if self._writers is None:
            self._writers = concurrent.futures.ThreadPoolExecutor(
                max_workers=BLOB_WRITERS, thread_name_prefix="blob-writer"
            )
        return self._writers.submit(self.put_sync, data)

    async def put(self, data: bytes) -> str:
        """Durable on return; the same bytes give the same key."""
        data = bytes(data)
        if self._packs(len(data)):
            # Waits for the pack's group commit without holding a thread.
            key = await content_key(data)
            return await asyncio.wrap_future(self.pack.put_started(key, data))
        return await asyncio.to_thread(self.put_sync, data)

    async def put_as(self, key: str, data: bytes) -> str:
        """:meth:`put_sync_as` off the event loop; durable on return."""
        data = bytes(data)
        if self._packs(len(data)):
            return await asyncio.wrap_future(self.pack.put_started(_check_key(key), data))
        return await asyncio.to_thread(self.put_sync_as, key, data)

    async def put_file(self, path: Path) -> str:
        """Stores a file's bytes in chunks, never all in memory."""
        return await asyncio.to_thread(self._put_file_sync, Path(path))

    async def put_file_range(
        self, key: str, path: Path, start: int, end: int, *, prefix: bytes = b""
    ) -> str:
        """Stores ``prefix`` followed by bytes ``start`` .. ``end`` of the
        file under ``key`` (the caller's, as :meth:`put_as`), copied in
        chunks of 1 MiB, never all in memory; durable on return. A blob
        already stored under ``key`` is kept (content-addressed: the same
        bytes) and only marked as stored now."""
        return await asyncio.to_thread(
            self.put_file_range_sync, key, Path(path), start, end, prefix
        )

    # --- reads --------------------------------------------------------------

    def _read_packs(self) -> list[BlobPack]:
        """The packs reads look in, in order."""
        packs = [self.pack] if self._may_be_packed() else []
        if self._old_pack is not None:
            packs.append(self._old_pack)
        return packs

    def _packed(self, sql: str, key: str) -> tuple[object, ...] | None:
        """A pack's row for ``key`` (``sql`` selects from ``blobs`` by key)."""
        for pack in self._read_packs():
            row = pack.row_sync(sql, (key,))
            if row is not None:
                return row
        return None

    def _read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        _check_key(key)
        row = self._packed("SELECT data FROM blobs WHERE key = ?", key)
        if row is not None:
            data = bytes(row[0])  # type: ignore[arg-type]
            return data[start:end] if start or end is not None else data
        try:
            with open(self.path(key), "rb") as f:
                if start:
                    f.seek(start)
                return f.read() if end is None else f.read(max(0, end - start))
        except FileNotFoundError:
            raise StorageError(ErrorKind.NOT_FOUND, "no such blob") from None

    async def _in_table(self, columns: str, key: str) -> tuple[object, ...] | None:
        """The PostgreSQL pack's ``columns`` for the blob, or None."""
        if self.table_pack is None:
            return None
        return await self.table_pack.row(columns, _check_key(key))

    async def get(self, key: str) -> bytes:
        """The whole blob; NOT_FOUND if absent."""
        row = await self._in_table("data", key)
        if row is not None:
            return bytes(row[0])  # type: ignore[arg-type]
        return await asyncio.to_thread(self._read, key)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` .. ``end`` (exclusive), clipped to the blob's size."""
        if start < 0 or end < start:
            raise StorageError(ErrorKind.INVALID, "bad byte range")
        row = await self._in_table("data", key)
        if row is not None:
            return bytes(row[0])[start:end]  # type: ignore[index]
        return await asyncio.to_thread(self._read, key, start, end)

    def stream(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """The blob in chunks of ``chunk_size`` bytes (the last may be shorter)."""
        return self.stream_range(key, 0, None, chunk_size)

    async def stream_range(
        self, key: str, start: int, end: int | None = None, chunk_size: int = 65536
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` .. ``end`` (None: to the end), clipped to the
        blob's size, in chunks of ``chunk_size`` bytes (the last may be
        shorter): a packed blob sliced from its row, a file read a chunk at
        a time from ``start``. NOT_FOUND if absent."""
        if start < 0 or (end is not None and end < start):
            raise StorageError(ErrorKind.INVALID, "bad byte range")
        row = await self._in_table("data", key)
        if row is None:
            row = await asyncio.to_thread(self._packed, "SELECT data FROM blobs WHERE key = ?", key)
        if row is not None:
            data = bytes(row[0])[start:end]  # type: ignore[index]
            for at in range(0, len(data), chunk_size):
                yield data[at : at + chunk_size]
            return
        path = self.path(key)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise StorageError(ErrorKind.NOT_FOUND, "no such blob") from None
        try:
            if start:
                await asyncio.to_thread(f.seek, start)
            pos = start
            while end is None or pos < end:
                want = chunk_size if end is None else min(chunk_size, end - pos)
                chunk = await asyncio.to_thread(f.read, want)
                if not chunk:
                    break
                pos += len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(f.close)

    def _exists(self, key: str) -> bool:
        _check_key(key)
        if self._packed("SELECT 1 FROM blobs WHERE key = ?", key) is not None:
            return True
        return self.path(key).is_file()

    async def exists(self, key: str) -> bool:
        if await self._in_table("1", key) is not None:
            return True
        return await asyncio.to_thread(self._exists, key)

    def _stat(self, key: str, column: str, field: str) -> float:
        """The pack's ``column`` for the blob, else its file's stat ``field``."""
        _check_key(key)
        row = self._packed(f"SELECT {column} FROM blobs WHERE key = ?", key)
        if row is not None:
            return float(row[0])  # type: ignore[arg-type]
        try:
            return float(getattr(self.path(key).stat(), field))
        except FileNotFoundError:
            raise StorageError(ErrorKind.NOT_FOUND, "no such blob") from None

    async def size(self, key: str) -> int:
        """The blob's length in bytes; NOT_FOUND if absent."""
        row = await self._in_table("length(data)", key)
        if row is not None:
            return int(row[0])  # type: ignore[call-overload]
        return int(await asyncio.to_thread(self._stat, key, "length(data)", "st_size"))

    async def stored_at(self, key: str) -> float:
        """When the blob was last stored (a Unix time; storing the same
        bytes again refreshes it); NOT_FOUND if absent. Garbage collection
        spares blobs stored recently: an ingest may be about to use them."""
        row = await self._in_table("stored", key)
        if row is not None:
            return float(row[0])  # type: ignore[arg-type]
        return await asyncio.to_thread(self._stat, key, "stored", "st_mtime")

    def _delete(self, key: str, stored_before: float | None) -> None:
        _check_key(key)
        for pack in self._read_packs():
            pack.delete_started(key, stored_before).result()
        path = self.path(key)
        if stored_before is None:
            path.unlink(missing_ok=True)
            return
        try:
            if path.stat().st_mtime >= stored_before:
                return
        except FileNotFoundError:
            return
        # Between a stat and an unlink an ingest may touch the blob (_touch)
        # and count on it: so it is set aside first, its time read where no
        # new touch can reach it, and put back if it was touched meanwhile.
        aside = path.with_name(f".gc-{self._tmp_prefix}-{next(self._tmp_counter)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.stat().st_mtime >= stored_before:
                with contextlib.suppress(FileExistsError):  # written again: same bytes
                    os.link(aside, path)
        finally:
            aside.unlink()

    async def delete(self, key: str, *, stored_before: float | None = None) -> None:
        """Removes the blob; a missing blob is not an error (GC is idempotent).
        ``stored_before``: only if not stored again since that Unix time."""
        if self.table_pack is not None:
            await self.table_pack.delete(_check_key(key), stored_before)
        await asyncio.to_thread(self._delete, key, stored_before)

    def _keys(self) -> list[str]:
        out = {key for pack in self._read_packs() for key in pack.keys_sync()}
        for _dirpath, _dirs, files in os.walk(self.root):
            out.update(name for name in files if _KEY.match(name))
        return sorted(out)

    async def keys(self) -> list[str]:
        """Every stored key, sorted."""
        keys = await asyncio.to_thread(self._keys)
        if self.table_pack is None:
            return keys
        return sorted({*keys, *await self.table_pack.keys()})

    async def close(self) -> None:
        """Finishes queued writes and closes the pack and the writer threads."""
        await asyncio.to_thread(self.pack.close_sync)
        if self._old_pack is not None:
            await asyncio.to_thread(self._old_pack.close_sync)
        if self._writers is not None:
            writers, self._writers = self._writers, None
            await asyncio.to_thread(writers.shutdown, True)

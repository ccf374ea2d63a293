"""Making a SQLite write-ahead log durable after a commit, outside any lock.

Both SQLite writers of a host (the shard database's, ``storage/sql/db.py``,
and the blob pack's, ``storage/blob/pack.py``) commit with
``synchronous=NORMAL`` while they hold their cross-process writers' lock,
then fsync the WAL file with :class:`WalFile` once the lock is free and
before anyone is told the write is durable.

Why that is as durable as ``synchronous=FULL``: NORMAL appends the
transaction's frames, commit frame last, to the WAL and skips only the
fsync. Recovery replays the WAL's frames in order up to the last commit
frame whose checksums hold, so once an fsync that started after the commit
returns, the transaction survives power loss. A checkpoint never loses it
either: with NORMAL, SQLite fsyncs the WAL before copying it into the
database and the database before reusing the WAL. fsync is per file, so
it also covers every other process's frames written before it.
"""

from __future__ import annotations

import os


class WalFile:
    """The WAL of the SQLite database at ``database`` (``<database>-wal``),
    kept open for fsync. Not thread-safe: one thread syncs it."""

    def __init__(self, database: str) -> None:
        self.path = f"{database}-wal"
        self._fd: int | None = None

    def sync(self) -> None:
        """fsyncs the WAL: every commit written to it before this call is
        durable when it returns. Raises OSError if the fsync failed (the
        caller must then not report those commits as durable).

        The descriptor is opened again if the WAL file was replaced (deleted
        by the last connection's close and made anew: the old one's frames
        were checkpointed), and after a failed fsync (Linux reports a failed
        writeback once per descriptor)."""
        fd = self._fd
        if fd is not None and os.fstat(fd).st_ino != _inode(self.path):
            self.close()
            fd = None
        if fd is None:
            fd = self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None

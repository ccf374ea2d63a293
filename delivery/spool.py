"""Messages in transit on disk: a DATA phase past a threshold, and its delivery.

A message is either ``bytes`` or a :class:`Spooled`: fields to prepend
(``prefix``, in memory and small: trace fields, a cleaned header) followed
by the octets of a spool file from ``offset`` on. Prepending a field to a
spooled message copies nothing; :func:`materialised` writes the whole
message once, to a file the ingest path and the blob store stream from.

Contract: whoever creates a spool file (:class:`SpoolFile`,
:func:`materialised`) removes it on every path, success, refusal, error
or a dropped connection; nothing here outlives the SMTP transaction.
Writes are unsynced temporary files: durability comes from the blob
store and the queue, which copy them before a 250 is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from runtime.memtrim import trim_soon
from storage.errors import ErrorKind, StorageError

# Large enough that a 35 MB message is a few hundred writes, small enough
# to stay well under any sensible spool threshold.
_WRITE_BUFFER = 64 * 1024
_COPY_CHUNK = 1024 * 1024


class SpoolFile:
    """A temporary file in ``directory`` that message text is appended to.

    :meth:`remove` is idempotent and must be called on every path. Writes
    go to the page cache (no fsync): a small blocking cost on the event loop
    that a thread hop per block would exceed."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="data-", suffix=".eml", dir=directory)
        self.path = Path(name)
        self._file: BinaryIO | None = open(fd, "wb", buffering=_WRITE_BUFFER)
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None, "write after close"
        self._file.write(data)
        self.size += len(data)

    def close(self) -> Path:
        """Flush and close; the file stays until :meth:`remove`."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.path

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.close()
        self.path.unlink(missing_ok=True)
        # A spooled upload ended: what its reads allocated is free now.
        trim_soon()


class SpoolBuffer:
    """Message text as it arrives: in memory up to ``spool_at`` octets (None:
    no limit), then all of it in a :class:`SpoolFile` in ``spool_dir``.

    :meth:`write` raises OSError when the disk fails (the caller then calls
    :meth:`discard`); :meth:`discard` must be called on every path, and
    :meth:`result` hands the text over: bytes, or the closed spool file,
    which stays the buffer's until :meth:`discard`."""

    __slots__ = ("_chunks", "_spool", "held", "spool_at", "spool_dir")

    def __init__(self, spool_at: int | None, spool_dir: Path | None) -> None:
        self.spool_at = spool_at
        self.spool_dir = spool_dir
        self.held = 0  # octets in memory
        self._chunks: list[bytes] = []
        self._spool: SpoolFile | None = None

    @property
    def empty(self) -> bool:
        return not self._chunks and self._spool is None

    def write(self, text: bytes) -> None:
        if self._spool is not None:
            self._spool.write(text)
            return
        self._chunks.append(text)
        self.held += len(text)
        if self.spool_at is not None and self.held > self.spool_at:
            self._spool = SpoolFile(self.spool_dir or Path("."))
            for chunk in self._chunks:
                self._spool.write(chunk)
            self._chunks = []
            self.held = 0

    def discard(self) -> None:
        """Drop what is held: the chunks in memory and the spool file."""
        self._chunks = []
        self.held = 0
        if self._spool is not None:
            self._spool.remove()
            self._spool = None

    @property
    def content(self) -> bytes:
        """The text held in memory (all of it while nothing was spooled)."""
        return b"".join(self._chunks)

    def result(self) -> bytes | Path:
        return self.content if self._spool is None else self._spool.close()


@dataclass(frozen=True)
class Spooled:
    """``prefix`` followed by the octets of ``path`` from ``offset`` on."""

    prefix: bytes
    path: Path
    offset: int
    file_size: int

    @property
    def size(self) -> int:
        return len(self.prefix) + self.file_size - self.offset

    def prepended(self, fields: bytes) -> Spooled:
        return replace(self, prefix=fields + self.prefix)

    def read_all(self) -> bytes:
        """The whole message in memory: for a check that needs bytes (dkimpy);
        call it in a worker thread and drop the result soon."""
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            return self.prefix + fh.read()


Message = bytes | Spooled


def prepend(fields: bytes, message: Message) -> Message:
    """``fields + message``, copying nothing for a spooled message."""
    return message.prepended(fields) if isinstance(message, Spooled) else fields + message


def message_size(message: Message) -> int:
    return message.size if isinstance(message, Spooled) else len(message)


def _write_whole(message: Spooled, target: Path) -> None:
    with message.path.open("rb") as src, target.open("wb") as dst:
        dst.write(message.prefix)
        src.seek(message.offset)
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


@contextlib.asynccontextmanager
async def materialised(message: Message) -> AsyncIterator[bytes | Path]:
    """The message as the ingest path and blob store take it: bytes as they
    are, a spooled message as a whole new file beside its spool file (written
    in a thread, removed on exit). A disk error is StorageError(TEMPORARY)."""
    if not isinstance(message, Spooled):
        yield message
        return
    try:
        fd, name = tempfile.mkstemp(prefix="whole-", suffix=".eml", dir=message.path.parent)
        os.close(fd)
    except OSError as exc:
        raise StorageError(ErrorKind.TEMPORARY, f"spool: {exc.strerror}") from exc
    target = Path(name)
    try:
        try:
            await asyncio.to_thread(_write_whole, message, target)
        except OSError as exc:
            raise StorageError(ErrorKind.TEMPORARY, f"spool: {exc.strerror}") from exc
        yield target
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)


def read_head(path: Path, limit: int) -> tuple[bytes, int]:
    """Up to ``limit`` octets from the start of ``path``, and its size (blocking)."""
    with path.open("rb") as fh:
        return fh.read(limit), os.fstat(fh.fileno()).st_size


__all__ = [
    "Message",
    "SpoolFile",
    "Spooled",
    "materialised",
    "message_size",
    "prepend",
    "read_head",
]

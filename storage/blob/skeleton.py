"""Attachments stored once: a message kept as a skeleton and its big parts.

At ingest, every MIME leaf part whose encoded body is longer than
``min_bytes`` (``storage.attachment_min_bytes``) is stored as a blob of its
own, keyed by the SHA-256 of its body bytes exactly as they appear in the
message (no decoding: reassembly is a concatenation, byte-exact by
construction). The message's own key stays the SHA-256 of the whole
message; under it the store keeps the message's *skeleton*:

Format, version 1 (all numbers ASCII decimal, lines end in LF)::

    MAGIC                          b"\\x00shardmail-skeleton\\x00v1\\n"
    b"<size> <count>\\n"            the message's length; references that follow
    count x b"<offset> <length> <key>\\n"
                                   ascending, non-overlapping byte ranges of the
                                   message, each kept as the blob ``key`` (the
                                   SHA-256 hex digest of exactly those bytes)
    literal                        the message's bytes outside those ranges, in
                                   order: ``size - sum(length)`` bytes exactly

A stored blob is a skeleton if and only if its bytes start with ``MAGIC``:
anything written through :class:`SkeletonBlobStore` that starts with it (a
message or a part crafted so) is kept as a skeleton with no references, so
no stored bytes are ever mistaken for one. Messages stored before this
existed have no skeleton and read as they are.

Every read (``get``, ``get_range``, ``stream``, ``size``) resolves a
skeleton, so every protocol returns the original message through the same
calls as before: IMAP FETCH, POP3 RETR/TOP, the API, export and moves
between shards never see a skeleton. A referenced blob is read through the
same resolving path (a part equal to a whole stored message may be a
skeleton itself).

Durability (no acknowledged mail lost, nothing referenced missing): the
parts are written durably first, then the skeleton, then (by ingest) the
metadata; a crash in between leaves only unreferenced blobs for garbage
collection, which counts a skeleton's references as referenced
(:meth:`SkeletonBlobStore.references`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import mmap
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.blob.key import content_key, content_key_sync
from storage.errors import ErrorKind, StorageError
from storage.mime import parse_message
from storage.model import BodyPart

MAGIC = b"\x00shardmail-skeleton\x00v1\n"
DEFAULT_ATTACHMENT_MIN_BYTES = 64 * 1024
_HEAD = re.compile(rb"(\d{1,12}) (\d{1,9})\n")
_REF = re.compile(rb"(\d{1,12}) (\d{1,12}) ([0-9a-f]{64})\n")
_CACHE = 4096  # skeletons kept decoded (a few hundred bytes each)
_SPLITTERS = 4  # threads for put_started's splits
_CHUNK = 1 << 20  # bytes of a message file read at a time to split it


@dataclass(frozen=True)
class Ref:
    """A range of the message kept as the blob ``key``."""

    offset: int
    length: int
    key: str


@dataclass(frozen=True)
class Skeleton:
    """A decoded skeleton: the message's size, its references, the rest."""

    size: int
    refs: tuple[Ref, ...]
    literal: bytes

    def segments(self) -> Iterator[tuple[int, int, Ref | int]]:
        """(start, end, source) covering the message in order: a
        :class:`Ref`, or the offset of literal bytes in :attr:`literal`."""
        pos = lit = 0
        for ref in self.refs:
            if ref.offset > pos:
                yield pos, ref.offset, lit
                lit += ref.offset - pos
            yield ref.offset, ref.offset + ref.length, ref
            pos = ref.offset + ref.length
        if pos < self.size:
            yield pos, self.size, lit


def _header(size: int, refs: list[Ref]) -> bytes:
    """A skeleton's bytes before its literal: ``MAGIC``, size, references."""
    lines = [MAGIC, b"%d %d\n" % (size, len(refs))]
    lines += [b"%d %d %s\n" % (r.offset, r.length, r.key.encode()) for r in refs]
    return b"".join(lines)


def encode(data: bytes | mmap.mmap, ranges: list[tuple[int, int]]) -> tuple[bytes, list[Ref]]:
    """The skeleton of ``data`` keeping ``ranges`` (sorted, disjoint
    ``(start, end)``) apart, and their references."""
    refs = [Ref(a, b - a, content_key_sync(data[a:b])) for a, b in ranges]
    out = [_header(len(data), refs)]
    pos = 0
    for a, b in ranges:
        out.append(bytes(data[pos:a]))
        pos = b
    out.append(bytes(data[pos:]))
    return b"".join(out), refs


def decode(blob: bytes) -> Skeleton:
    """A stored skeleton (starting with ``MAGIC``) decoded; TEMPORARY if
    it is damaged (``mailctl blobs verify`` names it)."""
    bad = StorageError(ErrorKind.TEMPORARY, "damaged message skeleton")
    m = _HEAD.match(blob, len(MAGIC))
    if not blob.startswith(MAGIC) or m is None:
        raise bad
    size, count = int(m[1]), int(m[2])
    pos, refs, end = m.end(), [], 0
    for _ in range(count):
        r = _REF.match(blob, pos)
        if r is None:
            raise bad
        ref = Ref(int(r[1]), int(r[2]), r[3].decode())
        # Strictly shorter than the message: reading a chain of skeletons
        # always ends (a part never stands for the whole).
        if ref.offset < end or ref.offset + ref.length > size or ref.length >= size:
            raise bad
        end = ref.offset + ref.length
        refs.append(ref)
        pos = r.end()
    literal = blob[pos:]
    if len(literal) != size - sum(r.length for r in refs):
        raise bad
    return Skeleton(size, tuple(refs), literal)


def _leaves(part: BodyPart) -> Iterator[BodyPart]:
    if part.children:
        for child in part.children:
            yield from _leaves(child)
    elif part.message_body is not None:
        yield from _leaves(part.message_body)
    else:
        yield part


def ranges_of(body: BodyPart, size: int, min_bytes: int) -> list[tuple[int, int]]:
    """The byte ranges to keep apart of a message of ``size`` bytes whose
    structure is ``body`` (``parse_message(...).body`` of those bytes):
    its leaf parts' encoded bodies longer than ``min_bytes``, sorted and
    disjoint. The same bytes always give the same ranges: a message stored
    again gets the same skeleton."""
    if min_bytes <= 0 or size <= min_bytes:
        return []
    found = sorted(
        (p.body_start, p.end)
        for p in _leaves(body)
        if 0 <= p.body_start
        and p.end <= size
        and min_bytes < p.end - p.body_start < size  # never the whole message
    )
    ranges: list[tuple[int, int]] = []
    for a, b in found:
        if not ranges or a >= ranges[-1][1]:
            ranges.append((a, b))
    return ranges


def split_ranges(data: bytes | mmap.mmap, min_bytes: int) -> list[tuple[int, int]]:
    """The byte ranges of ``data`` to keep apart (:func:`ranges_of` of its
    parse). Broken MIME (no closing boundary, bad boundaries) splits where
    the parser saw parts or not at all; the message is never altered
    either way."""
    if min_bytes <= 0 or len(data) <= min_bytes:
        return []
    try:
        body = parse_message(data, with_text=False).body
    except Exception:  # a parser bug: the message is stored whole
        return []
    return ranges_of(body, len(data), min_bytes)


@dataclass(frozen=True)
class _FilePlan:
    """How :meth:`SkeletonBlobStore.put_file` stores a file: the message's
    key, its skeleton and the parts it references (``magic``: the refs
    whose bytes start with ``MAGIC``, stored as skeletons of no refs)."""

    key: str
    size: int
    skeleton: bytes  # empty with no refs: then the file follows its header
    refs: list[Ref]
    magic: frozenset[Ref]


def _plan_file(path: Path, min_bytes: int, body: BodyPart | None) -> _FilePlan | None:
    """Reads the file once in chunks of ``_CHUNK`` bytes: the message's
    SHA-256, each range's (the ranges from ``body`` or, without it, from a
    parse of the file mapped), and the literal between them; None when
    nothing is kept apart and the bytes do not start with ``MAGIC`` (the
    file is stored as it is). Blocking."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(MAGIC))
        if size == 0 or (size <= min_bytes and head != MAGIC):
            return None
        if body is not None:
            ranges = ranges_of(body, size, min_bytes)
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                ranges = split_ranges(mapped, min_bytes)
        if not ranges and head != MAGIC:
            return None
        f.seek(0)
        digest = hashlib.sha256()
        parts = [hashlib.sha256() for _ in ranges]
        heads = [b""] * len(ranges)
        literal: list[bytes] = []
        pos = nxt = 0  # the file offset read up to; the first range not passed
        while chunk := f.read(_CHUNK):
            view = memoryview(chunk)
            digest.update(view)
            end = pos + len(chunk)
            at = pos
            while at < end:
                if nxt < len(ranges) and ranges[nxt][0] <= at:
                    a, b = ranges[nxt]
                    stop = min(end, b)
                    parts[nxt].update(view[at - pos : stop - pos])
                    if at - a < len(MAGIC):
                        heads[nxt] += bytes(view[at - pos : min(stop, a + len(MAGIC)) - pos])
                    nxt += stop == b
                else:
                    stop = min(end, ranges[nxt][0]) if nxt < len(ranges) else end
                    if ranges:  # else the file is stored behind a header
                        literal.append(bytes(view[at - pos : stop - pos]))
                at = stop
            pos = end
    if pos != size:
        raise StorageError(ErrorKind.TEMPORARY, "the message file changed while stored")
    refs = [Ref(a, b - a, h.hexdigest()) for (a, b), h in zip(ranges, parts, strict=True)]
    magic = frozenset(r for r, h in zip(refs, heads, strict=True) if h == MAGIC)
    skeleton = _header(size, refs) + b"".join(literal) if refs else b""
    return _FilePlan(digest.hexdigest(), size, skeleton, refs, magic)


def _part_error(err: StorageError, part: str) -> StorageError:
    """A referenced part's NOT_FOUND, naming the part (the caller's key is
    the message's, which is there): what a log must say to tell which
    blob went missing."""
    if err.kind is not ErrorKind.NOT_FOUND or "attachment part" in str(err):
        return err  # not missing, or a deeper part already named
    return StorageError(ErrorKind.NOT_FOUND, f"no such blob: attachment part {part}")


class SkeletonBlobStore:
    """A blob store (``inner``: fs or S3) that keeps a message's big parts
    as blobs of their own and the message as a skeleton referencing them;
    reads return the original bytes. Everything else (``keys``,
    ``delete``, ``stored_at``, ``inline_max``, ``migrate_layout``...) is
    the inner store's."""

    def __init__(self, inner: Any, min_bytes: int = DEFAULT_ATTACHMENT_MIN_BYTES) -> None:
        self.inner = inner
        self.min_bytes = min_bytes
        self._skeletons: collections.OrderedDict[str, Skeleton] = collections.OrderedDict()
        # Message key -> the part keys its last put here stored (parts_of).
        self._parts: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()
        self._parts_lock = threading.Lock()
        self._splitters: concurrent.futures.ThreadPoolExecutor | None = None
        if hasattr(inner, "put_sync_as"):
            # The ingest fast paths (``storage.ingest``) look for these.
            self.put_sync = self._put_sync
            self.put_started = self._put_started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # --- writes -------------------------------------------------------------

    def _may_split(self, data: bytes | mmap.mmap) -> bool:
        return len(data) > self.min_bytes or data[: len(MAGIC)] == MAGIC

    def _plan(self, data: bytes | mmap.mmap) -> tuple[bytes, list[tuple[int, int]]] | None:
        """The skeleton of ``data`` and the ranges it references, or None
        where the bytes are stored as they are."""
        ranges = split_ranges(data, self.min_bytes)
        if not ranges and data[: len(MAGIC)] != MAGIC:
            return None
        skeleton, _refs = encode(data, ranges)
        return skeleton, ranges

    def _note_parts(self, key: str, skeleton: bytes | None) -> None:
        """Remembers which parts the message ``key`` was stored with."""
        self._note_refs(key, decode(skeleton).refs if skeleton else ())

    def _note_refs(self, key: str, refs: Sequence[Ref]) -> None:
        parts = frozenset(r.key for r in refs)
        with self._parts_lock:
            self._parts[key] = parts
            self._parts.move_to_end(key)
            if len(self._parts) > _CACHE:
                self._parts.popitem(last=False)

    def parts_of(self, key: str) -> frozenset[str] | None:
        """The keys of the parts a put of the message ``key`` in this
        process stored (empty: stored whole), or None if not known (any
        thread). A writer names them with the message in its transaction
        (``storage/blob/deleting.py``)."""
        with self._parts_lock:
            return self._parts.get(key)

    def _put_part_sync(self, part: bytes) -> str:
        if part.startswith(MAGIC):
            return str(self.inner.put_sync_as(content_key_sync(part), encode(part, [])[0]))
        return str(self.inner.put_sync(part))

    def _put_sync(self, data: bytes) -> str:
        """``put`` from a worker thread (fs): parts, then the skeleton."""
        key = content_key_sync(data)
        plan = self._plan(data) if self._may_split(data) else None
        if plan is None:
            self._note_parts(key, None)
            return str(self.inner.put_sync_as(key, data))
        skeleton, ranges = plan
        for a, b in ranges:
            self._put_part_sync(data[a:b])
        self._note_parts(key, skeleton)
        return str(self.inner.put_sync_as(key, skeleton))

    def _put_started(self, data: bytes, key: str | None = None) -> concurrent.futures.Future[str]:
        """The inner store's ``put_started``, or a split in a thread of ours
        when the message may have parts to keep apart."""
        if not self._may_split(data):
            self._note_parts(key or content_key_sync(data), None)
            return self.inner.put_started(data, key)  # type: ignore[no-any-return]
        if self._splitters is None:
            self._splitters = concurrent.futures.ThreadPoolExecutor(
                max_workers=_SPLITTERS, thread_name_prefix="blob-split"
            )
        return self._splitters.submit(self._put_sync, data)

    async def _put_part(self, part: bytes) -> str:
        if part.startswith(MAGIC):
            return str(await self.inner.put_as(await content_key(part), encode(part, [])[0]))
        return str(await self.inner.put(part))

    async def put(self, data: bytes) -> str:
        """Durable on return, parts first; the key is the message's SHA-256."""
        data = bytes(data)
        plan = await asyncio.to_thread(self._plan, data) if self._may_split(data) else None
        if plan is None:
            key = str(await self.inner.put(data))
            self._note_parts(key, None)
            return key
        skeleton, ranges = plan
        for a, b in ranges:
            await self._put_part(data[a:b])
        key = await content_key(data)
        self._note_parts(key, skeleton)
        return str(await self.inner.put_as(key, skeleton))

    async def skeleton_of(self, data: bytes) -> bytes | None:
        """For a delivery that writes the blob in its own transaction
        (``MailStore.deliver``'s ``blob_data``): stores the parts of
        ``data`` to keep apart durably and returns the skeleton to write
        in their place, or None (store ``data`` as it is)."""
        if not self._may_split(data):
            return None
        plan = await asyncio.to_thread(self._plan, data)
        if plan is None:
            return None
        skeleton, ranges = plan
        for a, b in ranges:
            await self._put_part(data[a:b])
        return skeleton

    async def put_file(self, path: Path, *, body: BodyPart | None = None) -> str:
        """A file's bytes (a spooled message), never read whole into
        memory: streamed as they are when nothing is kept apart; else each
        part copied from the file by its byte offsets (the inner store's
        ``put_file_range``), then the skeleton. ``body``: the structure of
        a parse of these same bytes (``parse_message(...).body``: the
        ingest's), so the file is not mapped and parsed again here; a
        degraded parse (``storage.ingest``'s opaque message, no header
        offsets: ``body_start`` 0) is not one, the file is parsed then."""
        path = Path(path)
        if body is not None and body.body_start <= 0:
            body = None
        planned = await asyncio.to_thread(_plan_file, path, self.min_bytes, body)
        if planned is None:
            stored = str(await self.inner.put_file(path))
            self._note_parts(stored, None)
            return stored
        self._note_refs(planned.key, planned.refs)
        if not planned.refs:  # it starts with MAGIC: a skeleton of no refs
            return str(
                await self.inner.put_file_range(
                    planned.key, path, 0, planned.size, prefix=_header(planned.size, [])
                )
            )
        for ref in planned.refs:
            # A part that looks like a skeleton is kept as one of no refs.
            prefix = _header(ref.length, []) if ref in planned.magic else b""
            await self.inner.put_file_range(
                ref.key, path, ref.offset, ref.offset + ref.length, prefix=prefix
            )
        return str(await self.inner.put_as(planned.key, planned.skeleton))

    # --- reads --------------------------------------------------------------

    def _remember(self, key: str, skeleton: Skeleton) -> Skeleton:
        self._skeletons[key] = skeleton
        if len(self._skeletons) > _CACHE:
            self._skeletons.popitem(last=False)
        return skeleton

    async def skeleton(self, key: str) -> Skeleton | None:
        """The blob's skeleton, or None if it is stored as it is."""
        known = self._skeletons.get(key)
        if known is not None:
            return known
        head = await self.inner.get_range(key, 0, len(MAGIC))
        if head != MAGIC:
            return None
        return self._remember(key, decode(await self.inner.get(key)))

    async def references(self, key: str) -> set[str]:
        """The keys the blob ``key`` refers to, however deep (empty for a
        blob stored as it is); NOT_FOUND if ``key`` itself is missing. A
        missing part is still named (it refers to nothing more): garbage
        collection must keep every other part of a message one of whose
        parts is lost, not count them all unreferenced."""
        found: set[str] = set()
        todo = [key]
        while todo:
            at = todo.pop()
            try:
                skeleton = await self.skeleton(at)
            except StorageError as err:
                if err.kind is not ErrorKind.NOT_FOUND or at == key:
                    raise
                continue
            for ref in skeleton.refs if skeleton else ():
                if ref.key not in found:
                    found.add(ref.key)
                    todo.append(ref.key)
        return found

    async def get(self, key: str) -> bytes:
        """The whole message; NOT_FOUND if absent."""
        known = self._skeletons.get(key)
        if known is not None:
            return await self._assemble(known, 0, known.size)
        data = await self.inner.get(key)
        if not data.startswith(MAGIC):
            return bytes(data)
        skeleton = self._remember(key, decode(data))
        return await self._assemble(skeleton, 0, skeleton.size)

    async def _assemble(self, skeleton: Skeleton, start: int, end: int) -> bytes:
        """Bytes ``start`` .. ``end`` of the message: literal slices and the
        referenced parts' ranges, read concurrently."""

        async def piece(a: int, b: int, src: Ref | int) -> bytes:
            lo, hi = max(a, start), min(b, end)
            if not isinstance(src, Ref):
                return skeleton.literal[src + lo - a : src + hi - a]
            try:
                data = await self.get_range(src.key, lo - a, hi - a)
            except StorageError as err:
                raise _part_error(err, src.key) from None
            if len(data) != hi - lo:
                raise StorageError(ErrorKind.TEMPORARY, "attachment blob too short")
            return data

        wanted = [(a, b, src) for a, b, src in skeleton.segments() if a < end and b > start]
        return b"".join(await asyncio.gather(*(piece(*w) for w in wanted)))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` .. ``end`` (exclusive) of the message, clipped."""
        if start < 0 or end < start:
            raise StorageError(ErrorKind.INVALID, "bad byte range")
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            if start == 0 and end >= len(MAGIC):
                data = await self.inner.get_range(key, start, end)
                if not data.startswith(MAGIC):
                    return bytes(data)
            else:
                head, data = await asyncio.gather(
                    self.inner.get_range(key, 0, len(MAGIC)),
                    self.inner.get_range(key, start, end),
                )
                if head != MAGIC:
                    return bytes(data)
            skeleton = self._remember(key, decode(await self.inner.get(key)))
        return await self._assemble(skeleton, start, min(end, skeleton.size))

    async def size(self, key: str) -> int:
        """The message's length; NOT_FOUND if absent."""
        skeleton = await self.skeleton(key)
        return skeleton.size if skeleton else int(await self.inner.size(key))

    def stream(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """The whole message, as :meth:`stream_range` reads it."""
        return self.stream_range(key, 0, None, chunk_size)

    async def stream_range(
        self, key: str, start: int, end: int | None = None, chunk_size: int = 65536
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` .. ``end`` (None: to the end) of the message,
        clipped, in chunks of ``chunk_size`` bytes (the last may be shorter).

        Each stored piece the range covers is read as ONE stream of the
        inner store (one GET on S3), never read whole: a message stored as
        it is, one stream; a skeleton, the skeleton itself (read whole:
        references and the bytes between the parts), then one stream per
        referenced part in the range. Whether a blob is a skeleton is told
        by its first octets: from the stream itself when the range starts
        at 0, else by a read of ``len(MAGIC)`` octets first (once per
        process for a skeleton, which is then kept decoded)."""
        if start < 0 or (end is not None and end < start):
            raise StorageError(ErrorKind.INVALID, "bad byte range")
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            if start == 0:
                chunks = self.inner.stream_range(key, 0, end, chunk_size)
                async with contextlib.aclosing(chunks):
                    first = b""
                    async for chunk in chunks:
                        first += chunk
                        if len(first) >= len(MAGIC):
                            break
                    if not first.startswith(MAGIC):
                        for at in range(0, len(first), chunk_size):  # from chunks this small
                            yield first[at : at + chunk_size]
                        async for chunk in chunks:
                            yield chunk
                        return
                    rest = [first]
                    async for chunk in chunks:
                        rest.append(chunk)
                blob = b"".join(rest)
                if end is not None and len(blob) >= end:  # maybe cut short by the range
                    blob = await self.inner.get(key)
            else:
                if await self.inner.get_range(key, 0, len(MAGIC)) != MAGIC:
                    chunks = self.inner.stream_range(key, start, end, chunk_size)
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            yield chunk
                    return
                blob = await self.inner.get(key)
            skeleton = self._remember(key, decode(blob))
        stop = skeleton.size if end is None else min(end, skeleton.size)
        buffer = bytearray()
        for a, b, src in skeleton.segments():
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            if isinstance(src, Ref):
                got = 0
                part = self.stream_range(src.key, lo - a, hi - a, chunk_size)
                async with contextlib.aclosing(part):
                    try:
                        async for chunk in part:
                            chunk = chunk[: hi - lo - got]
                            got += len(chunk)
                            buffer += chunk
                            while len(buffer) >= chunk_size:
                                yield bytes(buffer[:chunk_size])
                                del buffer[:chunk_size]
                    except StorageError as err:
                        raise _part_error(err, src.key) from None
                if got != hi - lo:
                    raise StorageError(ErrorKind.TEMPORARY, "attachment blob too short")
                continue
            buffer += skeleton.literal[src + lo - a : src + hi - a]
            while len(buffer) >= chunk_size:
                yield bytes(buffer[:chunk_size])
                del buffer[:chunk_size]
        if buffer:
            yield bytes(buffer)

    def path(self, key: str) -> Path:
        """The blob's file, if it holds the message as it is: a skeleton's
        raises ``FileNotFoundError`` (a move then copies through
        :meth:`get`, so the target re-splits the original bytes), and so
        does a blob in a store of no files (S3)."""
        inner_path = getattr(self.inner, "path", None)
        if inner_path is None:
            raise FileNotFoundError(key)
        path = Path(inner_path(key))
        try:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC))
        except FileNotFoundError:
            return path  # packed, or not stored
        if head == MAGIC:
            raise FileNotFoundError(path)
        return path

    async def close(self) -> None:
        """Finishes the splits under way, then closes the inner store."""
        if self._splitters is not None:
            splitters, self._splitters = self._splitters, None
            await asyncio.to_thread(splitters.shutdown, True)
        await self.inner.close()

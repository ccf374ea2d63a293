"""FETCH and UID FETCH (RFC 3501 section 6.4.5; RFC 7162 CHANGEDSINCE,
MODSEQ and VANISHED).

Message bodies are never built whole in memory for large messages: a
section is a byte range of the blob (``BodyPart`` offsets), written as a
literal from ONE ``BlobStore.stream_range`` of that range (one GET per
stored piece on S3), a chunk at a time with back-pressure from the
transport between chunks. BINARY (RFC 3516) decodes the same stream a
chunk at a time; its literal's length (and literal8 or not) is measured
by a first decoding pass that keeps only counts, remembered per blob range.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from imapd.imap import binary, preview
from imapd.imap.mailbox_view import MailboxView
from imapd.imap.session import Reply, Session, bad, no, ok
from imapd.imap.wire import encode
from imapd.imap.wire.commands import Fetch, FetchAttribute, Section
from storage.contentpool import ContentTimeout, content_pool
from storage.errors import ErrorKind, StorageError
from storage.mime import header_end as _header_end  # the parser's own header rule
from storage.model import SEEN, BodyPart, MessageEntry, StoredMessage, StoreMode, UidSet

log = logging.getLogger("imapd.imap")

# Messages up to this size are read whole once per FETCH; larger ones by range.
SMALL_MESSAGE = 256 * 1024
CHUNK = 256 * 1024
BATCH = 200  # messages loaded from storage at a time
_ENTRY_ONLY = frozenset(
    {"UID", "FLAGS", "MODSEQ", "INTERNALDATE", "RFC822.SIZE", "EMAILID", "THREADID", "SAVEDATE"}
)
_RFC822_RAW = frozenset({"RFC822", "RFC822.HEADER", "RFC822.TEXT"})


class _Blob:
    """Lazy access to one message's raw bytes."""

    def __init__(self, s: Session, entry: MessageEntry) -> None:
        self.s = s
        self.entry = entry
        self.key = entry.blob_key
        self.size = entry.size
        self._data: bytes | None = None
        assert s.account is not None  # FETCH runs in the selected state only
        # The account's shard's blobs (each shard may keep its own).
        self._blobs = s.storage.blobs_for(s.account if s.shared is None else s.shared.owner)

    async def small(self) -> bytes | None:
        if self.size > SMALL_MESSAGE:
            return None
        if self._data is None:
            cache = self.s.message_cache
            self._data = cache.raw(self.entry)
            if self._data is None:
                self._data = await self._blobs.get(self.key)
                cache.put_raw(self.entry, self._data)
        return self._data

    async def check(self) -> None:
        """That the blob is there and the store answers (one HEAD on S3, a
        stat on disk): NOT_FOUND or TEMPORARY StorageError otherwise."""
        if not await self._blobs.exists(self.key):
            raise StorageError(ErrorKind.NOT_FOUND, "message blob missing")

    async def range(self, start: int, end: int) -> bytes:
        data = await self.small()
        if data is not None:
            return data[start:end]
        return await self._blobs.get_range(self.key, start, end)

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``start`` .. ``end`` in chunks of at most ``CHUNK``: a small
        message from memory, a large one as one stream of the blob store."""
        data = await self.small()
        if data is not None:
            for at in range(start, min(end, len(data)), CHUNK):
                yield data[at : min(end, at + CHUNK)]
            return
        stream = self._blobs.stream_range(self.key, start, end, CHUNK)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                yield chunk


@dataclass(frozen=True, slots=True)
class _TopLevel:
    """A message's header/body split, found in its raw bytes: all that the
    top-level sections (BODY[], HEADER, HEADER.FIELDS, TEXT) need."""

    body_start: int
    end: int
    header_start: int = 0

    def section_range(self, section: Section) -> tuple[int, int]:
        if section.text is None:
            return 0, self.end
        if section.text == "TEXT":
            return self.body_start, self.end
        return 0, self.body_start  # HEADER, HEADER.FIELDS[.NOT]


def find_part(root: BodyPart, path: tuple[int, ...]) -> BodyPart | None:
    """RFC 3501 section 6.4.5 part numbering. A non-multipart message has
    one part, itself; the parts of a message/rfc822 part are those of the
    message it encloses."""
    cur = root
    in_message = True
    for n in path:
        if in_message:
            kids = cur.children if cur.type == "multipart" else (cur,)
        elif cur.type == "multipart":
            kids = cur.children
        elif cur.type == "message" and cur.subtype == "rfc822" and cur.message_body:
            inner = cur.message_body
            kids = inner.children if inner.type == "multipart" else (inner,)
        else:
            return None
        if n > len(kids):
            return None
        cur = kids[n - 1]
        in_message = False
    return cur


def section_range(root: BodyPart, section: Section) -> tuple[int, int] | None:
    """The blob byte range a section names (header ranges include the blank
    line); None for a section the message does not have."""
    if not section.part:
        target, message = root, root
    else:
        part = find_part(root, section.part)
        if part is None:
            return None
        if section.text is None:
            return part.body_start, part.end
        if section.text == "MIME":
            return part.header_start, part.body_start
        if part.type == "message" and part.subtype == "rfc822" and part.message_body:
            message = part.message_body
        elif len(section.part) == 1 and part is root:
            message = root
        else:
            return None
        target = message
    text = section.text
    if text is None:
        return target.header_start, target.end
    if text == "TEXT":
        return message.body_start, message.end
    return message.header_start, message.body_start  # HEADER, HEADER.FIELDS[.NOT]


def filter_header(header: bytes, fields: Iterable[str], keep: bool) -> bytes:
    """RFC 3501 HEADER.FIELDS / HEADER.FIELDS.NOT: the chosen field lines
    (with their continuations) and the terminating blank line."""
    wanted = {f.lower().encode("utf-8", "replace") for f in fields}
    out: list[bytes] = []
    take = False
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if take:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        take = (name in wanted) == keep
        if take:
            out.append(line if line.endswith(b"\n") else line + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _att_label(att: FetchAttribute) -> bytes:
    if att.section is None:
        return att.name.encode()
    # RFC 3516 section 5: BINARY.PEEK is answered as BINARY.
    label = f"{'BODY' if att.name == 'BODY' else 'BINARY'}[{att.section.label()}]"
    if att.partial is not None:
        label += f"<{att.partial[0]}>"
    return label.encode("utf-8", "replace")


async def _write_range(s: Session, blob: _Blob, start: int, end: int) -> None:
    """A literal of blob bytes start..end, streamed (:meth:`_Blob.chunks`),
    honouring back-pressure between chunks."""
    end = min(end, blob.size)
    start = min(start, end)
    s.write(b"{%d}\r\n" % (end - start))
    await _write_octets(s, blob, blob.chunks(start, end), end - start)


async def _write_octets(s: Session, blob: _Blob, chunks: AsyncIterator[bytes], length: int) -> None:
    """Writes exactly ``length`` octets of a literal whose length is already
    announced, from ``chunks``, draining between chunks of a large one.

    A literal cannot be taken back or cut short (RFC 3501 section 4.3 gives
    no way to end one early), and padding it would hand the client wrong
    content as the message. So a blob that turns out short or unreadable
    mid-stream ends the connection (ConnectionAbortedError, logged): the
    client sees a broken response, reconnects and asks again, never
    bytes that were not stored. Dovecot does the same.
    """
    sent = 0
    async with contextlib.aclosing(chunks):
        while sent < length:
            try:
                data = await anext(chunks)
            except StopAsyncIteration:
                break
            except Exception as err:
                log.warning("blob %s unreadable during FETCH: %r; disconnecting", blob.key, err)
                raise ConnectionAbortedError("message unreadable mid-literal") from err
            data = data[: length - sent]
            s.write(data)
            sent += len(data)
            if length > CHUNK:
                await s.conn.drain()
    if sent < length:
        log.error("blob %s shorter than its metadata says; disconnecting", blob.key)
        raise ConnectionAbortedError("message shorter than its size")


@dataclass(frozen=True, slots=True)
class SectionSource:
    """What FETCH BODY.PEEK[section]<partial> returns of one stored message,
    as the blob range it is read from (or, for HEADER.FIELDS[.NOT], the
    filtered header). ``size`` is exact before any byte is read."""

    blob: _Blob
    start: int
    end: int
    filtered: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.filtered) if self.filtered is not None else self.end - self.start

    async def chunks(self) -> AsyncIterator[bytes]:
        """The octets in order, at most :data:`CHUNK` at a time. A blob
        shorter than its metadata is StorageError(TEMPORARY): unlike FETCH
        (which must keep an announced literal in step) nothing may pad it."""
        if self.filtered is not None:
            yield self.filtered
            return
        # One stream per stored piece, as FETCH reads (not a GET per chunk).
        sent = 0
        stream = self.blob.chunks(self.start, self.end)
        async with contextlib.aclosing(stream):
            async for data in stream:
                data = data[: self.size - sent]
                sent += len(data)
                yield data
        if sent != self.size:
            raise StorageError(ErrorKind.TEMPORARY, "message text shorter than stored size")


async def section_source(
    s: Session, m: StoredMessage, section: Section, partial: tuple[int, int | None] | None
) -> SectionSource | None:
    """The bytes BODY.PEEK[section]<partial> names (RFC 3501 section 6.4.5),
    by the ranges FETCH uses; None for a section the message does not have.
    ``partial``: (origin, octets), octets None for "to the end"."""
    rng = section_range(m.parsed.body, section)
    if rng is None:
        return None
    return await _section_bounds(_Blob(s, m.entry), rng, section, partial)


async def _section_bounds(
    blob: _Blob,
    rng: tuple[int, int],
    section: Section,
    partial: tuple[int, int | None] | None,
) -> SectionSource:
    """The section at blob range ``rng`` cut to ``partial`` (RFC 3501
    section 6.4.5): a blob range, or the filtered header of HEADER.FIELDS[.NOT]."""
    start, end = min(rng[0], blob.size), min(rng[1], blob.size)
    if section.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        filtered = filter_header(
            await blob.range(start, end), section.fields, section.text == "HEADER.FIELDS"
        )
        if partial is not None:
            origin, octets = partial
            filtered = filtered[origin : None if octets is None else origin + octets]
        return SectionSource(blob, 0, 0, filtered)
    if partial is not None:
        origin, octets = partial
        start = min(end, start + origin)
        end = end if octets is None else min(end, start + octets)
    return SectionSource(blob, start, end)


def _needs_seen(att: FetchAttribute) -> bool:
    if att.name in ("RFC822", "RFC822.TEXT"):
        return True
    # RFC 3516 section 4.2: BINARY sets \Seen as BODY does; BINARY.SIZE does not.
    return att.section is not None and not att.peek and att.name != "BINARY.SIZE"


def _raw_only(atts: tuple[FetchAttribute, ...]) -> bool:
    """Whether every item is answered from the entry and the raw bytes alone:
    the whole message, its top-level header or text. The header/body split
    is found in the bytes as the parser finds it, so no parsed form (a
    storage round trip) is needed."""
    for a in atts:
        if a.name in _ENTRY_ONLY or a.name in _RFC822_RAW:
            continue
        section = a.section
        if a.name != "BODY" or section is None or section.part or section.text == "MIME":
            return False
    return True


async def _load(
    s: Session, uids: list[int], atts: tuple[FetchAttribute, ...]
) -> list[StoredMessage | MessageEntry]:
    view = s.selected
    assert s.mail is not None and s.account is not None and view is not None
    await s.read_entries(view, uids)  # the snapshot is lazy: a batch at a time
    entries = view.entries
    if all(a.name in _ENTRY_ONLY for a in atts):
        # Flags, modseq, size and date: the session's entries, kept current
        # by our own writes and by the event bus (synced first).
        return [entries[u] for u in uids if u in entries]
    raw_only = _raw_only(atts)
    # Parsed forms never change: take them from the session cache where we
    # can, with the snapshot's (current) entry.
    cache = s.message_cache
    found: dict[int, StoredMessage | MessageEntry] = {}
    missing = []
    for u in uids:
        e = entries.get(u)
        if e is not None and raw_only and e.size <= SMALL_MESSAGE:
            found[u] = e  # the blob alone answers (see _raw_only)
            continue
        parsed = cache.parsed(e) if e is not None else None
        if e is not None and parsed is not None:
            found[u] = StoredMessage(e, parsed)
        else:
            missing.append(u)
    if missing:
        for m in await s.box_mail.fetch(s.box_owner, view.mailbox.id, UidSet.of(missing)):
            cache.put_parsed(m.entry, m.parsed)
            e = entries.get(m.entry.uid, m.entry)
            found[m.entry.uid] = StoredMessage(e, m.parsed)
    return [found[u] for u in uids if u in found]


async def handle_fetch(s: Session, cmd: Fetch) -> Reply:
    view = s.selected
    assert view is not None and s.mail is not None and s.account is not None
    if s.has_updates:
        await s.sync(allow_expunge=False)  # fresh flags; no EXPUNGE during FETCH
    uids = view.resolve(cmd.sequence, cmd.uid)
    atts = list(cmd.attributes)
    names = {a.name for a in atts}
    if cmd.uid and "UID" not in names:
        atts.insert(0, FetchAttribute("UID"))  # RFC 3501 section 6.4.8
    if cmd.changed_since is not None:
        s.use_condstore()
        if "MODSEQ" not in names:
            atts.append(FetchAttribute("MODSEQ"))  # RFC 7162 section 3.1.4.1
    if "MODSEQ" in names:
        s.use_condstore()
    if cmd.vanished and cmd.changed_since is not None:
        if "QRESYNC" not in s.enabled:
            return bad("Enable QRESYNC first")
        # RFC 7162 section 3.2.6: expunged UIDs in the set, reported first.
        changes = await s.box_mail.changes_since(s.box_owner, view.mailbox.id, cmd.changed_since)
        top = view.max_uid
        ranges = [
            (top if a is None else a, top if b is None else b) for a, b in cmd.sequence.ranges
        ]
        gone = sorted(
            u for u in changes.vanished if any(min(a, b) <= u <= max(a, b) for a, b in ranges)
        )
        if gone:
            s.untagged(b"VANISHED (EARLIER) " + encode.sequence_set(gone))
    uids = [u for u in uids if u not in view.pending_vanished]
    set_seen = not view.read_only and any(_needs_seen(a) for a in atts)
    # RFC 4314 section 4: FETCH sets \Seen only for a user holding "s".
    set_seen = set_seen and (s.shared is None or "s" in s.shared.rights)
    all_atts = tuple(atts)
    if all(a.name in _ENTRY_ONLY for a in all_atts):
        await s.read_entries(view, uids)  # small rows: all in one storage call
    for i in range(0, len(uids), BATCH):
        batch = uids[i : i + BATCH]
        items = await _load(s, batch, all_atts)
        if not _decodable(items, all_atts):
            # RFC 3516 section 4.3, checked before \Seen is stored for the batch.
            return no("Cannot decode a part's transfer encoding", "UNKNOWN-CTE")
        if set_seen:
            unseen = [_entry(m).uid for m in items if SEEN not in _entry(m).flags]
            if unseen:
                # RFC 3501 section 6.4.5: BODY[...] sets \Seen; the new flags
                # are sent with the data.
                result = await s.box_mail.store_flags(
                    s.box_owner, view.mailbox.id, UidSet.of(unseen), StoreMode.ADD, (SEEN,)
                )
                fresh = {e.uid: e for e in result.updated}
                for e in result.updated:
                    view.update(e)
                items = [_with_entry(m, fresh.get(_entry(m).uid)) for m in items]
                changed = set(fresh)
            else:
                changed = set()
        else:
            changed = set()
        s.announce_flags(view)  # RFC 3501 section 7.2.6: keywords before FETCH shows them
        for m in items:
            entry = _entry(m)
            if cmd.changed_since is not None and entry.modseq <= cmd.changed_since:
                continue
            try:
                await _fetch_one(s, view, m, all_atts, entry.uid in changed)
            except binary.UnknownCte:
                # RFC 3516 section 4.3: a part we cannot decode fails the command.
                return no("Cannot decode a part's transfer encoding", "UNKNOWN-CTE")
            if s.conn.congested:
                await s.conn.drain()  # a slow reader: wait before the next message
        if i + BATCH < len(uids):
            await s.conn.drain()  # before loading the next batch
        # The last batch leaves with the tagged reply: one send, not two.
    return ok(f"{cmd.name} completed")


def _entry(m: StoredMessage | MessageEntry) -> MessageEntry:
    return m.entry if isinstance(m, StoredMessage) else m


def _with_entry(
    m: StoredMessage | MessageEntry, entry: MessageEntry | None
) -> StoredMessage | MessageEntry:
    if entry is None:
        return m
    if isinstance(m, StoredMessage):
        return StoredMessage(entry, m.parsed)
    return entry


async def _fetch_one(
    s: Session,
    view: MailboxView,
    m: StoredMessage | MessageEntry,
    atts: tuple[FetchAttribute, ...],
    flags_changed: bool,
) -> None:
    entry = _entry(m)
    seq = view.seq_of(entry.uid)
    if seq is None:
        return
    parsed = m.parsed if isinstance(m, StoredMessage) else None
    blob = _Blob(s, entry)
    root: BodyPart | _TopLevel | None = parsed.body if parsed is not None else None
    if any(a.section is not None or a.name in _RFC822_RAW for a in atts):
        try:
            # Read (or, for a large message, found) before answering: a
            # store that is unavailable fails the command (NO [UNAVAILABLE],
            # RFC 5530 section 3) before any of this message is written; a
            # missing blob (damage, logged) skips the message, so one broken
            # message does not stop a client syncing the rest.
            raw = await blob.small()
            if raw is None:
                await blob.check()
        except StorageError as err:
            if err.kind is not ErrorKind.NOT_FOUND:
                raise
            log.error("blob %s of uid %d missing", entry.blob_key, entry.uid)
            return
        if root is None and raw is not None:
            root = _TopLevel(_header_end(raw, 0, len(raw)), len(raw))  # see _raw_only
    decoded = await _binary_sections(blob, parsed.body if parsed is not None else None, atts)
    s.write(b"* %d FETCH (" % seq)
    first = True
    names = {a.name for a in atts}
    if flags_changed and "FLAGS" not in names:
        atts = (*atts, FetchAttribute("FLAGS"))
    for att in atts:
        if not first:
            s.write(b" ")
        first = False
        name = att.name
        if name == "UID":
            s.write(b"UID %d" % entry.uid)
        elif name == "FLAGS":
            s.write(b"FLAGS " + encode.flags(s.display_flags(view, entry.uid, entry.flags)))
        elif name == "MODSEQ":
            s.write(b"MODSEQ (%d)" % entry.modseq)
        elif name == "INTERNALDATE":
            s.write(b"INTERNALDATE " + encode.internal_date(entry.internal_date))
        elif name == "SAVEDATE":
            # RFC 8514 section 3: when the message entered this mailbox.
            s.write(b"SAVEDATE " + encode.internal_date(entry.save_date))
        elif name == "RFC822.SIZE":
            s.write(b"RFC822.SIZE %d" % entry.size)
        elif name == "EMAILID":
            # RFC 8474 section 5.1: the stored message's id, kept across MOVE
            # and shared by COPY's copies (the same row).
            assert s.account is not None
            emailid = (await s.ctx.object_ids()).encode("M", s.box_owner, entry.message_id)
            s.write(b"EMAILID (" + emailid.encode() + b")")
        elif name == "THREADID":
            s.write(b"THREADID NIL")  # RFC 8474 section 5.2: no thread ids kept
        elif name == "RFC822" and root is not None:
            s.write(b"RFC822 ")
            await _write_range(s, blob, 0, entry.size)
        elif name == "RFC822.HEADER" and root is not None:
            s.write(b"RFC822.HEADER ")
            await _write_range(s, blob, 0, root.body_start)
        elif name == "RFC822.TEXT" and root is not None:
            s.write(b"RFC822.TEXT ")
            await _write_range(s, blob, root.body_start, root.end)
        elif name == "BINARY.SIZE" and att.section is not None:
            item = decoded[att]
            size = item.size if item is not None else 0
            s.write(b"BINARY.SIZE[%s] %d" % (att.section.label().encode(), size))
        elif name == "BINARY" and att.section is not None:
            s.write(_att_label(att) + b" ")
            await _write_binary(s, blob, decoded[att])
        elif att.section is not None and root is not None:
            s.write(_att_label(att) + b" ")
            await _write_section(s, blob, root, att)
        elif name == "PREVIEW" and parsed is not None:
            # RFC 8970 section 3.1; never sets \Seen (section 3.1 again).
            s.write(b"PREVIEW " + encode.nstring(await _preview(blob, parsed.body)))
        elif parsed is None:
            s.write(name.encode() + b" NIL")
        elif name == "ENVELOPE":
            s.write(b"ENVELOPE " + encode.envelope(parsed.envelope))
        elif name == "BODYSTRUCTURE":
            s.write(b"BODYSTRUCTURE " + encode.body_structure(parsed.body, True))
        else:  # BODY without a section
            s.write(b"BODY " + encode.body_structure(parsed.body, False))
    s.write(b")\r\n")


async def _preview(blob: _Blob, body: BodyPart) -> str | None:
    """A message's RFC 8970 preview from a capped prefix of its first text
    part (see imapd.imap.preview); "" without one; None (NIL) if its blob
    cannot be read or an HTML part's reduction ran past the content
    pool's time limit (nstring: RFC 8970 section 6)."""
    part = preview.preview_part(body)
    if part is None:
        return ""
    start, end, truncated = preview.read_range(part)
    try:
        encoded = await blob.range(start, end)
    except Exception:
        log.exception("blob %s unreadable for PREVIEW", blob.key)
        return None
    if not preview.needs_pool(part):
        return preview.preview_of(part, encoded, truncated)
    try:
        return await content_pool().run(preview.preview_of, part, encoded, truncated)
    except ContentTimeout:
        return None


def _decodable(items: list[StoredMessage | MessageEntry], atts: tuple[FetchAttribute, ...]) -> bool:
    """Whether every part a BINARY item names has an encoding we can undo."""
    parts = [a.section.part for a in atts if a.name.startswith("BINARY") and a.section]
    for m in items if any(parts) else ():
        if not isinstance(m, StoredMessage):
            continue
        for path in parts:
            part = find_part(m.parsed.body, path) if path else None
            if part is None or part.type in ("multipart", "message"):
                continue
            try:
                binary.check(part.encoding)
            except binary.UnknownCte:
                return False
    return True


@dataclass(frozen=True, slots=True)
class _Binary:
    """A BINARY item's content, measured before the response starts: the
    blob range of the part's body, its transfer encoding, its decoded size,
    and the decoded window sent (start, length) with whether it holds a NUL."""

    start: int
    end: int
    encoding: str
    size: int
    window: tuple[int, int]
    nul: bool


async def _binary_sections(
    blob: _Blob, body: BodyPart | None, atts: tuple[FetchAttribute, ...]
) -> dict[FetchAttribute, _Binary | None]:
    """Each BINARY / BINARY.SIZE item's content (RFC 3516 section 4.2),
    measured before the FETCH response starts so that an undecodable part
    (:class:`binary.UnknownCte`) can still fail the command and the
    literal's length is known; nothing decoded is kept. ``BINARY[]`` is the
    whole message as stored; a part the message lacks is empty (None), as
    BODY's is (RFC 3501 section 6.4.5).

    A range not measured before in this process costs one streamed pass
    (:func:`binary.measure`), shared by every item naming it; BINARY.SIZE
    of a part stored unencoded costs none."""
    found: dict[FetchAttribute, tuple[int, int, str] | None] = {}
    for att in atts:
        if att.section is None or att.name not in ("BINARY", "BINARY.SIZE") or att in found:
            continue
        part = find_part(body, att.section.part) if body and att.section.part else None
        if body is None or (att.section.part and part is None):
            found[att] = None
        elif part is None:
            found[att] = (0, blob.size, "")
        else:
            # Multiparts and message/rfc822 may only be 7bit/8bit/binary (RFC
            # 2045 section 6.4): their bodies are returned as stored.
            encoding = part.encoding if part.type not in ("multipart", "message") else ""
            binary.check(encoding)
            found[att] = (part.body_start, part.end, encoding)
    out: dict[FetchAttribute, _Binary | None] = {att: None for att in found}
    for rng in {r for r in found.values() if r is not None}:
        start, end, encoding = rng
        mine = [att for att, r in found.items() if r == rng]
        known = binary.remembered(blob.key, start, end, encoding)
        if known is None and binary.is_identity(encoding):
            if all(att.name == "BINARY.SIZE" for att in mine):
                known = binary.Measure(end - start, -1, -1)  # no literal: no NUL to find
        windows = [known.window(*_partial(att)) if known is not None else (0, 0) for att in mine]
        flags = [
            known.nul_in(*w) if known is not None and att.name == "BINARY" else False
            for att, w in zip(mine, windows, strict=True)
        ]
        if known is None or None in flags:
            if known is None:
                # Windows before the size is known: clipped once it is.
                windows = [_unclipped(att) for att in mine]
            known, found_flags = await binary.measure(
                blob.key, start, end, encoding, blob.chunks(start, end), windows
            )
            windows = [known.window(*_partial(att)) for att in mine]
            flags = list(found_flags)
        for att, window, nul in zip(mine, windows, flags, strict=True):
            out[att] = _Binary(start, end, encoding, known.size, window, bool(nul))
    return out


def _partial(att: FetchAttribute) -> tuple[int, int | None]:
    return att.partial if att.partial is not None else (0, None)


def _unclipped(att: FetchAttribute) -> tuple[int, int]:
    origin, octets = _partial(att)
    return origin, (1 << 62) if octets is None else octets


async def _write_binary(s: Session, blob: _Blob, item: _Binary | None) -> None:
    """A BINARY literal: the decoded window, streamed (RFC 3516 section 4.2:
    a literal8 when the octets hold a NUL)."""
    if item is None:
        s.write(b"{0}\r\n")
        return
    start, length = item.window
    s.write((b"~{%d}\r\n" if item.nul else b"{%d}\r\n") % length)
    if length:
        chunks = blob.chunks(item.start, item.end)
        decoded = binary.decoded_window(chunks, item.encoding, start, length)
        await _write_octets(s, blob, decoded, length)


async def _write_section(
    s: Session, blob: _Blob, root: BodyPart | _TopLevel, att: FetchAttribute
) -> None:
    section = att.section
    assert section is not None
    if isinstance(root, _TopLevel):
        rng: tuple[int, int] | None = root.section_range(section)
    else:
        rng = section_range(root, section)
    if rng is None:
        s.write(b'""')  # a section the message lacks is empty (RFC 3501 6.4.5)
        return
    src = await _section_bounds(blob, rng, section, att.partial)
    if src.filtered is not None:
        s.write(b"{%d}\r\n" % len(src.filtered) + src.filtered)
        return
    await _write_range(s, blob, src.start, src.end)

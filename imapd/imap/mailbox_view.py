"""The session's view of the selected mailbox: message sequence numbers.

Storage speaks UIDs only (DESIGN.md); RFC 3501 section 2.3.1.2 sequence
numbers are this per-session snapshot, changed only when the session tells
the client (EXISTS, EXPUNGE/VANISHED), never behind its back.
"""

from __future__ import annotations

import dataclasses
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from imapd.imap.wire.commands import SequenceSet
from storage.model import BodyPart, Mailbox, MailboxSnapshot, MessageEntry, ParsedMessage

if TYPE_CHECKING:
    from imapd.imap.contexts import UpdateContext

# More expunged UIDs than this at once: the UID array is rebuilt in one
# pass rather than shifted once per UID.
_DELETE_ONE_BY_ONE = 64


class BadSequence(Exception):
    """A message sequence number beyond EXISTS (RFC 3501 section 9: BAD)."""


@dataclass
class MailboxView:
    """One session's snapshot of its selected mailbox.

    Lazy by design (issue #20): ``uids`` holds every UID, four bytes each,
    so SELECT on 100,000 messages reads no message rows. ``entries`` holds
    only the entries this session has read (FETCH, STORE and SEARCH read
    those they touch, :meth:`missing` says which) or been told of (its own
    writes, storage reads after events), each kept current by
    :meth:`update`, :meth:`add` and :meth:`remove`. A UID in ``uids`` but not
    in ``entries`` is simply one storage has not been asked about yet.
    """

    mailbox: Mailbox
    read_only: bool
    # Ascending; index + 1 is the sequence number (RFC 3501 section 2.3.1.2).
    uids: array[int] = field(default_factory=lambda: array("I"))
    entries: dict[int, MessageEntry] = field(default_factory=dict)  # read so far, current
    recent: set[int] = field(default_factory=set)
    modseq: int = 0  # highest modseq this session has caught up with
    heard_modseq: int = 0  # highest modseq an event has told of (see skipped_to)
    pending_vanished: set[int] = field(default_factory=set)  # expunged, not yet announced
    # Event-bus news not yet applied: (uid, modseq, new flags or None if expunged).
    events: list[tuple[int, int, frozenset[str] | None]] = field(default_factory=list)
    # New mail another session of this process added, not yet announced:
    # (entry, the mailbox's recent floor once it was committed), taken
    # from the NEW event itself (storage.model.Change), no read needed.
    arrivals: list[tuple[MessageEntry, int]] = field(default_factory=list)
    # Modseqs above ``modseq`` whose changes this process published and
    # the session took, each with every other change of its transaction
    # (Change.local): see :meth:`caught_up`. ``read_modseq``: the
    # mailbox's HIGHESTMODSEQ at the last storage read (or SELECT), below
    # which nothing can have been missed.
    heard_whole: set[int] = field(default_factory=set)
    read_modseq: int = 0
    distrusts: int = 0  # how often :meth:`distrust` was called
    # UID ranges (first, last) this session claimed \Recent for with its
    # own APPEND, not yet announced (MailStore.deliver's claim_recent).
    claimed: list[tuple[int, int]] = field(default_factory=list)
    # Our own APPEND's entry when nothing else can have changed the mailbox
    # since ``modseq`` (its modseq is the next one): announced from here,
    # not read back. ``own_uids``: those whose NEW event is still to come
    # (it carries nothing new to us and must not trigger a read).
    own_new: list[MessageEntry] = field(default_factory=list)
    own_uids: set[int] = field(default_factory=set)
    # Why the session must read the mailbox again: NEW events for these
    # UIDs, or (``unknown_news``) anything else. Cleared by that read.
    news: set[int] = field(default_factory=set)
    unknown_news: bool = False
    # Keywords the client was told of in FLAGS (RFC 3501 section 7.2.6), and
    # those the view's messages have but the client was not told of yet:
    # update, add and load note them; Session.announce_flags tells the client.
    keywords: set[str] = field(default_factory=set)
    unannounced: set[str] = field(default_factory=set)
    # RFC 5182 section 2.1: the UIDs the last SEARCH RETURN (SAVE) found,
    # ascending; "$" names those still in the snapshot. A new view (SELECT,
    # EXAMINE) starts empty, as section 2.1 requires.
    saved: list[int] = field(default_factory=list)
    # RFC 5267 section 4.3: live UPDATE contexts by tag (imapd.imap.contexts),
    # ended with the view, and the UIDs that arrived or whose flags changed
    # since they were last brought up to date (kept only while there are any).
    contexts: dict[str, UpdateContext] = field(default_factory=dict)
    touched: set[int] = field(default_factory=set)

    @classmethod
    def from_snapshot(
        cls, mailbox: Mailbox, read_only: bool, snapshot: MailboxSnapshot, modseq: int
    ) -> MailboxView:
        view = cls(mailbox, read_only, modseq=modseq, read_modseq=modseq)
        view.uids = array("I", snapshot.uids)
        view.keywords = set(snapshot.keywords)
        return view

    @classmethod
    def from_entries(
        cls, mailbox: Mailbox, read_only: bool, entries: list[MessageEntry], modseq: int
    ) -> MailboxView:
        """A view with every entry read already (tests, small mailboxes)."""
        view = cls(mailbox, read_only, modseq=modseq, read_modseq=modseq)
        view.uids = array("I", [e.uid for e in entries])
        view.entries = {e.uid: e for e in entries}
        # Few distinct flag sets (storage shares them): look at each once.
        view.keywords = {
            f for flags in {e.flags for e in entries} for f in flags if not f.startswith("\\")
        }
        return view

    def _note_keywords(self, flags: frozenset[str]) -> None:
        for f in flags:
            if f not in self.keywords and not f.startswith("\\"):
                self.unannounced.add(f)

    def contains(self, uid: int) -> bool:
        """Whether ``uid`` is in the snapshot (announced, not yet expunged to the client)."""
        return self.seq_of(uid) is not None

    def update(self, entry: MessageEntry) -> None:
        """A newer state of a message in the snapshot (ignored if the UID is
        not in it), whether or not the session had read it before."""
        if not self.contains(entry.uid):
            return
        old = self.entries.get(entry.uid)
        self.entries[entry.uid] = entry
        if old is None or old.flags != entry.flags:
            self._note_keywords(entry.flags)
        if self.contexts and (
            old is None or old.flags != entry.flags or old.modseq != entry.modseq
        ):
            self.touched.add(entry.uid)

    def missing(self, uids: Iterable[int]) -> list[int]:
        """Those of ``uids`` (UIDs of the snapshot) whose entries were never read."""
        entries = self.entries
        return [u for u in uids if u not in entries]

    def load(self, entries: Iterable[MessageEntry]) -> None:
        """Entries read from storage for the UIDs :meth:`missing` named (the
        snapshot cannot change meanwhile: only the session's own command
        changes it). One the session already holds is kept: that is the
        state it told the client of, kept current by update."""
        for e in entries:
            if e.uid not in self.entries:
                self.entries[e.uid] = e
                self._note_keywords(e.flags)

    def skipped_to(self, modseq: int) -> bool:
        """An event tells of a change at ``modseq``: True if the view has
        heard of no change at the modseq just below it. Every change to a
        mailbox takes the next modseq (RFC 7162 section 3.1.1; changes of
        one STORE or EXPUNGE share one), and each process's bus delivers
        them in commit order, so a jump means the bus lost some (it is
        best effort) or delivered them out of order."""
        top = max(self.modseq, self.heard_modseq)
        self.heard_modseq = max(top, modseq)
        return modseq > top + 1

    def caught_up(self) -> int:
        """The highest modseq up to which the session holds every change:
        ``modseq``, then each next one whose changes it took whole from
        this process's publications (``heard_whole``). Every change takes
        the next modseq (see :meth:`skipped_to`), so once these are
        applied nothing up to it is unknown and no read is needed."""
        top = self.modseq
        while top + 1 in self.heard_whole:
            top += 1
        return top

    def forget_whole(self) -> None:
        """Drops ``heard_whole`` entries at or below ``modseq`` (applied)."""
        if self.heard_whole:
            self.heard_whole = {m for m in self.heard_whole if m > self.modseq}

    def distrust(self) -> None:
        """The bus lost changes: since the last read, only what storage
        says is certain; ``modseq`` goes back there, so the next read
        (its caller makes sure of one) brings everything after it again."""
        self.modseq = min(self.modseq, self.read_modseq)
        self.distrusts += 1
        self.heard_whole.clear()
        self.arrivals.clear()

    def mark_recent(self, count: int, among: Iterable[int] | None = None) -> None:
        """Marks the ``count`` highest UIDs \\Recent (only those in ``among`` if
        given): entries at or above the recent floor are always the newest,
        so a peeked count (MailStore.peek_recent) names them."""
        if count <= 0:
            return
        top = self.uids[-count:]
        if among is not None:
            allowed = set(among)
            top = [u for u in top if u in allowed]
        self.recent.update(top)

    def uids_from(self, floor: int) -> array[int]:
        """The snapshot's UIDs at or above ``floor``, ascending."""
        return self.uids[bisect_left(self.uids, floor) :]

    def claimed_by_us(self, uid: int) -> bool:
        """Whether our own APPEND already claimed \\Recent for ``uid``."""
        return any(first <= uid <= last for first, last in self.claimed)

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def max_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def seq_of(self, uid: int) -> int | None:
        i = bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def resolve(self, seqset: SequenceSet, uid: bool, strict: bool = True) -> list[int]:
        """The UIDs in this snapshot that ``seqset`` names, ascending.

        UID sets ignore UIDs not present (RFC 3501 section 6.4.8); ``*`` is
        the highest UID, so ``n:*`` always includes the last message.
        Sequence sets must stay within 1..EXISTS (BadSequence otherwise;
        with ``strict`` False, as SEARCH wants, numbers beyond it match nothing).
        Cost: O(ranges * log n + result). ``$`` (RFC 5182) gives the saved
        result, whether or not the command is a UID one (section 2.1).
        """
        if seqset.saved:
            return [u for u in self.saved if self.contains(u)]
        uids = self.uids
        n = len(uids)
        out: list[int] = []
        if uid:
            top = uids[-1] if uids else 0
            for a, b in seqset.ranges:
                lo = top if a is None else a
                hi = top if b is None else b
                if lo > hi:
                    lo, hi = hi, lo
                if not n:
                    continue
                out.extend(uids[bisect_left(uids, lo) : bisect_right(uids, hi)])
        else:
            for a, b in seqset.ranges:
                lo = n if a is None else a
                hi = n if b is None else b
                if lo > hi:
                    lo, hi = hi, lo
                if hi > n or lo < 1:
                    if strict:
                        raise BadSequence("Invalid message sequence number")
                    hi = min(hi, n)
                    if lo > hi:
                        continue
                out.extend(uids[lo - 1 : hi])
        if len(seqset.ranges) > 1:
            out = sorted(set(out))
        return out

    def add(self, entries: list[MessageEntry]) -> None:
        """New messages (UIDs above every known one) at the end."""
        for e in entries:
            self.uids.append(e.uid)
            self.entries[e.uid] = e
            self._note_keywords(e.flags)
        if self.contexts:
            self.touched.update(e.uid for e in entries)

    def remove(self, gone: set[int]) -> list[int]:
        """Drop expunged UIDs; returns their former sequence numbers, highest
        first, which is the order to announce them in (each EXPUNGE then
        leaves the numbers still to come unchanged)."""
        seqs = sorted(s for s in map(self.seq_of, gone) if s is not None) if gone else []
        if seqs:
            if len(seqs) <= _DELETE_ONE_BY_ONE:
                for seq in reversed(seqs):
                    del self.uids[seq - 1]
            else:
                self.uids = array("I", [u for u in self.uids if u not in gone])
            for u in gone:
                self.entries.pop(u, None)
                self.recent.discard(u)
        self.pending_vanished -= gone
        seqs.reverse()
        return seqs


# What the message cache files a message under: its row id AND its blob key.
# The row id alone is not enough: SQLite reuses the id of a deleted row, so
# once a message is expunged everywhere another message may get its id; the
# blob key is the SHA-256 of the content, so the pair never names two
# different messages (issue #17).
CacheKey = tuple[int, str]


def cache_key(entry: MessageEntry) -> CacheKey:
    return (entry.message_id, entry.blob_key)


# What every session's MessageCache together may hold in one process (issue
# #24): a session's own bound alone lets a thousand sessions that fetched
# a little and went idle keep 2 GB. Past it a cache evicts its own oldest
# items to make room, and if that is not enough, keeps nothing new.
PROCESS_CACHE_BYTES = 32 * 1024 * 1024


class MessageCache:
    """Recently used parsed messages and small raw messages of one session,
    by :func:`cache_key` (what it names is immutable), bounded in bytes.

    Contract: a lookup returns only what was stored for the same message
    row holding the same content, and of the entry's size; anything else
    is a miss (and the stale item is dropped). Clients commonly fetch
    BODYSTRUCTURE and then parts of the same message; this spares the
    storage round trips for the second look.
    """

    # Octets held by every cache of the process (see PROCESS_CACHE_BYTES).
    process_bytes = 0

    def __init__(self, max_bytes: int = 2 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        # key -> (parsed form, the message's size, cost in bytes)
        self._parsed: OrderedDict[CacheKey, tuple[ParsedMessage, int, int]] = OrderedDict()
        self._raw: OrderedDict[CacheKey, bytes] = OrderedDict()
        self._bytes = 0

    def parsed(self, entry: MessageEntry) -> ParsedMessage | None:
        key = cache_key(entry)
        hit = self._parsed.get(key)
        if hit is None:
            return None
        if hit[1] != entry.size:  # not the message the entry describes
            del self._parsed[key]
            self._account(-hit[2])
            return None
        self._parsed.move_to_end(key)
        return hit[0]

    def raw(self, entry: MessageEntry) -> bytes | None:
        key = cache_key(entry)
        hit = self._raw.get(key)
        if hit is None:
            return None
        if len(hit) != entry.size:
            del self._raw[key]
            self._account(-len(hit))
            return None
        self._raw.move_to_end(key)
        return hit

    def put_parsed(self, entry: MessageEntry, parsed: ParsedMessage) -> None:
        """Keep what FETCH reads (envelope, body structure); the decoded body
        text (for the search index, often most of the size) is dropped, so
        several times more messages fit."""
        key = cache_key(entry)
        if key in self._parsed:
            return
        if parsed.body_text or parsed.preview:
            parsed = dataclasses.replace(parsed, body_text="", preview="")
        cost = 1024 + 768 * _count_parts(parsed.body)
        if not self._room_for(cost):
            return
        self._parsed[key] = (parsed, entry.size, cost)
        self._account(cost)
        self._trim()

    def put_raw(self, entry: MessageEntry, raw: bytes) -> None:
        """Keep a small message's bytes, only if they are the entry's size
        (a short read is not cached)."""
        key = cache_key(entry)
        if key in self._raw or len(raw) > self.max_bytes // 4 or len(raw) != entry.size:
            return
        if not self._room_for(len(raw)):
            return
        self._raw[key] = raw
        self._account(len(raw))
        self._trim()

    @property
    def size(self) -> int:
        """Octets this cache holds (its own estimate)."""
        return self._bytes

    def clear(self) -> None:
        """Drop everything (the session ended or went idle)."""
        self._raw.clear()
        self._parsed.clear()
        self._account(-self._bytes)

    def _account(self, delta: int) -> None:
        self._bytes += delta
        MessageCache.process_bytes += delta

    def _room_for(self, cost: int) -> bool:
        """Whether ``cost`` more octets fit in the process's budget, once
        this cache's own oldest items are evicted as far as needed."""
        while MessageCache.process_bytes + cost > PROCESS_CACHE_BYTES:
            if not self._evict_oldest():
                return False
        return True

    def _evict_oldest(self) -> bool:
        if self._raw:
            _, raw = self._raw.popitem(last=False)
            self._account(-len(raw))
        elif self._parsed:
            _, (_, _, cost) = self._parsed.popitem(last=False)
            self._account(-cost)
        else:
            return False
        return True

    def _trim(self) -> None:
        while self._bytes > self.max_bytes and self._evict_oldest():
            pass


def _count_parts(part: BodyPart) -> int:
    """MIME parts in a body structure (a rough measure of its memory)."""
    n = 1 + sum(_count_parts(c) for c in part.children)
    if part.message_body is not None:
        n += _count_parts(part.message_body)
    return n

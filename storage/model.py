"""The mail-world values that cross the storage seam.

All are frozen dataclasses: protocol code reads them, never mutates them.
Storage speaks UIDs only; message sequence numbers live in IMAP/POP3
sessions.
"""

from __future__ import annotations

import datetime as dt
import enum
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# RFC 3501 section 2.3.2 system flags, as stored.
SEEN = "\\Seen"
ANSWERED = "\\Answered"
FLAGGED = "\\Flagged"
DELETED = "\\Deleted"
DRAFT = "\\Draft"
SYSTEM_FLAGS = (SEEN, ANSWERED, FLAGGED, DELETED, DRAFT)

# RFC 6154 special-use attributes of the mailboxes every account starts with.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)

HIERARCHY_DELIMITER = "/"


@dataclass(frozen=True)
class UidSet:
    """A set of UIDs as sorted, disjoint, inclusive ``(first, last)`` ranges.

    ``last`` may be ``None`` for an open range (``n:*`` resolved by storage
    to "up to the highest UID").
    """

    ranges: tuple[tuple[int, int | None], ...]

    @classmethod
    def of(cls, uids: Iterable[int]) -> UidSet:
        ranges: list[tuple[int, int | None]] = []
        for uid in sorted(set(uids)):
            if ranges and ranges[-1][1] == uid - 1:
                ranges[-1] = (ranges[-1][0], uid)
            else:
                ranges.append((uid, uid))
        return cls(tuple(ranges))

    @classmethod
    def all(cls) -> UidSet:
        return cls(((1, None),))

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int | None]]) -> UidSet:
        """Normalise arbitrary ranges (any order, overlapping) in O(n log n)."""
        norm = sorted(
            ((min(a, b), max(a, b)) if b is not None else (a, None) for a, b in ranges),
            key=lambda r: r[0],
        )
        out: list[tuple[int, int | None]] = []
        for first, last in norm:
            if out:
                pf, pl = out[-1]
                if pl is None:
                    continue
                if first <= pl + 1:
                    out[-1] = (pf, None if last is None else max(pl, last))
                    continue
            out.append((first, last))
        return cls(tuple(out))

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        return any(a <= uid and (b is None or uid <= b) for a, b in self.ranges)

    def iter_bounded(self, highest: int) -> Iterator[int]:
        """Every UID in the set, open ranges capped at ``highest``."""
        for a, b in self.ranges:
            yield from range(a, (highest if b is None else min(b, highest)) + 1)

    def is_empty(self) -> bool:
        return not self.ranges


@dataclass(frozen=True)
class Domain:
    id: int
    name: str  # lower-case, IDNA A-label form


@dataclass(frozen=True)
class Account:
    """A mail account. ``address`` is the canonical login and primary address."""

    id: int
    address: str
    password_hash: str
    shard: str
    quota_bytes: int | None  # None: unlimited
    created: dt.datetime


@dataclass(frozen=True)
class Alias:
    """``source`` is an exact address or a catch-all ``@domain``."""

    id: int
    source: str
    target: str


@dataclass(frozen=True)
class Mailbox:
    id: int
    account_id: int
    name: str  # UTF-8, "/" hierarchy delimiter; IMAP converts to modified UTF-7
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    special_use: str | None


@dataclass(frozen=True)
class MailboxStatus:
    """RFC 3501 section 6.3.10 STATUS counters (plus CONDSTORE, size)."""

    messages: int
    unseen: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int
    size: int  # sum of message sizes, RFC 8438 STATUS=SIZE


@dataclass(frozen=True)
class Address:
    """An RFC 3501 ENVELOPE address: (name, adl, mailbox, host).

    A group start is ``(None, None, group_name, None)`` and its end
    ``(None, None, None, None)`` as RFC 3501 section 7.4.2 says.
    """

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


@dataclass(frozen=True)
class Envelope:
    """RFC 3501 section 7.4.2 ENVELOPE. Strings are header values as sent
    (encoded-words kept), unfolded; ``None`` is NIL."""

    date: str | None
    subject: str | None
    from_: tuple[Address, ...]
    sender: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    in_reply_to: str | None
    message_id: str | None


@dataclass(frozen=True)
class BodyPart:
    """One MIME part, with exactly what RFC 3501 BODYSTRUCTURE needs.

    Offsets index the raw message bytes so FETCH BODY[section] slices the
    blob without re-parsing: ``header_start`` .. ``body_start`` is the part
    header (including its blank line), ``body_start`` .. ``end`` the body.
    For a multipart, ``children`` holds the parts; for message/rfc822,
    ``message_envelope`` and ``message_body`` describe the enclosed message.
    """

    type: str  # lower-case, e.g. "text"
    subtype: str  # lower-case, e.g. "plain"
    params: tuple[tuple[str, str], ...]
    id: str | None
    description: str | None
    encoding: str  # as sent, upper-cased; "7BIT" by default
    size: int  # body octets
    lines: int | None  # text/* and message/rfc822 only
    md5: str | None
    disposition: tuple[str, tuple[tuple[str, str], ...]] | None
    language: tuple[str, ...] | None
    location: str | None
    header_start: int
    body_start: int
    end: int
    children: tuple[BodyPart, ...] = ()
    message_envelope: Envelope | None = None
    message_body: BodyPart | None = None


@dataclass(frozen=True)
class ParsedMessage:
    """What ingest derives once from the raw bytes and stores beside them."""

    size: int
    envelope: Envelope
    body: BodyPart
    subject: str  # decoded (RFC 2047) for display and search
    from_text: str  # decoded "Name <addr>" list
    to_text: str
    cc_text: str
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    sent_date: dt.datetime | None
    body_text: str  # decoded text of text/* parts, for the full-text index
    preview: str  # first ~200 chars of body text
    has_attachments: bool


@dataclass(frozen=True)
class MessageEntry:
    """A message as it sits in a mailbox: one row per (mailbox, uid)."""

    mailbox_id: int
    uid: int
    message_id: int  # the stored message row (shared by copies)
    flags: frozenset[str]  # system flags and keywords
    modseq: int
    internal_date: dt.datetime
    size: int
    blob_key: str
    # RFC 8514 save date: when the entry was made in this mailbox (APPEND,
    # COPY, MOVE, delivery), UTC; an entry stored before save dates were
    # kept reports its internal date.
    saved: dt.datetime | None = None

    @property
    def save_date(self) -> dt.datetime:
        """The RFC 8514 section 3 save date, never unknown (see ``saved``)."""
        return self.saved if self.saved is not None else self.internal_date.astimezone(dt.UTC)


@dataclass(frozen=True)
class MailboxSnapshot:
    """What IMAP SELECT needs of a mailbox without reading its messages
    (``MailStore.snapshot``): every UID, ascending, as a compact array (the
    session's sequence numbers, RFC 3501 section 2.3.1.2), the lowest UID
    among them without \\Seen (section 6.3.1 UNSEEN; None if all are
    seen), and the keywords set on any of them (section 7.2.6 FLAGS)."""

    uids: array[int]
    first_unseen: int | None
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class StoredMessage:
    """A message entry with its parsed form, for FETCH and the API."""

    entry: MessageEntry
    parsed: ParsedMessage


class StoreMode(enum.Enum):
    """RFC 3501 section 6.4.6 STORE: FLAGS, +FLAGS, -FLAGS."""

    REPLACE = "replace"
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class StoreResult:
    """``updated``: entries whose flags were written (new flags and modseq).
    ``modified``: UIDs refused by the UNCHANGEDSINCE guard (RFC 7162
    section 3.1.3)."""

    updated: tuple[MessageEntry, ...]
    modified: tuple[int, ...]


@dataclass(frozen=True)
class CopyResult:
    """RFC 4315 COPYUID data: destination UIDVALIDITY and uid pairs."""

    uidvalidity: int
    pairs: tuple[tuple[int, int], ...]  # (source uid, destination uid)


@dataclass(frozen=True)
class AppendResult:
    """RFC 4315 APPENDUID data; ``recent_floor`` only when the delivery
    claimed \\Recent (``MailStore.deliver``'s ``claim_recent``): the
    mailbox's recent floor before the claim, so UIDs from it up to ``uid``
    are recent for the claiming session alone. ``entry``: see below."""

    mailbox_id: int
    uidvalidity: int
    uid: int
    modseq: int
    recent_floor: int | None = None
    # The entry as stored, when the backend gives it (the ingest path does):
    # the writing IMAP session adds it to its view without reading it back.
    entry: MessageEntry | None = None


@dataclass(frozen=True)
class MailboxChanges:
    """Changes in one mailbox since a modseq (RFC 7162 CONDSTORE/QRESYNC)."""

    highestmodseq: int
    changed: tuple[MessageEntry, ...]  # added or flag-changed since
    vanished: tuple[int, ...]  # expunged since
    # The mailbox's \Recent floor read with them (RFC 3501 section 2.3.2;
    # see MailStore.claim_recent): UIDs below it are claimed already, so a
    # session hearing only of such UIDs has nothing to claim. 0: not read.
    recent_floor: int = 0


class ChangeKind(enum.Enum):
    NEW = "new"  # message appended
    FLAGS = "flags"  # flags changed
    EXPUNGE = "expunge"  # message removed
    MAILBOX = "mailbox"  # mailbox created, renamed or deleted
    # The account is fenced for a move to another shard (storage/move.py):
    # never in the change log, only on the bus; sessions on the account end
    # so that their clients reconnect to where the account will be.
    FENCE = "fence"


@dataclass(frozen=True)
class Change:
    """One entry of an account's change log, also what the event bus carries.

    ``id`` increases strictly per account, so a reconnecting client resumes
    with "changes after id N" and misses nothing.

    ``data`` by kind: NEW and FLAGS carry ``{"flags": [sorted flags]}`` (the
    entry's flags after the change), so IDLE and WebSocket sessions need not
    re-read storage; MAILBOX carries ``{"op": ..., "name": ...}`` (and
    ``{"op": "metadata", "entries": [names]}`` when METADATA entries of
    the mailbox, or with ``mailbox_id`` None the server's, changed).

    The fields after ``data`` exist only in the process whose store
    committed the change: they are neither logged nor carried to another
    process (a bus that encodes the change leaves them out), so a
    subscriber that finds them unset reads storage instead. ``local``: the
    change was published here, at once with every other change of its
    transaction and after those of earlier transactions, so no change of
    its modseq is missing from what a subscription was handed with it.
    ``entry`` (NEW from ``MailStore.deliver``): the message entry as
    stored; ``recent_floor``: the mailbox's \\Recent floor once committed
    (RFC 3501 section 2.3.2; see ``MailStore.claim_recent``), so a UID
    below it was claimed by a session already. 0: unknown.
    """

    id: int
    account_id: int
    kind: ChangeKind
    mailbox_id: int | None
    uid: int | None
    modseq: int | None
    at: dt.datetime
    data: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    local: bool = field(default=False, compare=False, hash=False)
    entry: MessageEntry | None = field(default=None, compare=False, hash=False, repr=False)
    recent_floor: int = field(default=0, compare=False, hash=False)


MAX_SPAM_ENTRIES = 1000  # sender list entries per account, both lists together
SPAM_THRESHOLD_LIMIT = 1000.0  # |junk_threshold|: far past any spam filter's scores


@dataclass(frozen=True)
class SpamPolicy:
    """An account's own anti-spam choices (issue #22): senders it always
    wants in INBOX (``allow``) or always in Junk (``block``), each entry an
    address or a domain as ``delivery.acctpolicy.parse_entry`` normalises
    it, sorted; and the spam score from which its mail goes to Junk
    (``junk_threshold``; None: the spam filter's own action decides)."""

    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()
    junk_threshold: float | None = None


@dataclass(frozen=True)
class SpamCounts:
    """An account's Bayes counts for some tokens (``MailStore.spam_counts``):
    how many spam and ham messages it has learned, and for each token asked
    about that any learned message held, (spam messages, ham messages)
    holding it. A token no learned message held is absent."""

    spam_messages: int
    ham_messages: int
    tokens: dict[int, tuple[int, int]] = field(default_factory=dict)

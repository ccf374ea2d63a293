"""Frozen dataclasses for parsed IMAP commands (RFC 3501 section 6 and extensions).

Mailbox names are already decoded from modified UTF-7 (RFC 3501 section
5.1.3) to UTF-8 ``str``. Sequence sets keep ``*`` as ``None``: only the
session knows what it stands for.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

# --------------------------------------------------------------------------
# Sequence sets (RFC 3501 section 9, "sequence-set")


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """Ranges as the client wrote them; ``None`` is ``*`` (the largest
    number in use). ``saved``: the RFC 5182 ``$`` marker (no ranges), the
    messages the last SEARCH RETURN (SAVE) found."""

    ranges: tuple[tuple[int | None, int | None], ...]
    saved: bool = False

    def __str__(self) -> str:
        if self.saved:
            return "$"

        def one(n: int | None) -> str:
            return "*" if n is None else str(n)

        return ",".join(one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.ranges)


# --------------------------------------------------------------------------
# Search keys (RFC 3501 section 6.4.4, RFC 7162 section 3.1.5)


@dataclass(frozen=True, slots=True)
class SearchAll:
    pass


@dataclass(frozen=True, slots=True)
class SearchFlag:
    flag: str  # "\\Seen" or a keyword
    present: bool


@dataclass(frozen=True, slots=True)
class SearchRecent:
    """RECENT (True) / OLD (False); NEW is And(Recent, Flag(Seen, False))."""

    recent: bool


@dataclass(frozen=True, slots=True)
class SearchHeader:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class SearchText:
    where: str  # "body" | "text"
    value: str


@dataclass(frozen=True, slots=True)
class SearchDate:
    field: str  # "internal" | "sent" | "saved" (RFC 8514)
    op: str  # "before" | "on" | "since"
    date: dt.date


@dataclass(frozen=True, slots=True)
class SearchSize:
    op: str  # "larger" | "smaller"
    octets: int


@dataclass(frozen=True, slots=True)
class SearchSequence:
    """A bare sequence set (message sequence numbers) or ``UID set``."""

    set: SequenceSet
    uid: bool


@dataclass(frozen=True, slots=True)
class SearchModSeq:
    modseq: int


@dataclass(frozen=True, slots=True)
class SearchObjectId:
    """RFC 8474 section 6: EMAILID or THREADID and the id searched for."""

    kind: str  # "EMAILID" | "THREADID"
    value: str


@dataclass(frozen=True, slots=True)
class SearchNot:
    key: SearchKey


@dataclass(frozen=True, slots=True)
class SearchOr:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class SearchAnd:
    keys: tuple[SearchKey, ...]


SearchKey = (
    SearchAll
    | SearchFlag
    | SearchRecent
    | SearchHeader
    | SearchText
    | SearchDate
    | SearchSize
    | SearchSequence
    | SearchModSeq
    | SearchObjectId
    | SearchNot
    | SearchOr
    | SearchAnd
)

# --------------------------------------------------------------------------
# FETCH attributes (RFC 3501 section 6.4.5)


@dataclass(frozen=True, slots=True)
class Section:
    """``BODY[part.text (fields)]``: ``part`` () for the whole message;
    ``text`` one of None, HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME."""

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def label(self) -> str:
        """The section spec as echoed in the response (RFC 3501 section 7.4.2)."""
        out = ".".join(str(p) for p in self.part)
        if self.text:
            out = f"{out}.{self.text}" if out else self.text
        if self.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            out += " (" + " ".join(_field_label(f) for f in self.fields) + ")"
        return out


def _field_label(name: str) -> str:
    return (
        name
        if name and all(33 <= ord(c) < 127 and c not in '(){%*"\\]' for c in name)
        else ('"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"')
    )


@dataclass(frozen=True, slots=True)
class FetchAttribute:
    """One fetch item. ``name`` is upper-case: ENVELOPE, FLAGS, INTERNALDATE,
    RFC822, RFC822.HEADER, RFC822.SIZE, RFC822.TEXT, BODY, BODYSTRUCTURE, UID,
    MODSEQ, or BODY / BINARY / BINARY.SIZE with ``section`` set."""

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None  # <origin.octets>
    peek: bool = False


# --------------------------------------------------------------------------
# Commands


@dataclass(frozen=True, kw_only=True)
class Command:
    tag: str
    name: str  # upper-case command name, "UID FETCH" for UID forms


@dataclass(frozen=True, kw_only=True)
class Simple(Command):
    """CAPABILITY, NOOP, LOGOUT, STARTTLS, CHECK, CLOSE, EXPUNGE, IDLE,
    NAMESPACE, UNSELECT: no arguments."""


@dataclass(frozen=True, kw_only=True)
class Authenticate(Command):
    mechanism: str  # upper-case
    initial_response: bytes | None  # RFC 4959 SASL-IR, still base64; b"=" is empty


@dataclass(frozen=True, kw_only=True)
class Login(Command):
    username: str
    password: str


@dataclass(frozen=True, kw_only=True)
class QresyncParams:
    """RFC 7162 section 3.2.5.1 SELECT (QRESYNC (...))."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None


@dataclass(frozen=True, kw_only=True)
class Select(Command):
    """SELECT and EXAMINE (``name`` tells which)."""

    mailbox: str
    condstore: bool = False
    qresync: QresyncParams | None = None


@dataclass(frozen=True, kw_only=True)
class MailboxCommand(Command):
    """CREATE, DELETE, SUBSCRIBE, UNSUBSCRIBE."""

    mailbox: str
    special_use: tuple[str, ...] = ()  # RFC 6154 section 3 CREATE (USE (...))


@dataclass(frozen=True, kw_only=True)
class Rename(Command):
    old: str
    new: str


@dataclass(frozen=True, kw_only=True)
class ListCommand(Command):
    """LIST (RFC 3501 6.3.8 and RFC 5258 extended form) and LSUB."""

    reference: str
    patterns: tuple[str, ...]
    selection: tuple[str, ...] = ()  # upper-case, e.g. SUBSCRIBED, SPECIAL-USE
    returns: tuple[str, ...] = ()  # upper-case, e.g. SUBSCRIBED, CHILDREN, SPECIAL-USE
    status_items: tuple[str, ...] = ()  # RFC 5819 RETURN (STATUS (...))
    # RFC 9590 RETURN (METADATA (entries)): entry names, lower-case, each
    # once; ``metadata_maxsize`` this server's MAXSIZE after them (None: not given).
    metadata: tuple[str, ...] = ()
    metadata_maxsize: int | None = None


@dataclass(frozen=True, kw_only=True)
class Status(Command):
    mailbox: str
    items: tuple[str, ...]  # upper-case


@dataclass(frozen=True, kw_only=True)
class Append(Command):
    """``message`` is whatever the connection stored the literal as: bytes,
    or an opaque spooled-file object for a large literal, or a
    :class:`Catenate` (RFC 4469). ``more``: the
    further messages of a MULTIAPPEND (RFC 3502), in order."""

    mailbox: str
    flags: tuple[str, ...]
    internal_date: dt.datetime | None
    message: object
    more: tuple[AppendMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class Catenate:
    """RFC 4469 section 5: ``CATENATE (cat-part *(SP cat-part))`` as an
    APPEND message. Each part is either a TEXT literal (bytes, or the
    connection's spooled-file object) or a URL (``str``, the astring as
    sent, resolved by the APPEND handler)."""

    parts: tuple[object | str, ...]


@dataclass(frozen=True, slots=True)
class AppendMessage:
    """One further message of a MULTIAPPEND (RFC 3502 section 6.3.11)."""

    flags: tuple[str, ...]
    internal_date: dt.datetime | None
    message: object


@dataclass(frozen=True, kw_only=True)
class Search(Command):
    key: SearchKey
    uid: bool
    charset: str | None = None
    returns: tuple[str, ...] | None = None  # RFC 4731 ESEARCH; None: plain SEARCH
    partial: tuple[int, int] | None = None  # RFC 9394 PARTIAL range, as sent (-1:-100 kept)


@dataclass(frozen=True, kw_only=True)
class Sort(Command):
    """RFC 5256 section 3 SORT; ``returns`` is RFC 5267 ESORT (None: plain)."""

    criteria: tuple[tuple[str, bool], ...]  # (key, reverse), most significant first
    key: SearchKey
    uid: bool
    charset: str
    returns: tuple[str, ...] | None = None
    partial: tuple[int, int] | None = None  # RFC 5267 section 4.4 / RFC 9394 section 3.1


@dataclass(frozen=True, kw_only=True)
class CancelUpdate(Command):
    """RFC 5267 section 4.3.5 CANCELUPDATE: the tags of the contexts to end."""

    tags: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Thread(Command):
    """RFC 5256 section 3 THREAD."""

    algorithm: str  # "ORDEREDSUBJECT" or "REFERENCES"
    key: SearchKey
    uid: bool
    charset: str


@dataclass(frozen=True, kw_only=True)
class Fetch(Command):
    sequence: SequenceSet
    attributes: tuple[FetchAttribute, ...]
    uid: bool
    changed_since: int | None = None  # RFC 7162 section 3.1.4
    vanished: bool = False  # RFC 7162 section 3.2.6


@dataclass(frozen=True, kw_only=True)
class Store(Command):
    sequence: SequenceSet
    mode: str  # "replace" | "add" | "remove"
    silent: bool
    flags: tuple[str, ...]
    uid: bool
    unchanged_since: int | None = None  # RFC 7162 section 3.1.3


@dataclass(frozen=True, kw_only=True)
class Copy(Command):
    """COPY and MOVE (RFC 6851); ``name`` tells which."""

    sequence: SequenceSet
    mailbox: str
    uid: bool


@dataclass(frozen=True, kw_only=True)
class UidExpunge(Command):
    """RFC 4315 section 2.1 UID EXPUNGE."""

    sequence: SequenceSet


@dataclass(frozen=True, kw_only=True)
class Id(Command):
    """RFC 2971; ``params`` None for NIL."""

    params: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True, kw_only=True)
class Enable(Command):
    capabilities: tuple[str, ...]  # upper-case


@dataclass(frozen=True, kw_only=True)
class Quota(Command):
    """RFC 9208 section 4.1: GETQUOTA and SETQUOTA name a quota root,
    GETQUOTAROOT a mailbox (in ``root``); SETQUOTA's (resource, limit) pairs."""

    root: str
    limits: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, kw_only=True)
class Compress(Command):
    """RFC 4978 section 3: COMPRESS <mechanism>."""

    mechanism: str  # upper-case


@dataclass(frozen=True, kw_only=True)
class GetMetadata(Command):
    """RFC 5464 section 4.2: entries of ``mailbox`` ("" the server's),
    names lower-case; ``depth`` "0", "1" or "infinity"; ``maxsize`` None
    when not given."""

    mailbox: str
    entries: tuple[str, ...]
    maxsize: int | None = None
    depth: str = "0"


@dataclass(frozen=True, kw_only=True)
class SetMetadata(Command):
    """RFC 5464 section 4.3: (entry, value) pairs in order, None (NIL) to
    remove; names lower-case."""

    mailbox: str
    values: tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True, kw_only=True)
class Acl(Command):
    """RFC 4314 section 3: SETACL (mailbox, identifier, mod-rights),
    DELETEACL and LISTRIGHTS (mailbox, identifier), GETACL and MYRIGHTS
    (mailbox)."""

    mailbox: str
    identifier: str | None = None
    rights: str | None = None


@dataclass(frozen=True)
class ParseError:
    """What the parser returns for a malformed command: answer
    ``<tag> BAD <message>`` (``*`` when no tag could be read)."""

    tag: str
    message: str
    code: str | None = field(default=None)  # e.g. BADCHARSET


@dataclass(frozen=True, slots=True)
class NotifyGroup:
    """One event group of NOTIFY SET (RFC 5465 section 8, event-group):
    ``filter`` upper-case (SELECTED, SELECTED-DELAYED, INBOXES, PERSONAL,
    SUBSCRIBED, SUBTREE, MAILBOXES), ``mailboxes`` the names SUBTREE and
    MAILBOXES take (decoded, INBOX upper-cased); ``events`` the event
    names as sent (case kept; None for NONE); ``fetch`` MessageNew's
    fetch attributes."""

    filter: str
    mailboxes: tuple[str, ...]
    events: tuple[str, ...] | None
    fetch: tuple[FetchAttribute, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Notify(Command):
    """RFC 5465 section 3: NOTIFY SET [STATUS] groups, or NOTIFY NONE
    (``groups`` empty)."""

    status: bool
    groups: tuple[NotifyGroup, ...]

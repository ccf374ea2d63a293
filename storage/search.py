"""Search criteria: a small tree covering every RFC 3501 section 6.4.4 key.

The IMAP parser builds it (resolving message sequence numbers to UIDs and
\\Recent to a UID floor, which are session state); the HTTP API builds it
from its query language; the storage backends evaluate it.

Mapping of RFC 3501 keys:
    ALL -> All(); ANSWERED/DELETED/DRAFT/FLAGGED/SEEN -> Flag(f, True);
    UN* -> Flag(f, False); KEYWORD/UNKEYWORD -> Flag(kw, ...);
    NEW -> And(Recent, Flag(SEEN, False)); OLD -> Not(Recent) (session side);
    BCC/CC/FROM/TO/SUBJECT -> Header(name, s); HEADER f s -> Header(f, s);
    BODY s -> Text("body", s); TEXT s -> Text("text", s);
    (the HTTP API's free text) -> Text("content", s);
    BEFORE/ON/SINCE -> Date("internal", op, d); SENT* -> Date("sent", op, d);
    SAVED* (RFC 8514) -> Date("saved", op, d); SAVEDATESUPPORTED -> All();
    LARGER/SMALLER -> Size(op, n); UID set / seq set -> Uids(set);
    NOT -> Not; OR -> Or; a list -> And; MODSEQ (RFC 7162) -> ModSeq(n).
Substring matches are case-insensitive (RFC 3501 section 6.4.4).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from storage.model import UidSet


@dataclass(frozen=True)
class All:
    pass


@dataclass(frozen=True)
class Flag:
    """A system flag (``\\Seen``) or keyword; ``present`` False for UN*."""

    flag: str
    present: bool = True


@dataclass(frozen=True)
class Header:
    """Header field ``name`` contains ``value`` (empty value: field exists)."""

    name: str
    value: str


@dataclass(frozen=True)
class Text:
    """``where`` "body": body text; "text": headers and body (RFC 3501
    TEXT: every header field, Received and DKIM lines included);
    "content": the subject, From, To and Cc fields and the body text, what a
    reader of the message sees (the HTTP API's free text). "content" is
    decided from stored columns alone, so the full-text index can answer it."""

    where: Literal["body", "text", "content"]
    value: str


@dataclass(frozen=True)
class Date:
    """Dates compare by calendar day, disregarding time and timezone.
    "saved": the RFC 8514 save date (its day in UTC)."""

    field: Literal["internal", "sent", "saved"]
    op: Literal["before", "on", "since"]
    date: dt.date


@dataclass(frozen=True)
class Size:
    op: Literal["larger", "smaller"]
    octets: int


@dataclass(frozen=True)
class Uids:
    uids: UidSet


@dataclass(frozen=True)
class ModSeq:
    """RFC 7162 section 3.1.5: entries with modseq >= ``modseq``."""

    modseq: int


@dataclass(frozen=True)
class Not:
    term: Criteria


@dataclass(frozen=True)
class Or:
    left: Criteria
    right: Criteria


@dataclass(frozen=True)
class And:
    terms: tuple[Criteria, ...]


Criteria = All | Flag | Header | Text | Date | Size | Uids | ModSeq | Not | Or | And

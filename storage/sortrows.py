"""What IMAP SORT and THREAD compare of each message (RFC 5256), read for a
whole mailbox in one call without building every message's parsed form.

:meth:`storage.api.MailStore.sort_rows` returns one :class:`SortRow` per
entry. The rebuild of a full ParsedMessage (body structure included) cost
about 80 us a message, 8 s for a SORT of 100,000, and even a plain
``json.loads`` of the stored form 3-5 s: the database picks the few fields
(:data:`SORT_PATHS`) and :func:`sort_row` reads only those.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from storage.imapstruct import JSON_VERSION
from storage.model import Address, ParsedMessage

# What sort_row needs of the stored parsed form (storage.imapstruct
# parsed_to_json): JSON paths the database extracts into one array, in this
# order. The envelope is a list in RFC 3501 section 7.4.2 order.
SORT_PATHS: tuple[tuple[str | int, ...], ...] = (
    ("env", 2),  # from
    ("env", 5),  # to
    ("env", 6),  # cc
    ("mid",),
    ("irt",),
    ("refs",),
    ("v",),
)


class SortRow(NamedTuple):
    """One entry's sort and thread inputs (a tuple: 100,000 are built per
    SORT of a big mailbox, and a frozen dataclass costs several times more)."""

    uid: int
    internal_date: float  # epoch seconds
    size: int
    sent_date: float | None  # epoch seconds; None: no usable Date header
    subject: str  # RFC 2047-decoded
    # The first address of From, To and Cc, group markers skipped (RFC 5256
    # and RFC 5957 compare no other): a 1-tuple, or () when there is none.
    from_: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]


def _first(rows: list[list[str | None]]) -> tuple[Address, ...]:
    """The first real address (a group marker has no host), as a 1-tuple."""
    for r in rows:
        if r[3] is not None and r[2] is not None:
            return (Address(r[0], r[1], r[2], r[3]),)
    return ()


def sort_row(
    uid: int,
    internal_micros: int,
    size: int,
    sent_date: float | None,
    subject: str,
    picked: str,
) -> SortRow:
    """A SortRow from an entry's columns, its message's subject and sent
    date columns, and ``picked``: the JSON array of SORT_PATHS taken from
    the stored parsed form. ValueError on an unknown version of that form,
    as storage.imapstruct.parsed_from_json."""
    from_, to, cc, mid, irt, refs, version = json.loads(picked)
    if version != JSON_VERSION:
        raise ValueError(f"unknown parsed-message JSON version {version!r}")
    return SortRow(
        uid=uid,
        internal_date=internal_micros / 1_000_000,
        size=size,
        sent_date=sent_date,
        subject=subject,
        from_=_first(from_),
        to=_first(to),
        cc=_first(cc),
        message_id=mid,
        in_reply_to=irt,
        references=tuple(refs),
    )


def sort_row_of(parsed: ParsedMessage, internal_micros: int, sent_date: float | None) -> SortRow:
    """The SortRow :func:`sort_row` reads back for a new entry of ``parsed``
    (uid 0: not known yet), from the message itself: its stored keys are
    computed from this at delivery (``sent_date`` as its messages row
    holds it)."""
    env = parsed.envelope

    def first(addresses: tuple[Address, ...]) -> tuple[Address, ...]:
        return next(((a,) for a in addresses if a.host is not None and a.mailbox is not None), ())

    return SortRow(
        uid=0,
        internal_date=internal_micros / 1_000_000,
        size=parsed.size,
        sent_date=sent_date,
        subject=parsed.subject or "",
        from_=first(env.from_),
        to=first(env.to),
        cc=first(env.cc),
        message_id=parsed.message_id,
        in_reply_to=parsed.in_reply_to,
        references=tuple(parsed.references),
    )

"""What SORT and THREAD compare (RFC 5256 section 2), computed per
command from the fields storage holds (envelope, parsed subject, sent and
internal dates, size): the path for a few matching messages, or a mailbox
whose entries lack stored keys. The key functions themselves are
storage.sortkeys', the same that compute the stored keys at ingest.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

from storage.sortkeys import BaseSubject, addr_mailbox, base_subject, casemap, display
from storage.sortrows import SortRow

__all__ = ["BaseSubject", "SortFields", "base_subject", "casemap", "sort_fields", "sort_messages"]


class SortFields(NamedTuple):
    """One message's sort and thread inputs, read once per command (a
    tuple: a SORT of 100,000 messages builds 100,000 of them, and a frozen
    dataclass took 0.6-0.8 s of that SORT to build)."""

    uid: int
    arrival: float  # internal date, epoch seconds
    date: float  # sent date (RFC 5256 section 2.2), else the internal date
    size: int
    subject: bytes  # casemap(base subject)
    base_subject: str
    is_reply: bool
    from_: bytes
    to: bytes
    cc: bytes
    display_from: bytes
    display_to: bytes
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]


_NO_SUBJECT = BaseSubject("", False)


def sort_fields(row: SortRow, keys: Collection[str] | None = None) -> SortFields:
    """The keys of one message, from what storage read for it. ``keys``:
    the SORT keys (or "SUBJECT" for THREAD) the command compares; the
    string keys not named are left empty (their extraction is most of
    the cost: a SORT by DATE of 100,000 messages need not decode a
    single address or subject). None: every key."""

    def wanted(key: str) -> bool:
        return keys is None or key in keys

    base = base_subject(row.subject) if wanted("SUBJECT") else _NO_SUBJECT
    return SortFields(
        uid=row.uid,
        arrival=row.internal_date,
        date=row.sent_date if row.sent_date is not None else row.internal_date,
        size=row.size,
        subject=casemap(base.text),
        base_subject=base.text,
        is_reply=base.is_reply,
        from_=casemap(addr_mailbox(row.from_)) if wanted("FROM") else b"",
        to=casemap(addr_mailbox(row.to)) if wanted("TO") else b"",
        cc=casemap(addr_mailbox(row.cc)) if wanted("CC") else b"",
        display_from=casemap(display(row.from_)) if wanted("DISPLAYFROM") else b"",
        display_to=casemap(display(row.to)) if wanted("DISPLAYTO") else b"",
        message_id=row.message_id,
        in_reply_to=row.in_reply_to,
        references=row.references,
    )


# SORT criteria (RFC 5256 section 3; RFC 5957 section 3 DISPLAYFROM/DISPLAYTO).
SORT_KEYS = {
    "ARRIVAL": lambda f: f.arrival,
    "CC": lambda f: f.cc,
    "DATE": lambda f: f.date,
    "FROM": lambda f: f.from_,
    "SIZE": lambda f: f.size,
    "SUBJECT": lambda f: f.subject,
    "TO": lambda f: f.to,
    "DISPLAYFROM": lambda f: f.display_from,
    "DISPLAYTO": lambda f: f.display_to,
}


def sort_messages(
    fields: Sequence[SortFields], criteria: Sequence[tuple[str, bool]]
) -> list[SortFields]:
    """``fields`` in UID order, sorted by ``criteria`` ((key, reverse) pairs,
    most significant first). Exact ties keep mailbox order whatever REVERSE
    says (RFC 5256 section 3: "sorted according to the order in which they
    appear in the mailbox"): Python's sort is stable also with
    ``reverse=True``, so sorting by the least significant key first gives
    exactly that. A key named again is dropped (its first use already
    decided every tie it could), so the cost is O(n log n) times at most
    the nine distinct keys, whatever a client sends."""
    distinct: dict[str, bool] = {}
    for name, reverse in criteria:
        distinct.setdefault(name, reverse)
    out = list(fields)
    for name, reverse in reversed(distinct.items()):
        out.sort(key=SORT_KEYS[name], reverse=reverse)
    return out

"""What SORT and THREAD compare (RFC 5256 section 2), computed once per
message from the fields storage already holds (envelope, parsed subject,
sent and internal dates, size).

Everything here is linear in the size of the header values it looks at:
the base-subject extraction walks the subject with two indexes and never
re-slices it, so "Re: " repeated 10,000 times or deeply nested "[fwd: ...]"
costs one pass (tests/unit/test_imap_sort_linear.py counts the steps).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from storage.model import Address
from storage.sortrows import SortRow
from storage.text import decode_words

# RFC 5256 section 2.1 ABNF pieces, case-insensitive ("re", "fw", "fwd" are
# compared with i;ascii-casemap). WSP is SP / HTAB; step (1) turned every
# run of whitespace into one space already.
_BLOB = re.compile(r"\[[^\[\]]*\][ \t]*")  # subj-blob = "[" *BLOBCHAR "]" *WSP
_REFWD = re.compile(r"(?:re|fwd?)[ \t]*(?:\[[^\[\]]*\][ \t]*)?:", re.I)  # subj-refwd
_SPACES = re.compile(r"[ \t\r\n]+")
_FWD_HDR = "[fwd:"  # subj-fwd-hdr; subj-fwd-trl is "]"
_FWD_TRAILER = "(fwd)"


@dataclass(frozen=True, slots=True)
class BaseSubject:
    """RFC 5256 section 2.1 step (7), and whether it was a reply or forward
    (section 4 step 5: the extraction removed a subj-refwd, a "(fwd)"
    subj-trailer, or a subj-fwd-hdr/subj-fwd-trl pair)."""

    text: str
    is_reply: bool


def base_subject(subject: str, counter: list[int] | None = None) -> BaseSubject:
    """The base subject of an already RFC 2047-decoded subject.

    ``counter`` (tests): its first item is increased once per loop step,
    so a test can check the work grows linearly with hostile input.
    """
    # Step (1): whitespace runs become one space (decoding was done at parse).
    s = _SPACES.sub(" ", subject)
    pos, end = 0, len(s)
    is_reply = False
    steps = 0
    while True:
        # Step (2): strip subj-trailer ("(fwd)" / WSP) from the end, repeatedly.
        while end > pos:
            steps += 1
            if s[end - 1] == " " or s[end - 1] == "\t":
                end -= 1
            elif end - pos >= 5 and s[end - 5 : end].lower() == _FWD_TRAILER:
                end -= 5
                is_reply = True
            else:
                break
        # Steps (3)-(5): strip subj-leader, then a subj-blob that is not the
        # whole remaining subject, until neither applies.
        while pos < end:
            steps += 1
            if s[pos] == " " or s[pos] == "\t":  # subj-leader = WSP
                pos += 1
                continue
            # subj-leader = *subj-blob subj-refwd: find where the blobs end.
            q = pos
            last_blob = pos
            while q < end and s[q] == "[":
                m = _BLOB.match(s, q, end)
                if m is None:
                    break
                steps += m.end() - q
                last_blob, q = q, m.end()
            m = _REFWD.match(s, q, end)
            if m is not None:
                steps += m.end() - q
                pos = m.end()
                is_reply = True
                continue
            if q == pos:
                break  # neither a leader nor a blob: done
            # Step (4), repeated over the blob run: each blob whose removal
            # leaves text goes (step (3) would fail again on the rest of the
            # run, at the same place, so it need not be tried again).
            pos = q if q < end else last_blob
            if q >= end:
                break
        # Step (6): "[fwd:" ... "]" around the whole text: remove, redo from (2).
        if end - pos >= 6 and s[pos : pos + 5].lower() == _FWD_HDR and s[end - 1] == "]":
            steps += 1
            pos += 5
            end -= 1
            is_reply = True
            continue
        break
    if counter is not None:
        counter[0] += steps
    return BaseSubject(s[pos:end], is_reply)


def casemap(text: str) -> bytes:
    """The i;ascii-casemap collation key (RFC 4790 section 9.2): octets of
    the UTF-8 form with a-z mapped to A-Z, compared as octets."""
    return text.encode("utf-8", "surrogatepass").upper()


def _first_address(addresses: Sequence[Address]) -> Address | None:
    """The first real address (group start/end markers have no host)."""
    for a in addresses:
        if a.host is not None and a.mailbox is not None:
            return a
    return None


def _addr_mailbox(addresses: Sequence[Address]) -> str:
    """RFC 5256 section 3: the addr-mailbox of the first address, or ""."""
    a = _first_address(addresses)
    return a.mailbox or "" if a is not None else ""


def _display(addresses: Sequence[Address]) -> str:
    """RFC 5957 section 3: the display name of the first address, decoded,
    else its addr-spec ("" when there is none)."""
    a = _first_address(addresses)
    if a is None:
        return ""
    if a.name:
        name = decode_words(a.name).strip()
        if name:
            return name
    return f"{a.mailbox}@{a.host}" if a.host else a.mailbox or ""


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
        from_=casemap(_addr_mailbox(row.from_)) if wanted("FROM") else b"",
        to=casemap(_addr_mailbox(row.to)) if wanted("TO") else b"",
        cc=casemap(_addr_mailbox(row.cc)) if wanted("CC") else b"",
        display_from=casemap(_display(row.from_)) if wanted("DISPLAYFROM") else b"",
        display_to=casemap(_display(row.to)) if wanted("DISPLAYTO") else b"",
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

"""The RFC 5256 (and RFC 5957) sort and thread keys of one message entry,
computed once, at ingest, and stored as columns of its
``mailbox_entries`` row (schema step ``_v31_sort_keys``), so that IMAP
SORT is an ORDER BY and THREAD a read of compact rows
(``SqlMailStore.sorted_uids`` and ``thread_rows``).

The same functions compute the keys for IMAP's in-memory path
(imapd.imap.sortkeys, imapd.imap.threads): a stored key is by
construction what that path would compare.

Everything here is linear in the size of the header values it looks at:
the base-subject extraction walks the subject with two indexes and never
re-slices it, so "Re: " repeated 10,000 times or deeply nested "[fwd: ...]"
costs one pass (tests/unit/test_imap_sort_linear.py counts the steps).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
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


def addr_mailbox(addresses: Sequence[Address]) -> str:
    """RFC 5256 section 3: the addr-mailbox of the first address, or ""."""
    a = _first_address(addresses)
    return a.mailbox or "" if a is not None else ""


def display(addresses: Sequence[Address]) -> str:
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


# --------------------------------------------------------------------------
# Message-IDs for THREAD=REFERENCES (RFC 5256 section 4)

_QUOTED = re.compile(r'\\(.)|"')


def normalize_msg_id(raw: str | None) -> str | None:
    """A msg-id in one spelling (RFC 5256 section 4: <"a"@b> and <a@b> are
    the same): angle brackets kept, quoting removed. None if not a msg-id.
    Not idempotent (a quoted-pair may leave a quote): apply once, to the
    header's value."""
    if not raw or len(raw) < 3 or raw[0] != "<" or raw[-1] != ">":
        return None
    return _QUOTED.sub(lambda m: m.group(1) or "", raw) if '"' in raw or "\\" in raw else raw


def thread_ids(
    message_id: str | None, in_reply_to: str | None, references: Sequence[str]
) -> tuple[str | None, tuple[str, ...]]:
    """RFC 5256 section 4 step 1: the message's own normalised ID (None:
    missing or invalid) and its references, normalised, invalid ones
    dropped: those of References, else the first msg-id of In-Reply-To."""
    refs = tuple(r for r in map(normalize_msg_id, references) if r is not None)
    if not refs:
        irt = normalize_msg_id(in_reply_to)
        if irt is not None:
            refs = (irt,)
    return normalize_msg_id(message_id), refs


def encode_thread_ids(own: str | None, refs: Sequence[str]) -> str:
    """:func:`thread_ids` as stored: ``own`` ("" for None) and each
    reference, joined by newlines (split by C code when read: a JSON
    decode per message cost a THREAD of 100,000 seconds). An ID with a
    newline, a NUL or a lone surrogate (text either database may refuse)
    makes it a JSON array ``[own, *refs]``, ASCII only; every normalised
    ID starts with "<", so a leading "[" tells the two apart."""
    ids = [own or "", *refs]
    joined = "\n".join(ids)
    if "\x00" not in joined and all("\n" not in i for i in ids):
        try:
            joined.encode("utf-8")
            return joined
        except UnicodeEncodeError:
            pass
    return json.dumps([own, *refs])


def decode_thread_ids(stored: str) -> tuple[str | None, tuple[str, ...]]:
    """The inverse of :func:`encode_thread_ids`."""
    if stored.startswith("["):
        own, *refs = json.loads(stored)
        return own, tuple(refs)
    own, *refs = stored.split("\n")
    return own or None, tuple(refs)


class EntryKeys(NamedTuple):
    """The stored keys of one entry: ``mailbox_entries`` columns of the
    same names (ARRIVAL and SIZE are its ``internal_date`` and ``size``)."""

    sort_date: float  # RFC 5256 section 2.2: sent date, else internal date
    sort_subject: bytes  # i;ascii-casemap of the base subject (section 2.1)
    sort_reply: bool  # the base-subject extraction removed a reply/forward mark
    sort_from: bytes  # i;ascii-casemap of the first From addr-mailbox (section 3)
    sort_to: bytes
    sort_cc: bytes
    sort_display_from: bytes  # RFC 5957 section 3
    sort_display_to: bytes
    thread_ids: str  # encode_thread_ids(*thread_ids(...))


KEY_COLUMNS: tuple[str, ...] = EntryKeys._fields


def entry_keys(row: SortRow) -> EntryKeys:
    """Every stored key of the entry ``row`` describes."""
    base = base_subject(row.subject)
    return EntryKeys(
        sort_date=row.sent_date if row.sent_date is not None else row.internal_date,
        sort_subject=casemap(base.text),
        sort_reply=base.is_reply,
        sort_from=casemap(addr_mailbox(row.from_)),
        sort_to=casemap(addr_mailbox(row.to)),
        sort_cc=casemap(addr_mailbox(row.cc)),
        sort_display_from=casemap(display(row.from_)),
        sort_display_to=casemap(display(row.to)),
        thread_ids=encode_thread_ids(*thread_ids(row.message_id, row.in_reply_to, row.references)),
    )


# One entry's stored THREAD inputs as read (``MailStore.thread_rows``): UID,
# EntryKeys.sort_date, .sort_subject, .sort_reply and .thread_ids, still
# encoded (decoded where the threading runs, see :func:`thread_input`). A
# plain tuple: 100,000 of them go to a worker process, and a NamedTuple
# costs a call per item to unpickle.
ThreadRow = tuple[int, float, bytes, bool, str]


class ThreadInput(NamedTuple):
    """What the threading of imapd.imap.threads reads of a message (the
    attributes it shares with imapd.imap.sortkeys.SortFields)."""

    uid: int
    date: float
    subject: bytes
    is_reply: bool


def thread_input(
    rows: Sequence[ThreadRow],
) -> tuple[list[ThreadInput], list[tuple[str | None, tuple[str, ...]]]]:
    """The threading inputs of ``rows``
    and each one's decoded :func:`thread_ids`."""
    return (
        [ThreadInput(r[0], r[1], bytes(r[2]), bool(r[3])) for r in rows],
        [decode_thread_ids(r[4]) for r in rows],
    )

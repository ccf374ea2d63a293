"""SORT, UID SORT (RFC 5256 section 3, with RFC 5267 ESORT result options;
CONTEXT=SORT's PARTIAL and UPDATE are imapd.imap.contexts)
and THREAD, UID THREAD (RFC 5256 section 3, ORDEREDSUBJECT and REFERENCES).

The matches come from the SEARCH machinery. Many of them
(STORED_KEYS_ROWS) are ordered by the keys stored with each entry at
ingest (storage.sortkeys): SORT is the database's ORDER BY over the
mailbox (``MailStore.sorted_uids``), the matches kept in that order, and
THREAD reads every entry's compact stored inputs in one query
(``MailStore.thread_rows``) and threads the matches in O(n log n)
(REFERENCES: imapd.imap.thread_refs, on flat lists). A few
matches, or a mailbox with entries written before the keys were stored:
their sort fields are read in one storage call (``MailStore.sort_rows``
of the matching UIDs), then sorted or threaded in memory
(imapd.imap.sortkeys, imapd.imap.threads). Threading, and the in-memory
sort, run on the event loop for a few messages, in the content pool's
worker processes for many (INLINE_ROWS).
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any, TypeVar

from imapd.imap import thread_cache
from imapd.imap.commands.message import esearch_response, matching_uids
from imapd.imap.contexts import MAX_SORT_CONTEXT, open_sort, refuse_reuse
from imapd.imap.mailbox_view import MailboxView
from imapd.imap.session import Reply, Session, no, ok
from imapd.imap.sortkeys import sort_fields, sort_messages
from imapd.imap.thread_refs import references_response
from imapd.imap.threads import encode_threads, ordered_subject, references
from imapd.imap.wire import commands as c
from storage.contentpool import ContentTimeout, content_pool
from storage.model import UidSet
from storage.sortkeys import ThreadRow, thread_input
from storage.sortrows import SortRow

T = TypeVar("T")

CHARSETS = ("UTF-8", "US-ASCII")


# RFC 5256 section 3 / RFC 3501 section 6.4.4: BADCHARSET lists what we take.
_BADCHARSET = no("Charset not supported", "BADCHARSET (UTF-8 US-ASCII)")


# Below this many messages the sorting or threading takes milliseconds and
# is done on the event loop; above it, in the content pool's worker
# processes (storage.contentpool), where it cannot hold this process's GIL
# while other sessions wait: 100,000 messages take seconds of pure Python.
INLINE_ROWS = 2000

# From this many matching messages on, SORT and THREAD use the stored keys
# (when every entry of the mailbox has them): the database orders or reads
# the whole mailbox, which costs more than reading a few matches' fields.
STORED_KEYS_ROWS = INLINE_ROWS

# RFC 5530 section 3: LIMIT, the command went past what the server allows
# (the content pool's time limit).
_TOO_MANY = no("Too many messages to sort in time", "LIMIT")


async def _matches(
    s: Session, charset: str, key: c.SearchKey
) -> tuple[MailboxView, list[int]] | None:
    """The selected view and the UIDs ``key`` matches, ascending; None if
    the charset is not one we take."""
    if charset not in CHARSETS:
        return None
    assert s.mail is not None and s.account is not None and s.selected is not None
    view = s.selected
    if s.has_updates:
        await s.sync(allow_expunge=False)  # no EXPUNGE while numbers are given out
    if _is_all(key):
        # Every message of the view (as SEARCH ALL answers), without a
        # storage search: those gone meanwhile have no stored row, and both
        # paths drop UIDs without one.
        gone = view.pending_vanished
        return view, [u for u in view.uids if u not in gone] if gone else list(view.uids)
    return view, await matching_uids(s, key)


def _is_all(key: c.SearchKey) -> bool:
    """Whether ``key`` is ALL (RFC 3501 section 6.4.4), alone or ANDed."""
    if isinstance(key, c.SearchAll):
        return True
    return isinstance(key, c.SearchAnd) and all(_is_all(k) for k in key.keys)


async def _rows(s: Session, view: MailboxView, uids: list[int]) -> list[SortRow]:
    """The sort rows of ``uids`` still in the view, UID order."""
    assert s.mail is not None and s.account is not None
    if not uids:
        return []
    rows = await s.box_mail.sort_rows(s.box_owner, view.mailbox.id, UidSet.of(uids))
    return [r for r in rows if view.contains(r.uid)]


def _kept(ordered: list[int], uids: list[int]) -> list[int]:
    """The UIDs of ``ordered`` (a whole mailbox's, in some order) that are
    among ``uids`` (the view's matches), in ``ordered``'s order: linear."""
    wanted = set(uids)
    return [u for u in ordered if u in wanted]


async def _off_loop(rows: list[Any], fn: Callable[..., T], *args: object) -> T:
    """``fn(rows, *args)``: here for a few rows, else in the content pool
    (ContentTimeout past its time limit)."""
    if len(rows) <= INLINE_ROWS:
        return fn(rows, *args)
    return await content_pool().run(fn, rows, *args)


def sorted_uids(
    rows: list[SortRow], keys: Collection[str], criteria: tuple[tuple[str, bool], ...]
) -> list[int]:
    """The UIDs of ``rows`` in SORT order (pure: runs in a worker process)."""
    return [f.uid for f in sort_messages([sort_fields(r, keys) for r in rows], criteria)]


def thread_response(rows: list[SortRow], algorithm: str, number: dict[int, int]) -> bytes:
    """The THREAD response's data for ``rows``, each message named by
    ``number[uid]`` (pure: runs in a worker process)."""
    fields = [sort_fields(r, ("SUBJECT",)) for r in rows]  # RFC 5256: base subjects
    top = ordered_subject(fields) if algorithm == "ORDEREDSUBJECT" else references(fields)
    return encode_threads(top, number)


def stored_thread_response(rows: list[ThreadRow], algorithm: str, numbers: Sequence[int]) -> bytes:
    """:func:`thread_response` from the stored keys (storage.sortkeys:
    base subject, date and normalised IDs computed at ingest by the same
    functions), each message named by its item of ``numbers`` (same
    order); pure: runs in a worker process. REFERENCES on flat lists
    (imapd.imap.thread_refs, the same answer as imapd.imap.threads)."""
    if algorithm != "ORDEREDSUBJECT":
        return references_response(rows, numbers)
    fields, _ = thread_input(rows)
    number = {f.uid: m for f, m in zip(fields, numbers, strict=True)}
    return encode_threads(ordered_subject(fields), number)


# A UID table (a list indexed by UID) is used up to this many slots per
# message, a dict past it (a mailbox with UIDs far apart).
_TABLE_SLOTS = 4

_Mapper = Callable[[Iterable[int]], Iterator[int]]


def _lookup(keys: Sequence[int], values: Iterable[int], low: int, top: int) -> _Mapper:
    """What maps UIDs (each from ``low`` to ``top``) to the item of
    ``values`` at their place in ``keys`` (distinct UIDs), 0 for others:
    a list indexed by UID minus ``low`` when they are dense enough, else
    a dict. Filled and read by C loops (``map``), no Python step per
    number (issue #24: 100,000 of them per SORT)."""
    if top - low <= _TABLE_SLOTS * len(keys) + 65536:
        table = [0] * (top - low + 1)
        deque(map(table.__setitem__, map(operator.sub, keys, repeat(low)), values), maxlen=0)
        return lambda uids: map(table.__getitem__, map(operator.sub, uids, repeat(low)))
    found = dict(zip(keys, values, strict=False))
    return lambda uids: map(found.get, uids, repeat(0))


def _seqs(view: MailboxView) -> _Mapper:
    """Each UID of the view to its sequence number (RFC 3501 section
    2.3.1.2: its place in the ascending UIDs); 0 for others between its
    lowest and highest UID."""
    uids = view.uids
    return _lookup(uids, range(1, len(uids) + 1), uids[0] if uids else 0, view.max_uid)


def _numbers(view: MailboxView, uids: list[int], uid: bool) -> list[int]:
    """What the response names ``uids`` (of the view) by, in their order:
    themselves, or their sequence numbers (one bisect each for a few)."""
    if uid:
        return uids
    if len(uids) <= INLINE_ROWS:
        return [view.seq_of(u) or 0 for u in uids]
    return list(_seqs(view)(uids))


def _numbered(view: MailboxView, matches: list[int], ordered: list[int], uid: bool) -> list[int]:
    """The numbers (UIDs, or sequence numbers) of ``matches`` (UIDs of the
    view, ascending) in the order of ``ordered`` (every UID of the
    mailbox in SORT order, as storage read it: some may be new to the view
    or not among the matches, and are left out)."""
    if not matches or not ordered:
        return []
    low, top = min(min(ordered), matches[0]), max(max(ordered), matches[-1])
    if uid:
        values: Iterable[int] = matches
    elif len(matches) == len(view.uids):
        values = range(1, len(matches) + 1)  # the matches are the whole view
    else:
        values = _seqs(view)(matches)
    return list(filter(None, _lookup(matches, values, low, top)(ordered)))


def _sort_line(numbers: list[int]) -> bytes:
    """The SORT response (RFC 5256 section 4): one join of C-made digits."""
    if not numbers:
        return b"* SORT\r\n"
    return b"* SORT " + " ".join(map(str, numbers)).encode("ascii") + b"\r\n"


async def handle_sort(s: Session, cmd: c.Sort) -> Reply:
    reuse = refuse_reuse(s, cmd)  # RFC 5267 section 4.3
    if reuse is not None:
        return reuse
    got = await _matches(s, cmd.charset, cmd.key)
    if got is None:
        return _BADCHARSET
    view, uids = got
    assert s.mail is not None and s.account is not None
    ordered: list[int] | None = None
    everything: list[int] | None = None
    rows: list[SortRow] | None = None
    if uids and len(uids) >= STORED_KEYS_ROWS:
        everything = await s.box_mail.sorted_uids(s.box_owner, view.mailbox.id, cmd.criteria)
    if everything is not None:
        numbers = _numbered(view, uids, everything, cmd.uid)
    else:
        rows = await _rows(s, view, uids)
        keys = frozenset(name for name, _ in cmd.criteria)
        try:
            ordered = await _off_loop(rows, sorted_uids, keys, cmd.criteria)
        except ContentTimeout:
            return _TOO_MANY
        numbers = _numbers(view, ordered, cmd.uid)
    if cmd.returns is None:
        s.write(_sort_line(numbers))
        return ok("SORT completed")
    if "UPDATE" in cmd.returns:
        if ordered is None:
            assert everything is not None
            ordered = _kept(everything, uids)
        if rows is None and len(ordered) <= MAX_SORT_CONTEXT:
            rows = await _rows(s, view, uids)  # the context keeps each result's keys
        try:
            await open_sort(s, cmd, rows or [], ordered)  # RFC 5267 section 4.3
        except ContentTimeout:
            return _TOO_MANY
    # RFC 5267 section 3.1: an ESEARCH response; RETURN () means ALL.
    returns = cmd.returns or ("ALL",)
    s.write(esearch_response(cmd.tag, cmd.uid, returns, numbers, partial=cmd.partial))
    return ok("SORT completed")


async def handle_thread(s: Session, cmd: c.Thread) -> Reply:
    got = await _matches(s, cmd.charset, cmd.key)
    if got is None:
        return _BADCHARSET
    view, uids = got
    try:
        threads = await _stored_threads(s, view, uids, cmd)
        if threads is None:
            rows = await _rows(s, view, uids)
            number = _number_map(view, [r.uid for r in rows], cmd.uid)
            threads = await _off_loop(rows, thread_response, cmd.algorithm, number)
    except ContentTimeout:
        return _TOO_MANY
    s.write(b"* THREAD" + (b" " + threads if threads else b"") + b"\r\n")
    return ok("THREAD completed")


async def _stored_threads(
    s: Session, view: MailboxView, uids: list[int], cmd: c.Thread
) -> bytes | None:
    """The THREAD answer from the stored keys, or from the answer kept for
    the same messages (imapd.imap.thread_cache); None: too few matches for
    that path, or entries without stored keys."""
    assert s.mail is not None and s.account is not None
    if not uids or len(uids) < STORED_KEYS_ROWS:
        return None
    kept = tuple(uids)  # the view's: _matches
    if cmd.uid:
        numbers = kept
    elif len(kept) == len(view.uids):
        numbers = tuple(range(1, len(kept) + 1))  # the matches are the whole view
    else:
        numbers = tuple(_numbers(view, uids, False))
    key = (s.account.id, view.mailbox.id, view.mailbox.uidvalidity, cmd.algorithm, cmd.uid)
    answer = thread_cache.get(key, kept, numbers)
    if answer is not None:
        return answer
    stored = await s.box_mail.thread_rows(s.box_owner, view.mailbox.id)
    if stored is None:
        return None
    if list(map(itemgetter(0), stored)) == uids:
        named: Sequence[int] = numbers  # storage has exactly the matches (C compares)
    else:
        number = dict(zip(kept, numbers, strict=True))
        stored = [r for r in stored if r[0] in number]
        named = [number[r[0]] for r in stored]
    answer = await _off_loop(stored, stored_thread_response, cmd.algorithm, named)
    if len(stored) == len(kept):  # none expunged meanwhile: the answer for ``kept``
        thread_cache.put(key, kept, numbers, answer)
    return answer


def _number_map(view: MailboxView, uids: list[int], uid: bool) -> dict[int, int]:
    return dict(zip(uids, _numbers(view, uids, uid), strict=True))

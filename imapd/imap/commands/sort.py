"""SORT, UID SORT (RFC 5256 section 3, with RFC 5267 ESORT result options;
CONTEXT=SORT's PARTIAL and UPDATE are imapd.imap.contexts)
and THREAD, UID THREAD (RFC 5256 section 3, ORDEREDSUBJECT and REFERENCES).

The matches come from the SEARCH machinery. Many of them
(STORED_KEYS_ROWS) are ordered by the keys stored with each entry at
ingest (storage.sortkeys): SORT is the database's ORDER BY over the
mailbox (``MailStore.sorted_uids``), the matches kept in that order, and
THREAD reads every entry's compact stored inputs in one query
(``MailStore.thread_rows``) and threads the matches in O(n log n). A few
matches, or a mailbox with entries written before the keys were stored:
their sort fields are read in one storage call (``MailStore.sort_rows``
of the matching UIDs), then sorted or threaded in memory
(imapd.imap.sortkeys, imapd.imap.threads). Threading, and the in-memory
sort, run on the event loop for a few messages, in the content pool's
worker processes for many (INLINE_ROWS).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

from imapd.imap import thread_cache
from imapd.imap.commands.message import esearch_response, matching_uids
from imapd.imap.contexts import MAX_SORT_CONTEXT, open_sort, refuse_reuse
from imapd.imap.mailbox_view import MailboxView
from imapd.imap.session import Reply, Session, no, ok
from imapd.imap.sortkeys import sort_fields, sort_messages
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


def stored_thread_response(rows: list[ThreadRow], algorithm: str, number: dict[int, int]) -> bytes:
    """:func:`thread_response` from the stored keys (storage.sortkeys:
    base subject, date and normalised IDs computed at ingest by the same
    functions); pure: runs in a worker process."""
    fields, ids = thread_input(rows)
    if algorithm == "ORDEREDSUBJECT":
        top = ordered_subject(fields)
    else:
        top = references(fields, ids=ids)
    return encode_threads(top, number)


def _numbers(view: MailboxView, uids: list[int], uid: bool) -> list[int]:
    """What the response names ``uids`` (of the view) by: themselves, or
    their sequence numbers (a position table past a few: one bisect each
    is slower for 100,000)."""
    if uid:
        return uids
    if len(uids) <= INLINE_ROWS:
        return [view.seq_of(u) or 0 for u in uids]
    position = {u: i for i, u in enumerate(view.uids, 1)}
    return [position.get(u, 0) for u in uids]


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
    rows: list[SortRow] | None = None
    if uids and len(uids) >= STORED_KEYS_ROWS:
        everything = await s.box_mail.sorted_uids(s.box_owner, view.mailbox.id, cmd.criteria)
        if everything is not None:
            ordered = _kept(everything, uids)
    if ordered is None:
        rows = await _rows(s, view, uids)
        keys = frozenset(name for name, _ in cmd.criteria)
        try:
            ordered = await _off_loop(rows, sorted_uids, keys, cmd.criteria)
        except ContentTimeout:
            return _TOO_MANY
    numbers = _numbers(view, ordered, cmd.uid)
    if cmd.returns is None:
        s.write(b"* SORT" + b"".join(b" %d" % n for n in numbers) + b"\r\n")
        return ok("SORT completed")
    if "UPDATE" in cmd.returns:
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
    numbers = tuple(_numbers(view, list(kept), cmd.uid))
    key = (s.account.id, view.mailbox.id, view.mailbox.uidvalidity, cmd.algorithm, cmd.uid)
    answer = thread_cache.get(key, kept, numbers)
    if answer is not None:
        return answer
    stored = await s.box_mail.thread_rows(s.box_owner, view.mailbox.id)
    if stored is None:
        return None
    wanted = set(kept)
    stored = [r for r in stored if r[0] in wanted]
    number = dict(zip(kept, numbers, strict=True))
    answer = await _off_loop(stored, stored_thread_response, cmd.algorithm, number)
    if len(stored) == len(kept):  # none expunged meanwhile: the answer for ``kept``
        thread_cache.put(key, kept, numbers, answer)
    return answer


def _number_map(view: MailboxView, uids: list[int], uid: bool) -> dict[int, int]:
    return dict(zip(uids, _numbers(view, uids, uid), strict=True))

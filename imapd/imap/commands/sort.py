"""SORT, UID SORT (RFC 5256 section 3, with RFC 5267 ESORT result options;
CONTEXT=SORT's PARTIAL and UPDATE are imapd.imap.contexts)
and THREAD, UID THREAD (RFC 5256 section 3, ORDEREDSUBJECT and REFERENCES).

The matches come from the SEARCH machinery; their sort fields are read in
one storage call per command (``MailStore.sort_rows`` of the matching
UIDs), then sorted or threaded in memory in O(n log n)
(imapd.imap.sortkeys, imapd.imap.threads): on the event loop for a few
messages, in the content pool's worker processes for many (INLINE_ROWS).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

from imapd.imap.commands.message import esearch_response, matching_uids
from imapd.imap.contexts import open_sort, refuse_reuse
from imapd.imap.mailbox_view import MailboxView
from imapd.imap.session import Reply, Session, no, ok
from imapd.imap.sortkeys import sort_fields, sort_messages
from imapd.imap.threads import encode_threads, ordered_subject, references
from imapd.imap.wire import commands as c
from storage.contentpool import ContentTimeout, content_pool
from storage.model import UidSet
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

# RFC 5530 section 3: LIMIT, the command went past what the server allows
# (the content pool's time limit).
_TOO_MANY = no("Too many messages to sort in time", "LIMIT")


async def _rows(
    s: Session, charset: str, key: c.SearchKey
) -> tuple[MailboxView, list[SortRow]] | None:
    """The selected view and the sort rows of the messages ``key``
    matches, UID order; None if the charset is not one we take."""
    if charset not in CHARSETS:
        return None
    assert s.mail is not None and s.account is not None and s.selected is not None
    view = s.selected
    if s.has_updates:
        await s.sync(allow_expunge=False)  # no EXPUNGE while numbers are given out
    uids = await matching_uids(s, key)
    if not uids:
        return view, []
    rows = await s.mail.sort_rows(s.account.id, view.mailbox.id, UidSet.of(uids))
    return view, [r for r in rows if view.contains(r.uid)]


async def _off_loop(rows: list[SortRow], fn: Callable[..., T], *args: object) -> T:
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


def _numbers(view: MailboxView, uids: list[int], uid: bool) -> list[int]:
    return uids if uid else [view.seq_of(u) or 0 for u in uids]


async def handle_sort(s: Session, cmd: c.Sort) -> Reply:
    reuse = refuse_reuse(s, cmd)  # RFC 5267 section 4.3
    if reuse is not None:
        return reuse
    got = await _rows(s, cmd.charset, cmd.key)
    if got is None:
        return _BADCHARSET
    view, rows = got
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
        try:
            await open_sort(s, cmd, rows, ordered)  # RFC 5267 section 4.3
        except ContentTimeout:
            return _TOO_MANY
    # RFC 5267 section 3.1: an ESEARCH response; RETURN () means ALL.
    returns = cmd.returns or ("ALL",)
    s.write(esearch_response(cmd.tag, cmd.uid, returns, numbers, partial=cmd.partial))
    return ok("SORT completed")


async def handle_thread(s: Session, cmd: c.Thread) -> Reply:
    got = await _rows(s, cmd.charset, cmd.key)
    if got is None:
        return _BADCHARSET
    view, rows = got
    uids = [r.uid for r in rows]
    number = dict(zip(uids, _numbers(view, uids, cmd.uid), strict=True))
    try:
        threads = await _off_loop(rows, thread_response, cmd.algorithm, number)
    except ContentTimeout:
        return _TOO_MANY
    s.write(b"* THREAD" + (b" " + threads if threads else b"") + b"\r\n")
    return ok("THREAD completed")

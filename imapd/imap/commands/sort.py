"""SORT, UID SORT (RFC 5256 section 3, with RFC 5267 ESORT result options)
and THREAD, UID THREAD (RFC 5256 section 3, ORDEREDSUBJECT and REFERENCES).

The matches come from the SEARCH machinery; their sort fields are read in
one storage call per command (``MailStore.sort_rows`` of the matching
UIDs), then sorted or threaded in memory in O(n log n)
(imapd.imap.sortkeys, imapd.imap.threads).
"""

from __future__ import annotations

from collections.abc import Collection

from imapd.imap.commands.message import esearch_response, matching_uids
from imapd.imap.mailbox_view import MailboxView
from imapd.imap.session import Reply, Session, no, ok
from imapd.imap.sortkeys import SortFields, sort_fields, sort_messages
from imapd.imap.threads import encode_threads, ordered_subject, references
from imapd.imap.wire import commands as c
from storage.model import UidSet

CHARSETS = ("UTF-8", "US-ASCII")


# RFC 5256 section 3 / RFC 3501 section 6.4.4: BADCHARSET lists what we take.
_BADCHARSET = no("Charset not supported", "BADCHARSET (UTF-8 US-ASCII)")


async def _fields(
    s: Session, charset: str, key: c.SearchKey, keys: Collection[str]
) -> tuple[MailboxView, list[SortFields]] | None:
    """The selected view and the sort fields (those of ``keys``, see
    sortkeys.sort_fields) of the messages ``key`` matches, UID order;
    None if the charset is not one we take."""
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
    return view, [sort_fields(r, keys) for r in rows if view.contains(r.uid)]


def _numbers(view: MailboxView, uids: list[int], uid: bool) -> list[int]:
    return uids if uid else [view.seq_of(u) or 0 for u in uids]


async def handle_sort(s: Session, cmd: c.Sort) -> Reply:
    got = await _fields(s, cmd.charset, cmd.key, {name for name, _ in cmd.criteria})
    if got is None:
        return _BADCHARSET
    view, fields = got
    ordered = sort_messages(fields, cmd.criteria)
    numbers = _numbers(view, [f.uid for f in ordered], cmd.uid)
    if cmd.returns is None:
        s.write(b"* SORT" + b"".join(b" %d" % n for n in numbers) + b"\r\n")
        return ok("SORT completed")
    # RFC 5267 section 3.1: an ESEARCH response; RETURN () means ALL.
    s.write(esearch_response(cmd.tag, cmd.uid, cmd.returns or ("ALL",), numbers))
    return ok("SORT completed")


async def handle_thread(s: Session, cmd: c.Thread) -> Reply:
    got = await _fields(s, cmd.charset, cmd.key, ("SUBJECT",))  # RFC 5256: base subjects
    if got is None:
        return _BADCHARSET
    view, fields = got
    if cmd.algorithm == "ORDEREDSUBJECT":
        top = ordered_subject(fields)
    else:
        top = references(fields)
    uids = [f.uid for f in fields]
    number = dict(zip(uids, _numbers(view, uids, cmd.uid), strict=True))
    threads = encode_threads(top, number)
    s.write(b"* THREAD" + (b" " + threads if threads else b"") + b"\r\n")
    return ok("THREAD completed")

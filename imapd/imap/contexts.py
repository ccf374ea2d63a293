"""RFC 5267 section 4 (CONTEXT=SEARCH, CONTEXT=SORT): PARTIAL results and
searches kept up to date with ADDTO / REMOVEFROM.

PARTIAL (section 4.4, with RFC 9394 section 3.1's ranges counted from the
end) is a slice of the result list: :func:`partial_item`.

An UPDATE context lives on the selected :class:`MailboxView` (so updates
cease when the mailbox is no longer selected, section 4.3) and holds the
UIDs its search matches, in result order. It learns of changes the way the
session's snapshot does, never by searching again:

* the view marks the UIDs that arrived or whose flags changed
  (``MailboxView.touched``); after each sync :func:`refresh` asks whether
  those few still match (the snapshot when it can, else one storage search
  restricted to them) and writes ADDTO / REMOVEFROM. New messages were
  announced by EXISTS already, as section 4.3.3 requires;
* :func:`expunging` writes REMOVEFROM for expunged members just before the
  EXPUNGE or VANISHED responses (section 4.3.4), while their sequence
  numbers are still valid.

A SORT context keeps one comparable key per member, so a new message is
placed by binary search (O(log n) comparisons), never by sorting again; a
batch of k changes costs O(k log n) plus, for big batches, one linear merge.
Search criteria are resolved once, when the context is made: message
sequence numbers and "$" name the messages they named then; a UID range
``n:*`` stays open for new mail.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from imapd.imap.sortkeys import SORT_KEYS, sort_fields
from imapd.imap.wire import commands as c
from imapd.imap.wire import encode
from storage.contentpool import ContentTimeout, content_pool
from storage.model import UidSet
from storage.sortrows import SortRow

if TYPE_CHECKING:
    from imapd.imap.mailbox_view import MailboxView
    from imapd.imap.session import Reply, Session
    from storage import search as q

# Live UPDATE contexts one session may keep (RFC 5267 section 4.3.1: at
# least one; past the limit the request gets NOUPDATE, the search still
# answers).
MAX_UPDATE_CONTEXTS = 5
# Results a SORT context may hold when made: each keeps a sort key in
# memory, about 200 bytes (a SEARCH context keeps four bytes a result, as
# the view does). New results may take it to twice that; past it the
# context ends with NOUPDATE.
MAX_SORT_CONTEXT = 20_000
# Sort keys computed on the event loop up to this many messages, else in
# the content pool (100,000 take seconds of pure Python).
_INLINE_KEYS = 2000
# Changes applied one by one below this many; above, the context is
# rebuilt in one pass (a list insert or delete moves the whole tail).
_ONE_BY_ONE = 32
# Position/set pairs per ADDTO or REMOVEFROM line of a SORT context.
_PAIRS_PER_LINE = 256


# ---------------------------------------------------------------- PARTIAL
def partial_slice(results: Sequence[int], rng: tuple[int, int]) -> Sequence[int]:
    """The results ``rng`` names (RFC 5267 section 4.4, RFC 9394 section
    3.1): 1 is the first result and -1 the last; 500:400 is 400:500; a
    range past the end names what there is (maybe nothing). O(size of the
    answer), whatever the range."""
    n = len(results)
    lo, hi = sorted((abs(rng[0]), abs(rng[1])))
    if rng[0] > 0:
        return results[lo - 1 : hi] if lo <= n else results[0:0]
    # Counted from the end: position p is index n - p.
    start, stop = max(n - hi, 0), n - lo + 1
    return results[start:stop] if stop > 0 else results[0:0]


def partial_item(results: Sequence[int], rng: tuple[int, int]) -> bytes:
    """The PARTIAL return data item: the range as the client sent it and the
    results in it, in result order, or NIL (RFC 9394 section 5 ret-data-partial)."""
    part = partial_slice(results, rng)
    got = encode.sequence_set(part) if part else b"NIL"
    return b"PARTIAL (%d:%d %s)" % (rng[0], rng[1], got)


# ---------------------------------------------------------------- contexts
class _SortKey:
    """One message's place in a SORT context: its values of the command's
    distinct sort keys, compared key by key with each key's REVERSE, exact
    ties in mailbox (UID) order. The same order as
    imapd.imap.sortkeys.sort_messages (RFC 5256 section 3)."""

    __slots__ = ("reverse", "uid", "values")

    def __init__(self, values: tuple[Any, ...], uid: int, reverse: tuple[bool, ...]) -> None:
        self.values = values
        self.uid = uid
        self.reverse = reverse

    def __lt__(self, other: _SortKey) -> bool:
        for mine, theirs, rev in zip(self.values, other.values, self.reverse, strict=True):
            if mine != theirs:
                return mine > theirs if rev else mine < theirs
        return self.uid < other.uid


def distinct_criteria(criteria: Iterable[tuple[str, bool]]) -> tuple[tuple[str, bool], ...]:
    """The sort keys that decide anything: a key named again is dropped,
    its first use keeps its REVERSE (as sort_messages does)."""
    out: dict[str, bool] = {}
    for name, reverse in criteria:
        out.setdefault(name, reverse)
    return tuple(out.items())


def sort_key_values(
    rows: list[SortRow], criteria: tuple[tuple[str, bool], ...]
) -> list[tuple[Any, ...]]:
    """Each row's values of ``criteria`` (distinct keys), in row order (pure:
    runs in a worker process for many rows)."""
    names = frozenset(name for name, _ in criteria)
    getters = [SORT_KEYS[name] for name, _ in criteria]
    out = []
    for row in rows:
        f = sort_fields(row, names)
        out.append(tuple(get(f) for get in getters))
    return out


class UpdateContext:
    """One searching command's results, kept current (RFC 5267 section 4.3).

    ``criteria`` is the search program as storage takes it, resolved when
    the command ran. A SEARCH context (``sort`` None) keeps its UIDs
    ascending and reports changes at position 0 (section 4.3.3 allows it
    for SEARCH); a SORT context keeps them in sort order with one
    :class:`_SortKey` each and reports positions. ``pending``: UIDs that
    arrived or changed since the context was last brought up to date.
    """

    def __init__(
        self,
        tag: str,
        uid: bool,
        criteria: q.Criteria,
        sort: tuple[tuple[str, bool], ...] | None,
    ) -> None:
        self.tag = tag
        self.uid = uid
        self.criteria = criteria
        self.sort = sort
        self.reverse = tuple(rev for _, rev in sort) if sort else ()
        self.uids = array("I")  # SEARCH: ascending
        self.order: list[_SortKey] = []  # SORT: result order
        self.key_of: dict[int, _SortKey] = {}  # SORT: uid -> its key
        self.pending: set[int] = set()

    def __len__(self) -> int:
        return len(self.order) if self.sort else len(self.uids)

    def __contains__(self, uid: int) -> bool:
        if self.sort:
            return uid in self.key_of
        i = bisect_left(self.uids, uid)
        return i < len(self.uids) and self.uids[i] == uid

    def key(self, uid: int, values: tuple[Any, ...]) -> _SortKey:
        return _SortKey(values, uid, self.reverse)

    def fill(self, uids: Iterable[int], keys: Iterable[_SortKey] = ()) -> None:
        """The command's own results: ascending UIDs, or for SORT the keys
        in sort order."""
        if self.sort:
            self.order = list(keys)
            self.key_of = {k.uid: k for k in self.order}
        else:
            self.uids = array("I", uids)

    # Each change returns (position, UIDs) pairs in the order the client
    # applies them (section 4.3.2); position 0 for SEARCH contexts.
    def insert(self, new: list[int], keys: dict[int, _SortKey]) -> list[tuple[int, list[int]]]:
        """Adds ``new`` (not members; for SORT, each with its key in ``keys``)."""
        if not new:
            return []
        if not self.sort:
            if len(new) <= _ONE_BY_ONE:
                for u in sorted(new):
                    insort(self.uids, u)
            else:
                self.uids = array("I", sorted({*self.uids, *new}))
            return [(0, sorted(new))]
        added = sorted(keys[u] for u in new)
        if len(added) <= _ONE_BY_ONE:
            for k in added:
                insort(self.order, k)
        else:
            self.order = sorted(self.order + added)  # two sorted runs: one merge
        for k in added:
            self.key_of[k.uid] = k
        # Inserted lowest first, each lands on its final position.
        return _runs([(bisect_left(self.order, k) + 1, k.uid) for k in added])

    def delete(self, gone: Iterable[int]) -> list[tuple[int, list[int]]]:
        """Removes those of ``gone`` that are members."""
        members = sorted(u for u in gone if u in self)
        if not members:
            return []
        if not self.sort:
            if len(members) <= _ONE_BY_ONE:
                for u in reversed(members):
                    del self.uids[bisect_left(self.uids, u)]
            else:
                drop = set(members)
                self.uids = array("I", [u for u in self.uids if u not in drop])
            return [(0, members)]
        at = sorted((bisect_left(self.order, self.key_of[u]) + 1, u) for u in members)
        if len(at) <= _ONE_BY_ONE:
            for pos, _ in reversed(at):
                del self.order[pos - 1]
        else:
            drop = set(members)
            self.order = [k for k in self.order if k.uid not in drop]
        for u in members:
            del self.key_of[u]
        # Highest positions first: each removal leaves the lower ones valid.
        return list(reversed(_runs(at)))


def _runs(at: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """(position, uid) pairs, ascending positions -> runs of consecutive
    positions as (first position, uids)."""
    out: list[tuple[int, list[int]]] = []
    for pos, uid in at:
        if out and out[-1][0] + len(out[-1][1]) == pos:
            out[-1][1].append(uid)
        else:
            out.append((pos, [uid]))
    return out


def _write(
    s: Session,
    view: MailboxView,
    ctx: UpdateContext,
    word: bytes,
    pairs: list[tuple[int, list[int]]],
) -> None:
    """ESEARCH lines carrying ``word`` (ADDTO or REMOVEFROM) for ``pairs``
    (RFC 5267 section 5 ret-data-addto / ret-data-removefrom), numbers as
    the context's command gave them (section 4.3.2: UIDs for UID commands)."""
    head = b'* ESEARCH (TAG "' + ctx.tag.encode() + b'")' + (b" UID " if ctx.uid else b" ")
    for i in range(0, len(pairs), _PAIRS_PER_LINE):
        items = []
        for pos, uids in pairs[i : i + _PAIRS_PER_LINE]:
            nums = uids if ctx.uid else [view.seq_of(u) or 0 for u in uids]
            items.append(b"%d %s" % (pos, encode.sequence_set(nums)))
        s.write(head + word + b" (" + b" ".join(items) + b")\r\n")


# ------------------------------------------------------------ the session
_TAG_REUSE = "Tag reuse"


def refuse_reuse(s: Session, cmd: c.Search | c.Sort) -> Reply | None:
    """RFC 5267 section 4.3: UPDATE under the tag of a live context is BAD."""
    from imapd.imap.session import bad

    view = s.selected
    if cmd.returns and "UPDATE" in cmd.returns and view is not None and cmd.tag in view.contexts:
        return bad(_TAG_REUSE)
    return None


def _cannot_keep(s: Session, cmd: c.Search | c.Sort) -> str | None:
    """Why an UPDATE context for ``cmd`` cannot be kept, or None."""
    view = s.selected
    assert view is not None
    if len(view.contexts) >= MAX_UPDATE_CONTEXTS:
        return "Too many contexts"
    # \\Recent (RECENT, NEW, OLD) changes with no event to tell of it, and
    # EMAILID/THREADID name messages by what they were when resolved.
    if _any_key(cmd.key, (c.SearchRecent, c.SearchObjectId)):
        return "Cannot keep this search up to date"
    return None


def _any_key(key: c.SearchKey, kinds: tuple[type, ...]) -> bool:
    stack = [key]
    while stack:
        k = stack.pop()
        if isinstance(k, kinds):
            return True
        if isinstance(k, c.SearchNot):
            stack.append(k.key)
        elif isinstance(k, c.SearchOr):
            stack += (k.left, k.right)
        elif isinstance(k, c.SearchAnd):
            stack += k.keys
    return False


def _noupdate(s: Session, tag: str, why: str) -> None:
    """RFC 5267 section 4.3.1: an untagged NO with NOUPDATE and the tag; the
    command's other return options are still answered."""
    quoted = tag.replace("\\", "\\\\").replace('"', '\\"')
    s.untagged(f'NO [NOUPDATE "{quoted}"] {why}')


def open_search(s: Session, cmd: c.Search, uids: list[int]) -> None:
    """SEARCH ... RETURN (UPDATE): keep ``uids`` (the matches, ascending)
    current, or answer NOUPDATE."""
    from imapd.imap.commands.message import search_criteria

    why = _cannot_keep(s, cmd)
    view = s.selected
    assert view is not None
    if why is not None:
        _noupdate(s, cmd.tag, why)
        return
    ctx = UpdateContext(cmd.tag, cmd.uid, search_criteria(cmd.key, view, live=True), None)
    ctx.fill(uids)
    view.contexts[cmd.tag] = ctx


async def _key_values(
    rows: list[SortRow], criteria: tuple[tuple[str, bool], ...]
) -> list[tuple[Any, ...]]:
    """:func:`sort_key_values`: here for a few rows, else in the content
    pool's worker processes (as SORT itself, imapd.imap.commands.sort)."""
    if len(rows) <= _INLINE_KEYS:
        return sort_key_values(rows, criteria)
    return await content_pool().run(sort_key_values, rows, criteria)


async def open_sort(s: Session, cmd: c.Sort, rows: list[SortRow], ordered: list[int]) -> None:
    """SORT ... RETURN (UPDATE): keep ``ordered`` (the sorted UIDs of
    ``rows``) current, or answer NOUPDATE. Raises ContentTimeout as SORT's
    own sorting does."""
    from imapd.imap.commands.message import search_criteria

    why = _cannot_keep(s, cmd)
    if why is None and len(ordered) > MAX_SORT_CONTEXT:
        why = "Too many results to keep sorted"
    view = s.selected
    assert view is not None
    if why is not None:
        _noupdate(s, cmd.tag, why)
        return
    criteria = distinct_criteria(cmd.criteria)
    ctx = UpdateContext(cmd.tag, cmd.uid, search_criteria(cmd.key, view, live=True), criteria)
    values = await _key_values(rows, criteria)
    by_uid = {row.uid: ctx.key(row.uid, v) for row, v in zip(rows, values, strict=True)}
    ctx.fill((), [by_uid[u] for u in ordered])
    view.contexts[cmd.tag] = ctx


def cancel(view: MailboxView, tags: Iterable[str]) -> list[str]:
    """RFC 5267 section 4.3.5: ends the contexts named; returns the tags
    that name none (then none is ended)."""
    tags = list(tags)
    unknown = [t for t in tags if t not in view.contexts]
    if not unknown:
        for t in tags:
            del view.contexts[t]
    return unknown


def expunging(s: Session, view: MailboxView, gone: set[int]) -> None:
    """REMOVEFROM for the members of ``gone`` (RFC 5267 section 4.3.4),
    written before the EXPUNGE/VANISHED responses for them, while their
    sequence numbers are still valid."""
    for ctx in view.contexts.values():
        ctx.pending -= gone
        pairs = ctx.delete(gone)
        if pairs:
            _write(s, view, ctx, b"REMOVEFROM", pairs)


async def refresh(s: Session, view: MailboxView) -> None:
    """Brings every context up to date with the messages that arrived or
    changed (``view.touched``): after EXISTS (section 4.3.3), at any
    point the RFC allows untagged responses (section 4.3.2). A failed
    storage call leaves them pending for the next time."""
    from imapd.imap.commands.message import matching_among

    if view.touched:
        touched, view.touched = view.touched, set()
        for ctx in view.contexts.values():
            ctx.pending |= touched
    assert s.mail is not None and s.account is not None
    for ctx in list(view.contexts.values()):
        if not ctx.pending:
            continue
        gone = view.pending_vanished
        look = sorted(u for u in ctx.pending if view.contains(u) and u not in gone)
        matched = await matching_among(s, ctx.criteria, look) if look else set()
        new = [u for u in look if u in matched and u not in ctx]
        keys: dict[int, _SortKey] = {}
        if ctx.sort and new:
            rows = await s.box_mail.sort_rows(s.box_owner, view.mailbox.id, UidSet.of(new))
            try:
                values = await _key_values(rows, ctx.sort)
            except ContentTimeout:  # past the pool's time limit: cannot keep it
                del view.contexts[ctx.tag]
                _noupdate(s, ctx.tag, "Too many results to keep sorted")
                continue
            keys = {r.uid: ctx.key(r.uid, v) for r, v in zip(rows, values, strict=True)}
            new = [u for u in new if u in keys]  # expunged meanwhile: its EXPUNGE comes
        # Every storage call is done: change and tell in one step.
        if ctx.sort and len(ctx) + len(new) > 2 * MAX_SORT_CONTEXT:
            # Section 4.3.1: the server no longer keeps this context.
            del view.contexts[ctx.tag]
            _noupdate(s, ctx.tag, "Too many results to keep sorted")
            continue
        left = ctx.delete(u for u in look if u not in matched)
        added = ctx.insert(new, keys)
        ctx.pending.clear()
        if left:
            _write(s, view, ctx, b"REMOVEFROM", left)
        if added:
            _write(s, view, ctx, b"ADDTO", added)

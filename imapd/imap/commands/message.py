"""Selected-state commands: CHECK, CLOSE, UNSELECT, EXPUNGE, UID EXPUNGE,
SEARCH, STORE, COPY, MOVE, and IDLE (RFC 3501 section 6.4; RFC 3691, 4315,
4731, 6851, 2177, 7162)."""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from delivery.learn import learn_moved
from imapd.imap import notify
from imapd.imap.contexts import cancel, open_search, partial_item, partial_slice, refuse_reuse
from imapd.imap.mailbox_view import MailboxView
from imapd.imap.namespace import in_other_users
from imapd.imap.session import Reply, Session, State, bad, no, ok
from imapd.imap.wire import commands as c
from imapd.imap.wire import encode
from storage import search as q
from storage.acl import MailboxAccess, flag_rights, no_right
from storage.errors import ErrorKind, StorageError
from storage.model import Mailbox, MessageEntry, StoreMode, UidSet

_MODES = {"replace": StoreMode.REPLACE, "add": StoreMode.ADD, "remove": StoreMode.REMOVE}


def _view(s: Session) -> MailboxView:
    assert s.selected is not None
    return s.selected


def _ids(s: Session) -> tuple[int, int]:
    """The selected mailbox's owner and id (another account's when shared)."""
    assert s.selected is not None
    return s.box_owner, s.selected.mailbox.id


async def handle_check(s: Session, cmd: c.Command) -> Reply:
    await s.sync(poll=True)
    return ok("CHECK completed")


async def handle_close(s: Session, cmd: c.Command) -> Reply:
    view = _view(s)
    # RFC 4314 section 4: CLOSE expunges only with "e", else silently not.
    may_expunge = s.shared is None or "e" in s.shared.rights
    if cmd.name == "CLOSE" and not view.read_only and may_expunge:
        # RFC 3501 section 6.4.2: expunge silently, no EXPUNGE responses.
        await s.box_mail.expunge(*_ids(s))
    s.selected = None
    s.select_shared(None)
    s.state = State.AUTHENTICATED
    return ok(f"{cmd.name} completed")


async def handle_expunge(s: Session, cmd: c.Command) -> Reply:
    view = _view(s)
    if view.read_only:
        return no("Mailbox is read-only", "READ-ONLY")
    assert s.mail is not None
    uids = None
    if isinstance(cmd, c.UidExpunge):  # RFC 4315 section 2.1
        wanted = view.resolve(cmd.sequence, uid=True)
        if not wanted:
            return ok("UID EXPUNGE completed")
        uids = UidSet.of(wanted)
    gone = await s.box_mail.expunge(*_ids(s), uids)
    if gone:
        s.announce_expunge(view, set(gone))  # only those in the snapshot are announced
    return ok(f"{cmd.name} completed")


def search_criteria(key: c.SearchKey, view: MailboxView, live: bool = False) -> q.Criteria:
    """The wire search AST -> storage criteria, resolving what only the
    session knows: sequence numbers, ``*`` and \\Recent. ``live`` (an RFC
    5267 UPDATE context, matched again as mail arrives): a UID range
    ``n:*`` starting at or below the highest UID stays open upwards, so
    new mail falls in it as it does for a client's ``*``."""
    if isinstance(key, c.SearchAll):
        return q.All()
    if isinstance(key, c.SearchFlag):
        return q.Flag(key.flag, key.present)
    if isinstance(key, c.SearchHeader):
        return q.Header(key.name, key.value)
    if isinstance(key, c.SearchText):
        return q.Text("body" if key.where == "body" else "text", key.value)
    if isinstance(key, c.SearchDate):
        return q.Date(key.field, key.op, key.date)  # type: ignore[arg-type]
    if isinstance(key, c.SearchSize):
        return q.Size(key.op, key.octets)  # type: ignore[arg-type]
    if isinstance(key, c.SearchRecent):
        recent = q.Uids(UidSet.of(view.recent))
        return recent if key.recent else q.Not(recent)
    if isinstance(key, c.SearchSequence):
        if live and key.uid and not key.set.saved:
            return q.Uids(_open_uid_set(key.set, view.max_uid))
        return q.Uids(UidSet.of(view.resolve(key.set, key.uid, strict=False)))
    if isinstance(key, c.SearchModSeq):
        return q.ModSeq(key.modseq)
    if isinstance(key, c.SearchNot):
        return q.Not(search_criteria(key.key, view, live))
    if isinstance(key, c.SearchOr):
        return q.Or(search_criteria(key.left, view, live), search_criteria(key.right, view, live))
    if isinstance(key, c.SearchAnd):
        return q.And(tuple(search_criteria(k, view, live) for k in key.keys))
    raise TypeError(f"unknown search key {key!r}")


def _open_uid_set(seqset: c.SequenceSet, top: int) -> UidSet:
    """A UID set with ``n:*`` (n <= ``top``, the highest UID, or any n in an
    empty mailbox) open upwards;
    any other ``*`` is ``top`` (RFC 3501 section 9: "*" is the largest
    UID in use, and n:* with n above it names that one)."""
    ranges: list[tuple[int, int | None]] = []
    for a, b in seqset.ranges:
        start = a if b is None else b if a is None else None  # n of n:* or *:n
        if start is not None and (start <= top or not top):  # empty: all to come
            ranges.append((start, None))
        else:
            lo, hi = top if a is None else a, top if b is None else b
            ranges.append((min(lo, hi), max(lo, hi)))
    return UidSet.from_ranges(ranges)


_LOCAL = (q.All, q.Flag, q.Uids, q.ModSeq, q.Size)


def _local(crit: q.Criteria) -> bool:
    """Whether the snapshot alone can answer (no header, text or date keys)."""
    if isinstance(crit, _LOCAL):
        return True
    if isinstance(crit, q.Not):
        return _local(crit.term)
    if isinstance(crit, q.Or):
        return _local(crit.left) and _local(crit.right)
    if isinstance(crit, q.And):
        return all(_local(t) for t in crit.terms)
    return False


def _compile(crit: q.Criteria) -> Callable[[MessageEntry], bool]:
    """RFC 3501 section 6.4.4 semantics for the keys :func:`_local` accepts,
    as one predicate (UID sets tested by bisection, not range by range)."""
    if isinstance(crit, q.All):
        return lambda e: True
    if isinstance(crit, q.Flag):
        flag, present = crit.flag, crit.present
        return lambda e: (flag in e.flags) == present
    if isinstance(crit, q.Uids):
        starts = [a for a, _ in crit.uids.ranges]
        ends = [b for _, b in crit.uids.ranges]

        def in_set(e: MessageEntry) -> bool:
            i = bisect_right(starts, e.uid) - 1
            return i >= 0 and (ends[i] is None or e.uid <= ends[i])  # type: ignore[operator]

        return in_set
    if isinstance(crit, q.ModSeq):
        floor = crit.modseq
        return lambda e: e.modseq >= floor
    if isinstance(crit, q.Size):
        n = crit.octets
        return (lambda e: e.size > n) if crit.op == "larger" else (lambda e: e.size < n)
    if isinstance(crit, q.Not):
        inner = _compile(crit.term)
        return lambda e: not inner(e)
    if isinstance(crit, q.Or):
        left, right = _compile(crit.left), _compile(crit.right)
        return lambda e: left(e) or right(e)
    if isinstance(crit, q.And):
        terms = [_compile(t) for t in crit.terms]
        return lambda e: all(t(e) for t in terms)
    raise TypeError(f"not a local search key: {crit!r}")


def _any_key(key: c.SearchKey, kind: type) -> bool:
    """Whether ``key`` holds a key of type ``kind`` at any depth."""
    if isinstance(key, kind):
        return True
    if isinstance(key, c.SearchNot):
        return _any_key(key.key, kind)
    if isinstance(key, c.SearchOr):
        return _any_key(key.left, kind) or _any_key(key.right, kind)
    if isinstance(key, c.SearchAnd):
        return any(_any_key(k, kind) for k in key.keys)
    return False


def _uses_modseq(key: c.SearchKey) -> bool:
    return _any_key(key, c.SearchModSeq)


def _modseq_reported_for(cmd: c.Search, uids: list[int]) -> list[int]:
    """The matches (ascending UIDs) whose highest mod-sequence a MODSEQ
    search reports: all of them (RFC 7162 section 3.1.5), or with RETURN
    MIN and/or MAX alone, the messages returned (RFC 4731 section 3.1)."""
    wanted = set(cmd.returns or ()) - {"SAVE"}
    if not uids or not wanted or not wanted <= {"MIN", "MAX"}:
        return uids
    return [u for u, opt in ((uids[0], "MIN"), (uids[-1], "MAX")) if opt in wanted]


def saved_result(
    returns: tuple[str, ...], uids: list[int], partial: tuple[int, int] | None = None
) -> list[int]:
    """What RETURN (SAVE ...) keeps of the matches (ascending UIDs), RFC 5182
    section 2.1: with MIN, MAX and/or PARTIAL but neither ALL nor COUNT,
    only the messages they return (RFC 9394 section 3.1 for PARTIAL);
    otherwise every match."""
    wanted = set(returns)
    if not uids or wanted & {"ALL", "COUNT"} or not wanted & {"MIN", "MAX", "PARTIAL"}:
        return uids
    kept = {u for u, opt in ((uids[0], "MIN"), (uids[-1], "MAX")) if opt in wanted}
    if partial is not None:
        kept.update(partial_slice(uids, partial))
    return sorted(kept)


async def _resolve_objectids(s: Session, key: c.SearchKey) -> c.SearchKey:
    """EMAILID and THREADID keys (RFC 8474 section 6) -> UID sets: the
    mailbox's entries are read once and indexed by message row, so each key
    costs one lookup however many the command holds. THREADID matches
    nothing: every THREADID is NIL here (section 5.2)."""
    assert s.mail is not None and s.account is not None
    ids = await s.ctx.object_ids()
    by_row: dict[int, list[int]] = {}
    for e in await s.box_mail.uids(*_ids(s)):
        by_row.setdefault(e.message_id, []).append(e.uid)

    def swap(k: c.SearchKey) -> c.SearchKey:
        if isinstance(k, c.SearchObjectId):
            row = ids.decode("M", s.box_owner, k.value) if k.kind == "EMAILID" else None
            uids = by_row.get(row, []) if row is not None else []
            return c.SearchSequence(c.SequenceSet(tuple((u, u) for u in uids)), uid=True)
        if isinstance(k, c.SearchNot):
            return c.SearchNot(swap(k.key))
        if isinstance(k, c.SearchOr):
            return c.SearchOr(swap(k.left), swap(k.right))
        if isinstance(k, c.SearchAnd):
            return c.SearchAnd(tuple(swap(x) for x in k.keys))
        return k

    return swap(key)


async def matching_uids(s: Session, key: c.SearchKey) -> list[int]:
    """The UIDs of the snapshot ``key`` matches, ascending (SEARCH, SORT and
    THREAD): answered from the snapshot when it can, else by storage."""
    view = _view(s)
    assert s.mail is not None
    if _any_key(key, c.SearchObjectId):
        key = await _resolve_objectids(s, key)
    criteria = search_criteria(key, view)
    known = view.entries
    if _local(criteria) and len(known) == view.exists:
        # Every entry was read: flags, UIDs, sizes and modseqs are in the
        # snapshot, no storage trip.
        gone = view.pending_vanished
        match = _compile(criteria)
        uids = [u for u in view.uids if u not in gone and match(known[u])]
    else:
        # The snapshot is lazy (MailboxView): storage decides, in SQL
        # where it can; only what this session has seen is reported.
        found = await s.box_mail.search(*_ids(s), criteria)
        uids = [u for u in found if view.contains(u)]
    return uids


async def matching_among(s: Session, criteria: q.Criteria, uids: list[int]) -> set[int]:
    """Which of ``uids`` (ascending, in the snapshot) ``criteria`` matches
    now (RFC 5267 UPDATE contexts): from the snapshot's entries when it
    can, else one storage search restricted to them."""
    view = _view(s)
    known = view.entries
    if _local(criteria) and all(u in known for u in uids):
        match = _compile(criteria)
        return {u for u in uids if match(known[u])}
    restricted = q.And((criteria, q.Uids(UidSet.of(uids))))
    return set(await s.box_mail.search(*_ids(s), restricted))


async def handle_search(s: Session, cmd: c.Search) -> Reply:
    view = _view(s)
    reuse = refuse_reuse(s, cmd)
    if reuse is not None:
        return reuse
    saving = cmd.returns is not None and "SAVE" in cmd.returns
    if saving:
        view.saved = []  # RFC 5182 section 2.1: a failed SEARCH leaves "$" empty
    if cmd.charset is not None and cmd.charset not in ("UTF-8", "US-ASCII"):
        # RFC 3501 section 6.4.4: BADCHARSET lists what we take.
        return no(f"Charset {cmd.charset[:40]} not supported", "BADCHARSET (UTF-8 US-ASCII)")
    if s.has_updates:
        await s.sync(allow_expunge=False)  # current flags; no EXPUNGE during SEARCH
    uids = await matching_uids(s, cmd.key)
    known = view.entries
    top_modseq = 0
    if _uses_modseq(cmd.key):
        s.use_condstore()
        reported = _modseq_reported_for(cmd, uids)
        await s.read_entries(view, reported)
        top_modseq = max((known[u].modseq for u in reported if u in known), default=0)
    modseq_note = b" (MODSEQ %d)" % top_modseq if top_modseq else b""
    numbers = uids if cmd.uid else [view.seq_of(u) or 0 for u in uids]
    if cmd.returns is None and not s.rev2:
        s.write(b"* SEARCH" + b"".join(b" %d" % n for n in numbers) + modseq_note + b"\r\n")
        return ok("SEARCH completed")
    if saving:
        view.saved = saved_result(cmd.returns, uids, cmd.partial)  # type: ignore[arg-type]
        if cmd.returns == ("SAVE",):
            return ok("SEARCH completed, result saved")  # RFC 5182 2.1: no ESEARCH
    if "UPDATE" in (cmd.returns or ()):
        open_search(s, cmd, uids)  # RFC 5267 section 4.3
    # RFC 4731 ESEARCH; RETURN () means ALL (also beside SAVE alone: never here),
    # and so does no RETURN at all in IMAP4rev2 (RFC 9051 section 6.4.4).
    wanted = tuple(r for r in cmd.returns or () if r != "SAVE") or ("ALL",)
    extra = b"MODSEQ %d" % top_modseq if top_modseq else b""  # RFC 7162 section 3.1.5
    s.write(esearch_response(cmd.tag, cmd.uid, wanted, numbers, extra, cmd.partial))
    return ok("SEARCH completed")


async def handle_cancelupdate(s: Session, cmd: c.CancelUpdate) -> Reply:
    """RFC 5267 section 4.3.5: no more updates for the contexts named. A tag
    naming no live context is a client error: BAD, and none is ended."""
    unknown = cancel(_view(s), cmd.tags)
    if unknown:
        return bad(f"No update context for tag {unknown[0][:64]}")
    return ok("CANCELUPDATE completed")


def esearch_response(
    tag: str,
    uid: bool,
    wanted: tuple[str, ...],
    numbers: list[int],
    extra: bytes = b"",
    partial: tuple[int, int] | None = None,
) -> bytes:
    """The ESEARCH line (RFC 4731 section 3.1) for ``numbers`` in result
    order: MIN and MAX are its first and last (for SORT, RFC 5267 section
    3.1, the first and last in sort order), ALL keeps the order, and so
    does PARTIAL (RFC 5267 section 4.4), which is sent even for no
    results. CONTEXT and UPDATE return nothing here."""
    parts = [b'* ESEARCH (TAG "' + tag.encode() + b'")']
    if uid:
        parts.append(b"UID")
    if numbers:
        if "MIN" in wanted:
            parts.append(b"MIN %d" % numbers[0])
        if "MAX" in wanted:
            parts.append(b"MAX %d" % numbers[-1])
        if "ALL" in wanted:
            parts.append(b"ALL " + encode.sequence_set(numbers))
    if partial is not None:
        parts.append(partial_item(numbers, partial))
    if "COUNT" in wanted:
        parts.append(b"COUNT %d" % len(numbers))
    if extra:
        parts.append(extra)
    return b" ".join(parts) + b"\r\n"


async def handle_store(s: Session, cmd: c.Store) -> Reply:
    view = _view(s)
    if view.read_only:
        return no("Mailbox is read-only", "READ-ONLY")
    assert s.mail is not None
    uids = view.resolve(cmd.sequence, cmd.uid)
    if cmd.unchanged_since is not None:
        s.use_condstore()
    if not uids:
        return ok("STORE completed")
    result = await s.box_mail.store_flags(
        *_ids(s), UidSet.of(uids), _MODES[cmd.mode], cmd.flags, cmd.unchanged_since
    )
    updated = {}
    for e in result.updated:
        if view.contains(e.uid):
            view.update(e)
            updated[e.uid] = e.modseq
    if not cmd.silent:
        await s.read_entries(view, uids)  # the flags of those the STORE left alone
    s.announce_flags(view)  # RFC 3501 section 7.2.6: a new keyword, before its FETCH
    modified = set(result.modified)
    for uid in uids:
        seq = view.seq_of(uid)
        if seq is None or uid in modified or uid in view.pending_vanished:
            continue
        items: list[bytes] = []
        if cmd.uid or "QRESYNC" in s.enabled:
            items.append(b"UID %d" % uid)
        if not cmd.silent:
            entry = view.entries.get(uid)
            if entry is None:
                continue  # expunged elsewhere; the client hears of it at the next sync
            flags = entry.flags
            items.append(b"FLAGS " + encode.flags(s.display_flags(view, uid, flags)))
        if s.condstore and uid in updated:
            # RFC 7162 section 3.1.3: MODSEQ is sent even for .SILENT.
            items.append(b"MODSEQ (%d)" % updated[uid])
        if cmd.silent and not (s.condstore and uid in updated):
            continue
        s.write(b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n")
    if modified:
        mod = sorted(modified) if cmd.uid else sorted(view.seq_of(u) or 0 for u in modified)
        return ok("Conditional STORE failed", "MODIFIED " + encode.sequence_set(mod).decode())
    return ok("STORE completed")


def _copyuid(uidvalidity: int, pairs: tuple[tuple[int, int], ...]) -> str:
    pairs = tuple(sorted(pairs))
    src = [a for a, _ in pairs]
    dst = [b for _, b in pairs]
    if all(dst[i] < dst[i + 1] for i in range(len(dst) - 1)):
        return (
            f"COPYUID {uidvalidity} {encode.sequence_set(src).decode()} "
            f"{encode.sequence_set(dst).decode()}"
        )
    return f"COPYUID {uidvalidity} {','.join(map(str, src))} {','.join(map(str, dst))}"


def _learn(
    s: Session, view: MailboxView, dest: Mailbox, pairs: tuple[tuple[int, int], ...]
) -> None:
    """Into Junk teaches spam, out of it ham (delivery/learn.py): queued,
    never delaying this reply."""
    assert s.account is not None
    learn_moved(s.ctx.settings, s.storage, s.account, view.mailbox, dest, pairs)


async def handle_copy(s: Session, cmd: c.Copy) -> Reply:
    view = _view(s)
    assert s.mail is not None and s.account is not None
    move = cmd.name.endswith("MOVE")
    if move and view.read_only:
        return no("Mailbox is read-only", "READ-ONLY")
    uids = view.resolve(cmd.sequence, cmd.uid)
    try:
        access = await s.open_access(cmd.mailbox)
    except StorageError as err:
        if err.kind is ErrorKind.NOT_FOUND and not in_other_users(cmd.mailbox):
            return no("Mailbox does not exist", "TRYCREATE")  # RFC 3501 section 6.4.7
        raise
    dest = access.mailbox
    uids = [u for u in uids if u not in view.pending_vanished]
    # RFC 4314 section 4: COPY needs "i" on the target (and "r" on the
    # source, which SELECT checked); MOVE also "t" and "e" on the source
    # (RFC 6851 section 3.1).
    access.require("i", "copy into this mailbox")
    if s.shared is not None:
        s.shared.require("r", "copy out of this mailbox")
    if move and s.shared is not None:
        for right in "te":
            if right not in s.shared.rights:
                raise no_right(right, "move messages out of this mailbox")
    if not uids:
        return ok(f"{cmd.name} completed")
    s.wrote_to(dest.id, owner_id=access.owner.id)
    if access.owner.id != s.box_owner:
        return await _copy_across(s, view, uids, access, move)
    # One account (this one's, or a sharer's): the store copies in one step.
    store = s.mail if s.shared is None else s.shared.store.store
    assert store is not None
    if not move:
        result = await store.copy(*_ids(s), UidSet.of(uids), dest.id)
        if not result.pairs:
            return ok("COPY completed")
        if s.shared is None:
            _learn(s, view, dest, result.pairs)
        return ok("COPY completed", _copyuid(result.uidvalidity, result.pairs))
    result = await store.move(*_ids(s), UidSet.of(uids), dest.id)
    if s.shared is None:
        _learn(s, view, dest, result.pairs)
    # RFC 6851 section 4.3: COPYUID in an untagged OK, before the EXPUNGEs.
    if result.pairs:
        s.untagged(f"OK [{_copyuid(result.uidvalidity, result.pairs)}] Moved")
    s.announce_expunge(view, {a for a, _ in result.pairs})
    return ok(f"{cmd.name} completed")


async def _copy_across(
    s: Session, view: MailboxView, uids: list[int], access: MailboxAccess, move: bool
) -> Reply:
    """COPY or MOVE between two accounts' mailboxes (one of them shared,
    RFC 4314): each message's bytes are read from the source's shard and
    stored into the target's with its internal date and the flags the
    target's rights allow (section 4), all or none
    (:func:`storage.ingest.ingest_many`): RFC 3501 section 6.4.7 and RFC
    6851 section 3.3, a failed COPY or MOVE leaves the target as it was
    (its UIDNEXT aside). One source message is in memory at a time. A
    MOVE removes the originals by UID only once every copy committed."""
    from storage.ingest import ingest_many

    assert s.account is not None
    source_owner = s.account if s.shared is None else s.shared.owner
    blobs = s.storage.blobs_for(source_owner)
    # Entries only (flags, date, blob key): a few hundred bytes each.
    entries = await s.box_mail.entries(*_ids(s), UidSet.of(uids))

    async def messages() -> AsyncIterator[tuple[bytes, tuple[str, ...], datetime]]:
        for e in entries:
            needs = flag_rights(e.flags)
            flags = tuple(f for f in sorted(e.flags) if needs[f] in access.rights)
            yield await blobs.get(e.blob_key), flags, e.internal_date

    results = await ingest_many(s.storage, access.owner, access.mailbox.id, messages())
    if not results:
        return ok(f"{'MOVE' if move else 'COPY'} completed")
    pairs = tuple((e.uid, r.uid) for e, r in zip(entries, results, strict=True))
    copyuid = _copyuid(results[0].uidvalidity, pairs)
    if not move:
        return ok("COPY completed", copyuid)
    # The originals go in one write, flagged or not: no \Deleted is set
    # first for other sessions to see, or to be left behind by a failure.
    gone = await s.box_mail.expunge(*_ids(s), UidSet.of([a for a, _ in pairs]), flagged_only=False)
    s.untagged(f"OK [{copyuid}] Moved")  # RFC 6851 section 4.3
    s.announce_expunge(view, set(gone))
    return ok("MOVE completed")


async def handle_idle(s: Session, cmd: c.Command) -> Reply | None:
    """RFC 2177: updates flow until the client sends DONE."""
    s.write(b"+ idling\r\n")
    s.message_cache.clear()  # an idling client holds no cached messages (issue #24)
    if s.selected is not None:
        await s.sync(poll=True)
    if s.notify is not None:
        await notify.after_command(s, allow_expunge=True)  # RFC 5465 section 4
    await s.conn.drain()
    loop = asyncio.get_running_loop()
    reader = loop.create_task(s.read_continuation(None))
    deadline = loop.time() + s.idle_timeout
    try:
        while True:
            waker = loop.create_task(s.wakeup.wait())
            done, _ = await asyncio.wait(
                {reader, waker},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            waker.cancel()
            if reader in done:
                break
            if not done:
                s.untagged("BYE IDLE timed out")
                s.state = State.LOGOUT
                return None
            s.wakeup.clear()
            if s.fenced:
                s.end_fenced()
                return None
            if s.notify is not None:
                await notify.after_command(s, allow_expunge=True)  # RFC 5465 section 4
            elif s.selected is not None:
                await s.sync()
            await s.conn.drain()
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    line = reader.result()
    if line is None:
        raise ConnectionResetError("client went away")
    if line.strip().upper() != b"DONE":
        return bad("Expected DONE")
    return ok("IDLE terminated")

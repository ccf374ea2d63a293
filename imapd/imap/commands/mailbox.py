"""Authenticated-state commands on mailboxes: SELECT, EXAMINE, CREATE,
DELETE, RENAME, SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB, STATUS,
NAMESPACE (RFC 3501 section 6.3; RFC 5258, 5819, 6154, 2342, 7162, 9590); APPEND is
in :mod:`imapd.imap.commands.append`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from imapd.imap.commands.metadata import metadata_response, named_entries
from imapd.imap.mailbox_view import MailboxView
from imapd.imap.namespace import (
    NAMESPACE_LINE,
    OTHER_USERS,
    in_other_users,
    other_user_name,
    split_other_user,
)
from imapd.imap.session import Reply, Session, State, bad, no, ok
from imapd.imap.wire import encode
from imapd.imap.wire.commands import (
    ListCommand,
    MailboxCommand,
    Rename,
    Select,
    Status,
)
from storage.acl import GrantedStore, MailboxAccess, grants_to, may_annotate
from storage.errors import ErrorKind, StorageError
from storage.model import DELETED, HIERARCHY_DELIMITER, Account, Mailbox, UidSet
from storage.search import Flag
from storage.sql.acl import Grant

if TYPE_CHECKING:
    from storage.api import MailStore

_DELIM = HIERARCHY_DELIMITER
# RFC 5258 section 3 sets no bound on a pattern list; each pattern is tried
# against every mailbox, so a 64 KiB line of patterns is refused instead.
MAX_LIST_PATTERNS = 100


def _account_id(s: Session) -> int:
    assert s.account is not None
    return s.account.id


async def handle_select(s: Session, cmd: Select) -> Reply:
    assert s.mail is not None
    if s.selected is not None:
        # RFC 7162 section 3.2.11: the old mailbox is closed from here on.
        s.selected = None
        s.select_shared(None)
        s.state = State.AUTHENTICATED
        s.untagged("OK [CLOSED] Previous mailbox closed")
    if cmd.qresync is not None and "QRESYNC" not in s.enabled:
        return bad("Enable QRESYNC first")  # RFC 7162 section 3.2.5
    read_only = cmd.name == "EXAMINE"
    access = None
    if split_other_user(cmd.mailbox) is not None:
        access = await s.open_access(cmd.mailbox)
        access.require("r", "select this mailbox")  # RFC 4314 section 4: SELECT needs "r"
        # SELECT stays read-write whatever the rights: each write is
        # checked against them (storage.acl), a missing one is NO [NOPERM].
        s.select_shared(access)  # before the snapshot: news from here on is heard
    heard = s.changes_heard  # see Session.selected_now
    try:
        acct = s.box_owner
        store = s.box_mail
        box = access.mailbox if access is not None else await store.get_mailbox(acct, cmd.mailbox)
        # UIDs and what the responses below need, no message rows (issue #20):
        # entries are read per command, for the UIDs it touches.
        snapshot = await store.snapshot(acct, box.id)
    except BaseException:
        s.select_shared(None)
        raise
    view = MailboxView.from_snapshot(box, read_only, snapshot, box.highestmodseq)
    if cmd.condstore or cmd.qresync is not None:
        s.condstore = True  # RFC 7162 section 3.1.8
    if read_only:
        # RFC 3501 section 6.3.2: EXAMINE leaves \Recent state alone but still
        # reports it; section 2.3.2: a read-only session sees \Recent set on
        # the messages without taking it from later sessions.
        view.mark_recent(await store.peek_recent(acct, box.id))
    else:
        floor = await store.claim_recent(acct, box.id)
        view.recent = set(view.uids_from(floor))
    s.announce_flags(view, always=True)
    s.untagged(f"{view.exists} EXISTS")
    first_unseen = view.seq_of(snapshot.first_unseen) if snapshot.first_unseen else None
    if s.rev2:
        first_unseen = None  # RFC 9051 Appendix E items 5 and 6: no RECENT, no [UNSEEN]
    else:
        s.untagged(f"{len(view.recent)} RECENT")
    if first_unseen is not None:
        s.untagged(f"OK [UNSEEN {first_unseen}] First unseen")  # RFC 3501 section 6.3.1
    s.untagged(f"OK [UIDVALIDITY {box.uidvalidity}] UIDs valid")
    s.untagged(f"OK [UIDNEXT {max(box.uidnext, view.max_uid + 1)}] Predicted next UID")
    mailboxid = await s.mailboxid(box.id, acct)
    s.untagged(f"OK [MAILBOXID ({mailboxid})] Ok")  # RFC 8474 section 4.1
    s.untagged(f"OK [HIGHESTMODSEQ {max(box.highestmodseq, 1)}] Highest")
    if s.rev2:
        # RFC 9051 section 6.3.2: a LIST response with the mailbox's name and
        # accurate attributes is one of SELECT's required answers.
        if access is None:
            tree = _Hierarchy(await store.list_mailboxes(acct))
            attrs = " ".join(tree.attributes(box.name, "LIST"))
        else:
            attrs = "\\HasNoChildren"
        s.untagged(f'LIST ({attrs}) "{_DELIM}" '.encode() + encode.mailbox(cmd.mailbox, s.utf8))
    s.selected_now(view, heard)
    s.state = State.SELECTED
    if cmd.qresync is not None and cmd.qresync.uidvalidity == box.uidvalidity:
        await _qresync(s, view, cmd)
    return ok(f"{cmd.name} completed", "READ-ONLY" if read_only else "READ-WRITE")


async def _qresync(s: Session, view: MailboxView, cmd: Select) -> None:
    """RFC 7162 section 3.2.5.1: VANISHED (EARLIER) then changed FLAGS."""
    assert cmd.qresync is not None
    q = cmd.qresync
    changes = await s.box_mail.changes_since(s.box_owner, view.mailbox.id, q.modseq)
    vanished = sorted(changes.vanished)
    if q.known_uids is not None and vanished:
        allowed = _uid_filter(q.known_uids, view.max_uid)
        vanished = [u for u in vanished if allowed(u)]
    if vanished:
        s.untagged(b"VANISHED (EARLIER) " + encode.sequence_set(vanished))
    for e in sorted(changes.changed, key=lambda e: e.uid):
        seq = view.seq_of(e.uid)
        if seq is None:
            continue
        flags = encode.flags(s.display_flags(view, e.uid, e.flags))
        s.write(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))\r\n" % (seq, e.uid, flags, e.modseq))


def _uid_filter(seqset: object, top: int):  # type: ignore[no-untyped-def]
    ranges = [
        (top if a is None else a, top if b is None else b)
        for a, b in seqset.ranges  # type: ignore[attr-defined]
    ]
    return lambda u: any(min(a, b) <= u <= max(a, b) for a, b in ranges)


# Names under Other Users are other accounts' mailboxes (RFC 2342 section
# 3): their levels are not created or deleted, nor any of them renamed.
_NOT_PERSONAL = no("Not a mailbox of your own to change", "NOPERM")


async def handle_create(s: Session, cmd: MailboxCommand) -> Reply:
    assert s.mail is not None
    # RFC 3501 section 6.3.3: a trailing delimiter only says "will have children".
    name = cmd.mailbox.rstrip(_DELIM)
    if not name or name.upper() == "INBOX":
        return no("Mailbox already exists", "ALREADYEXISTS")
    if _DELIM * 2 in name or name.startswith(_DELIM):
        return no("Invalid mailbox name", "CANNOT")
    if in_other_users(name):
        return await _create_shared(s, name)
    use = cmd.special_use[0] if cmd.special_use else None
    if use is not None and use not in (
        "\\All",
        "\\Archive",
        "\\Drafts",
        "\\Flagged",
        "\\Junk",
        "\\Sent",
        "\\Trash",
    ):
        return no(f"Unknown special-use {use}", "USEATTR")  # RFC 6154 section 6
    s.forget_mailboxes()
    created = await s.mail.create_mailbox(_account_id(s), name, use)
    # RFC 8474 section 4.1: the new mailbox's MAILBOXID in the tagged OK.
    return ok("CREATE completed", f"MAILBOXID ({await s.mailboxid(created.id)})")


async def handle_delete(s: Session, cmd: MailboxCommand) -> Reply:
    assert s.mail is not None
    if cmd.mailbox == "INBOX":
        return no("INBOX cannot be deleted", "CANNOT")
    if in_other_users(cmd.mailbox):
        return await _delete_shared(s, cmd.mailbox)
    s.forget_mailboxes()
    await s.mail.delete_mailbox(_account_id(s), cmd.mailbox)
    if s.selected is not None and s.shared is None and s.selected.mailbox.name == cmd.mailbox:
        s.selected = None
        s.state = State.AUTHENTICATED
        s.untagged("OK [CLOSED] Mailbox deleted")
    return ok("DELETE completed")


async def _create_shared(s: Session, name: str) -> Reply:
    """CREATE below another account's mailbox: "k" on the parent (RFC 4314
    section 4). The new mailbox starts with its parent's ACL (RFC 4314
    leaves a new mailbox's ACL to the server), so whoever could reach the
    parent, its creator too, reaches the child."""
    other = split_other_user(name)
    if other is None or _DELIM not in other[1]:
        return _NOT_PERSONAL  # a top level of another account is its own
    parent = await s.open_access(name.rsplit(_DELIM, 1)[0])
    parent.require("k", "create mailboxes here")
    store, owner = parent.store.store, parent.owner.id
    created = await store.create_mailbox(owner, other[1])
    for grantee, held in (await store.acl(owner, parent.mailbox.id)).items():  # type: ignore[attr-defined]
        await store.set_acl(owner, created.id, grantee, held)  # type: ignore[attr-defined]
    return ok("CREATE completed", f"MAILBOXID ({await s.mailboxid(created.id, owner)})")


async def _delete_shared(s: Session, name: str) -> Reply:
    """DELETE of another account's mailbox: "x" on it (RFC 4314 section 4)."""
    if split_other_user(name) is None:
        return _NOT_PERSONAL
    access = await s.open_access(name)
    access.require("x", "delete this mailbox")
    await access.store.store.delete_mailbox(access.owner.id, access.mailbox.name)
    if s.shared is not None and s.shared.mailbox.id == access.mailbox.id:
        s.selected = None
        s.select_shared(None)
        s.state = State.AUTHENTICATED
        s.untagged("OK [CLOSED] Mailbox deleted")
    return ok("DELETE completed")


async def _rename_shared(s: Session, old: str, new: str) -> Reply:
    """RENAME within another account: "x" on the mailbox and "k" on the
    new parent (RFC 4314 section 4); never between two accounts. The ACL
    goes along (it is the mailbox's)."""
    src, dst = split_other_user(old), split_other_user(new)
    if src is None or dst is None or src[0].lower() != dst[0].lower() or _DELIM not in dst[1]:
        return _NOT_PERSONAL
    access = await s.open_access(old)
    access.require("x", "rename this mailbox")
    parent = await s.open_access(new.rsplit(_DELIM, 1)[0])
    parent.require("k", "create mailboxes here")
    await access.store.store.rename_mailbox(access.owner.id, access.mailbox.name, dst[1])
    return ok("RENAME completed")


async def handle_rename(s: Session, cmd: Rename) -> Reply:
    assert s.mail is not None
    new = cmd.new.rstrip(_DELIM)
    if not new or new == "INBOX":
        return no("Mailbox already exists", "ALREADYEXISTS")
    if in_other_users(cmd.old) or in_other_users(new):
        return await _rename_shared(s, cmd.old, new)
    s.forget_mailboxes()
    await s.mail.rename_mailbox(_account_id(s), cmd.old, new)
    return ok("RENAME completed")


async def handle_subscribe(s: Session, cmd: MailboxCommand) -> Reply:
    assert s.mail is not None
    await s.mail.set_subscribed(_account_id(s), cmd.mailbox, cmd.name == "SUBSCRIBE")
    return ok(f"{cmd.name} completed")


class MailboxPattern:
    """A LIST / LSUB mailbox pattern (RFC 3501 section 6.3.8, RFC 5258
    section 3): "*" matches any characters, "%" any but the hierarchy
    delimiter, everything else itself; the reference is prefixed.

    Contract: building costs time linear in the pattern; :meth:`matches`
    costs O(len(name)) big-integer steps on a bit set no wider than twice
    the name, whatever the client sent. Never a regex built from client
    input: one backtracked for minutes on ``"*" * 60 + "x"``."""

    __slots__ = ("_accept", "_by_char", "_literals", "_stay", "_stay_at_delim", "_tokens")

    def __init__(self, reference: str, pattern: str) -> None:
        # RFC 3501 6.3.8: reference and pattern join with one delimiter.
        if reference.endswith(_DELIM) and pattern.startswith(_DELIM):
            pattern = pattern[1:]
        full = reference + pattern
        tokens: list[str] = []
        for ch in full:
            if ch in "*%" and tokens and tokens[-1] in "*%":
                # A run of wildcards means its widest member: "%*" is "*".
                if ch == "*":
                    tokens[-1] = "*"
                continue
            tokens.append(ch)
        self._tokens = tokens
        self._literals = sum(1 for t in tokens if t not in "*%")
        self._accept = 1 << len(tokens)
        # Bit i set in a state: tokens[:i] match the name read so far.
        self._stay = _mask(i for i, t in enumerate(tokens) if t in "*%")
        self._stay_at_delim = _mask(i for i, t in enumerate(tokens) if t == "*")
        self._by_char: dict[str, int] | None = None  # built on first use

    def _char_masks(self) -> dict[str, int]:
        """Per character, the literal positions it satisfies. Built only once a
        name is long enough to match, so at most ~2 x MAX_MAILBOX_NAME wide."""
        positions: dict[str, list[int]] = {}
        fold = "".join(self._tokens[:5]).upper() == "INBOX"
        for i, t in enumerate(self._tokens):
            if t in "*%":
                continue
            if fold and i < 5:
                # RFC 3501 section 5.1: INBOX is case-insensitive.
                positions.setdefault(t.lower(), []).append(i)
                positions.setdefault(t.upper(), []).append(i)
            else:
                positions.setdefault(t, []).append(i)
        return {ch: _mask(ps) for ch, ps in positions.items()}

    def matches(self, name: str) -> bool:
        if len(name) < self._literals:
            return False  # each literal takes one character: the cheap answer
        if self._by_char is None:
            self._by_char = self._char_masks()
        by_char, stay, stay_at_delim = self._by_char, self._stay, self._stay_at_delim
        # A simulated NFA, one bit per token: wildcards also match nothing
        # (no two are adjacent, so one shift closes the set over that).
        state = 1 | ((1 & stay) << 1)
        for ch in name:
            kept = state & (stay_at_delim if ch == _DELIM else stay)
            state = ((state & by_char.get(ch, 0)) << 1) | kept
            if not state:
                return False
            state |= (state & stay) << 1
        return bool(state & self._accept)


def _mask(positions: Iterable[int]) -> int:
    bits = bytearray()
    for i in positions:
        byte = i >> 3
        if byte >= len(bits):
            bits.extend(bytes(byte + 1 - len(bits)))
        bits[byte] |= 1 << (i & 7)
    return int.from_bytes(bits, "little")


def _ancestors(name: str) -> list[str]:
    """ "a/b/c" -> ["a", "a/b"]."""
    parts = name.split(_DELIM)
    return [_DELIM.join(parts[:i]) for i in range(1, len(parts))]


class _Hierarchy:
    """The account's mailboxes with the levels their names imply: a parent
    that is no mailbox is \\Noselect (RFC 3501 section 6.3.8)."""

    def __init__(self, boxes: list[Mailbox]) -> None:
        self.by_name = {b.name: b for b in boxes}
        self.names = set(self.by_name)
        for name in self.by_name:
            self.names.update(_ancestors(name))
        self.has_children = {n.rsplit(_DELIM, 1)[0] for n in self.names if _DELIM in n}

    def attributes(self, name: str, verb: str) -> list[str]:
        """An existing name's attributes, \\Subscribed aside."""
        box = self.by_name.get(name)
        attrs = ["\\Noselect"] if box is None else []
        attrs.append("\\HasChildren" if name in self.has_children else "\\HasNoChildren")
        if box is not None and box.special_use and verb == "LIST":
            attrs.append(box.special_use)  # RFC 6154 section 2
        return attrs


async def handle_list(s: Session, cmd: ListCommand) -> Reply:
    """LIST and LSUB (RFC 3501 sections 6.3.8, 6.3.9) with LIST-EXTENDED
    selection and return options (RFC 5258), SPECIAL-USE (RFC 6154),
    LIST-STATUS (RFC 5819) and LIST-METADATA (RFC 9590)."""
    assert s.mail is not None
    verb = cmd.name
    if verb == "LIST" and cmd.patterns == ("",):
        # RFC 3501 section 6.3.8: an empty pattern asks for the delimiter.
        s.untagged(b'LIST (\\Noselect) "/" ""')
        return ok("LIST completed")
    if len(cmd.patterns) > MAX_LIST_PATTERNS:
        return no("Too many patterns", "LIMIT")  # RFC 5530 section 3
    acct = _account_id(s)
    # Other accounts' mailboxes are read (one query per shard) only when a
    # pattern can reach a name under "Other Users": one starting with a
    # wildcard or with that name's first letter.
    reach = any((cmd.reference + p)[:1] in ("*", "%", OTHER_USERS[0]) for p in cmd.patterns)
    shared = await _shared_boxes(s) if reach else {}
    own = await s.mail.list_mailboxes(acct)
    tree = _Hierarchy(own + [box for box, _ in shared.values()])
    patterns = [MailboxPattern(cmd.reference, p) for p in cmd.patterns]

    def wanted(name: str) -> bool:
        return any(p.matches(name) for p in patterns)

    sel_subscribed = verb == "LSUB" or "SUBSCRIBED" in cmd.selection
    subscribed: set[str] = set()
    if sel_subscribed or "SUBSCRIBED" in cmd.returns:
        subscribed = set(await s.mail.subscriptions(acct))
    # RFC 5258 section 3.5 (RECURSIVEMATCH) and RFC 3501 section 6.3.9 (LSUB
    # with "%"): a level above subscribed names that the patterns leave out.
    above: set[str] = set()
    if sel_subscribed and (verb == "LSUB" or "RECURSIVEMATCH" in cmd.selection):
        for name in subscribed:
            if not wanted(name):
                above.update(_ancestors(name))
    candidates = subscribed | above if sel_subscribed else tree.names
    # RFC 9590 section 3: the entries asked for, of all the account's
    # mailboxes in one read (bounded: storage keeps few per account).
    entries = await s.mail.mailboxes_metadata(acct, cmd.metadata) if cmd.metadata else {}
    listed_shared = {n: shared[n] for n in shared if wanted(n)} if cmd.metadata else {}
    granted = await _shared_metadata(s, listed_shared, cmd.metadata) if listed_shared else {}
    longest = 0
    for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
        if not wanted(name):
            continue
        box = tree.by_name.get(name)
        if "SPECIAL-USE" in cmd.selection and (box is None or not box.special_use):
            continue
        line = f'{verb} ({" ".join(_attributes(tree, name, verb, subscribed))}) "{_DELIM}" '
        data = line.encode() + encode.mailbox(name, s.utf8)
        if verb == "LIST" and name in above:
            data += b' ("CHILDINFO" ("SUBSCRIBED"))'  # RFC 5258 section 3.5
        s.untagged(data)
        if cmd.status_items and box is not None:
            # RFC 5819 section 2: STATUS right after its LIST line (on
            # another account's mailbox only with "r", RFC 4314 section 4).
            access = shared[name][1] if name in shared else None
            if access is None or "r" in access.rights:
                await _status_line(s, box, cmd.status_items, access)
        if cmd.metadata and box is not None:
            if sel_subscribed and name not in subscribed:
                continue  # RFC 9590 section 4: listed for its children only
            if name in shared and name not in granted:
                continue  # no right to its entries (RFC 5464 section 3.3): none
            stored = granted[name] if name in shared else entries.get(box.id, {})
            longest = max(longest, _metadata_line(s, name, stored, cmd))
            if s.conn.congested:
                await s.conn.drain()  # thousands of mailboxes: a slow reader waits
    if longest:
        # RFC 5464 section 4.2.1, for this server's MAXSIZE after the entries.
        return ok(f"{verb} completed", f"METADATA LONGENTRIES {longest}")
    return ok(f"{verb} completed")


def _metadata_line(s: Session, name: str, stored: dict[str, bytes], cmd: ListCommand) -> int:
    """RFC 9590 section 3: the METADATA response of a listed mailbox, as
    GETMETADATA at DEPTH 0 answers it (an entry with no value is NIL, as
    in the section 4 example); none when MAXSIZE left every entry out.
    Returns the size of the longest value left out. ``stored``: the
    entries this account sees (on another account's mailbox its /shared
    entries and its own /private ones, :func:`_shared_metadata`)."""
    found, longest = named_entries(stored, cmd.metadata, cmd.metadata_maxsize)
    if found:
        s.untagged(metadata_response(name, s.utf8, found))
    return longest


async def _shared_metadata(
    s: Session, boxes: dict[str, tuple[Mailbox, MailboxAccess]], names: tuple[str, ...]
) -> dict[str, dict[str, bytes]]:
    """RFC 9590 section 3 for other accounts' mailboxes being listed: the
    entries called ``names`` as GETMETADATA gives them to this account
    (their /shared entries, its own /private ones), by listed name, for
    the mailboxes whose rights allow it (RFC 5464 section 3.3,
    storage.acl.may_annotate); the others are left out (RFC 9590 section
    3: what the server cannot look up gets no METADATA). One read per
    owner's store, whatever the number of mailboxes."""
    assert s.account is not None
    by_store: dict[int, tuple[Any, list[tuple[str, int]]]] = {}
    for name, (box, access) in boxes.items():
        if may_annotate(access.rights):
            store = access.store.store
            by_store.setdefault(id(store), (store, []))[1].append((name, box.id))
    out: dict[str, dict[str, bytes]] = {}
    for store, listed in by_store.values():
        found = await store.granted_metadata(s.account.id, [i for _, i in listed], names)
        for name, box_id in listed:
            out[name] = found.get(box_id, {})
    return out


async def _shared_boxes(s: Session) -> dict[str, tuple[Mailbox, MailboxAccess]]:
    """The other accounts' mailboxes this account may look up (RFC 4314
    section 4: LIST shows a mailbox only with "l"), by their names under
    Other Users: a copy of each mailbox carrying that name, and the
    access it is opened with. One read per shard, one directory read per
    owner."""
    assert s.account is not None
    by_box: dict[tuple[int, int], list[Grant]] = {}
    for grant in await grants_to(s.storage, s.account):
        by_box.setdefault((grant.owner_id, grant.mailbox_id), []).append(grant)
    owners: dict[int, Account | None] = {}
    out: dict[str, tuple[Mailbox, MailboxAccess]] = {}
    for (owner_id, mailbox_id), grants in by_box.items():
        rights = frozenset().union(*(g.rights for g in grants))
        if "l" not in rights:
            continue
        if owner_id not in owners:
            try:
                owners[owner_id] = await s.storage.directory.get_account_by_id(owner_id)
            except StorageError as err:
                if err.kind is not ErrorKind.NOT_FOUND:
                    raise
                owners[owner_id] = None  # being removed
        owner = owners[owner_id]
        if owner is None:
            continue
        name = other_user_name(owner.address, grants[0].name)
        box = Mailbox(mailbox_id, owner_id, name, 0, 0, 0, None)
        store = GrantedStore(s.storage.mail(owner), owner_id, mailbox_id, rights, s.account.id)
        out[name] = (box, MailboxAccess(owner, box, store))
    return out


def _attributes(tree: _Hierarchy, name: str, verb: str, subscribed: set[str]) -> list[str]:
    if verb == "LSUB":
        if name not in subscribed or name not in tree.names:
            # RFC 3501 section 6.3.9: the level above a subscribed name, or a
            # subscribed name that is no mailbox, cannot be selected.
            return ["\\Noselect"]
        return tree.attributes(name, verb)
    # RFC 5258 section 3.4: \\NonExistent, listed only for its subscription
    # or its subscribed children.
    attrs = tree.attributes(name, verb) if name in tree.names else ["\\NonExistent"]
    if name in subscribed:
        attrs.append("\\Subscribed")  # RFC 5258 section 3.1 (here only when asked for)
    return attrs


async def _status_line(
    s: Session, box: Mailbox, items: tuple[str, ...], access: MailboxAccess | None = None
) -> None:
    """One STATUS response for ``box``: this account's, or another's
    opened through ``access`` (then named as ``box`` is, never cached:
    mailbox ids are per shard)."""
    assert s.mail is not None
    store = s.mail if access is None else access.store
    acct = _account_id(s) if access is None else access.owner.id
    st = s.status_cache.get(box.id) if access is None else None
    if st is None:
        st = await store.status(acct, box.id)  # type: ignore[union-attr]
        if access is None:
            s.status_cache[box.id] = st
    view = s.selected if s.selected and s.selected.mailbox.id == box.id else None
    if view is not None and acct != s.box_owner:
        view = None
    recent = 0
    if view is not None:
        recent = len(view.recent)  # what this session was told (RECENT, FETCH FLAGS)
    elif "RECENT" in items:
        # RFC 3501 section 6.3.10: count the \Recent messages without
        # claiming them; a later SELECT still gets them.
        recent = await store.peek_recent(acct, box.id)  # type: ignore[union-attr]
    values: dict[str, int | str] = {
        "MESSAGES": st.messages,
        "RECENT": recent,
        "UIDNEXT": st.uidnext,
        "UIDVALIDITY": st.uidvalidity,
        "UNSEEN": st.unseen,
        "HIGHESTMODSEQ": st.highestmodseq,
        "SIZE": st.size,
        "APPENDLIMIT": s.ctx.max_literal,
    }
    if "DELETED" in items or "DELETED-STORAGE" in items:
        await _deleted_counts(store, acct, box, values, "DELETED-STORAGE" in items)  # type: ignore[arg-type]
    if "MAILBOXID" in items:  # RFC 8474 section 4.2
        values["MAILBOXID"] = f"({await s.mailboxid(box.id, acct)})"
    if "HIGHESTMODSEQ" in items:
        s.use_condstore()  # RFC 7162 section 3.1: a CONDSTORE enabling command
    body = " ".join(f"{i} {values[i]}" for i in items)
    s.untagged(b"STATUS " + encode.mailbox(box.name, s.utf8) + f" ({body})".encode())


async def _deleted_counts(
    store: MailStore, acct: int, box: Mailbox, values: dict[str, int | str], storage: bool
) -> None:
    """STATUS DELETED (RFC 9051 section 6.3.11: messages with \\Deleted) and
    DELETED-STORAGE (RFC 9208 section 4.1.4: what EXPUNGE would free, in
    units of 1024 octets, rounded up as GETQUOTA's usage is). Asked of
    storage each time; the STATUS cache holds the other counters."""
    uids = await store.search(acct, box.id, Flag(DELETED, True))
    values["DELETED"] = len(uids)
    if storage:
        octets = 0
        if uids:
            entries = await store.entries(acct, box.id, UidSet.of(uids))
            octets = sum(e.size for e in entries)
        values["DELETED-STORAGE"] = -(-octets // 1024)


async def handle_status(s: Session, cmd: Status) -> Reply:
    assert s.mail is not None
    if split_other_user(cmd.mailbox) is None:
        box = await s.mailbox_id_of(cmd.mailbox)
        await _status_line(s, box, cmd.items)
        return ok("STATUS completed")
    access = await s.open_access(cmd.mailbox)
    access.require("r", "read its status")  # RFC 4314 section 4: STATUS needs "r"
    named = Mailbox(access.mailbox.id, access.owner.id, cmd.mailbox, 0, 0, 0, None)
    await _status_line(s, named, cmd.items, access)
    return ok("STATUS completed")


async def handle_namespace(s: Session, cmd: object) -> Reply:
    # RFC 2342 section 5: personal, other users' (imapd/imap/namespace.py), no shared.
    s.untagged(NAMESPACE_LINE)
    return ok("NAMESPACE completed")

"""Conversations: messages grouped by Message-ID / In-Reply-To / References.

:func:`thread_messages` is Jamie Zawinski's threading algorithm
(https://www.jwz.org/doc/threading.html, also RFC 5256 section 2.2
REFERENCES) as a pure function: link containers by the References chain
(In-Reply-To appended when it is not already last), take the roots, prune
empty containers, then merge roots whose base subjects match (RFC 5256
section 2.1 base subject: "Re:", "Fwd:" and list tags removed).

:class:`ThreadIndex` applies it to every message of an account and is cached
per account until the account's change log shows a message added or
removed (flag changes do not move messages between threads).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from storage.api import MailStore
from storage.model import ChangeKind, UidSet

# RFC 5256 section 2.1: reply/forward prefixes and [list] blobs, repeated.
_SUBJ_PREFIX = re.compile(
    r"^\s*(?:(?:re|fwd?|aw|sv|antw|vs|ref|tr)\s*(?:\[\d+\])?\s*:|\[[^\]]*\])\s*", re.IGNORECASE
)
_SUBJ_TRAILER = re.compile(r"\s*\((?:fwd)\)\s*$", re.IGNORECASE)
_MSGID = re.compile(r"<([^<>\s]+)>")


def base_subject(subject: str | None) -> str:
    """RFC 5256 section 2.1 base subject, case-folded, whitespace collapsed."""
    text = " ".join((subject or "").split())
    while True:
        stripped = _SUBJ_TRAILER.sub("", _SUBJ_PREFIX.sub("", text))
        if stripped == text:
            return text.casefold()
        text = stripped


def is_reply_subject(subject: str | None) -> bool:
    return base_subject(subject) != " ".join((subject or "").split()).casefold()


def normalize_msgid(value: str | None) -> str | None:
    """``<a@b>`` or ``a@b`` -> ``a@b``; None for empty."""
    if not value:
        return None
    match = _MSGID.search(value)
    token = match.group(1) if match else value.strip().strip("<>")
    return token or None


def msgid_list(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        found = _MSGID.findall(value)
        out.extend(found if found else [v for v in value.split() if v])
    return [v.strip("<>") for v in out if v.strip("<>")]


@dataclass(frozen=True)
class ThreadInput:
    """The headers threading needs, for one message known by ``key``."""

    key: Hashable
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    subject: str
    date: dt.datetime | None = None


@dataclass(eq=False)
class _Container:
    msgid: str
    messages: list[ThreadInput] = field(default_factory=list)
    parent: _Container | None = None
    children: list[_Container] = field(default_factory=list)

    def reaches(self, other: _Container) -> bool:
        """True if ``other`` is this container or one of its descendants."""
        stack = [self]
        while stack:
            node = stack.pop()
            if node is other:
                return True
            stack.extend(node.children)
        return False

    def set_parent(self, parent: _Container | None) -> None:
        if self.parent is not None:
            self.parent.children.remove(self)
        self.parent = parent
        if parent is not None:
            parent.children.append(self)

    def first_message(self) -> ThreadInput | None:
        stack = [self]
        while stack:
            node = stack.pop(0)
            if node.messages:
                return node.messages[0]
            stack.extend(node.children)
        return None

    def walk(self) -> Iterable[_Container]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children)


def _thread_id(root: _Container) -> str:
    return hashlib.sha256(root.msgid.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def thread_messages(messages: Iterable[ThreadInput]) -> dict[Hashable, str]:
    """Map each message key to a thread id (see module doc). Deterministic
    for the same input in the same order; ids derive from each thread's root."""
    table: dict[str, _Container] = {}
    synthetic = 0

    def container(msgid: str) -> _Container:
        node = table.get(msgid)
        if node is None:
            node = table[msgid] = _Container(msgid)
        return node

    for message in messages:
        # Step 1A: the message's own container; a duplicate Message-ID shares
        # it (the Sent copy and the delivered copy are one message).
        own_id = normalize_msgid(message.message_id)
        if own_id is None:
            synthetic += 1
            own_id = f"\0synthetic-{synthetic}"
        this = container(own_id)
        this.messages.append(message)
        # Step 1B: link the References chain parent -> child.
        refs = msgid_list(message.references)
        reply_to = normalize_msgid(message.in_reply_to)
        if reply_to and (not refs or refs[-1] != reply_to):
            refs.append(reply_to)
        refs = [r for r in refs if r != own_id]
        previous: _Container | None = None
        for ref in refs:
            node = container(ref)
            if previous is not None and node.parent is None and not node.reaches(previous):
                node.set_parent(previous)
            previous = node
        # Step 1C: the last reference is this message's parent, overriding
        # whatever an earlier message guessed.
        if previous is not None and not this.reaches(previous):
            this.set_parent(previous)
        elif previous is None and this.parent is not None and len(this.messages) == 1:
            this.set_parent(None)

    # Step 2: the root set.
    roots = [node for node in table.values() if node.parent is None]

    # Step 4: prune empty containers.
    def prune(node: _Container, at_root: bool) -> list[_Container]:
        kids: list[_Container] = []
        for child in list(node.children):
            kids.extend(prune(child, False))
        node.children = []
        for kid in kids:
            kid.parent = node
            node.children.append(kid)
        if node.messages:
            return [node]
        if not node.children:
            return []
        if not at_root or len(node.children) == 1:
            promoted = list(node.children)
            for kid in promoted:
                kid.parent = None
            node.children = []
            return promoted
        return [node]

    pruned: list[_Container] = []
    for root in roots:
        pruned.extend(prune(root, True))
    roots = pruned

    # Step 5: merge roots by base subject (JWZ 5B-5C).
    def subject_of(root: _Container) -> tuple[str, bool]:
        first = root.messages[0] if root.messages else root.first_message()
        raw = first.subject if first else ""
        return base_subject(raw), is_reply_subject(raw)

    by_subject: dict[str, _Container] = {}
    for root in roots:
        subject, reply = subject_of(root)
        if not subject:
            continue
        old = by_subject.get(subject)
        if (
            old is None
            or (not root.messages and old.messages)
            or (old.messages and root.messages and subject_of(old)[1] and not reply)
        ):
            by_subject[subject] = root
    for root in list(roots):
        subject, reply = subject_of(root)
        holder = by_subject.get(subject) if subject else None
        if holder is None or holder is root or root.parent is not None:
            continue
        if not holder.messages and not root.messages:
            for kid in list(root.children):
                kid.set_parent(holder)
        elif not holder.messages or (reply and not subject_of(holder)[1]):
            root.set_parent(holder)
        else:
            # Two unrelated-looking roots with one subject: siblings under a new root.
            parent = _Container(f"\0subject-{subject}")
            holder.set_parent(parent)
            root.set_parent(parent)
            by_subject[subject] = parent

    def top(node: _Container) -> _Container:
        while node.parent is not None:
            node = node.parent
        return node

    tops: dict[int, _Container] = {}
    for root in roots:
        node = top(root)
        tops.setdefault(id(node), node)
    roots = list(tops.values())

    result: dict[Hashable, str] = {}
    for root in roots:
        tid = _thread_id(root)
        for node in root.walk():
            for message in node.messages:
                result.setdefault(message.key, tid)
    return result


@dataclass(frozen=True)
class ThreadMember:
    """One mailbox entry in a thread."""

    mailbox_id: int
    uid: int
    row_id: int  # the stored message row (shared by copies)
    date: dt.datetime


@dataclass
class ThreadIndex:
    """Every message of one account, threaded. Keys are stored message row ids."""

    change_id: int
    thread_of: dict[int, str]
    members: dict[str, list[ThreadMember]]
    checked: float = 0.0  # monotonic time it was last found current
    # The mail store (shard) it was read from: its row ids are that shard's
    # own, and an account moved to another shard keeps its change ids.
    store: object = None


# How late a list or a message read may show a thread id that a deletion or
# move regrouped: within this long of the last check, a page of messages the
# index all knows is answered without reading storage (a new message is not
# known, and forces the check).
THREAD_CHECK_SECONDS = 1.0


class ThreadCache:
    """Per-account :class:`ThreadIndex`, rebuilt when messages come or go.

    Reads the whole account; fine for personal mailboxes (tens of thousands
    of messages). A storage-side thread id column would make this
    incremental.
    """

    def __init__(self, max_accounts: int = 256,
                 check_seconds: float = THREAD_CHECK_SECONDS) -> None:
        self._cache: dict[int, ThreadIndex] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self.max_accounts = max_accounts
        self.check_seconds = check_seconds

    async def index(
        self, mail: MailStore, account_id: int, shown: Iterable[int] | None = None
    ) -> ThreadIndex:
        """The account's index, found current now; or, given ``shown`` (the
        message row ids about to be shown), found current within
        ``check_seconds`` and knowing each of them."""
        cached = self._cache.get(account_id)
        if (
            shown is not None
            and cached is not None
            and cached.store is mail
            and time.monotonic() - cached.checked < self.check_seconds
            and all(row in cached.thread_of for row in shown)
        ):
            return cached
        lock = self._locks.setdefault(account_id, asyncio.Lock())
        async with lock:
            cached = self._cache.get(account_id)
            checked = time.monotonic()
            if cached is not None and await self._still_valid(mail, account_id, cached):
                cached.checked = checked
                return cached
            index = await self._build(mail, account_id)
            index.checked = checked
            if len(self._cache) >= self.max_accounts:
                self._cache.pop(next(iter(self._cache)))
            self._cache[account_id] = index
            return index

    async def _still_valid(self, mail: MailStore, account_id: int, cached: ThreadIndex) -> bool:
        if cached.store is not mail:  # the account moved to another shard
            return False
        # The account's change counter, one indexed read: the log itself is
        # read only when something changed (flag changes keep the index).
        if await mail.last_change_id(account_id) == cached.change_id:
            return True
        while True:
            changes = await mail.account_changes(account_id, cached.change_id, limit=500)
            if not changes:
                return True
            if any(c.kind is not ChangeKind.FLAGS for c in changes):
                return False
            cached.change_id = changes[-1].id

    async def _build(self, mail: MailStore, account_id: int) -> ThreadIndex:
        change_id = await latest_change_id(mail, account_id)
        inputs: list[ThreadInput] = []
        members: list[ThreadMember] = []
        seen_rows: set[int] = set()
        for mailbox in await mail.list_mailboxes(account_id):
            for stored in await mail.fetch(account_id, mailbox.id, UidSet.all()):
                entry, parsed = stored.entry, stored.parsed
                members.append(
                    ThreadMember(entry.mailbox_id, entry.uid, entry.message_id,
                                 entry.internal_date)
                )
                if entry.message_id in seen_rows:
                    continue
                seen_rows.add(entry.message_id)
                inputs.append(ThreadInput(
                    key=entry.message_id,
                    message_id=parsed.message_id,
                    in_reply_to=parsed.in_reply_to,
                    references=parsed.references,
                    subject=parsed.subject,
                    date=parsed.sent_date or entry.internal_date,
                ))
        inputs.sort(key=lambda m: _sortable(m.date))
        thread_of_any = await asyncio.to_thread(thread_messages, inputs)
        thread_of = {int(k): v for k, v in thread_of_any.items()}  # type: ignore[call-overload]
        grouped: dict[str, list[ThreadMember]] = {}
        for member in members:
            tid = thread_of.get(member.row_id)
            if tid is not None:
                grouped.setdefault(tid, []).append(member)
        for group in grouped.values():
            group.sort(key=lambda m: (_sortable(m.date), m.mailbox_id, m.uid))
        return ThreadIndex(change_id, thread_of, grouped, store=mail)


def _sortable(value: dt.datetime | None) -> float:
    if value is None:
        return 0.0
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


async def latest_change_id(mail: MailStore, account_id: int, after: int = 0) -> int:
    """The id of the account's newest change (0 if none), paging the change
    log from ``after`` (a known earlier id makes this one short query)."""
    while True:
        changes = await mail.account_changes(account_id, after, limit=1000)
        if not changes:
            return after
        after = changes[-1].id
        if len(changes) < 1000:
            return after

"""What one session asked NOTIFY (RFC 5465) to tell it, and the telling.

Contract: a :class:`NotifyState` is made by ``NOTIFY SET`` and held in
``Session.notify`` (None: the RFC 3501 behaviour, no NOTIFY). The
session's bus watcher hands it every change (:meth:`NotifyState.offer`,
synchronous): the change is matched against the event groups with a few
dict and set look-ups (no work per change proportional to the account's
mailboxes, section 6's filters become sets of names) and, if the client
asked for it, queued. Queued notifications go out only where RFC 5465
section 4 allows unsolicited responses: between commands
(:func:`next_event`), in IDLE, and at the end of a command
(:func:`after_command`), never in the middle of a command's responses.

Kept bounded (section 5.8): STATUS news is coalesced per mailbox, and
once :data:`MAX_QUEUED` notifications wait the session drops them, sends
``OK [NOTIFICATIONOVERFLOW]`` and behaves as after ``NOTIFY NONE``.

Where the RFC leaves a choice:

* ``inboxes`` (section 6) are INBOX and Junk: the mailboxes delivery
  files into (delivery/acctpolicy.py).
* The selected mailbox's updates of RFC 3501 (EXISTS, EXPUNGE, FETCH
  FLAGS at the end of commands) go on whatever NOTIFY says; the SELECTED
  filters add that they also come between commands (SELECTED-DELAYED:
  without EXPUNGE, which waits for a command as section 7.4.1 of RFC 3501
  has it).
* Message events of the selected mailbox match only the SELECTED filters
  (section 6.1); its mailbox events match the others.
* A STATUS notification carries MESSAGES UIDNEXT UNSEEN for new and
  expunged mail, UIDVALIDITY UNSEEN for flag changes, and HIGHESTMODSEQ
  once the client used CONDSTORE (section 5.1 and 5.2).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from imapd.imap.waitflag import WaitFlag
from imapd.imap.wire import encode
from imapd.imap.wire.commands import Fetch, NotifyGroup, SequenceSet
from imapd.imap.wire.notify_syntax import SELECTED_FILTERS
from storage.errors import StorageError
from storage.model import ChangeKind

if TYPE_CHECKING:
    from imapd.imap.session import Session
    from imapd.imap.wire.framing import FrameEvent
    from storage.model import Change, Mailbox

log = logging.getLogger("imapd.imap")

# Notifications waiting to be sent per session before NOTIFICATIONOVERFLOW
# (section 5.8). STATUS news of one mailbox counts once however often it
# changed; tests lower it.
MAX_QUEUED = 1000
# Entry names kept per METADATA notification (RFC 5464 section 4.4.2).
MAX_METADATA_NAMES = 50
# The mailboxes delivery files into (delivery/acctpolicy.py): "inboxes".
DELIVERY_TARGETS = frozenset({"INBOX", "Junk"})
SUPPORTED_EVENTS = (
    "MessageNew",
    "MessageExpunge",
    "FlagChange",
    "MailboxName",
    "SubscriptionChange",
    "MailboxMetadataChange",
    "ServerMetadataChange",
)
_KIND_EVENT = {
    ChangeKind.NEW: "MessageNew",
    ChangeKind.EXPUNGE: "MessageExpunge",
    ChangeKind.FLAGS: "FlagChange",
}
_DELIM = "/"


def unsupported_events(groups: Iterable[NotifyGroup]) -> list[str]:
    """The events named that this server cannot notify (section 6 BADEVENT)."""
    known = set(SUPPORTED_EVENTS)
    return [e for g in groups for e in g.events or () if e not in known]


class NotifyState:
    """One session's NOTIFY SET: the groups, the names its filters need,
    and the queue of notifications not yet sent."""

    def __init__(self, groups: tuple[NotifyGroup, ...], boxes: list[Mailbox], subscribed: set[str]):
        self.groups = [g for g in groups if g.filter not in SELECTED_FILTERS]
        self.selected = next((g for g in groups if g.filter in SELECTED_FILTERS), None)
        self._named = [(g, frozenset(g.mailboxes)) for g in self.groups]
        self.names = {b.id: b.name for b in boxes}  # mailbox id -> name
        self.existing = set(self.names.values())
        self.subscribed = set(subscribed)
        # Keyed so that repeated news about one thing is sent once, in the
        # order first heard: ("status", id) -> events; ("list", n) -> line;
        # ("metadata", id or None) -> entry names.
        self.queue: dict[tuple[str, object], object] = {}
        self._serial = 0
        self.ready = WaitFlag()  # something to send
        self.selected_news = False  # the selected mailbox changed (SELECTED filters)
        self.overflowed = False
        self._view: object | None = None  # the view ``_top`` belongs to
        self._top = 0  # the highest UID MessageNew's fetch attributes were sent for
        self._dropped: int | None = None  # the bus's lost-change count when first heard

    # ------------------------------------------------------------ matching
    def wants(self, name: str, event: str) -> bool:
        """Whether a change of ``event`` in mailbox ``name`` (not the
        selected one for message events) is to be told: the first group
        whose filter takes the mailbox and that names the event decides;
        a group with NONE ends the search (section 3)."""
        for group, named in self._named:
            if not self._takes(group, named, name):
                continue
            if group.events is None:
                return False
            if event in group.events:
                return True
        return False

    def _takes(self, group: NotifyGroup, named: frozenset[str], name: str) -> bool:
        """Section 6: whether ``group``'s filter covers mailbox ``name``;
        SUBTREE costs one set look-up per level of the name."""
        kind = group.filter
        if kind == "PERSONAL":
            return True
        if kind == "INBOXES":
            return name in DELIVERY_TARGETS
        if kind == "SUBSCRIBED":
            return name in self.subscribed
        if name in named:
            return True
        if kind == "SUBTREE":
            cut = name.rfind(_DELIM)
            while cut > 0:
                if name[:cut] in named:
                    return True
                cut = name.rfind(_DELIM, 0, cut)
        return False

    def selected_wants(self, event: str) -> bool:
        group = self.selected
        return group is not None and group.events is not None and event in group.events

    # -------------------------------------------------------------- events
    def offer(self, change: Change, selected_id: int | None, dropped: int = 0) -> bool:
        """Takes one change from the bus; True if there is news to send.
        Synchronous and O(1) in the number of mailboxes. ``dropped``: the
        subscription's count of changes it lost (a slow consumer); any
        loss once NOTIFY is set is an overflow too (section 5.8), as what
        was lost cannot be told."""
        if self.overflowed:
            return False
        if self._dropped is None:
            self._dropped = dropped
        elif dropped != self._dropped:
            self._overflow()
            return True
        kind = change.kind
        event = _KIND_EVENT.get(kind)
        if event is not None:
            box = change.mailbox_id
            if box is not None and box == selected_id:
                if self.selected_wants(event):
                    self.selected_news = True
                    self.ready.set()
                    return True
                return False
            name = self.names.get(box)  # type: ignore[arg-type]
            if name is None or not self.wants(name, event):
                return False
            return self._queue_status(box, event)  # type: ignore[arg-type]
        if kind is ChangeKind.MAILBOX:
            return self._mailbox_change(change)
        return False

    def _mailbox_change(self, change: Change) -> bool:
        data = change.data or {}
        op, name = data.get("op"), data.get("name")
        if not isinstance(name, str):
            name = None
        box = change.mailbox_id
        if op == "create" and name is not None and box is not None:
            self.names[box] = name
            self.existing.add(name)
            if self.wants(name, "MailboxName"):
                return self._queue_list(name, self._exists_attrs(name), None)
        elif op == "rename" and name is not None and box is not None:
            old = data.get("old")
            old = old if isinstance(old, str) else self.names.get(box, name)
            self.names[box] = name
            self.existing.discard(old)
            self.existing.add(name)
            if old in self.subscribed:  # storage renames subscriptions too
                self.subscribed.discard(old)
                self.subscribed.add(name)
            if self.wants(name, "MailboxName") or self.wants(old, "MailboxName"):
                return self._queue_list(name, self._exists_attrs(name), old)
        elif op == "delete" and name is not None:
            if box is not None:
                self.names.pop(box, None)
            self.existing.discard(name)
            if self.wants(name, "MailboxName"):
                return self._queue_list(name, self._exists_attrs(name), None)
        elif op in ("subscribe", "unsubscribe") and name is not None:
            if op == "subscribe":
                self.subscribed.add(name)
            else:
                self.subscribed.discard(name)
            if self.wants(name, "SubscriptionChange"):
                return self._queue_list(name, self._exists_attrs(name), None)
        elif op == "metadata":
            entries = data.get("entries")
            names = [e for e in entries if isinstance(e, str)] if isinstance(entries, list) else []
            if box is None:
                if any(g.events and "ServerMetadataChange" in g.events for g in self.groups):
                    return self._queue_metadata(None, names)
            else:
                box_name = self.names.get(box)
                if box_name is not None and self.wants(box_name, "MailboxMetadataChange"):
                    return self._queue_metadata(box, names)
        return False

    def _exists_attrs(self, name: str) -> str:
        """Section 5.4 and 5.5: what a LIST notification says of ``name``."""
        attrs = [] if name in self.existing else ["\\NonExistent"]
        if name in self.subscribed:
            attrs.append("\\Subscribed")
        return " ".join(attrs)

    # --------------------------------------------------------------- queue
    def _room(self, key: tuple[str, object]) -> bool:
        """False (and the queue dropped, section 5.8) once it is full."""
        if key in self.queue or len(self.queue) < MAX_QUEUED:
            return True
        self._overflow()
        return False

    def _overflow(self) -> None:
        self.queue.clear()
        self.selected_news = False
        self.overflowed = True
        self.ready.set()

    def _queue_status(self, box: int, event: str) -> bool:
        key = ("status", box)
        if not self._room(key):
            return True
        events = self.queue.setdefault(key, set())
        events.add(event)  # type: ignore[attr-defined]
        self.ready.set()
        return True

    def _queue_list(self, name: str, attrs: str, old: str | None) -> bool:
        self._serial += 1
        key = ("list", self._serial)
        if not self._room(key):
            return True
        self.queue[key] = (name, attrs, old)
        self.ready.set()
        return True

    def _queue_metadata(self, box: int | None, names: list[str]) -> bool:
        key = ("metadata", box)
        if not self._room(key):
            return True
        held = self.queue.setdefault(key, {})
        for n in names:
            if len(held) < MAX_METADATA_NAMES:  # type: ignore[arg-type]
                held[n] = None  # type: ignore[index]
        self.ready.set()
        return True

    @property
    def pending(self) -> bool:
        return bool(self.queue) or self.selected_news or self.overflowed


# ------------------------------------------------------------------ sending
def status_items(events: Iterable[str], condstore: bool) -> tuple[str, ...]:
    """The STATUS items a notification carries (sections 5.1 and 5.2)."""
    events = set(events)
    items: list[str] = []
    if events & {"MessageNew", "MessageExpunge"}:
        items += ["MESSAGES", "UIDNEXT"]
    if "FlagChange" in events:
        items.append("UIDVALIDITY")
    items.append("UNSEEN")
    if condstore:
        items.append("HIGHESTMODSEQ")
    return tuple(items)


async def status_line(s: Session, box_id: int, name: str, items: tuple[str, ...]) -> None:
    """One untagged STATUS for mailbox ``box_id`` (read through the
    session's STATUS cache, which every change of the mailbox clears)."""
    assert s.mail is not None and s.account is not None
    st = s.status_cache.get(box_id)
    if st is None:
        st = await s.mail.status(s.account.id, box_id)
        s.status_cache[box_id] = st
    values = {
        "MESSAGES": st.messages,
        "UIDNEXT": st.uidnext,
        "UIDVALIDITY": st.uidvalidity,
        "UNSEEN": st.unseen,
        "HIGHESTMODSEQ": st.highestmodseq,
    }
    body = " ".join(f"{i} {values[i]}" for i in items)
    s.untagged(b"STATUS " + encode.mailbox(name, s.utf8) + f" ({body})".encode())


async def sync_selected(s: Session, state: NotifyState, allow_expunge: bool, **kw: bool) -> None:
    """The selected mailbox's updates (Session.sync), then MessageNew's
    fetch attributes for mail it announced (section 5.2: EXISTS, then
    FETCH with the attributes asked for)."""
    view = s.selected
    if view is None:
        return
    state.selected_news = False
    if state._view is not view:
        state._view, state._top = view, view.max_uid  # SELECT told of these
    await s.sync(allow_expunge=allow_expunge, **kw)
    group = state.selected
    top = view.max_uid
    if s.selected is not view or top <= state._top:
        return
    first, state._top = state._top + 1, top
    if group is None or not group.fetch or not state.selected_wants("MessageNew"):
        return
    from imapd.imap.commands.fetch import handle_fetch

    fetch = Fetch(
        tag="*",
        name="UID FETCH",
        sequence=SequenceSet(((first, top),)),
        attributes=group.fetch,
        uid=True,
    )
    try:
        await handle_fetch(s, fetch)  # untagged FETCH only; its completion is not sent
    except StorageError as err:
        log.debug("NOTIFY fetch attributes not sent: %s", err)


async def flush(s: Session, in_command: bool) -> None:
    """Sends what is queued: the selected mailbox's news, then STATUS,
    LIST and METADATA notifications in the order they were first heard;
    after an overflow, NOTIFICATIONOVERFLOW and NOTIFY is off (section
    5.8). Only where an unsolicited response may go (see module doc):
    ``in_command`` (IDLE, a command's end) allows EXPUNGE; between
    commands only the SELECTED filter with MessageExpunge does (section
    6.1; SELECTED-DELAYED keeps RFC 3501 section 7.4.1's rule)."""
    state = s.notify
    if state is None:
        return
    state.ready.clear()
    if state.overflowed:
        s.notify = None
        s.untagged("OK [NOTIFICATIONOVERFLOW] Too many notifications, NOTIFY is now NONE")
        return
    group = state.selected
    if s.selected is not None and state.selected_news and group is not None:
        expunge = in_command or (
            group.filter == "SELECTED" and state.selected_wants("MessageExpunge")
        )
        try:
            await sync_selected(s, state, expunge)
        except StorageError:
            state.selected_news = True  # sync left itself owing a read
    queue, state.queue = state.queue, {}
    for (what, key), value in queue.items():
        if what == "status":
            name = state.names.get(key)  # type: ignore[arg-type]
            if name is None:
                continue  # deleted meanwhile: its LIST said so
            items = status_items(value, s.condstore)  # type: ignore[arg-type]
            try:
                await status_line(s, key, name, items)  # type: ignore[arg-type]
            except StorageError:
                continue  # gone, or storage down: the next change tells again
        elif what == "list":
            name, attrs, old = value  # type: ignore[misc]
            line = f'LIST ({attrs}) "{_DELIM}" '.encode() + encode.mailbox(name, s.utf8)
            if old is not None:  # section 5.4 (RFC 5258 section 9's OLDNAME)
                line += b' ("OLDNAME" (' + encode.mailbox(old, s.utf8) + b"))"
            s.untagged(line)
        else:
            _metadata_line(s, state, key, value)  # type: ignore[arg-type]
        if state.overflowed or s.notify is not state:
            return


def _metadata_line(s: Session, state: NotifyState, box: int | None, names: dict[str, None]) -> None:
    """RFC 5464 section 4.4.2 unsolicited METADATA: the mailbox ("" the
    server) and the entries that changed (sections 5.6 and 5.7)."""
    from imapd.imap.commands.metadata import entry_atom

    mailbox = "" if box is None else state.names.get(box)
    if mailbox is None or not names:
        return
    entries = b" ".join(entry_atom(n) for n in names)
    s.untagged(b"METADATA " + encode.mailbox(mailbox, s.utf8) + b" " + entries)


async def after_command(s: Session, allow_expunge: bool) -> None:
    """At a command's end, before its tagged reply: the selected mailbox's
    updates (with MessageNew's fetch attributes) and whatever else waits."""
    state = s.notify
    if state is None:
        return
    if s.selected is not None:
        await sync_selected(s, state, allow_expunge)
    if state.queue or state.overflowed:
        await flush(s, in_command=True)


async def next_event(s: Session, timeout: float | None) -> FrameEvent | None:
    """The connection's next framing event while no command is in
    progress, sending notifications as they come meanwhile (section 4).
    The read itself is never cancelled while it waits (it only holds a
    wait on the socket), so no client input is lost."""
    loop = asyncio.get_running_loop()
    reader = loop.create_task(s.conn.next_event(timeout))  # type: ignore[arg-type]
    try:
        while True:
            state = s.notify
            if state is not None and state.ready.is_set():
                await flush(s, in_command=False)
                await s.conn.drain()
            if reader.done():
                return reader.result()  # type: ignore[no-any-return]
            if s.notify is None:
                return await reader  # type: ignore[no-any-return]
            waker = loop.create_task(s.notify.ready.wait())
            try:
                await asyncio.wait({reader, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
    except BaseException:
        reader.cancel()
        raise

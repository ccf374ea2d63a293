"""NOTIFY (RFC 5465 section 3): what this session is told of unasked.

``NOTIFY NONE`` turns it off (the RFC 3501 updates of the selected
mailbox go on); ``NOTIFY SET`` replaces what was set before with a new
:class:`~imapd.imap.notify.NotifyState`, after reading the account's
mailbox names and subscriptions once (so that each later change costs a
dict look-up), and with STATUS (section 3.1) tells the state of every
mailbox it covers first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imapd.imap.notify import (
    SUPPORTED_EVENTS,
    NotifyState,
    status_items,
    status_line,
    unsupported_events,
)
from imapd.imap.session import Reply, no, ok
from storage.errors import ErrorKind, StorageError

if TYPE_CHECKING:
    from imapd.imap.session import Session
    from imapd.imap.wire.commands import Notify
    from storage.model import Mailbox

# Reads of the names again when changes came in while they were read.
_READ_TRIES = 3


async def handle_notify(s: Session, cmd: Notify) -> Reply:
    assert s.mail is not None and s.account is not None
    if not cmd.groups:
        s.notify = None
        return ok("NOTIFY completed")
    unknown = unsupported_events(cmd.groups)
    if unknown:
        # Section 6: NO [BADEVENT (the events this server supports)].
        supported = " ".join(SUPPORTED_EVENTS)
        return no(f"Event {unknown[0][:40]} not supported", f"BADEVENT ({supported})")
    s.notify = None  # section 3: the new set replaces the old, from here on
    boxes, subscribed = await _names(s)
    state = NotifyState(cmd.groups, boxes, subscribed)
    if cmd.status:
        await _initial_status(s, state, boxes)
    s.notify = state
    return ok("NOTIFY completed")


async def _names(s: Session) -> tuple[list[Mailbox], set[str]]:
    """The account's mailboxes and subscriptions, read again if a change
    came in meanwhile (the bus tells the new state only from now on)."""
    assert s.mail is not None and s.account is not None
    for _ in range(_READ_TRIES):
        heard = s.changes_heard
        boxes = await s.mail.list_mailboxes(s.account.id)
        subscribed = set(await s.mail.subscriptions(s.account.id))
        if s.changes_heard == heard:
            break
    return boxes, subscribed


async def _initial_status(s: Session, state: NotifyState, boxes: list[Mailbox]) -> None:
    """Section 3.1: a STATUS response for each mailbox the message events
    cover, the selected one aside, before the tagged OK."""
    items = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", *status_items((), s.condstore))
    selected = s.selected.mailbox.id if s.selected is not None else None
    for box in sorted(boxes, key=lambda b: (b.name != "INBOX", b.name)):
        if box.id == selected or not state.wants(box.name, "MessageNew"):
            continue
        try:
            await status_line(s, box.id, box.name, items)
        except StorageError as err:
            if err.kind is not ErrorKind.NOT_FOUND:
                raise  # deleted meanwhile: nothing to tell of it

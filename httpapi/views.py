"""JSON shapes of folders, messages and events, in one place.

Dates are RFC 3339 strings in UTC; ids are opaque strings (see
:mod:`httpapi.ids`); flags are returned raw (``\\Seen``, keywords) next to
the booleans a client usually wants (``unread``, ``flagged``).
"""

from __future__ import annotations

import datetime as dt
import email.errors
import email.header
from typing import Any

from httpapi.ids import folder_id, message_id
from storage.model import (
    ANSWERED,
    FLAGGED,
    SEEN,
    Address,
    Change,
    Mailbox,
    MailboxStatus,
    StoredMessage,
)


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def decode_words(value: str | None) -> str | None:
    """RFC 2047 encoded-words to text; undecodable input comes back as is."""
    if not value or "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, email.errors.HeaderParseError):
        return value


def addresses(values: tuple[Address, ...]) -> list[dict[str, str | None]]:
    """ENVELOPE addresses as ``{"name", "address"}``; group markers skipped."""
    out: list[dict[str, str | None]] = []
    for addr in values:
        if addr.host is None:
            continue  # RFC 3501 section 7.4.2 group start/end marker
        out.append({
            "name": decode_words(addr.name) or None,
            "address": f"{addr.mailbox or ''}@{addr.host}",
        })
    return out


def folder_view(mailbox: Mailbox, status: MailboxStatus) -> dict[str, Any]:
    return {
        "id": folder_id(mailbox.id),
        "name": mailbox.name,
        "special_use": mailbox.special_use,
        "total": status.messages,
        "unread": status.unseen,
        "size": status.size,
    }


def summary(stored: StoredMessage, thread_id: str | None) -> dict[str, Any]:
    """One message-list item."""
    entry, parsed = stored.entry, stored.parsed
    env = parsed.envelope
    sender = addresses(env.from_)
    return {
        "id": message_id(entry.mailbox_id, entry.uid),
        "folder_id": folder_id(entry.mailbox_id),
        "from": sender[0] if sender else None,
        "to": addresses(env.to),
        "cc": addresses(env.cc),
        "subject": parsed.subject,
        "preview": parsed.preview,
        "date": iso(parsed.sent_date or entry.internal_date),
        "received_at": iso(entry.internal_date),
        "flags": sorted(entry.flags),
        "unread": SEEN not in entry.flags,
        "flagged": FLAGGED in entry.flags,
        "answered": ANSWERED in entry.flags,
        "has_attachments": parsed.has_attachments,
        "size": entry.size,
        "thread_id": thread_id,
    }


def event_view(change: Change) -> dict[str, Any]:
    """A change-log entry as pushed to clients (WebSocket and long-poll)."""
    return {
        "id": change.id,
        "kind": change.kind.value,
        "folder_id": folder_id(change.mailbox_id) if change.mailbox_id is not None else None,
        "message_id": (
            message_id(change.mailbox_id, change.uid)
            if change.mailbox_id is not None and change.uid is not None
            else None
        ),
        "uid": change.uid,
        "modseq": change.modseq,
        "at": iso(change.at),
    }

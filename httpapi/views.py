"""JSON shapes of folders, messages and events, in one place.

Dates are RFC 3339 strings in UTC; ids are opaque strings (see
:mod:`httpapi.ids`); flags are returned raw (``\\Seen``, keywords) next to
the booleans a client usually wants (``unread``, ``flagged``).
"""

from __future__ import annotations

import datetime as dt
import email.errors
import email.header
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from httpapi.ids import FolderIds, folder_id
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

try:  # orjson encodes a message list several times faster than json
    import orjson
except ImportError:  # pragma: no cover - a site without it answers the same, slower
    orjson = None


def encode_json(data: Any) -> bytes:
    """``data`` as UTF-8 JSON (RFC 8259 section 8.1). What orjson cannot take
    (a lone surrogate from an undecodable header, an integer beyond 64
    bits, a non-string key) goes through :mod:`json`, which escapes it: the
    same document either way."""
    if orjson is not None:
        try:
            return orjson.dumps(data)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            pass
    return json.dumps(data, separators=(",", ":")).encode("ascii")


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """``web.json_response`` (same headers) through :func:`encode_json`."""
    return json_bytes_response(encode_json(data), status, headers)


def json_bytes_response(
    body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """:func:`json_response` of a document already encoded (``body``)."""
    return web.Response(
        body=body,
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
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
        "id": folder_id(mailbox),
        "name": mailbox.name,
        "special_use": mailbox.special_use,
        "total": status.messages,
        "unread": status.unseen,
        "size": status.size,
    }


def summary(stored: StoredMessage, thread_id: str | None, ids: FolderIds) -> dict[str, Any]:
    """One message-list item; ``ids`` names its folder and itself."""
    return {**_unthreaded_summary(stored, ids), "thread_id": thread_id}


LIST_ITEMS_CACHED = 10_000  # list items remembered per process (a few KB each)


class ListItems:
    """Message-list items (:func:`summary`) remembered without their thread
    id, keyed by what they are computed from: the entry (mailbox, UID), its
    modseq (every flag change raises it, RFC 7162 section 3.1), its message
    row and content-addressed blob. A key names one item for good, so an
    entry is never stale; at most ``max_items`` are kept, oldest out first."""

    def __init__(self, max_items: int = LIST_ITEMS_CACHED) -> None:
        self.max_items = max_items
        self._items: dict[tuple[int, str, int, int, str], dict[str, Any]] = {}

    def item(self, stored: StoredMessage, thread_id: str | None, ids: FolderIds) -> dict[str, Any]:
        """``summary(stored, thread_id, ids)``: a new dict whose nested values
        (addresses, flags) are shared with the cache: read them only."""
        entry = stored.entry
        # The ids are part of the key: a row id is one shard's own.
        key = (entry.mailbox_id, ids.message_id(entry.mailbox_id, entry.uid), entry.modseq,
               entry.message_id, entry.blob_key)
        base = self._items.get(key)
        if base is None:
            base = _unthreaded_summary(stored, ids)
            if len(self._items) >= self.max_items:
                del self._items[next(iter(self._items))]
            self._items[key] = base
        return {**base, "thread_id": thread_id}

    def __len__(self) -> int:
        return len(self._items)


LIST_PAGES_BYTES = 16 * 1024 * 1024  # encoded message-list answers kept per process


class ListPages:
    """Encoded message-list answers, each kept with what it was built from:
    the page (its keys and :class:`StoredMessage` objects), the thread index
    object and the folder's id. An answer is reused only for a page made of
    the very same objects: the storage hands out one frozen StoredMessage
    per set of entry columns (flags and modseq among them) and never changes
    it, the objects are held here so their identity is never recycled, and a
    :class:`ThreadIndex`'s thread map does not change once built. The answer
    is a function of exactly these, so a reused one is the answer that would
    be built now; whatever another process wrote reaches this only through
    a new page read, which yields new objects. Bounded by the bytes held,
    oldest out first."""

    def __init__(self, max_bytes: int = LIST_PAGES_BYTES) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._pages: dict[Any, tuple[tuple[Any, ...], object, str, bytes]] = {}

    def get(self, key: Any, page: list[Any], index: object, folder: str) -> bytes | None:
        """The answer kept under ``key`` if it was built from ``page``
        (``(key, StoredMessage)`` pairs), ``index`` and ``folder``."""
        found = self._pages.get(key)
        if found is None:
            return None
        kept, kept_index, kept_folder, body = found
        if (
            kept_index is not index
            or kept_folder != folder
            or len(kept) != len(page)
            or not all(a[1] is b[1] and a[0] == b[0] for a, b in zip(kept, page, strict=True))
        ):
            return None
        return body

    def put(self, key: Any, page: list[Any], index: object, folder: str, body: bytes) -> None:
        if len(body) > self.max_bytes // 8:
            return
        old = self._pages.pop(key, None)
        if old is not None:
            self.held -= len(old[3])
        while self._pages and self.held + len(body) > self.max_bytes:
            self.held -= len(self._pages.pop(next(iter(self._pages)))[3])
        self._pages[key] = (tuple(page), index, folder, body)
        self.held += len(body)


MESSAGE_BODIES_BYTES = 32 * 1024 * 1024  # message-read content kept per process
MESSAGE_BODY_MAX = 256 * 1024  # a larger one is read afresh each time


class MessageBodies:
    """What a message read derives from the raw bytes alone (headers, text,
    sanitized HTML, attachment sizes), kept by the blob's key: blobs are
    content-addressed, so a key names one content for good, and copies in
    other folders share it. Bounded by the text it holds, oldest out first;
    content over ``max_item`` characters is not kept."""

    def __init__(self, max_bytes: int = MESSAGE_BODIES_BYTES,
                 max_item: int = MESSAGE_BODY_MAX) -> None:
        self.max_bytes = max_bytes
        self.max_item = max_item
        self.held = 0
        self._bodies: dict[str, tuple[dict[str, Any], int]] = {}

    def get(self, blob_key: str) -> dict[str, Any] | None:
        """The content kept for ``blob_key``: read it, never change it."""
        found = self._bodies.get(blob_key)
        return found[0] if found is not None else None

    def put(self, blob_key: str, content: dict[str, Any]) -> None:
        size = _text_size(content)
        if size > self.max_item or blob_key in self._bodies:
            return
        while self._bodies and self.held + size > self.max_bytes:
            self.held -= self._bodies.pop(next(iter(self._bodies)))[1]
        self._bodies[blob_key] = (content, size)
        self.held += size


def _text_size(value: Any) -> int:
    """Characters of text in a JSON-shaped value, plus a little per item."""
    if isinstance(value, str):
        return len(value) + 16
    if isinstance(value, dict):
        return sum(_text_size(k) + _text_size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_text_size(v) for v in value) + 16
    return 16


def _unthreaded_summary(stored: StoredMessage, ids: FolderIds) -> dict[str, Any]:
    entry, parsed = stored.entry, stored.parsed
    env = parsed.envelope
    sender = addresses(env.from_)
    return {
        "id": ids.message_id(entry.mailbox_id, entry.uid),
        "folder_id": ids.folder_id(entry.mailbox_id),
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
    }


def event_view(change: Change, ids: FolderIds) -> dict[str, Any]:
    """A change-log entry as pushed to clients (WebSocket and long-poll)."""
    return {
        "id": change.id,
        "kind": change.kind.value,
        "folder_id": ids.folder_id(change.mailbox_id) if change.mailbox_id is not None else None,
        "message_id": (
            ids.message_id(change.mailbox_id, change.uid)
            if change.mailbox_id is not None and change.uid is not None
            else None
        ),
        "uid": change.uid,
        "modseq": change.modseq,
        "at": iso(change.at),
    }

"""Opaque identifiers of the API: message ids and pagination cursors.

A message id names one mailbox entry, ``(mailbox id, uid)``: UIDs are
unique and never reused within a mailbox (RFC 3501 section 2.3.1.1), so an
id never silently points at another message. Ids are URL-safe base64 of a
small tagged string; clients must treat them as opaque. Ownership is never
taken from the id: every handler checks the mailbox belongs to the caller.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from httpapi.errors import ApiError, bad_request


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("ascii")).rstrip(b"=").decode("ascii")


def _decode(token: str) -> str | None:
    if not token or len(token) > 200:
        return None
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def _ints(text: str | None, tag: str, count: int) -> tuple[int, ...] | None:
    if text is None or not text.startswith(tag + ":"):
        return None
    parts = text[len(tag) + 1 :].split(".")
    if len(parts) != count or not all(p.isdigit() and len(p) < 19 for p in parts):
        return None
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class MessageRef:
    """One mailbox entry as the API names it."""

    mailbox_id: int
    uid: int

    def encode(self) -> str:
        return _encode(f"m:{self.mailbox_id}.{self.uid}")

    @classmethod
    def decode(cls, token: str) -> MessageRef:
        """Raises a 404 ApiError for anything that is not a message id."""
        parsed = _ints(_decode(token), "m", 2)
        if parsed is None:
            raise ApiError(404, "not_found", "no such message")
        return cls(parsed[0], parsed[1])


def message_id(mailbox_id: int, uid: int) -> str:
    return MessageRef(mailbox_id, uid).encode()


def folder_id(mailbox_id: int) -> str:
    """Folder ids are the mailbox row ids as strings (stable across renames)."""
    return str(mailbox_id)


def parse_folder_id(token: str) -> int:
    if not token.isdigit() or len(token) > 18:
        raise ApiError(404, "not_found", "no such folder")
    return int(token)


def encode_folder_cursor(mailbox_id: int, date_key: int, uid: int) -> str:
    """Next page: entries of ``mailbox_id`` ordered strictly after
    ``(date_key, uid)`` newest first (see :mod:`httpapi.folders`). A keyset,
    so messages arriving meanwhile never shift or repeat a page."""
    return _encode(f"f:{mailbox_id}.{date_key}.{uid}")


def decode_folder_cursor(token: str, mailbox_id: int) -> tuple[int, int]:
    """The ``(date_key, uid)`` of a folder cursor; 400 if it is not one for this folder."""
    parsed = _ints(_decode(token), "f", 3)
    if parsed is None or parsed[0] != mailbox_id:
        raise bad_request("cursor is not valid for this folder", "invalid_cursor")
    return parsed[1], parsed[2]


def encode_search_cursor(timestamp_us: int, mailbox_id: int, uid: int) -> str:
    """Next page of an account-wide list ordered newest first by
    (internal date, mailbox id, uid): entries strictly after this key."""
    return _encode(f"s:{timestamp_us}.{mailbox_id}.{uid}")


def decode_search_cursor(token: str) -> tuple[int, int, int]:
    parsed = _ints(_decode(token), "s", 3)
    if parsed is None:
        raise bad_request("cursor is not valid", "invalid_cursor")
    return parsed[0], parsed[1], parsed[2]

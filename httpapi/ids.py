"""Opaque identifiers of the API: folder and message ids, pagination cursors.

A folder id names a mailbox by its account and UIDVALIDITY,
``u<account>.<uidvalidity>``; a message id names one mailbox entry,
``(account, uidvalidity, uid)``. An account move to another shard keeps
all three (``storage/move.py``) where mailbox row ids are each shard's
own, so ids a client stored survive the move. UIDVALIDITY is never reused
within an account (``MailStore.create_mailbox``) and UIDs never within a
mailbox (RFC 3501 section 2.3.1.1), so an id never silently points at
another message; the account makes ids unique across accounts. Ids
issued before (a row id: ``<digits>`` and ``m:<row>.<uid>``) are still
accepted. Ids are URL-safe base64 of a small
tagged string; clients must treat them as opaque. Ownership is never taken
from the id: every handler checks the mailbox belongs to the caller.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from httpapi.errors import ApiError, bad_request
from storage.model import Mailbox


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
    """One mailbox entry, resolved to this shard's mailbox row id."""

    mailbox_id: int
    uid: int


def folder_id(mailbox: Mailbox) -> str:
    """A folder's id: its account and UIDVALIDITY, kept by renames and moves."""
    return f"u{mailbox.account_id}.{mailbox.uidvalidity}"


class FolderIds:
    """The API ids of one account's mailboxes (see the module docstring):
    mailbox row id <-> UIDVALIDITY, from one ``MailStore.list_mailboxes``.
    A row not listed (a mailbox deleted since) keeps the row-id form."""

    def __init__(self, account_id: int, mailboxes: Iterable[Mailbox]) -> None:
        self.account_id = account_id
        self._uidvalidity = {b.id: b.uidvalidity for b in mailboxes}
        self._row = {v: row for row, v in self._uidvalidity.items()}

    def folder_id(self, mailbox_id: int) -> str:
        uidvalidity = self._uidvalidity.get(mailbox_id)
        if uidvalidity is None:
            return str(mailbox_id)
        return f"u{self.account_id}.{uidvalidity}"

    def message_id(self, mailbox_id: int, uid: int) -> str:
        uidvalidity = self._uidvalidity.get(mailbox_id)
        if uidvalidity is None:
            return _encode(f"m:{mailbox_id}.{uid}")
        return _encode(f"v:{self.account_id}.{uidvalidity}.{uid}")

    def knows(self, mailbox_id: int) -> bool:
        """Whether the mailbox row was among those listed."""
        return mailbox_id in self._uidvalidity

    def _row_of(self, account_id: int, uidvalidity: int) -> int | None:
        return self._row.get(uidvalidity) if account_id == self.account_id else None

    def folder(self, token: str) -> int:
        """The mailbox row id a folder id names; 404 if none of the account's."""
        parsed = _ints(f"u:{token[1:]}", "u", 2) if token.startswith("u") else None
        if parsed is not None:
            row = self._row_of(*parsed)
        elif token.isdigit() and len(token) < 19:
            row = int(token)  # an id issued before: the row id itself
        else:
            row = None
        if row is None:
            raise ApiError(404, "not_found", "no such folder")
        return row

    def message(self, token: str) -> MessageRef:
        """The entry a message id names; 404 for anything that is not one."""
        text = _decode(token)
        parsed = _ints(text, "v", 3)
        row = self._row_of(parsed[0], parsed[1]) if parsed is not None else None
        if parsed is not None:
            if row is None:
                raise ApiError(404, "not_found", "no such message")
            return MessageRef(row, parsed[2])
        parsed = _ints(text, "m", 2)  # an id issued before: row id and UID
        if parsed is None:
            raise ApiError(404, "not_found", "no such message")
        return MessageRef(parsed[0], parsed[1])


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

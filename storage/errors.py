"""Storage error kinds, classified once and mapped to each protocol's reply.

Every storage operation raises :class:`StorageError` (never a backend
exception) for conditions a client can cause or a retry can cure. Protocol
code maps ``error.kind`` to its reply through :data:`IMAP_RESPONSE_CODE`,
:data:`SMTP_REPLY`, :data:`POP3_RESP_CODE` and :data:`HTTP_STATUS`, so the
mapping lives in one place (the Dovecot lib-storage habit).
"""

from __future__ import annotations

import enum
from collections.abc import Collection


class ErrorKind(enum.Enum):
    """What went wrong, in terms a protocol can answer."""

    NOT_FOUND = "not found"  # no such mailbox, message, account
    EXISTS = "exists"  # name already taken
    EXPUNGED = "expunged"  # message vanished under the caller
    OVER_QUOTA = "over quota"
    TOO_BIG = "too big"
    IN_USE = "in use"  # lock held elsewhere (POP3 maildrop, mailbox being renamed)
    INVALID = "invalid"  # bad name, bad argument
    TEMPORARY = "temporary"  # backend unavailable, lock timeout: retry later
    NO_PERMISSION = "no permission"


class StorageError(Exception):
    """A classified storage failure. ``str(err)`` is safe to show a client."""

    def __init__(self, kind: ErrorKind, message: str = "") -> None:
        super().__init__(message or kind.value)
        self.kind = kind

    @property
    def message(self) -> str:
        return str(self)


class AccountMoving(StorageError):
    """TEMPORARY: the account is being moved to another shard, or has moved
    away from the one asked (``storage/move.py``). A session holding that
    shard's mailbox ids ends, so that its client reconnects to the new one."""

    def __init__(self) -> None:
        super().__init__(ErrorKind.TEMPORARY, "account is moving to another shard, try again")


class BlobsBeingDeleted(StorageError):
    """TEMPORARY: blobs a transaction names are being (or were lately)
    deleted by garbage collection; it rolled back
    (``storage/blob/deleting.py``). ``keys``: those blobs; ``last_id``:
    the newest deletion row found (the retry answers the rows up to it);
    ``where``: whose rows, where a writer may try another database (a
    queue partition)."""

    def __init__(self, keys: Collection[str], last_id: int, where: str = "") -> None:
        super().__init__(ErrorKind.TEMPORARY, "a blob is being collected, try again")
        self.keys = frozenset(keys)
        self.last_id = last_id
        self.where = where


# RFC 5530 IMAP response codes.
IMAP_RESPONSE_CODE: dict[ErrorKind, str] = {
    ErrorKind.NOT_FOUND: "NONEXISTENT",
    ErrorKind.EXISTS: "ALREADYEXISTS",
    ErrorKind.EXPUNGED: "EXPUNGEISSUED",
    ErrorKind.OVER_QUOTA: "OVERQUOTA",
    ErrorKind.TOO_BIG: "TOOBIG",
    ErrorKind.IN_USE: "INUSE",
    ErrorKind.INVALID: "CANNOT",
    ErrorKind.TEMPORARY: "UNAVAILABLE",
    ErrorKind.NO_PERMISSION: "NOPERM",
}

# RFC 5321 section 4.2.2 reply codes with RFC 3463 enhanced status codes.
SMTP_REPLY: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.NOT_FOUND: (550, "5.1.1"),
    ErrorKind.EXISTS: (451, "4.3.0"),
    ErrorKind.EXPUNGED: (451, "4.3.0"),
    ErrorKind.OVER_QUOTA: (452, "4.2.2"),
    ErrorKind.TOO_BIG: (552, "5.3.4"),
    ErrorKind.IN_USE: (451, "4.3.0"),
    ErrorKind.INVALID: (550, "5.6.0"),
    ErrorKind.TEMPORARY: (451, "4.3.0"),
    ErrorKind.NO_PERMISSION: (550, "5.7.1"),
}

# RFC 2449 section 8 / RFC 3206 POP3 response codes.
POP3_RESP_CODE: dict[ErrorKind, str] = {
    ErrorKind.NOT_FOUND: "SYS/PERM",
    ErrorKind.EXISTS: "SYS/PERM",
    ErrorKind.EXPUNGED: "SYS/TEMP",
    ErrorKind.OVER_QUOTA: "SYS/PERM",
    ErrorKind.TOO_BIG: "SYS/PERM",
    ErrorKind.IN_USE: "IN-USE",
    ErrorKind.INVALID: "SYS/PERM",
    ErrorKind.TEMPORARY: "SYS/TEMP",
    ErrorKind.NO_PERMISSION: "AUTH",
}

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.EXISTS: 409,
    ErrorKind.EXPUNGED: 404,
    ErrorKind.OVER_QUOTA: 507,
    ErrorKind.TOO_BIG: 413,
    ErrorKind.IN_USE: 423,
    ErrorKind.INVALID: 400,
    ErrorKind.TEMPORARY: 503,
    ErrorKind.NO_PERMISSION: 403,
}


def not_found(what: str) -> StorageError:
    return StorageError(ErrorKind.NOT_FOUND, what)


def exists(what: str) -> StorageError:
    return StorageError(ErrorKind.EXISTS, what)


def invalid(what: str) -> StorageError:
    return StorageError(ErrorKind.INVALID, what)

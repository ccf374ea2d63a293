"""METADATA and METADATA-SERVER (RFC 5464): GETMETADATA and SETMETADATA.

Entries are kept in the mailbox owner's shard (storage/sql/metadata.py):
the server's (mailbox "") and each mailbox's, under /private and /shared.
On the account's own mailboxes both are its own, kept apart by their
names. On another account's mailbox, named under "Other Users" (RFC 2342,
shared through RFC 4314), /shared entries are the mailbox's, seen and set
by each of its users, and /private entries are the accessing user's own
(RFC 5464 section 3.3: private entries are per user); reading or setting
either needs "l" and one of "r", "s", "w", "i", "p" (section 3.3, decided
in storage.acl), else NO [NOPERM]. Private entries are always stored (no
NOPRIVATE). Limits,
each answered as section 4.3 says: a value of at most :data:`MAX_VALUE`
octets (NO [METADATA MAXSIZE n]), at most :data:`MAX_ENTRIES` entries per
account (NO [METADATA TOOMANY]).

Where the RFC leaves a choice: an entry named at DEPTH 0 that has no value
is returned as NIL, so that a client tells "unset" from "not answered";
at DEPTH 1 and infinity only the entries that hold a value are (the
section 4.2.2 example).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from imapd.imap.namespace import split_other_user
from imapd.imap.session import Reply, no, ok
from imapd.imap.wire import encode
from storage.errors import ErrorKind, StorageError

if TYPE_CHECKING:
    from imapd.imap.session import Session
    from imapd.imap.wire.commands import GetMetadata, SetMetadata

MAX_VALUE = 32 * 1024  # octets per value (below the 64 KiB argument literal cap)
MAX_ENTRIES = 200  # entries per account, server and mailboxes together


async def _entries_of(s: Session, name: str) -> tuple[Any, int, int | None]:
    """Where the entries of mailbox ``name`` are: (store, owner account
    id, mailbox id or None for the server's ""). Another account's
    mailbox comes with the store that checks this account's rights
    (storage.acl.GrantedStore). NO [NONEXISTENT] for an unknown mailbox."""
    assert s.mail is not None and s.account is not None
    if name == "":
        return s.mail, s.account.id, None
    if split_other_user(name) is None:
        return s.mail, s.account.id, (await s.mailbox_id_of(name)).id
    access = await s.open_access(name)
    return access.store, access.owner.id, access.mailbox.id


def _wanted(stored: dict[str, bytes], entry: str, depth: str) -> list[tuple[str, bytes | None]]:
    """RFC 5464 section 4.2.2: ``entry`` and, by ``depth``, its children
    (one more component) or all its descendants."""
    out: list[tuple[str, bytes | None]] = []
    value = stored.get(entry)
    if value is not None or depth == "0":
        out.append((entry, value))
    if depth == "0":
        return out
    prefix = entry + "/"
    for name in sorted(stored):
        if name.startswith(prefix) and (depth == "infinity" or "/" not in name[len(prefix) :]):
            out.append((name, stored[name]))
    return out


_ASTRING_CHARS = re.compile(r'[^(){ \x00-\x1f\x7f-\uffff%*"\\]+')


def entry_atom(name: str) -> bytes:
    """entry = astring: as an atom where it can be (as the RFC's examples
    show them), else quoted."""
    return name.encode() if _ASTRING_CHARS.fullmatch(name) else encode.string(name)


def _value(value: bytes | None) -> bytes:
    """value = nstring / literal8 (RFC 5464 section 5): octets holding NUL
    go as a literal8 (RFC 3516 section 4.2)."""
    if value is None:
        return b"NIL"
    if b"\0" in value:
        return b"~{%d}\r\n" % len(value) + value
    return encode.string(value)


def metadata_response(mailbox: str, utf8: bool, found: Iterable[tuple[str, bytes | None]]) -> bytes:
    """An untagged METADATA response (RFC 5464 section 4.4.1) with the
    entries ``found`` (name, value or None) of ``mailbox`` ("": the
    server), "* " and CRLF left to the caller."""
    items = b" ".join(entry_atom(n) + b" " + _value(v) for n, v in found)
    return b"METADATA " + encode.mailbox(mailbox, utf8) + b" (" + items + b")"


def named_entries(
    stored: dict[str, bytes], entries: Iterable[str], maxsize: int | None
) -> tuple[list[tuple[str, bytes | None]], int]:
    """GETMETADATA at DEPTH 0 (RFC 5464 section 4.2.2) over ``stored``:
    each entry named with its value, None (NIL) when it has none; a value
    longer than ``maxsize`` left out (section 4.2.1). Also the size of the
    longest left out (0: none was). Work linear in ``entries``."""
    found: list[tuple[str, bytes | None]] = []
    longest = 0
    for name in entries:
        value = stored.get(name)
        if value is not None and maxsize is not None and len(value) > maxsize:
            longest = max(longest, len(value))
            continue
        found.append((name, value))
    return found, longest


async def handle_getmetadata(s: Session, cmd: GetMetadata) -> Reply:
    """RFC 5464 section 4.2: one METADATA response with the entries found;
    values past MAXSIZE left out and the largest of their sizes given in
    OK [METADATA LONGENTRIES n] (section 4.2.1)."""
    store, owner, box = await _entries_of(s, cmd.mailbox)
    stored = await store.metadata(owner, box)
    found: dict[str, bytes | None] = {}
    longest = 0
    for entry in cmd.entries:
        for name, value in _wanted(stored, entry, cmd.depth):
            if value is not None and cmd.maxsize is not None and len(value) > cmd.maxsize:
                longest = max(longest, len(value))
                continue
            found.setdefault(name, value)
    if found:
        s.untagged(metadata_response(cmd.mailbox, s.utf8, found.items()))
    if longest:
        return ok("GETMETADATA completed", f"METADATA LONGENTRIES {longest}")
    return ok("GETMETADATA completed")


async def handle_setmetadata(s: Session, cmd: SetMetadata) -> Reply:
    """RFC 5464 section 4.3: every entry set or removed, or none."""
    if any(v is not None and len(v) > MAX_VALUE for _, v in cmd.values):
        return no("Metadata value too large", f"METADATA MAXSIZE {MAX_VALUE}")
    store, owner, box = await _entries_of(s, cmd.mailbox)
    try:
        await store.set_metadata(owner, box, cmd.values, MAX_ENTRIES)
    except StorageError as err:
        if err.kind is ErrorKind.OVER_QUOTA:
            return no("Too many metadata entries", "METADATA TOOMANY")
        raise
    return ok("SETMETADATA completed")

"""RFC 4314 rights, and the one place that decides what they allow.

Every backend stores an ACL the same way (``storage/sql/acl.py``, in the
owner's shard); what a grantee may do with a mailbox of another account
is decided here, once, for IMAP and every other caller:

* :func:`open_mailbox` finds another account's mailbox through the
  directory and the owner's shard (the account -> shard route of
  ``Storage.mail``), reads its ACL and returns a :class:`MailboxAccess`:
  the owner, the mailbox, the caller's rights and a :class:`GrantedStore`.
* :class:`GrantedStore` is the owner's mail store seen through those
  rights: each method checks the right RFC 4314 section 4 ties it to and
  raises ``StorageError(NO_PERMISSION)`` (IMAP ``NO [NOPERM]``, RFC 5530)
  without it; it serves only the one mailbox it was opened for, and a
  method it does not know is refused (deny by default).
* :func:`grants_to` lists what every shard granted one account: the
  mailboxes it sees under "Other Users" (one indexed read per shard).

An account's own mailboxes carry all rights, implicitly (section 2:
the owner's rights may be implicit); they are never checked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage import errors
from storage.errors import ErrorKind, StorageError
from storage.model import DELETED, SEEN, SYSTEM_FLAGS, StoreMode
from storage.sql.acl import ANYONE, Grant

if TYPE_CHECKING:
    from storage.api import MailStore, Storage
    from storage.model import Account, Mailbox

log = logging.getLogger(__name__)

# RFC 4314 section 2.1: every right this server knows, in the RFC's order.
RIGHTS = "lrswipkxtea"
# RFC 4314 section 2.2: RIGHTS= names the rights not in RFC 2086.
RIGHTS_CAPABILITY = "RIGHTS=texk"
# RFC 4314 section 2.1.1: the obsolete RFC 2086 rights stand for these.
OBSOLETE = {"c": "k", "d": "xte"}
ALL = frozenset(RIGHTS)
ANYONE_ID = ANYONE
ANYONE_NAME = "anyone"  # RFC 4314 section 2: the identifier every user matches


def parse_rights(text: str) -> tuple[str, frozenset[str]]:
    """A SETACL mod-rights (RFC 4314 section 3.1): ("+" add, "-" remove or
    "=" replace, the rights). The obsolete "c" and "d" are taken as the
    rights they stand for (section 2.1.1). INVALID for a right this
    server does not know (section 3.1: the command then fails)."""
    mode = "="
    if text[:1] in ("+", "-"):
        mode, text = text[0], text[1:]
    out: set[str] = set()
    for ch in text:
        if ch in ALL:
            out.add(ch)
        elif ch in OBSOLETE:
            out.update(OBSOLETE[ch])
        else:
            raise errors.invalid(f"unknown right {ch!r}")
    return mode, frozenset(out)


async def change_rights(
    store: MailStore, owner_id: int, mailbox_id: int, grantee_id: int, mod_rights: str
) -> str:
    """Applies a SETACL mod-rights (:func:`parse_rights`: add, remove or
    replace) to one grantee's entry on the owner's mailbox, and returns
    the rights it holds now ("" : the entry is gone). The one rule for
    IMAP SETACL and ``mailctl acl grant``; INVALID for an unknown right,
    NOT_FOUND for a mailbox not the owner's."""
    mode, given = parse_rights(mod_rights)

    def change(current: str) -> str:
        held = frozenset(current)
        return render({"=": given, "+": held | given, "-": held - given}[mode])

    return await store.change_acl(owner_id, mailbox_id, grantee_id, change)  # type: ignore[attr-defined,no-any-return]


def render(rights: Iterable[str]) -> str:
    """Rights in the RFC's order, as GETACL and MYRIGHTS answer them."""
    held = set(rights)
    return "".join(r for r in RIGHTS if r in held)


def rights_in(acl: dict[int, str], account_id: int) -> frozenset[str]:
    """What ``account_id`` holds in ``acl`` (grantee id -> rights): its
    own entry and "anyone"'s together (RFC 4314 section 2)."""
    return frozenset(acl.get(account_id, "")) | frozenset(acl.get(ANYONE, ""))


def flag_rights(flags: Iterable[str]) -> dict[str, str]:
    """Which right changing each flag needs (RFC 4314 section 4, STORE):
    \\Seen "s", \\Deleted "t", any other flag or keyword "w"."""
    out = {}
    for flag in flags:
        low = flag.lower()
        out[flag] = "s" if low == SEEN.lower() else "t" if low == DELETED.lower() else "w"
    return out


def no_right(right: str, what: str) -> StorageError:
    return StorageError(ErrorKind.NO_PERMISSION, f"Missing right {right!r} to {what}")


# RFC 4314 section 4: the right each read of a mailbox needs.
_READS = {
    "snapshot": "r",
    "entries": "r",
    "fetch": "r",
    "search": "r",
    "sort_rows": "r",
    "sorted_uids": "r",
    "thread_rows": "r",
    "changes_since": "r",
    "uids": "r",
    "status": "r",
    "peek_recent": "r",
    "claim_recent": "r",
    "page": "r",
}


# RFC 5464 section 3.3: "l" and any one of these to read or set a mailbox's
# /private or /shared METADATA entries.
METADATA_RIGHTS = frozenset("rswip")


def may_annotate(rights: frozenset[str]) -> bool:
    """Whether ``rights`` let a user read and set a mailbox's METADATA
    entries (RFC 5464 section 3.3: "l" and any of "r", "s", "w", "i", "p",
    for /private and /shared alike)."""
    return "l" in rights and bool(rights & METADATA_RIGHTS)


class GrantedStore:
    """The owner's mail store seen through a grantee's rights on ONE of
    its mailboxes. Calls take the owner's account id and that mailbox's
    id, like :class:`storage.api.MailStore`'s; another account or mailbox
    is NOT_FOUND, a missing right NO_PERMISSION. ``rights`` may be
    replaced (the ACL changed while the mailbox is selected).
    ``grantee_id``: the account using it (the owner's own id for its own
    mailbox), whose /private METADATA entries it reaches."""

    def __init__(
        self,
        store: MailStore,
        owner_id: int,
        mailbox_id: int,
        rights: frozenset[str],
        grantee_id: int | None = None,
    ):
        self.store = store
        self.owner_id = owner_id
        self.mailbox_id = mailbox_id
        self.rights = rights
        self.grantee_id = owner_id if grantee_id is None else grantee_id

    def require(self, right: str, what: str) -> None:
        if right not in self.rights:
            raise no_right(right, what)

    def _check(self, account_id: int, mailbox_id: int) -> None:
        if account_id != self.owner_id or mailbox_id != self.mailbox_id:
            raise errors.not_found("no such mailbox")

    def __getattr__(self, name: str) -> Any:
        right = _READS.get(name)
        if right is None:
            raise AttributeError(name)  # deny by default: no unknown call passes
        method = getattr(self.store, name)

        async def call(account_id: int, mailbox_id: int, *a: Any, **kw: Any) -> Any:
            self._check(account_id, mailbox_id)
            self.require(right, "read this mailbox")
            return await method(account_id, mailbox_id, *a, **kw)

        return call

    async def store_flags(
        self,
        account_id: int,
        mailbox_id: int,
        uids: Any,
        mode: StoreMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> Any:
        """STORE with the flags the rights allow (RFC 4314 section 4: "s"
        for \\Seen, "t" for \\Deleted, "w" for the others and keywords;
        a STORE SHOULD NOT fail if it may change at least one flag it
        names, those it may not are left alone). NO_PERMISSION if it may
        change none of them. A REPLACE sets the flags it may change as
        listed and leaves the others as each message has them; without
        any of "s", "t" and "w" it is refused."""
        self._check(account_id, mailbox_id)
        flags = list(flags)
        needs = flag_rights(flags)
        allowed = [f for f in flags if needs[f] in self.rights]
        keep: list[str] = []
        if mode is StoreMode.REPLACE:
            if not self.rights & {"s", "t", "w"}:
                raise no_right("w", "change flags")
            keep = [f for f, right in flag_rights(SYSTEM_FLAGS).items() if right not in self.rights]
            if "w" not in self.rights:
                keep.append("\\*")  # keywords stay
        elif flags and not allowed:
            raise no_right(needs[flags[0]], "change these flags")
        if not keep:
            return await self.store.store_flags(
                account_id, mailbox_id, uids, mode, allowed, unchanged_since
            )
        return await self.store.store_flags(
            account_id, mailbox_id, uids, mode, allowed, unchanged_since, keep=keep
        )

    def _may_annotate(self, account_id: int, mailbox_id: int) -> None:
        self._check(account_id, mailbox_id)
        if not may_annotate(self.rights):
            raise no_right("l" if "l" not in self.rights else "r", "use its metadata")

    async def metadata(self, account_id: int, mailbox_id: int) -> dict[str, bytes]:
        """The mailbox's METADATA entries as the grantee sees them: its
        /shared entries and the grantee's own /private ones (RFC 5464
        section 3.3, rights as :func:`may_annotate` says)."""
        self._may_annotate(account_id, mailbox_id)
        return await self.store.metadata(account_id, mailbox_id, self.grantee_id)

    async def set_metadata(
        self,
        account_id: int,
        mailbox_id: int,
        values: Any,
        max_entries: int,
    ) -> None:
        """SETMETADATA on the mailbox (RFC 5464 section 3.3, rights as
        :func:`may_annotate` says): /shared entries are the mailbox's,
        /private ones the grantee's own."""
        self._may_annotate(account_id, mailbox_id)
        await self.store.set_metadata(
            account_id, mailbox_id, values, max_entries, self.grantee_id
        )

    async def expunge(
        self, account_id: int, mailbox_id: int, uids: Any = None, *, flagged_only: bool = True
    ) -> list[int]:
        """EXPUNGE needs "e" (RFC 4314 section 4); removing entries not
        flagged \\Deleted (a MOVE's originals) also "t", as setting the
        flag first would (RFC 6851 section 3.1)."""
        self._check(account_id, mailbox_id)
        self.require("e", "expunge")
        if not flagged_only:
            self.require("t", "move messages out of this mailbox")
        return await self.store.expunge(account_id, mailbox_id, uids, flagged_only=flagged_only)

    async def copy(self, account_id: int, mailbox_id: int, uids: Any, dest: int) -> Any:
        """COPY within the mailbox itself needs "r" and "i" (section 4)."""
        self._check(account_id, mailbox_id)
        self._check(account_id, dest)
        self.require("r", "copy from this mailbox")
        self.require("i", "copy into this mailbox")
        return await self.store.copy(account_id, mailbox_id, uids, dest)

    async def move(self, account_id: int, mailbox_id: int, uids: Any, dest: int) -> Any:
        """MOVE within the mailbox itself: COPY's rights and those of
        removing the originals, "t" and "e" (RFC 6851 section 3.1)."""
        self._check(account_id, mailbox_id)
        self._check(account_id, dest)
        for right in "rite":
            self.require(right, "move messages")
        return await self.store.move(account_id, mailbox_id, uids, dest)


@dataclass
class MailboxAccess:
    """Another account's mailbox as one account may use it."""

    owner: Account
    mailbox: Mailbox
    store: GrantedStore

    @property
    def rights(self) -> frozenset[str]:
        return self.store.rights

    def require(self, right: str, what: str) -> None:
        """NO_PERMISSION unless the rights include ``right``."""
        self.store.require(right, what)


async def open_mailbox(
    storage: Storage, actor: Account, owner_address: str, name: str
) -> MailboxAccess:
    """``owner_address``'s mailbox ``name`` as ``actor`` may use it, read
    from the owner's shard. NOT_FOUND when the owner or mailbox does not
    exist, and also when ``actor`` holds no right on it at all: its
    existence is not told to whoever may not look it up (RFC 4314
    section 4, LIST/SELECT: without "l" or "r" as if absent)."""
    owner = await storage.directory.get_account(owner_address)
    store = storage.mail(owner)
    box = await store.get_mailbox(owner.id, name)
    if owner.id == actor.id:
        rights = ALL
    else:
        rights = rights_in(await store.acl(owner.id, box.id), actor.id)  # type: ignore[attr-defined]
        if not rights & {"l", "r"}:
            raise errors.not_found("no such mailbox")
    return MailboxAccess(owner, box, GrantedStore(store, owner.id, box.id, rights, actor.id))


async def grants_to(storage: Storage, account: Account) -> list[Grant]:
    """What every shard granted ``account`` (its own entries and
    "anyone"'s), one read per shard database, concurrently. A shard that
    is down is left out (logged): its mailboxes are missing from a LIST
    until it is back, the others are still listed."""
    stores: dict[int, Any] = {}
    for store in getattr(storage, "stores", {}).values():
        stores.setdefault(id(store.db), store)
    results = await asyncio.gather(
        *(s.grants_to(account.id) for s in stores.values()), return_exceptions=True
    )
    found: list[Grant] = []
    for result in results:
        if isinstance(result, StorageError) and result.kind is ErrorKind.TEMPORARY:
            log.warning("shared mailboxes of a shard are not listed: %s", result)
            continue
        if isinstance(result, BaseException):
            raise result
        found.extend(result)
    return found


__all__ = [
    "ALL",
    "ANYONE_ID",
    "ANYONE_NAME",
    "METADATA_RIGHTS",
    "RIGHTS",
    "RIGHTS_CAPABILITY",
    "Grant",
    "GrantedStore",
    "MailboxAccess",
    "change_rights",
    "flag_rights",
    "grants_to",
    "may_annotate",
    "no_right",
    "open_mailbox",
    "parse_rights",
    "render",
    "rights_in",
]

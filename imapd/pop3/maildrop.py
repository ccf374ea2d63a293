"""The POP3 maildrop: one session's locked snapshot of the account's INBOX.

Contract (RFC 1939 sections 3, 5, 6 and 8):

* :meth:`Maildrop.open` takes the cross-instance lease
  ``"pop3:<account id>"`` through :meth:`MailStore.acquire_lock` and lists
  the INBOX once. The listing is the session's snapshot: messages that
  arrive later are not in it, message numbers never change in the session.
  A second session on the same account gets ``StorageError(IN_USE)``.
* While the session lives, the lease is renewed every third of its
  lifetime, so a long download keeps it and a crashed instance loses it
  once the lease runs out.
* DELE only marks; nothing is written before :meth:`commit`, which the
  UPDATE state calls after QUIT. A dropped connection or an autologout
  calls :meth:`close` alone, which deletes nothing.
* :meth:`commit` flags the marked UIDs ``\\Deleted`` and then expunges
  exactly that UID set (never other ``\\Deleted`` messages an IMAP client
  left). Two storage calls, each atomic: a crash between them leaves the
  ``\\Deleted`` flags set and the messages present, which an IMAP EXPUNGE
  or the next POP3 QUIT cleans up; nothing is lost.
* The snapshot is the account's shard's. When a move to another shard
  fences the account (a FENCE event, ``storage/move.py``), :attr:`fenced`
  turns true: the session must end without UPDATE, and the client
  reconnects to the shard the account is on then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass

from storage.api import MailStore, Storage, Subscription
from storage.errors import ErrorKind, StorageError
from storage.model import (
    DELETED,
    SEEN,
    Account,
    ChangeKind,
    Mailbox,
    MessageEntry,
    StoreMode,
    UidSet,
)

log = logging.getLogger("imapd.pop3")

MAILDROP = "INBOX"  # RFC 1939 section 1: the maildrop is the account's inbox


def lock_name(account: Account) -> str:
    return f"pop3:{account.id}"


def new_lock_owner() -> str:
    """Unique across sessions and instances, readable in the lock table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class NoSuchMessage(Exception):
    """The message number is out of range or marked deleted (RFC 1939 section 5)."""


@dataclass(frozen=True)
class MaildropStat:
    count: int
    octets: int


class Maildrop:
    """A locked INBOX snapshot; message number ``n`` is ``entries[n - 1]``."""

    def __init__(
        self,
        mail: MailStore,
        account: Account,
        mailbox: Mailbox,
        entries: list[MessageEntry],
        owner: str,
        lock_seconds: float,
    ) -> None:
        self.mail = mail
        self.account = account
        self.mailbox = mailbox
        self.entries = entries
        self.owner = owner
        self.lock_seconds = lock_seconds
        self.deleted: set[int] = set()
        self.retrieved: set[int] = set()
        self.lock_lost = False
        self.fenced = False  # the account is moving shards: see the module docstring
        self._closed = False
        self._renewal: asyncio.Task[None] | None = None
        self._fence_watch: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None

    @classmethod
    async def open(cls, storage: Storage, account: Account, lock_seconds: float) -> Maildrop:
        """Lock and snapshot the account's INBOX. Raises StorageError(IN_USE)
        when another session holds it, other StorageErrors from storage."""
        # Listening before the snapshot is read: a fence announced meanwhile counts.
        subscription = storage.events.subscribe(account.id)
        mail = storage.mail(account)
        owner = new_lock_owner()
        try:
            if not await mail.acquire_lock(lock_name(account), owner, lock_seconds):
                raise StorageError(ErrorKind.IN_USE, "maildrop already locked by another session")
            try:
                mailbox = await mail.get_mailbox(account.id, MAILDROP)
                entries = await mail.uids(account.id, mailbox.id)
            except BaseException:
                await _release_quietly(mail, account, owner)
                raise
        except BaseException:
            subscription.close()
            raise
        drop = cls(mail, account, mailbox, list(entries), owner, lock_seconds)
        drop._subscription = subscription
        drop._fence_watch = asyncio.create_task(
            drop._hear_fence(subscription), name=f"pop3-fence-{account.id}"
        )
        drop._renewal = asyncio.create_task(drop._renew_lease(), name=f"pop3-lease-{account.id}")
        return drop

    async def _hear_fence(self, subscription: Subscription) -> None:
        async for change in subscription:
            if change.kind is ChangeKind.FENCE:
                self.fenced = True
                return

    async def _renew_lease(self) -> None:
        period = max(1.0, self.lock_seconds / 3)
        while True:
            await asyncio.sleep(period)
            await self._renew_once()

    async def _renew_once(self) -> bool:
        try:
            if not await self.mail.acquire_lock(
                lock_name(self.account), self.owner, self.lock_seconds
            ):
                self.lock_lost = True
        except StorageError as exc:  # transient: try again next period
            log.warning("pop3 lease renewal for account %s failed: %s", self.account.id, exc)
        return not self.lock_lost

    # -- the snapshot, by RFC 1939 message number --

    def entry(self, number: int) -> MessageEntry:
        """The live (not deleted) message ``number``, else NoSuchMessage."""
        if not 1 <= number <= len(self.entries) or number in self.deleted:
            raise NoSuchMessage(number)
        return self.entries[number - 1]

    def live(self) -> list[tuple[int, MessageEntry]]:
        """(number, entry) of every message not marked deleted, in order."""
        return [(n, e) for n, e in enumerate(self.entries, 1) if n not in self.deleted]

    def stat(self) -> MaildropStat:
        live = self.live()
        return MaildropStat(len(live), sum(e.size for _, e in live))

    def unique_id(self, entry: MessageEntry) -> str:
        """RFC 1939 section 7 UIDL: stable across sessions while the
        mailbox keeps its UIDVALIDITY, 0x21-0x7E only."""
        return f"{self.mailbox.uidvalidity}.{entry.uid}"

    def delete(self, number: int) -> None:
        self.entry(number)
        self.deleted.add(number)

    def reset(self) -> None:
        """RFC 1939 section 5 RSET: unmark every message."""
        self.deleted.clear()

    # -- UPDATE and the end of the session --

    async def commit(self) -> int:
        """RFC 1939 section 6 UPDATE: remove the marked messages; returns how
        many were removed. Retrieved, kept messages get ``\\Seen`` so IMAP
        shows them read. Raises StorageError(IN_USE) if the lease was lost
        (then nothing is deleted), other StorageErrors from storage."""
        if not await self._renew_once():
            raise StorageError(ErrorKind.IN_USE, "maildrop lock lost; no messages deleted")
        aid, mid = self.account.id, self.mailbox.id
        seen = [self.entries[n - 1].uid for n in sorted(self.retrieved - self.deleted)]
        if seen:
            try:
                await self.mail.store_flags(aid, mid, UidSet.of(seen), StoreMode.ADD, [SEEN])
            except StorageError as exc:  # a lost \Seen is harmless; deletions still matter
                log.warning("pop3 \\Seen update for account %s failed: %s", aid, exc)
        doomed = UidSet.of(self.entries[n - 1].uid for n in self.deleted)
        if doomed.is_empty():
            return 0
        await self.mail.store_flags(aid, mid, doomed, StoreMode.ADD, [DELETED])
        # A crash here leaves \Deleted flags only (see the module docstring).
        return len(await self.mail.expunge(aid, mid, uids=doomed))

    async def close(self) -> None:
        """Stop renewing and release the lease. Idempotent; deletes nothing."""
        if self._closed:
            return
        self._closed = True
        for task in (self._renewal, self._fence_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._subscription is not None:
            self._subscription.close()
        await _release_quietly(self.mail, self.account, self.owner)


async def _release_quietly(mail: MailStore, account: Account, owner: str) -> None:
    try:
        await mail.release_lock(lock_name(account), owner)
    except Exception:  # the lease then simply runs out
        log.warning("pop3 lock release for account %s failed", account.id, exc_info=True)

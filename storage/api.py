"""The storage seam: the interfaces every daemon calls and every backend implements.

Contracts common to all of them:

* Every method is a coroutine and never blocks the event loop (blocking work
  such as argon2 or file fsync runs in a thread).
* A method either commits all of its effect or none of it; when it returns,
  the effect is durable (committed to the database, fsynced for blobs) and
  visible to every other session and instance.
* Failures a client can cause or a retry can cure raise
  :class:`storage.errors.StorageError` with a kind; anything else is a bug.
* The mail store speaks UIDs only. Every write bumps the mailbox
  HIGHESTMODSEQ, appends to the account's change log, and publishes that
  change on the event bus after commit.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from storage.errors import StorageError
from storage.model import (
    Account,
    Alias,
    AppendResult,
    Change,
    CopyResult,
    Domain,
    Mailbox,
    MailboxChanges,
    MailboxSnapshot,
    MailboxStatus,
    MessageEntry,
    ParsedMessage,
    SpamCounts,
    SpamPolicy,
    StoredMessage,
    StoreMode,
    StoreResult,
    UidSet,
)
from storage.search import Criteria
from storage.sortkeys import ThreadRow
from storage.sortrows import SortRow

if TYPE_CHECKING:
    from storage.authcache import AuthCache


@dataclass(frozen=True)
class Route:
    """Where mail for one address goes, as the directory sees it.

    ``local_domain``: the domain is ours (unknown users there are 550 5.1.1).
    ``accounts``: local accounts that receive it (several via an alias).
    ``forward``: alias targets outside our domains (relayed via the queue).
    Empty ``accounts`` and ``forward`` on a local domain: no such user.
    """

    address: str
    local_domain: bool
    accounts: tuple[Account, ...]
    forward: tuple[str, ...]


class Directory(Protocol):
    """Domains, accounts, aliases and the account -> shard map (global)."""

    async def add_domain(self, name: str) -> Domain: ...
    async def list_domains(self) -> list[Domain]: ...
    async def remove_domain(self, name: str) -> None:
        """Refuses (INVALID) while accounts or aliases of the domain exist."""

    async def is_local_domain(self, name: str) -> bool: ...

    async def add_account(
        self, address: str, password: str, quota_bytes: int | None = None, shard: str | None = None
    ) -> Account:
        """Hashes ``password`` with argon2 and creates the account's default
        mailboxes (INBOX, Sent, Drafts, Trash, Junk, Archive) in its shard.
        The domain must exist (NOT_FOUND otherwise); EXISTS if taken."""

    async def get_account(self, address: str) -> Account:
        """By exact address, case-insensitive. NOT_FOUND if none."""

    async def get_account_by_id(self, account_id: int) -> Account: ...
    async def list_accounts(self, domain: str | None = None) -> list[Account]: ...
    async def set_password(self, address: str, password: str) -> None: ...
    async def set_quota(self, address: str, quota_bytes: int | None) -> None: ...
    async def remove_account(self, address: str) -> None:
        """Removes the account, its mailboxes and messages."""

    async def authenticate(
        self,
        login: str,
        password: str,
        *,
        run_check: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        cache: AuthCache | None = None,
    ) -> Account | None:
        """The account if ``password`` matches, else None (never raises for
        a wrong password or unknown login; takes the same time for both).
        TEMPORARY, never None, when the directory cannot be read.
        ``run_check(fn)`` runs the CPU-heavy hash check ``fn`` (default: a thread).
        ``cache`` (:mod:`storage.authcache`) may answer a right password
        without the hash check, never a wrong one; the account is read anyway."""

    async def add_alias(self, source: str, target: str) -> Alias:
        """``source`` is an address or ``@domain`` (catch-all) on a local domain."""

    async def list_aliases(self) -> list[Alias]: ...
    async def remove_alias(self, source: str, target: str | None = None) -> None: ...

    async def shared_secret(self, name: str, offered: bytes) -> bytes:
        """The site's secret ``name`` (the HTTP token key): the value stored
        first by any instance, storing ``offered`` if there is none; the
        same bytes for every instance over this directory."""

    async def resolve(self, address: str) -> Route:
        """Exact account, then exact alias, then plus-address
        (``user+tag@d`` -> ``user@d``), then catch-all ``@d``."""

    async def addresses_of(self, account: Account) -> list[str]:
        """The account's own address and every alias source that reaches it."""


class BlobStore(Protocol):
    """Raw RFC 5322 bytes, content-addressed by SHA-256 hex digest.

    ``put`` returns only once the bytes are durable (written, fsynced,
    renamed into place). Blobs are immutable; the same bytes give the same
    key. Deletion is garbage collection by the mail store.
    """

    async def put(self, data: bytes) -> str: ...
    async def put_file(self, path: Path) -> str:
        """Stores a file's bytes without reading it all into memory."""

    async def get(self, key: str) -> bytes: ...
    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` .. ``end`` (exclusive)."""

    def stream(self, key: str, chunk_size: int = 65536) -> AsyncIterator[bytes]: ...
    def stream_range(
        self, key: str, start: int, end: int | None = None, chunk_size: int = 65536
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` .. ``end`` (exclusive; None: to the end), clipped
        to the blob's size, in chunks of ``chunk_size`` bytes (the last may
        be shorter), read as they arrive: the one read seam for large
        bodies (IMAP FETCH, POP3 RETR, the API's downloads). An S3 store
        sends one ranged GET per stored piece the range covers, never one
        per chunk; at most about a chunk is held. NOT_FOUND if absent."""

    async def exists(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def keys(self) -> list[str]: ...


class MailStore(Protocol):
    """One shard's mailboxes and messages. Names are UTF-8 with "/" as the
    hierarchy delimiter; "INBOX" is case-insensitive (RFC 3501 section 5.1)."""

    inline_blob_max: int
    """Blobs of up to this many bytes can be given to :meth:`deliver` as
    ``blob_data``, to be stored in the delivery's own transaction (0: none;
    the blob store must hold them first)."""

    async def create_default_mailboxes(self, account_id: int) -> None: ...
    async def list_mailboxes(self, account_id: int) -> list[Mailbox]: ...
    async def get_mailbox(self, account_id: int, name: str) -> Mailbox:
        """NOT_FOUND if none."""

    async def get_mailbox_by_id(self, account_id: int, mailbox_id: int) -> Mailbox: ...
    async def create_mailbox(
        self, account_id: int, name: str, special_use: str | None = None
    ) -> Mailbox:
        """Creates missing parents too (RFC 3501 section 6.3.3). EXISTS if taken.
        A new UIDVALIDITY that was never used for this name before."""

    async def rename_mailbox(self, account_id: int, old: str, new: str) -> None:
        """Renames inferior mailboxes too. Renaming INBOX moves its messages
        to ``new`` and leaves INBOX empty (RFC 3501 section 6.3.5)."""

    async def delete_mailbox(self, account_id: int, name: str) -> None:
        """INVALID for INBOX. Its messages are expunged."""

    async def set_subscribed(self, account_id: int, name: str, subscribed: bool) -> None:
        """Adds ``name`` to the subscription list or takes it off; the name
        need not be a mailbox (RFC 3501 sections 6.3.6, 6.3.7). CREATE does
        not subscribe, DELETE does not unsubscribe, RENAME carries the
        subscriptions along. Idempotent."""

    async def subscriptions(self, account_id: int) -> list[str]:
        """The subscription list, names sorted."""

    async def add_message(
        self,
        account_id: int,
        blob_key: str,
        parsed: ParsedMessage,
        blob_keys: Callable[[], tuple[Collection[str] | None, int]] | None = None,
    ) -> int:
        """Stores the parsed form of a blob, returns the message row id.
        Used by ingest only; the message is in no mailbox until ``append``
        or ``append_many``. ``blob_keys``: as ``deliver``'s."""

    async def append(
        self,
        account_id: int,
        mailbox_id: int,
        message_id: int,
        flags: Iterable[str] = (),
        internal_date: dt.datetime | None = None,
    ) -> AppendResult:
        """Adds a stored message to a mailbox with the next UID; enforces the
        account quota (OVER_QUOTA). UIDs are unique and strictly increasing
        under any concurrency."""

    async def append_many(
        self,
        account_id: int,
        mailbox_id: int,
        items: Sequence[tuple[int, Iterable[str], dt.datetime | None]],
        *,
        claim_recent: bool = False,
    ) -> list[AppendResult]:
        """``append`` of several stored messages (row id, flags, internal
        date) into one mailbox in ONE transaction: all committed when this
        returns, or none (NOT_FOUND, OVER_QUOTA for their sum). UIDs in the
        order given. What a COPY or MOVE from another account and a
        MULTIAPPEND commit (``storage.ingest.ingest_many``).
        ``claim_recent``: the mailbox's recent floor moves past the new
        entries in the same transaction, each result carrying the floor
        before (as ``deliver``'s)."""

    async def drop_staged(self, account_id: int, message_ids: Iterable[int]) -> None:
        """Deletes those of the account's message rows ``message_ids``
        that no mailbox entry names: ``add_message``'s rows of an
        ``append_many`` that did not commit."""

    async def deliver(
        self,
        account_id: int,
        blob_key: str,
        parsed: ParsedMessage,
        targets: Sequence[tuple[str | int, Iterable[str], dt.datetime | None]],
        blob_ready: concurrent.futures.Future[str] | None = None,
        claim_recent: bool = False,
        blob_data: bytes | None = None,
        blob_keys: Callable[[], tuple[Collection[str] | None, int]] | None = None,
    ) -> list[AppendResult]:
        """``add_message`` plus one ``append`` per target (mailbox name or id,
        flags, internal date) in ONE transaction: every target is committed
        when this returns, or none is (NOT_FOUND, OVER_QUOTA). The ingest path
        commits a message's metadata this way, once per account.

        ``claim_recent``: also ``claim_recent`` in every target, in the same
        transaction (an IMAP APPEND into the mailbox its session has
        selected read-write, RFC 3501 section 2.3.2, without a second
        write); each result then carries the floor before the claim.

        ``blob_ready``: the blob's durable write, still running; the
        transaction commits only once it has succeeded (its failure fails
        the delivery, TEMPORARY), so metadata never names a blob that is not
        durable while the two overlap.

        ``blob_data``: instead, the blob's bytes (at most
        :attr:`inline_blob_max`), stored with the rows that name it in the
        same transaction: durable together, or neither. Readable through
        the blob store once this returns.

        ``blob_keys()``: the blob keys the message row names (its parts
        too; None: unknown) and the newest deletion the caller answered.
        If garbage collection is deleting one of them, or did lately,
        ``storage.errors.BlobsBeingDeleted`` and nothing commits:
        the caller stores the blobs again and retries
        (``storage/blob/deleting.py``)."""

    async def uids(self, account_id: int, mailbox_id: int) -> list[MessageEntry]:
        """Every entry of the mailbox in UID order (a POP3 maildrop)."""

    async def snapshot(self, account_id: int, mailbox_id: int) -> MailboxSnapshot:
        """The mailbox's UIDs, first unseen UID and keywords, read without
        reading a row per message into memory: what IMAP SELECT answers
        from. Cost: proportional to the UIDs, a few bytes each. NOT_FOUND
        if the mailbox does not exist."""

    async def entries(self, account_id: int, mailbox_id: int, uids: UidSet) -> list[MessageEntry]:
        """The entries (flags, modseq, size, date, blob) named by ``uids``,
        UID order; missing UIDs skipped. An IMAP session reads those a
        command touches, not the whole mailbox."""

    async def fetch(self, account_id: int, mailbox_id: int, uids: UidSet) -> list[StoredMessage]:
        """Entries with their parsed form, UID order; missing UIDs skipped."""

    async def search(self, account_id: int, mailbox_id: int, criteria: Criteria) -> list[int]:
        """Matching UIDs, ascending."""

    async def sort_rows(self, account_id: int, mailbox_id: int, uids: UidSet) -> list[SortRow]:
        """What IMAP SORT and THREAD compare of the entries named by
        ``uids`` (storage.sortrows.SortRow), UID order; missing UIDs
        skipped. One call for any number of messages, cheaper per message
        than :meth:`fetch` (no full parsed form is built)."""

    async def sorted_uids(
        self, account_id: int, mailbox_id: int, criteria: Sequence[tuple[str, bool]]
    ) -> list[int] | None:
        """Every UID of the mailbox in IMAP SORT order by ``criteria``
        ((key, reverse) pairs, RFC 5256 section 3; exact ties in UID
        order), from the keys stored with each entry (storage.sortkeys):
        the order :meth:`sort_rows` sorted in memory gives. None if some
        entry has no stored keys yet."""

    async def thread_rows(self, account_id: int, mailbox_id: int) -> list[ThreadRow] | None:
        """Every entry's stored THREAD inputs (storage.sortkeys.ThreadRow:
        date and base-subject keys, normalised Message-ID and references),
        UID order, in one read. None if some entry has no stored keys."""

    async def page(
        self,
        account_id: int,
        mailbox_id: int,
        criteria: Criteria,
        limit: int,
        before: tuple[int, int] | None = None,
    ) -> list[tuple[tuple[int, int], StoredMessage]]:
        """A folder list page: entries matching ``criteria`` newest first by
        (list date, UID), strictly before the key ``before``, at most
        ``limit``, each with its key (the next page's ``before``). The list
        date is the message's Date, never later than its arrival. Reads the
        page, not the mailbox: every entry is on exactly one page however
        much mail arrives while a client pages."""

    async def search_account(
        self, account_id: int, criteria: Criteria, limit: int = 100
    ) -> list[MessageEntry]:
        """Matches across every mailbox of the account, newest first."""

    async def store_flags(
        self,
        account_id: int,
        mailbox_id: int,
        uids: UidSet,
        mode: StoreMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
        keep: Iterable[str] = (),
    ) -> StoreResult:
        """Entries whose flags actually change get a new modseq; entries
        whose modseq exceeds ``unchanged_since`` are left alone and listed in
        ``modified``. ``keep``: system flags a REPLACE leaves as each entry
        has them, "\\*" for its keywords (what a grantee may not change,
        RFC 4314 section 4)."""

    async def copy(
        self, account_id: int, mailbox_id: int, uids: UidSet, dest_mailbox_id: int
    ) -> CopyResult:
        """Copies keep flags and internal date and share the blob."""

    async def move(
        self, account_id: int, mailbox_id: int, uids: UidSet, dest_mailbox_id: int
    ) -> CopyResult:
        """Copy then expunge from the source, in one transaction (RFC 6851);
        into the source itself, the messages take new UIDs (section 3.3)."""

    async def expunge(
        self,
        account_id: int,
        mailbox_id: int,
        uids: UidSet | None = None,
        *,
        flagged_only: bool = True,
    ) -> list[int]:
        """Removes entries flagged \\Deleted (only those in ``uids`` if given),
        records tombstones, returns the expunged UIDs ascending. With
        ``flagged_only=False``, every entry in ``uids`` (required), in one
        write: a MOVE's originals (RFC 6851 section 3.3)."""

    async def status(self, account_id: int, mailbox_id: int) -> MailboxStatus: ...
    async def status_all(self, account_id: int) -> dict[int, MailboxStatus]:
        """STATUS of every mailbox of the account, by mailbox id, in one read."""

    async def changes_since(self, account_id: int, mailbox_id: int, modseq: int) -> MailboxChanges:
        """Entries with modseq > ``modseq`` and UIDs expunged after it, with
        the mailbox's \\Recent floor as of that read (0 if not known)."""

    async def claim_recent(self, account_id: int, mailbox_id: int) -> int:
        """RFC 3501 \\Recent: atomically moves the mailbox's recent floor to
        UIDNEXT and returns the old floor; UIDs >= it are \\Recent for the
        calling session only."""

    async def peek_recent(self, account_id: int, mailbox_id: int) -> int:
        """RFC 3501 \\Recent without claiming: the number of entries whose UID
        is >= the mailbox's recent floor, leaving the floor where it is (EXAMINE
        and STATUS RECENT must not change \\Recent state, sections 6.3.2 and
        6.3.10). NOT_FOUND if the mailbox does not exist."""

    async def account_changes(
        self, account_id: int, after_id: int, limit: int = 1000
    ) -> list[Change]:
        """The account's change log after ``after_id``, oldest first."""

    async def last_change_id(self, account_id: int) -> int:
        """The id of the account's newest change (0 if none); ids grow by
        one per change, so an unchanged id means nothing happened."""

    async def quota_used(self, account_id: int) -> int: ...

    async def spam_counts(self, account_id: int, tokens: Sequence[int]) -> SpamCounts:
        """The account's Bayes counts (built-in anti-spam engine) for
        ``tokens`` (63-bit word hashes, at most 5000, none 0), read in one
        query: what classifying one message costs the store."""

    async def learn_spam(
        self, account_id: int, blob_key: str, tokens: Sequence[int], spam: bool
    ) -> bool:
        """Teaches the account the message ``blob_key`` (its ``tokens``) as
        spam or ham, durably, serialised with the account's other writes.
        The same message learned again as the same class changes nothing
        (False); learned as the other class, its earlier lesson is taken
        back first. Counts never go below zero."""

    async def acquire_lock(self, name: str, owner: str, ttl_seconds: float) -> bool:
        """A lease that works across instances (POP3 maildrop lock). True if
        now held by ``owner``; an expired lease may be taken over."""

    async def release_lock(self, name: str, owner: str) -> None: ...

    # Per-account anti-spam choices (issue #22, delivery/acctpolicy.py),
    # kept in the account's shard: see storage/sql/spampolicy.py.
    async def spam_policy(
        self, account_id: int, entries: Collection[str] | None = None
    ) -> SpamPolicy:
        """The account's sender lists and Junk threshold; with ``entries``,
        only those list entries (the few that could match one sender)."""

    async def set_sender_entry(
        self, account_id: int, entry: str, to_list: str | None
    ) -> str | None:
        """``entry`` onto "allow" or "block" (off the other) or off both
        (None); returns the list it was on. INVALID past the entry cap."""

    async def set_junk_threshold(self, account_id: int, value: float | None) -> None: ...
    async def put_spam_policy(self, account_id: int, policy: SpamPolicy) -> None:
        """Replaces lists and threshold at once; INVALID changes nothing."""

    # RFC 5464 METADATA entries (issue #24), kept in the account's shard:
    # see storage/sql/metadata.py. ``mailbox_id`` None: the server's.
    async def metadata(
        self, account_id: int, mailbox_id: int | None, user_id: int | None = None
    ) -> dict[str, bytes]:
        """Every entry of the server or of one mailbox, name -> value.
        ``user_id``: another account (a grantee) reading the mailbox: its
        /shared entries and that user's own /private ones (RFC 5464
        section 3.3). Rights are the caller's to check (storage.acl)."""

    async def granted_metadata(
        self, user_id: int, mailbox_ids: Sequence[int], names: Sequence[str]
    ) -> dict[int, dict[str, bytes]]:
        """``metadata`` with ``user_id`` for several of this shard's
        mailboxes at once, only the entries called ``names`` that hold a
        value: mailbox id -> name -> value."""

    async def mailboxes_metadata(
        self, account_id: int, names: Sequence[str]
    ) -> dict[int, dict[str, bytes]]:
        """The entries called ``names`` (at most a few hundred) of all the
        account's mailboxes in one read: mailbox id -> name -> value,
        only entries holding a value."""

    async def set_metadata(
        self,
        account_id: int,
        mailbox_id: int | None,
        values: Sequence[tuple[str, bytes | None]],
        max_entries: int,
        user_id: int | None = None,
    ) -> None:
        """Sets (bytes) or removes (None) entries, all or none; NOT_FOUND
        for another account's or a deleted mailbox, OVER_QUOTA (nothing
        changed) past ``max_entries`` entries of the account in all.
        ``user_id``: another account (a grantee) writing on the mailbox:
        /shared entries are the mailbox's, /private ones that user's own
        (at most ``max_entries`` on this account's mailboxes)."""

    # RFC 4314 ACLs of the account's mailboxes (issue #24), kept in its
    # shard: see storage/sql/acl.py; what they allow: storage/acl.py.
    async def acl(self, account_id: int, mailbox_id: int) -> dict[int, str]:
        """The mailbox's ACL: grantee account id (0: "anyone") -> rights.
        The owner's own rights are implicit (all) and not listed."""

    async def set_acl(self, account_id: int, mailbox_id: int, grantee_id: int, rights: str) -> None:
        """Sets (``""``: removes) one grantee's rights on the account's
        mailbox; NOT_FOUND if it is not the account's. Publishes a MAILBOX
        change ``{"op": "acl"}`` on the owner's account."""

    async def change_acl(
        self, account_id: int, mailbox_id: int, grantee_id: int, change: Callable[[str], str]
    ) -> str:
        """``set_acl`` to ``change(current rights)``, atomically; the
        rights set. What SETACL's "+" and "-" need (storage.acl)."""

    async def grants_to(self, grantee_id: int) -> list[Any]:
        """Every grant of this shard to ``grantee_id`` or "anyone" on other
        accounts' mailboxes (``storage.sql.acl.Grant``), current names."""

    async def remove_grants(self, grantee_id: int) -> None:
        """Drops every right granted to ``grantee_id`` here (its account
        is being removed)."""


class EventBus(Protocol):
    """Carries committed changes to IDLE, POP3 and WebSocket sessions.

    Delivery is best effort and at most once; a subscriber that must not
    miss anything reads ``MailStore.account_changes`` after the last id it
    saw. The in-process bus is the default; Unix datagram sockets carry it
    between the processes of one host on SQLite (``LocalSocketEventBus``);
    PostgreSQL NOTIFY or Redis pub/sub carry it across instances.
    """

    async def publish(self, change: Change) -> None: ...
    def subscribe(self, account_id: int) -> Subscription: ...


class Subscription(Protocol):
    """An async iterator of changes for one account; ``close`` ends it."""

    def __aiter__(self) -> AsyncIterator[Change]: ...
    async def get(self, timeout: float | None = None) -> Change | None: ...
    def close(self) -> None: ...


class OutboundQueue(Protocol):
    """Mail waiting for remote delivery, durable in one shard's partition.

    This is what the inbound path and the admin see; the lease/record
    operations the queue workers use, and how entries are spread over the
    shards, are in ``storage.queue``. Entry ids are ``QueueRef``s
    (partition, number).
    """

    async def enqueue(
        self,
        sender: str,
        recipients: Iterable[str],
        blob_key: str,
        *,
        expires_in: dt.timedelta = ...,
        now: float | None = None,
        held_for: str | None = None,
        blob_keys: tuple[Collection[str] | None, Mapping[str, int]] | None = None,
        dsn: Any = None,
        recipient_dsn: Mapping[str, Any] | None = None,
    ) -> int:
        """Queues a stored blob for ``recipients`` (due at once); durable when
        it returns the entry id. INVALID with no recipients. ``blob_keys``:
        the blobs the entry names (None: unknown) and the newest deletion
        answered, by partition; ``BlobsBeingDeleted`` if garbage collection
        is deleting one (``storage/blob/deleting.py``). ``dsn`` and
        ``recipient_dsn`` (by address): the RFC 3461 parameters
        (``storage.sql.queue.DsnEnvelope``, ``DsnRecipient``) kept with
        the entry for its notifications and the next hop."""

    async def get(self, queue_id: int) -> Any: ...
    async def list(self, *, include_done: bool = True) -> list[Any]: ...

    async def flag(self, address: str, reason: str, *, now: float | None = None) -> int:
        """Flags ``address`` (any case) as held for a sending limit, durably
        and for every instance, and holds its queued entries with
        ``reason`` in the same transaction; how many. Flagged already: the
        first reason stays. TEMPORARY if the flag could not be stored."""

    async def is_flagged(self, address: str) -> bool:
        """Whether ``address`` (any case) is flagged; an indexed read.
        TEMPORARY when that cannot be known (its database is down)."""

    async def release_account(
        self, address: str, reason_prefix: str
    ) -> Mapping[str, tuple[int, bool] | StorageError]:
        """Releases every queued entry held with a reason starting with
        ``reason_prefix`` and clears the flag of ``address``, in one
        transaction per partition: by partition, (entries released, flag
        cleared there) or the error it answered with."""


class Storage(Protocol):
    """The whole data plane as one object, opened once per process."""

    directory: Directory
    blobs: BlobStore
    events: EventBus
    queue: OutboundQueue

    def mail(self, account: Account | int) -> MailStore:
        """The mail store of the account's shard."""

    def blobs_for(self, account: Account) -> BlobStore:
        """The blob store of the account's shard (each shard may have its
        own): where its messages' raw bytes are read and new ones stored.
        ``blobs`` is the site's store, the outbound queue's."""

    @property
    def shards(self) -> Sequence[str]: ...

    async def close(self) -> None: ...

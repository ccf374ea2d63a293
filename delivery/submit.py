"""Route and deliver one message: local ingest, the outbound queue, the Sent copy.

This is the delivery half of the pipeline (checks -> route -> deliver),
shared by SMTP submission (587/465), the MX (25) and the HTTP API's send
route. Contract of every function here:

* Nothing is acknowledged before it is durable: when :func:`deliver` or
  :func:`submit_message` returns, every local copy is committed through
  ``storage.ingest`` and every remote recipient is committed to the outbound
  queue (blob written first, then ``storage.queue.enqueue``).
* Failures are :class:`SubmitError` with a storage :class:`ErrorKind`, so
  each protocol maps them once (``errors.SMTP_REPLY``, ``errors.HTTP_STATUS``).
* If some local copies were committed and others failed, the error is
  TEMPORARY: the client retries and those recipients may see the message
  twice, which is better than losing it for the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from conf.settings import Settings
from delivery.address import POSTMASTER, PathSyntaxError, is_postmaster, parse_mailbox
from delivery.headers import return_path_field
from delivery.limits import hold_reason
from delivery.spool import Message, materialised, message_size, prepend
from delivery.srs import SrsError, is_srs_address, srs_of
from runtime.metrics import MESSAGES_DELIVERED, MESSAGES_QUEUED
from storage.api import Route, Storage
from storage.blob import deleting
from storage.errors import HTTP_STATUS, SMTP_REPLY, BlobsBeingDeleted, ErrorKind, StorageError
from storage.ingest import RESTORE_ATTEMPTS, Delivery, ingest_each
from storage.model import SEEN, Account, AppendResult
from storage.sql.queue import DsnEnvelope, DsnRecipient

log = logging.getLogger("delivery.submit")


class SubmitError(Exception):
    """A classified refusal. ``recipient`` names the address at fault, if any;
    ``str(err)`` is safe to show a client."""

    def __init__(self, kind: ErrorKind, message: str, recipient: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.recipient = recipient

    @property
    def smtp_reply(self) -> tuple[int, str]:
        """(code, enhanced code) per ``storage.errors.SMTP_REPLY``."""
        return SMTP_REPLY[self.kind]

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]


@dataclass(frozen=True)
class SubmitResult:
    """What happened to a submitted message: ``delivered`` maps each local
    account address to its INBOX append; ``queued`` lists the remote
    recipients committed to the outbound queue; ``sent`` is the sender's
    Sent copy (None if it failed, which does not fail the send)."""

    delivered: dict[str, AppendResult]
    queued: tuple[str, ...]
    sent: AppendResult | None
    blob_key: str | None  # the queued blob, if anything was queued


@dataclass
class Routing:
    """Recipients resolved to local accounts (de-duplicated) and remote
    addresses (including alias forwards leaving our domains, which are also
    in ``forwarded``: they leave with an SRS reverse-path, delivery/srs.py)."""

    local: dict[int, Account]
    remote: list[str]
    forwarded: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls) -> Routing:
        return cls({}, [])

    def add(self, route: Route, address: str) -> None:
        if route.local_domain:
            for account in route.accounts:
                self.local.setdefault(account.id, account)
            for target in route.forward:
                if target not in self.remote:
                    self.remote.append(target)
                    self.forwarded.append(target)
        elif address not in self.remote:
            self.remote.append(address)

    @property
    def is_empty(self) -> bool:
        return not self.local and not self.remote


async def resolve_recipient(
    storage: Storage, address: str, postmaster: str = "", settings: Settings | None = None
) -> Route:
    """The directory's route for ``address``; SubmitError(NOT_FOUND) for an
    unknown user on a local domain (SMTP 550 5.1.1).

    With ``settings`` (its ``[srs]``), an SRS address on a local domain that
    we made (delivery/srs.py: a bounce to mail an alias forwarded) routes to
    the address it encodes, as a forward of that local domain; a forged or
    expired one is an unknown user unless the directory knows the address.

    ``postmaster@`` any local domain and the bare ``postmaster`` always have
    a route (RFC 5321 section 4.5.1): the domain's own alias or catch-all if
    there is one, else ``postmaster`` (smtp.postmaster) if set, else the
    first account (lowest id) of the primary domain (:func:`primary_domain`).
    """
    bare = address.lower() == POSTMASTER
    if settings is not None and is_srs_address(address):
        reversed_route = await _srs_route(storage, address, settings)
        if reversed_route is not None:
            return reversed_route
    route = Route(address, True, (), ()) if bare else await storage.directory.resolve(address)
    if route.local_domain and not route.accounts and not route.forward:
        if is_postmaster(address):
            found = await _postmaster_route(storage, address, postmaster)
            if found is not None:
                return found
        raise SubmitError(ErrorKind.NOT_FOUND, f"no such user: {address}", address)
    return route


async def _srs_route(storage: Storage, address: str, settings: Settings) -> Route | None:
    """The route of a bounce to an SRS address of ours, or None when
    ``address`` is not one (SRS off, not our domain, forged or too old)."""
    if not await storage.directory.is_local_domain(address.rpartition("@")[2]):
        return None
    srs = await srs_of(settings, storage)
    if srs is None:
        return None
    try:
        original = srs.reverse(address)
    except SrsError as exc:
        log.info("bounce to <%s> refused: %s", address, exc)
        return None
    if original is None:
        return None
    route = await storage.directory.resolve(original)
    if route.local_domain:
        return route  # our own sender (a forward of a forward): its accounts
    return Route(address, True, (), (original,))


async def primary_domain(storage: Storage) -> str | None:
    """The first local domain added (lowest id); None when there is none."""
    domains = await storage.directory.list_domains()
    return min(domains, key=lambda d: d.id).name if domains else None


async def _postmaster_route(storage: Storage, address: str, configured: str) -> Route | None:
    if configured:
        route = await storage.directory.resolve(configured)
        if route.accounts or route.forward:
            return Route(address, True, route.accounts, route.forward)
        log.warning("smtp.postmaster %s does not resolve; using the first account", configured)
    domain = await primary_domain(storage)
    accounts = await storage.directory.list_accounts(domain) if domain else []
    if not accounts:
        return None
    return Route(address, True, (min(accounts, key=lambda a: a.id),), ())


async def check_quota(storage: Storage, account: Account, size: int) -> None:
    """SubmitError(OVER_QUOTA) if ``size`` more octets do not fit. We answer
    452 4.2.2 (temporary, RFC 3463 X.2.2 "mailbox full"): the owner can make
    room, and RFC 5321 section 4.5.3.1.10 has clients treat 552 after RCPT
    as temporary anyway."""
    if account.quota_bytes is None:
        return
    used = await storage.mail(account).quota_used(account.id)
    if used + size > account.quota_bytes:
        raise SubmitError(ErrorKind.OVER_QUOTA, f"mailbox full: {account.address}", account.address)


async def deliver(
    storage: Storage,
    *,
    mail_from: str,
    routing: Routing,
    message: Message,
    mailbox: str = "INBOX",
    held_for: str | None = None,
    filing: Mapping[int, tuple[str, bytes]] | None = None,
    dsn: DsnEnvelope | None = None,
    recipient_dsn: Mapping[str, DsnRecipient] | None = None,
    settings: Settings | None = None,
) -> tuple[dict[str, AppendResult], str | None]:
    """Deliver ``message`` (with trace fields already prepended) to the local
    accounts (Return-Path prepended, one blob for all) and queue it for the
    remote recipients, held with ``held_for`` as the reason if given
    (delivery/limits.py). Returns (appends by account address, queued blob key).
    A spooled message is streamed from a file, never read whole into memory.

    ``filing``: by account id, the mailbox and the header fields of that
    account's copy (the built-in anti-spam engine's, delivery/spamengine.py,
    and its own policy's, delivery/acctpolicy.py), put above the trace
    fields of that copy alone, instead of ``mailbox`` and none; accounts
    filed alike share one blob.

    ``dsn`` and ``recipient_dsn`` (by remote address): the RFC 3461
    parameters queued with the remote recipients.

    With ``settings`` (its ``[srs]``), alias forwards of mail from a sender
    outside our domains are queued apart, with an SRS reverse-path
    (delivery/srs.py), so that they pass SPF at the next hop.
    """
    delivered: dict[str, AppendResult] = {}
    accounts = list(routing.local.values())
    if accounts:
        for account in accounts:
            await check_quota(storage, account, message_size(message))
        groups: dict[tuple[str, bytes], list[Account]] = {}
        for account in accounts:
            key = (filing or {}).get(account.id, (mailbox, b""))
            groups.setdefault(key, []).append(account)
        pairs: list[tuple[Account, AppendResult | StorageError]] = []
        for (box, fields), members in groups.items():
            local_copy = prepend(return_path_field(mail_from) + fields, message)
            try:
                async with materialised(local_copy) as source:
                    outcomes = await ingest_each(
                        storage, [Delivery(a, box) for a in members], source
                    )
            except StorageError as exc:
                if not pairs:
                    raise SubmitError(ErrorKind.TEMPORARY, str(exc)) from exc
                outcomes = [exc] * len(members)  # earlier groups are committed
            pairs.extend(zip(members, outcomes, strict=True))
        failures = []
        for account, outcome in pairs:
            if isinstance(outcome, StorageError):
                failures.append((account, outcome))
            else:
                delivered[account.address] = outcome
        if failures:
            account, err = failures[0]
            kind = err.kind if not delivered else ErrorKind.TEMPORARY
            if kind not in (ErrorKind.OVER_QUOTA, ErrorKind.TOO_BIG):
                kind = ErrorKind.TEMPORARY
            raise SubmitError(kind, f"delivery to {account.address} failed: {err}", account.address)
    if delivered:
        MESSAGES_DELIVERED.inc(len(delivered), destination="local")
    blob_key = None
    if routing.remote:
        try:
            async with materialised(message) as source:
                for sender, recipients in await _senders(storage, mail_from, routing, settings):
                    blob_key = await _queue(
                        storage,
                        sender,
                        recipients,
                        source,
                        held_for,
                        dsn,
                        {a: d for a, d in (recipient_dsn or {}).items() if a in recipients},
                    )
        except StorageError as exc:
            raise SubmitError(ErrorKind.TEMPORARY, f"queueing failed: {exc}") from exc
        MESSAGES_QUEUED.inc(len(routing.remote))
    return delivered, blob_key


async def _senders(
    storage: Storage, mail_from: str, routing: Routing, settings: Settings | None
) -> list[tuple[str, list[str]]]:
    """The remote recipients grouped by the reverse-path they are queued
    with: ``mail_from``, and for alias forwards an SRS address when SRS is
    on and ``mail_from`` is another site's (a null reverse-path stays null,
    and our own domains' SPF names us already)."""
    forwarded = [a for a in routing.forwarded if a in routing.remote]
    if settings is None or not forwarded or not mail_from:
        return [(mail_from, list(routing.remote))]
    if await storage.directory.is_local_domain(mail_from.rpartition("@")[2]):
        return [(mail_from, list(routing.remote))]
    srs = await srs_of(settings, storage)
    if srs is None:
        return [(mail_from, list(routing.remote))]
    direct = [a for a in routing.remote if a not in forwarded]
    groups = [(srs.forward(mail_from), forwarded)]
    return [(mail_from, direct), *groups] if direct else groups


async def _queue(
    storage: Storage,
    sender: str,
    recipients: list[str],
    source: bytes | Path,
    held_for: str | None,
    dsn: DsnEnvelope | None = None,
    recipient_dsn: Mapping[str, DsnRecipient] | None = None,
) -> str:
    """Stores the message in the site's blob store, then queues it; returns
    its key. If garbage collection is deleting one of its blobs (or did
    lately: ``storage/blob/deleting.py``), waits for that to end, stores
    it again and queues it then."""
    answered: dict[str, int] = {}  # by partition: each database numbers its own
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
        blobs = storage.blobs
        key = await (blobs.put_file(source) if isinstance(source, Path) else blobs.put(source))
        parts_of = getattr(blobs, "parts_of", None)
        parts = parts_of(key) if parts_of is not None else frozenset()
        named = None if parts is None else {key, *parts}
        try:
            dsn_args = {"dsn": dsn, "recipient_dsn": recipient_dsn} if dsn or recipient_dsn else {}
            await storage.queue.enqueue(
                sender, recipients, key, held_for=held_for, blob_keys=(named, answered), **dsn_args
            )
            return key
        except BlobsBeingDeleted as err:
            if attempt == RESTORE_ATTEMPTS:
                raise
            await deleting.wait_done(storage.directory.db, err.keys)  # type: ignore[attr-defined]
            answered[err.where] = err.last_id
    raise AssertionError("unreachable")


def owns_address(address: str, owned: AbstractSet[str], *, plus: bool) -> bool:
    """Whether ``address`` is in ``owned`` (lower-case addresses), or with
    ``plus`` a subaddress ``base+detail@domain`` of one (RFC 5233); case-blind."""
    wanted = address.lower()
    if wanted in owned:
        return True
    local, at, domain = wanted.rpartition("@")
    base = local.partition("+")[0]
    return plus and bool(at) and base != local and f"{base}@{domain}" in owned


def sendable_addresses(account: Account, addresses: Iterable[str], settings: Settings) -> set[str]:
    """What ``account`` may send as, before plus-addresses (lower-case): its
    own address and, with smtp.sender_aliases, ``addresses`` (the directory's
    ``addresses_of``: every alias that reaches it)."""
    if not settings.smtp.sender_aliases:
        return {account.address.lower()}
    return {a.lower() for a in addresses} | {account.address.lower()}


async def sender_allowed(
    storage: Storage, settings: Settings, account: Account, mail_from: str
) -> bool:
    """True if ``account`` may use ``mail_from`` under smtp.sender_aliases
    and smtp.sender_plus_addresses."""
    addresses = await storage.directory.addresses_of(account)
    owned = sendable_addresses(account, addresses, settings)
    return owns_address(mail_from, owned, plus=settings.smtp.sender_plus_addresses)


async def save_sent_copy(
    storage: Storage, account: Account, message: Message
) -> AppendResult | None:
    """Store the submitted message in the sender's \\Sent mailbox, \\Seen.
    Best effort: the message is already on its way, so a failure is logged."""
    try:
        mailboxes = await storage.mail(account).list_mailboxes(account.id)
        target: str | int = next((m.id for m in mailboxes if m.special_use == "\\Sent"), "Sent")
        async with materialised(message) as source:
            results = await ingest_each(storage, [Delivery(account, target, (SEEN,))], source)
    except StorageError as exc:
        log.warning("Sent copy for %s failed: %s", account.address, exc)
        return None
    outcome = results[0] if results else None
    if isinstance(outcome, StorageError):
        log.warning("Sent copy for %s failed: %s", account.address, outcome)
        return None
    return outcome


async def submit_message(
    storage: Storage,
    settings: Settings,
    account: Account,
    mail_from: str,
    rcpt_to: Sequence[str],
    raw: bytes,
) -> SubmitResult:
    """Send ``raw`` (a complete RFC 5322 message) from ``account``.

    Checks, in order: the sender may use ``mail_from`` (when
    ``settings.smtp.sender_must_match``; NO_PERMISSION), there is at least
    one recipient and at most ``settings.smtp.max_recipients`` (INVALID),
    each recipient is syntactically valid (INVALID) and, on our domains,
    exists (NOT_FOUND, ``err.recipient`` set). Then local copies are
    committed, remote recipients queued (held while ``account`` is flagged
    for a sending limit; LimitReached, with nothing stored, if this message
    would go past one: delivery/limits.py), and a \\Seen copy saved to the
    sender's Sent mailbox: the HTTP send's caller has no copy of its own
    (SMTP submission follows smtp.save_sent_copy instead). The caller
    adds any trace field (Received) to ``raw`` beforehand.
    """
    if len(raw) > settings.server.max_message_size:
        raise SubmitError(ErrorKind.TOO_BIG, "message too big")
    if settings.smtp.sender_must_match and not await sender_allowed(
        storage, settings, account, mail_from
    ):
        raise SubmitError(ErrorKind.NO_PERMISSION, f"{mail_from} is not your address")
    if not rcpt_to:
        raise SubmitError(ErrorKind.INVALID, "no recipients")
    if len(rcpt_to) > settings.smtp.max_recipients:
        raise SubmitError(ErrorKind.INVALID, "too many recipients")
    routing = Routing.empty()
    for rcpt in rcpt_to:
        try:
            address = parse_mailbox(rcpt.strip().removeprefix("<").removesuffix(">"))
        except PathSyntaxError as exc:
            raise SubmitError(ErrorKind.INVALID, f"bad recipient {rcpt!r}: {exc}", rcpt) from exc
        route = await resolve_recipient(storage, address, settings.smtp.postmaster, settings)
        routing.add(route, address)
    held_for = None
    if routing.remote:
        held_for = await hold_reason(storage, settings, account, len(routing.remote))
    delivered, blob_key = await deliver(
        storage,
        mail_from=mail_from,
        routing=routing,
        message=raw,
        held_for=held_for,
        settings=settings,
    )
    sent = await save_sent_copy(storage, account, raw)
    return SubmitResult(delivered, tuple(routing.remote), sent, blob_key)


__all__ = [
    "Routing",
    "SubmitError",
    "SubmitResult",
    "check_quota",
    "deliver",
    "owns_address",
    "resolve_recipient",
    "save_sent_copy",
    "sendable_addresses",
    "sender_allowed",
    "submit_message",
]

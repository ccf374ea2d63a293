"""Per-application state shared by the handlers, and the ownership checks.

Every handler that takes a folder or message id resolves it through
:func:`owned_mailbox` / :func:`owned_message`, which answer 404 both for an
id that does not exist and for one that belongs to another account: a
caller cannot tell the two apart.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from conf.settings import Settings
from httpapi.auth import Authenticator
from httpapi.errors import ApiError, not_found
from httpapi.ids import FolderIds, MessageRef
from httpapi.threads import ThreadCache
from httpapi.views import ListItems, ListPages, MessageBodies
from storage.api import MailStore, Storage
from storage.errors import ErrorKind, StorageError
from storage.model import Account, Mailbox, StoredMessage, UidSet
from storage.shared import RateLimit

R = TypeVar("R")
FOLDER_MAPS_CACHED = 10_000  # accounts whose folder ids are remembered (a few KB each)


@dataclass
class ApiContext:
    settings: Settings
    storage: Storage
    auth: Authenticator
    user_limit: RateLimit  # requests per minute; shared by every instance with [redis]
    ip_limit: RateLimit
    threads: ThreadCache = field(default_factory=ThreadCache)
    list_items: ListItems = field(default_factory=ListItems)
    list_pages: ListPages = field(default_factory=ListPages)
    bodies: MessageBodies = field(default_factory=MessageBodies)
    # account id -> (directory generation, its folder ids): see resolve_ids.
    folder_maps: dict[int, tuple[int, FolderIds]] = field(default_factory=dict)
    # Highest change id seen per account: where to start paging the change log.
    change_hints: dict[int, int] = field(default_factory=dict)
    websockets: set[web.WebSocketResponse] = field(default_factory=set)

    def note_change(self, account_id: int, change_id: int) -> None:
        if change_id > self.change_hints.get(account_id, 0):
            if len(self.change_hints) > 100_000:
                self.change_hints.clear()
            self.change_hints[account_id] = change_id


CONTEXT: web.AppKey[ApiContext] = web.AppKey("shardmail_api", ApiContext)
# The authenticated caller, set on the request by the access middleware.
ACCOUNT_KEY: Any = (
    web.RequestKey("shardmail_account", Account)
    if hasattr(web, "RequestKey")
    else "shardmail_account"
)


def context(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]


def account_of(request: web.Request) -> Account:
    """The authenticated caller (set by the auth middleware)."""
    account = request.get(ACCOUNT_KEY)
    if account is None:
        raise ApiError(401, "unauthorized", "authentication required")
    return account  # type: ignore[no-any-return]


FOLDER_IDS_KEY: Any = (
    web.RequestKey("shardmail_folder_ids", FolderIds)
    if hasattr(web, "RequestKey")
    else "shardmail_folder_ids"
)


async def folder_ids(request: web.Request) -> FolderIds:
    """The caller's folder and message ids (:class:`httpapi.ids.FolderIds`),
    read once per request: one ``list_mailboxes`` of the account's shard."""
    ids = request.get(FOLDER_IDS_KEY)
    if ids is None:
        ctx, account = context(request), account_of(request)
        generation = getattr(ctx.storage.directory, "generation", None)
        boxes = await ctx.storage.mail(account).list_mailboxes(account.id)
        ids = request[FOLDER_IDS_KEY] = FolderIds(account.id, boxes)
        if isinstance(generation, int):
            if len(ctx.folder_maps) >= FOLDER_MAPS_CACHED:
                ctx.folder_maps.clear()
            ctx.folder_maps[account.id] = (generation, ids)
    return ids  # type: ignore[no-any-return]


async def resolve_ids(
    request: web.Request, resolve: Callable[[FolderIds], R], row: Callable[[R], int]
) -> tuple[FolderIds, R]:
    """``resolve(ids)`` (the request's folder or message id to a mailbox
    row) against the account's remembered folder ids, with no read, when
    they resolve it to a row they hold; else against ids read afresh (a
    folder created since). A row's UIDVALIDITY never changes and row ids
    are never reused, so what is remembered is never wrong, only
    incomplete; an account move (the directory's ``generation``) forgets it."""
    ctx, account = context(request), account_of(request)
    remembered = ctx.folder_maps.get(account.id)
    generation = getattr(ctx.storage.directory, "generation", None)
    if remembered is not None and remembered[0] == generation:
        try:
            found = resolve(remembered[1])
        except ApiError:
            pass
        else:
            if remembered[1].knows(row(found)):
                return remembered[1], found
    ids = await folder_ids(request)
    return ids, resolve(ids)


def client_ip(request: web.Request, trusted_proxies: list[str]) -> str:
    """The peer address, or the X-Forwarded-For client when the peer is a
    trusted proxy (the rightmost untrusted hop, which a client cannot forge)."""
    peer = request.remote or "unknown"
    if not trusted_proxies or not _trusted(peer, trusted_proxies):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _trusted(hop, trusted_proxies):
            return hop
    return peer


def _trusted(address: str, proxies: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for proxy in proxies:
        try:
            if ip in ipaddress.ip_network(proxy, strict=False):
                return True
        except ValueError:
            continue
    return False


async def owned_mailbox(mail: MailStore, account: Account, mailbox_id: int) -> Mailbox:
    try:
        mailbox = await mail.get_mailbox_by_id(account.id, mailbox_id)
    except StorageError as err:
        if err.kind is ErrorKind.NOT_FOUND:
            raise not_found("folder") from None
        raise
    if mailbox.account_id != account.id:
        raise not_found("folder")
    return mailbox


async def owned_stored(mail: MailStore, account: Account, ref: MessageRef) -> StoredMessage:
    """The message ``ref`` names, if it is the account's, in one read (the
    fetch checks the folder's owner itself); 404 otherwise."""
    try:
        found = await mail.fetch(account.id, ref.mailbox_id, UidSet.of([ref.uid]))
    except StorageError as err:
        if err.kind is ErrorKind.NOT_FOUND:
            raise not_found("message") from None
        raise
    if not found or found[0].entry.uid != ref.uid:
        raise not_found("message")
    return found[0]


async def owned_message(
    mail: MailStore, account: Account, ref: MessageRef
) -> tuple[Mailbox, StoredMessage]:
    try:
        mailbox = await owned_mailbox(mail, account, ref.mailbox_id)
    except ApiError:
        raise not_found("message") from None
    found = await mail.fetch(account.id, mailbox.id, UidSet.of([ref.uid]))
    if not found or found[0].entry.uid != ref.uid:
        raise not_found("message")
    return mailbox, found[0]

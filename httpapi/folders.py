"""Folder routes: list, create, rename, delete, and a folder's message list.

The message list is newest first by the message's Date (never later than
its arrival; the UID breaks ties) and paginated by a keyset cursor on
``(list date, uid)`` (``MailStore.page``): a page is "the ``limit`` entries
ordered after the cursor", read from storage's index, so mail arriving
while a client pages never shifts a page: nothing already listed is
repeated and nothing is skipped.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from aiohttp import web

from httpapi.body import is_text, json_body
from httpapi.context import account_of, context, folder_ids, owned_mailbox, resolve_ids
from httpapi.errors import ApiError, bad_request, not_found
from httpapi.ids import decode_folder_cursor, encode_folder_cursor
from httpapi.views import encode_json, folder_view, json_bytes_response, json_response
from storage.errors import ErrorKind, StorageError
from storage.model import DEFAULT_MAILBOXES, FLAGGED, HIERARCHY_DELIMITER, SEEN
from storage.search import All, And, Criteria, Date, Flag, Header

routes = web.RouteTableDef()

DEFAULT_PAGE = 50
MAX_PAGE = 200
MAX_FOLDER_NAME = 255
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f*%]")  # controls; IMAP LIST wildcards (RFC 3501 6.3.8)
_ORDER = {name.upper(): i for i, (name, _) in enumerate(DEFAULT_MAILBOXES)}


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise bad_request(f"limit must be 1..{MAX_PAGE}", "invalid_limit")
    return int(raw)


def bool_param(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise bad_request(f"{name} must be true or false", "invalid_filter")


def date_param(request: web.Request, name: str) -> dt.date | None:
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        return dt.date.fromisoformat(raw[:10])
    except ValueError:
        raise bad_request(f"{name} must be a date (YYYY-MM-DD)", "invalid_filter") from None


def folder_name(value: Any) -> str:
    """A full folder name: "/"-separated, no empty levels, no controls."""
    if not isinstance(value, str) or not value.strip():
        raise bad_request("name must be a non-empty string", "invalid_name")
    name = value.strip()
    levels = name.split(HIERARCHY_DELIMITER)
    if (
        len(name) > MAX_FOLDER_NAME
        or _BAD_NAME.search(name)
        or any(not lv for lv in levels)
        or not is_text(name)
    ):
        raise bad_request(
            "name must be up to 255 characters without control characters, '*', '%' "
            "or empty levels",
            "invalid_name",
        )
    return name


async def _folder(request: web.Request) -> int:
    """The mailbox row id the path's folder id names (404 if none)."""
    token = request.match_info["folder_id"]
    return (await resolve_ids(request, lambda ids: ids.folder(token), int))[1]


@routes.get("/v1/folders", name="list_folders")
async def list_folders(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    boxes = await mail.list_mailboxes(account.id)
    status = await mail.status_all(account.id)
    pairs = sorted(
        ((b, status[b.id]) for b in boxes if b.id in status),  # deleted meanwhile: skip
        key=lambda p: (_ORDER.get(p[0].name.upper(), len(_ORDER)), p[0].name.casefold()),
    )
    return json_response({"folders": [folder_view(b, s) for b, s in pairs]})


@routes.post("/v1/folders", name="create_folder")
async def create_folder(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    body = await json_body(request)
    mail = ctx.storage.mail(account)
    name = folder_name(body.get("name"))
    parent_id = body.get("parent_id")
    if parent_id is not None:
        if not isinstance(parent_id, str):
            raise bad_request("parent_id must be a folder id", "invalid_field")
        parent_row = (await folder_ids(request)).folder(parent_id)
        parent = await owned_mailbox(mail, account, parent_row)
        name = folder_name(f"{parent.name}{HIERARCHY_DELIMITER}{name}")
    mailbox = await mail.create_mailbox(account.id, name)
    status = await mail.status(account.id, mailbox.id)
    return json_response(folder_view(mailbox, status), status=201)


@routes.patch("/v1/folders/{folder_id}", name="rename_folder")
async def rename_folder(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    mailbox = await owned_mailbox(mail, account, await _folder(request))
    body = await json_body(request)
    new_name = folder_name(body.get("name"))
    if mailbox.name.upper() == "INBOX":
        raise bad_request("INBOX cannot be renamed here", "special_folder")
    if new_name != mailbox.name:
        await mail.rename_mailbox(account.id, mailbox.name, new_name)
    renamed = await mail.get_mailbox_by_id(account.id, mailbox.id)
    status = await mail.status(account.id, renamed.id)
    return json_response(folder_view(renamed, status))


@routes.delete("/v1/folders/{folder_id}", name="delete_folder")
async def delete_folder(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    mailbox = await owned_mailbox(mail, account, await _folder(request))
    if mailbox.name.upper() == "INBOX" or mailbox.special_use:
        # The webmail relies on INBOX, Sent, Trash...; IMAP may still remove them.
        raise bad_request("special folders cannot be deleted", "special_folder")
    await mail.delete_mailbox(account.id, mailbox.name)
    return web.Response(status=204)


@routes.get("/v1/folders/{folder_id}/messages", name="list_messages")
async def list_messages(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    mailbox_id = await _folder(request)
    try:
        limit, criteria, after = _list_query(request, mailbox_id)
    except ApiError:
        await owned_mailbox(mail, account, mailbox_id)  # an unknown folder is 404 first
        raise
    # One more than the page: whether there is a next one. The page read
    # checks the folder is the account's (NOT_FOUND): no read of its own.
    try:
        page = await mail.page(account.id, mailbox_id, criteria, limit + 1, after)
    except StorageError as err:
        if err.kind is ErrorKind.NOT_FOUND:
            raise not_found("folder") from None
        raise
    has_more = len(page) > limit
    shown = page[:limit]
    index = await ctx.threads.index(mail, account.id, [s.entry.message_id for _, s in shown])
    ids = (await resolve_ids(request, lambda ids: mailbox_id, int))[0]
    # The answer depends on the page, the thread index and the folder's id
    # only (the query is in the key): see ListPages for why reuse is safe.
    key = (account.id, mailbox_id, request.rel_url.raw_query_string)
    folder = ids.folder_id(mailbox_id)
    body = ctx.list_pages.get(key, page, index, folder)
    if body is None:
        thread_of = index.thread_of
        items = [ctx.list_items.item(s, thread_of.get(s.entry.message_id), ids) for _, s in shown]
        cursor = encode_folder_cursor(mailbox_id, *shown[-1][0]) if has_more else None
        body = encode_json({"messages": items, "next_cursor": cursor})
        ctx.list_pages.put(key, page, index, folder, body)
    return json_bytes_response(body)


def _list_query(
    request: web.Request, mailbox_id: int
) -> tuple[int, Criteria, tuple[int, int] | None]:
    """The page size, filters and cursor of a message-list request (400 if invalid)."""
    limit = page_limit(request)
    terms: list[Criteria] = []
    cursor = request.query.get("cursor")
    after = decode_folder_cursor(cursor, mailbox_id) if cursor else None
    unread = bool_param(request, "unread")
    if unread is not None:
        terms.append(Flag(SEEN, not unread))
    flagged = bool_param(request, "flagged")
    if flagged is not None:
        terms.append(Flag(FLAGGED, flagged))
    sender = request.query.get("from")
    if sender:
        terms.append(Header("from", sender))
    since = date_param(request, "since")
    if since is not None:
        terms.append(Date("internal", "since", since))
    before = date_param(request, "before")
    if before is not None:
        terms.append(Date("internal", "before", before))
    criteria: Criteria = And(tuple(terms)) if len(terms) > 1 else (terms[0] if terms else All())
    return limit, criteria, after


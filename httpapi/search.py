"""Account-wide search (``GET /v1/search``) and conversations (``GET /v1/threads/{id}``).

Search results are newest first by (internal date, mailbox id, uid) and
paginated by a keyset cursor on that triple: a later page holds only
entries strictly older than the last one returned, so mail arriving while
a client pages (always newer) shifts nothing. ``MailStore.search_account``
has only a limit, so a page asks for enough rows to reach past the cursor
and doubles the request until the page is full or the matches run out.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

from aiohttp import web

from httpapi.context import account_of, context, folder_ids
from httpapi.errors import bad_request, not_found
from httpapi.folders import page_limit
from httpapi.ids import decode_search_cursor, encode_search_cursor
from httpapi.query import QueryError, parse_query
from httpapi.views import summary
from storage.api import MailStore
from storage.model import MessageEntry, StoredMessage, UidSet

routes = web.RouteTableDef()

MAX_SCAN = 20_000  # rows one search request may pull from storage


def _timestamp_us(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp() * 1_000_000)


def order_key(entry: MessageEntry) -> tuple[int, int, int]:
    return (_timestamp_us(entry.internal_date), entry.mailbox_id, entry.uid)


async def fetch_entries(
    mail: MailStore, account_id: int, entries: list[MessageEntry]
) -> dict[tuple[int, int], StoredMessage]:
    """Parsed forms of entries spread over several mailboxes, one fetch per mailbox."""
    by_mailbox: dict[int, list[int]] = defaultdict(list)
    for entry in entries:
        by_mailbox[entry.mailbox_id].append(entry.uid)
    found: dict[tuple[int, int], StoredMessage] = {}
    for mailbox_id, uids in by_mailbox.items():
        for stored in await mail.fetch(account_id, mailbox_id, UidSet.of(uids)):
            found[(mailbox_id, stored.entry.uid)] = stored
    return found


@routes.get("/v1/search", name="search_messages")
async def search_messages(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    try:
        query = parse_query(request.query.get("q", ""))
    except QueryError as err:
        raise bad_request(str(err), "invalid_query") from None
    limit = page_limit(request)
    cursor_raw = request.query.get("cursor")
    after: tuple[int, int, int] | None = None
    if cursor_raw:
        after = decode_search_cursor(cursor_raw)
    want = limit + 1
    ask = want if after is None else want * 2
    page: list[StoredMessage] = []
    while True:
        entries = await mail.search_account(account.id, query.criteria, limit=ask)
        candidates = sorted(entries, key=order_key, reverse=True)
        if after is not None:
            candidates = [e for e in candidates if order_key(e) < after]
        exhausted = len(entries) < ask
        if query.has_attachment is not None:
            stored = await fetch_entries(mail, account.id, candidates)
            page = [
                stored[(e.mailbox_id, e.uid)]
                for e in candidates
                if (e.mailbox_id, e.uid) in stored
                and stored[(e.mailbox_id, e.uid)].parsed.has_attachments == query.has_attachment
            ]
        else:
            top = candidates[:want]
            stored = await fetch_entries(mail, account.id, top)
            page = [stored[(e.mailbox_id, e.uid)] for e in top if (e.mailbox_id, e.uid) in stored]
        if len(page) >= want or exhausted or ask >= MAX_SCAN:
            break
        ask = min(MAX_SCAN, ask * 4)
    has_more = len(page) > limit
    page = page[:limit]
    index = await ctx.threads.index(mail, account.id)
    ids = await folder_ids(request)
    next_cursor = None
    if has_more and page:
        last = page[-1].entry
        next_cursor = encode_search_cursor(*order_key(last))
    return web.json_response({
        "messages": [summary(s, index.thread_of.get(s.entry.message_id), ids) for s in page],
        "next_cursor": next_cursor,
    })


@routes.get("/v1/threads/{thread_id}", name="get_thread")
async def get_thread(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    thread_id = request.match_info["thread_id"]
    index = await ctx.threads.index(mail, account.id)
    members = index.members.get(thread_id)
    if not members:
        raise not_found("thread")
    by_mailbox: dict[int, list[int]] = defaultdict(list)
    for member in members:
        by_mailbox[member.mailbox_id].append(member.uid)
    found: dict[tuple[int, int], StoredMessage] = {}
    for mailbox_id, uids in by_mailbox.items():
        for stored in await mail.fetch(account.id, mailbox_id, UidSet.of(uids)):
            found[(mailbox_id, stored.entry.uid)] = stored
    ids = await folder_ids(request)
    messages: list[dict[str, Any]] = [
        summary(found[(m.mailbox_id, m.uid)], thread_id, ids)
        for m in members
        if (m.mailbox_id, m.uid) in found
    ]
    if not messages:
        raise not_found("thread")
    return web.json_response({
        "id": thread_id,
        "subject": messages[0]["subject"],
        "unread": sum(1 for m in messages if m["unread"]),
        "messages": messages,
    })

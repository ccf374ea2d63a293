"""Realtime push: ``GET /v1/events`` (WebSocket) and ``GET /v1/events/poll`` (long-poll).

Both are fed the same way, so they see the same events: the account's
change log (``MailStore.account_changes``) is the source of truth, read
after the last change id the client saw, and the event bus subscription is
only a wake-up. The subscription is opened *before* the log is read, so a
change committed after the read always wakes the reader: no gaps, and a
client that reconnects with ``since=<last id>`` resumes exactly.

WebSocket protocol (JSON text frames):

* authenticate with an ``Authorization`` header on the handshake, or (for
  browsers, which cannot set it) send ``{"type": "auth", "token": "..."}``
  as the first frame within 10 seconds;
* optional ``?since=<change id>`` resumes; without it the stream starts at
  the current end of the log;
* the server sends ``{"type": "ready", "last_event_id": N}`` then
  ``{"type": "event", "event": {...}}`` per change (``kind`` new, flags,
  expunge or mailbox; new-mail events carry the message summary and flag
  events the current flags); ``{"type": "ping"}`` from the client gets
  ``{"type": "pong"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from httpapi.context import ACCOUNT_KEY, ApiContext, account_of, context
from httpapi.errors import ApiError, bad_request
from httpapi.ids import FolderIds
from httpapi.threads import latest_change_id
from httpapi.views import event_view, summary
from runtime.metrics import CONNECTIONS, CONNECTIONS_TOTAL
from storage.api import MailStore, Subscription
from storage.errors import ErrorKind, StorageError
from storage.model import Account, Change, ChangeKind, UidSet

routes = web.RouteTableDef()
log = logging.getLogger("httpapi.realtime")

AUTH_TIMEOUT = 10.0
HEARTBEAT = 30.0  # WebSocket ping interval (RFC 6455 section 5.5.2), keeps proxies open
DEFAULT_POLL_TIMEOUT = 25.0
MAX_POLL_TIMEOUT = 60.0
BATCH = 500
WS_CLOSE_UNAUTHORIZED = 4401  # private-use close code (RFC 6455 section 7.4.2)
WS_CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455 section 7.4.1 (IANA registry)


class ChangeFeed:
    """The account's changes after ``after``, waiting on the bus when there are none."""

    def __init__(self, ctx: ApiContext, account: Account, after: int) -> None:
        self.ctx = ctx
        self.account = account
        self.after = after
        self.subscription: Subscription = ctx.storage.events.subscribe(account.id)

    @property
    def mail(self) -> MailStore:
        """The account's mail store now, asked at each read (no I/O): after
        the account moves to another shard (storage/move.py) the feed reads
        the new shard's log, whose change ids go on from the old one's."""
        return self.ctx.storage.mail(self.account)

    async def next_batch(self, timeout: float | None) -> list[Change]:
        """Changes after the last returned one, oldest first; [] on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            changes = await self.mail.account_changes(self.account.id, self.after, limit=BATCH)
            if changes:
                self.after = changes[-1].id
                self.ctx.note_change(self.account.id, self.after)
                return changes
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            woke = await self.subscription.get(timeout=remaining)
            if woke is None and getattr(self.subscription, "closed", False):
                return []

    def close(self) -> None:
        self.subscription.close()


async def start_id(ctx: ApiContext, account: Account, since: str | None) -> int:
    if since is not None and since != "":
        if not since.isdigit() or len(since) > 18:
            raise bad_request("since must be a change id", "invalid_since")
        return int(since)
    mail = ctx.storage.mail(account)
    latest = await latest_change_id(mail, account.id, ctx.change_hints.get(account.id, 0))
    ctx.note_change(account.id, latest)
    return latest


async def event_payloads(ctx: ApiContext, account: Account, changes: list[Change]) -> list[dict[
        str, Any]]:
    """Change-log entries as client events; a new-mail event carries the
    summary (if the message is still there), a flags event the current flags."""
    if not changes:
        return []
    mail = ctx.storage.mail(account)
    out: list[dict[str, Any]] = []
    index = None
    ids = FolderIds(account.id, await mail.list_mailboxes(account.id))
    for change in changes:
        view = event_view(change, ids)
        if (
            change.kind in (ChangeKind.NEW, ChangeKind.FLAGS)
            and change.mailbox_id is not None
            and change.uid is not None
        ):
            found = await mail.fetch(account.id, change.mailbox_id, UidSet.of([change.uid]))
            if found:
                if change.kind is ChangeKind.NEW:
                    if index is None:
                        index = await ctx.threads.index(mail, account.id)
                    view["message"] = summary(
                        found[0], index.thread_of.get(found[0].entry.message_id), ids
                    )
                else:
                    view["flags"] = sorted(found[0].entry.flags)
        out.append(view)
    return out


@routes.get("/v1/events/poll", name="poll_events")
async def poll_events(request: web.Request) -> web.Response:
    """Long-poll: returns as soon as there are changes after ``since``, or
    empty after ``timeout`` seconds (default 25, at most 60). Without
    ``since``, returns at once with the current ``last_event_id``."""
    ctx, account = context(request), account_of(request)
    since = request.query.get("since")
    raw_timeout = request.query.get("timeout", str(DEFAULT_POLL_TIMEOUT))
    try:
        timeout = min(MAX_POLL_TIMEOUT, max(0.0, float(raw_timeout)))
    except ValueError:
        raise bad_request("timeout must be a number of seconds", "invalid_timeout") from None
    after = await start_id(ctx, account, since)
    if since is None or since == "":
        return web.json_response({"events": [], "last_event_id": after})
    feed = ChangeFeed(ctx, account, after)
    try:
        changes = await feed.next_batch(timeout)
    finally:
        feed.close()
    events = await event_payloads(ctx, account, changes)
    return web.json_response({"events": events, "last_event_id": feed.after})


async def _authenticate_ws(
    request: web.Request, ws: web.WebSocketResponse, ctx: ApiContext
) -> Account | None:
    account = request.get(ACCOUNT_KEY)
    if account is not None:
        return account  # type: ignore[no-any-return]
    try:
        msg = await ws.receive(timeout=AUTH_TIMEOUT)
    except TimeoutError:
        msg = None
    token = None
    if msg is not None and msg.type == WSMsgType.TEXT:
        try:
            first = json.loads(msg.data)
        except ValueError:
            first = None
        if isinstance(first, dict) and first.get("type") == "auth":
            token = first.get("token")
    if not isinstance(token, str):
        await ws.close(code=WS_CLOSE_UNAUTHORIZED, message=b"authentication required")
        return None
    try:
        account = await ctx.auth.from_token(token)
    except ApiError:
        await ws.close(code=WS_CLOSE_UNAUTHORIZED, message=b"invalid or expired token")
        return None
    except StorageError as err:
        if err.kind is not ErrorKind.TEMPORARY:
            raise
        # RFC 6455 section 7.4.1: 1013 "try again later", not a bad token.
        await ws.close(code=WS_CLOSE_TRY_AGAIN_LATER, message=b"try again later")
        return None
    if await ctx.user_limit.take(f"user:{account.id}"):
        await ws.close(code=WS_CLOSE_TRY_AGAIN_LATER, message=b"rate limited")
        return None
    return account


@routes.get("/v1/events", name="events_websocket")
async def events_websocket(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    since = request.query.get("since")
    if since and (not since.isdigit() or len(since) > 18):
        raise bad_request("since must be a change id", "invalid_since")
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=64 * 1024)
    if not ws.can_prepare(request).ok:
        raise ApiError(426, "upgrade_required", "this endpoint speaks WebSocket (RFC 6455)",
                       {"Upgrade": "websocket"})
    await ws.prepare(request)
    ctx.websockets.add(ws)
    CONNECTIONS.inc(protocol="websocket")
    CONNECTIONS_TOTAL.inc(protocol="websocket")
    feed: ChangeFeed | None = None
    pump: asyncio.Task[None] | None = None
    try:
        account = await _authenticate_ws(request, ws, ctx)
        if account is None:
            return ws
        after = await start_id(ctx, account, since)
        feed = ChangeFeed(ctx, account, after)
        await ws.send_json({"type": "ready", "last_event_id": after, "account": account.address})

        async def push(active: ChangeFeed) -> None:
            try:
                while not ws.closed:
                    changes = await active.next_batch(timeout=None)
                    if not changes:
                        return
                    for event in await event_payloads(ctx, account, changes):
                        await ws.send_json({"type": "event", "event": event})
            except Exception:
                log.exception("event push failed")
            finally:
                # Ends the receive loop below; the client reconnects with since=.
                if not ws.closed:
                    await ws.close(code=1011, message=b"event stream ended")

        pump = asyncio.create_task(push(feed))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    data = None
                if isinstance(data, dict) and data.get("type") == "ping":
                    await ws.send_json({"type": "pong"})
            elif msg.type == WSMsgType.ERROR:
                break
    except ConnectionResetError:
        pass
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        if feed is not None:
            feed.close()
        ctx.websockets.discard(ws)
        CONNECTIONS.dec(protocol="websocket")
        if not ws.closed:
            await ws.close()
    return ws

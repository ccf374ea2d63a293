"""Message routes: read, raw source, attachments, flag/move, delete, send.

Reads go through the parsed body structure stored at ingest and byte
ranges of the blob (:mod:`httpapi.mime`); nothing is re-serialised. Sending
builds the message here (:mod:`httpapi.compose`) and hands it to
``delivery.submit.submit_message``: the same path as SMTP submission (local
recipients delivered, remote ones queued, a copy in Sent).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
from typing import Any

from aiohttp import BodyPartReader, web

from conf.settings import Settings
from delivery.checks import Action, CheckStage, Flow, Subject
from delivery.learn import learn_moved
from httpapi.body import json_body, parse_json, read_body
from httpapi.compose import (
    Draft,
    Upload,
    build_message,
    finish_draft,
    parse_json_draft,
)
from httpapi.context import (
    account_of,
    context,
    folder_ids,
    owned_mailbox,
    owned_message,
    owned_stored,
    resolve_ids,
)
from httpapi.errors import ApiError, bad_request, not_found, retry_later
from httpapi.ids import MessageRef, folder_id
from httpapi.mime import (
    content_disposition,
    decoded_size,
    message_parts,
    read_text,
    stream_decoded,
)
from httpapi.sanitize import sanitize_html
from httpapi.views import addresses, decode_words, iso, json_response, summary
from runtime.metrics import MESSAGES_RECEIVED
from storage.api import BlobStore
from storage.contentpool import ContentTimeout, content_pool
from storage.errors import ErrorKind, StorageError
from storage.model import FLAGGED, SEEN, StoredMessage, StoreMode, UidSet

routes = web.RouteTableDef()

SEND_OVERHEAD = 64 * 1024  # headers, field names and JSON syntax around the payload
SANITIZE_INLINE_LIMIT = 64 * 1024  # larger HTML is sanitized in a content worker
# Types a browser may show inline without running script in our origin.
INLINE_SAFE_TYPES = frozenset({
    "image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf", "text/plain",
})


@routes.get("/v1/messages/{message_id}", name="get_message")
async def get_message(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    token = request.match_info["message_id"]
    ids, ref = await resolve_ids(request, lambda ids: ids.message(token),
                                 lambda ref: ref.mailbox_id)
    stored = await owned_stored(mail, account, ref)
    content = ctx.bodies.get(stored.entry.blob_key)
    if content is None:
        content, complete = await _read_content(ctx.storage.blobs_for(account), stored)
        if complete:
            ctx.bodies.put(stored.entry.blob_key, content)
    index = await ctx.threads.index(mail, account.id, [stored.entry.message_id])
    view = summary(stored, index.thread_of.get(stored.entry.message_id), ids)
    view.update(content)
    view["attachments"] = [
        {**a, "url": f"/v1/messages/{view['id']}/attachments/{a['index']}"}
        for a in content["attachments"]
    ]
    return json_response(view)


async def _read_content(blobs: BlobStore, stored: StoredMessage) -> tuple[dict[str, Any], bool]:
    """What a message read shows beyond its list item, from the parsed
    structure and byte ranges of the blob; and whether it is complete
    (False when the HTML could not be sanitized in time: not to be kept)."""
    entry, parsed = stored.entry, stored.parsed
    parts = message_parts(parsed.body)
    text = await read_text(blobs, entry.blob_key, parts.text) if parts.text else None
    html = None
    complete = True
    if parts.html is not None:
        raw_html = await read_text(blobs, entry.blob_key, parts.html)
        if len(raw_html) > SANITIZE_INLINE_LIMIT:
            try:  # in a content worker, off our GIL, with a time limit
                html = await content_pool().run(sanitize_html, raw_html)
            except ContentTimeout:
                # Degrade to the plain-text view: the client shows ``text``
                # (the HTML source itself when the mail has no text part).
                text = text if text is not None else raw_html
                complete = False
        else:
            html = sanitize_html(raw_html)
    header_block = await blobs.get_range(entry.blob_key, 0, parsed.body.body_start)
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(header_block)
    env = parsed.envelope
    return {
        "reply_to": addresses(env.reply_to),
        "message_id": parsed.message_id,
        "in_reply_to": parsed.in_reply_to,
        "references": list(parsed.references),
        "sent_at": iso(parsed.sent_date),
        "headers": [[name, _header_text(value)] for name, value in headers.raw_items()],
        "text": text,
        "html": html,
        "attachments": [
            {
                "index": a.index,
                "filename": a.filename,
                "content_type": a.content_type,
                "size": await decoded_size(blobs, entry.blob_key, a.part),
                "inline": a.inline,
                "content_id": a.content_id,
            }
            for a in parts.attachments
        ],
    }, complete


def _header_text(value: str) -> str:
    unfolded = " ".join(str(value).split())
    return decode_words(unfolded) or ""


@routes.get("/v1/messages/{message_id}/raw", name="get_message_raw")
async def get_message_raw(request: web.Request) -> web.StreamResponse:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    ref = (await folder_ids(request)).message(request.match_info["message_id"])
    _, stored = await owned_message(mail, account, ref)
    response = web.StreamResponse(headers={
        "Content-Type": "message/rfc822",  # RFC 2046 section 5.2.1
        "Content-Disposition": content_disposition("message.eml", inline=False),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'",
    })
    response.content_length = stored.entry.size
    await response.prepare(request)
    async for chunk in ctx.storage.blobs_for(account).stream(stored.entry.blob_key):
        await response.write(chunk)
    await response.write_eof()
    return response


@routes.get("/v1/messages/{message_id}/attachments/{index}", name="get_attachment")
async def get_attachment(request: web.Request) -> web.StreamResponse:
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    ref = (await folder_ids(request)).message(request.match_info["message_id"])
    _, stored = await owned_message(mail, account, ref)
    raw_index = request.match_info["index"]
    parts = message_parts(stored.parsed.body)
    if not raw_index.isdigit() or int(raw_index) >= len(parts.attachments):
        raise not_found("attachment")
    attachment = parts.attachments[int(raw_index)]
    content_type = attachment.content_type
    if content_type.startswith("text/"):
        charset = next((v for k, v in attachment.part.params if k.lower() == "charset"), None)
        content_type += f"; charset={charset}" if charset else ""
    inline = attachment.content_type in INLINE_SAFE_TYPES and request.query.get("inline") == "1"
    response = web.StreamResponse(headers={
        "Content-Type": content_type,
        "Content-Disposition": content_disposition(attachment.filename, inline),
        # An attachment is not our page: never sniff, never script (text/html, SVG).
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:",
        "Cache-Control": "private, max-age=3600",
    })
    await response.prepare(request)
    async for chunk in stream_decoded(
        ctx.storage.blobs_for(account), stored.entry.blob_key, attachment.part
    ):
        await response.write(chunk)
    await response.write_eof()
    return response


@routes.patch("/v1/messages/{message_id}", name="update_message")
async def update_message(request: web.Request) -> web.Response:
    """``{"unread": bool, "flagged": bool, "folder_id": str}``, any subset;
    ``unread`` is the name lists and filters use (``read``, its negation, is
    still accepted from older clients)."""
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    ref = (await folder_ids(request)).message(request.match_info["message_id"])
    body = _read_state(await json_body(request))
    target = None
    if "folder_id" in body:
        if not isinstance(body["folder_id"], str):
            raise bad_request("folder_id must be a folder id", "invalid_field")
        folder = (await folder_ids(request)).folder(body["folder_id"])
        target = await owned_mailbox(mail, account, folder)
    mailbox, _ = await owned_message(mail, account, ref)
    uids = UidSet.of([ref.uid])
    # \Seen is set when the message is *not* unread (RFC 3501 section 2.3.2).
    for key, flag, set_when in (("unread", SEEN, False), ("flagged", FLAGGED, True)):
        if key in body:
            mode = StoreMode.ADD if body[key] is set_when else StoreMode.REMOVE
            await mail.store_flags(account.id, mailbox.id, uids, mode, [flag])
    if target is not None and target.id != mailbox.id:
        moved = await mail.move(account.id, mailbox.id, uids, target.id)
        if not moved.pairs:
            raise not_found("message")
        # Into Junk teaches spam, out of it ham: queued, never delaying the reply.
        learn_moved(ctx.settings, ctx.storage, account, mailbox, target, moved.pairs)
        ref = MessageRef(target.id, moved.pairs[0][1])
    _, stored = await owned_message(mail, account, ref)
    index = await ctx.threads.index(mail, account.id)
    ids = await folder_ids(request)
    return web.json_response(summary(stored, index.thread_of.get(stored.entry.message_id), ids))


def _read_state(body: dict[str, Any]) -> dict[str, Any]:
    """The PATCH body validated, with legacy ``read`` folded into ``unread``."""
    unknown = set(body) - {"unread", "read", "flagged", "folder_id"}
    if unknown:
        raise bad_request(f"unknown field {sorted(unknown)[0]!r}", "unknown_field")
    if not body:
        raise bad_request("nothing to change: give unread, flagged or folder_id", "empty_update")
    for key in ("unread", "read", "flagged"):
        if key in body and not isinstance(body[key], bool):
            raise bad_request(f"{key} must be true or false", "invalid_field")
    if "read" in body:
        unread = not body.pop("read")
        if body.setdefault("unread", unread) is not unread:
            raise bad_request("read and unread contradict each other", "conflicting_fields")
    return body


@routes.delete("/v1/messages/{message_id}", name="delete_message")
async def delete_message(request: web.Request) -> web.Response:
    """Moves to Trash; a message already in Trash (or with no Trash folder)
    is expunged for good."""
    ctx, account = context(request), account_of(request)
    mail = ctx.storage.mail(account)
    ref = (await folder_ids(request)).message(request.match_info["message_id"])
    mailbox, _ = await owned_message(mail, account, ref)
    uids = UidSet.of([ref.uid])
    trash = next(
        (b for b in await mail.list_mailboxes(account.id) if b.special_use == "\\Trash"), None
    )
    if trash is not None and trash.id != mailbox.id:
        moved = await mail.move(account.id, mailbox.id, uids, trash.id)
        if moved.pairs:
            new_id = (await folder_ids(request)).message_id(trash.id, moved.pairs[0][1])
            return web.json_response(
                {"expunged": False, "id": new_id, "folder_id": folder_id(trash)}
            )
        raise not_found("message")
    # One write: no \Deleted flag set first for IMAP sessions to see, or to
    # be left behind by a failure between two writes.
    if not await mail.expunge(account.id, mailbox.id, uids, flagged_only=False):
        raise not_found("message")
    return web.json_response({"expunged": True, "id": None, "folder_id": None})


async def _multipart_draft(request: web.Request, max_size: int) -> Draft:
    """multipart/form-data (RFC 7578): fields to, cc, bcc (repeatable or
    comma-separated), subject, text, html, in_reply_to, references; every
    part with a filename is an attachment."""
    fields: dict[str, list[str]] = {}
    uploads: list[Upload] = []
    total = 0
    reader = await request.multipart()
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise bad_request("nested multipart is not supported", "invalid_multipart")
        data = bytearray()
        while chunk := await part.read_chunk(65536):
            data.extend(chunk)
            total += len(chunk)
            if total > max_size:
                raise ApiError(413, "message_too_large", f"message larger than {max_size} octets")
        if part.filename:
            ctype = part.headers.get("Content-Type", "application/octet-stream")
            uploads.append(Upload(part.filename, ctype.split(";")[0].strip().lower(), bytes(data)))
            continue
        name = part.name or ""
        if name not in {"to", "cc", "bcc", "subject", "text", "html", "in_reply_to", "references"}:
            raise bad_request(f"unknown field {name!r}", "unknown_field")
        try:
            fields.setdefault(name, []).append(bytes(data).decode("utf-8"))
        except UnicodeDecodeError:
            raise bad_request(f"{name} is not UTF-8", "invalid_field") from None
    body: dict[str, Any] = {k: v for k, v in fields.items() if k in ("to", "cc", "bcc")}
    for key in ("subject", "text", "html", "in_reply_to"):
        if key in fields:
            body[key] = fields[key][-1]
    body["references"] = " ".join(fields.get("references", [])).split()
    draft = parse_json_draft(body, max_size)
    draft.attachments.extend(
        Upload(_clean_name(u.filename), u.content_type or "application/octet-stream", u.data)
        for u in uploads
    )
    return finish_draft(draft, max_size)


def _clean_name(name: str) -> str:
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch >= " " and ch != "\x7f")[:255] or "attachment"


async def _content_checks(
    settings: Settings, sender: str, recipients: list[str], raw: bytes, client_ip: str
) -> bytes:
    """The check stage (delivery/checks.py) on a message being sent, before
    anything is stored or queued: refused content is 422 ``content_rejected``
    (the client must change the message, RFC 9110 section 15.5.21), a check
    that could not decide is 503 with Retry-After. Returns ``raw`` with any
    header fields the checks add."""
    stage = CheckStage.from_settings(settings)
    if not stage:
        return raw
    verdict = await stage.run(
        Subject(Flow.HTTP, raw, sender, tuple(recipients), client_ip=client_ip, account=sender)
    )
    if verdict.action is Action.REJECT:
        raise ApiError(422, "content_rejected", verdict.text)
    if verdict.action is Action.TEMPFAIL:
        raise ApiError(503, "unavailable", verdict.text, retry_later())
    return verdict.headers + raw


@routes.post("/v1/messages", name="send_message")
async def send_message(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    max_size = ctx.settings.server.max_message_size
    # base64 in JSON grows attachments by 4/3; multipart carries them as is.
    body_limit = max_size * 4 // 3 + SEND_OVERHEAD
    if request.content_length is not None and request.content_length > body_limit:
        raise ApiError(413, "message_too_large", f"message larger than {max_size} octets")
    if request.content_type == "multipart/form-data":
        draft = await _multipart_draft(request, max_size)
    elif request.content_type == "application/json":
        try:
            data = await read_body(request, body_limit)
        except ApiError:
            raise ApiError(413, "message_too_large",
                           f"message larger than {max_size} octets") from None
        draft = parse_json_draft(parse_json(data), max_size)
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send application/json or multipart/form-data")
    raw, msgid = await asyncio.to_thread(
        build_message, draft, account.address, ctx.settings.server.hostname
    )
    if len(raw) > max_size:
        raise ApiError(413, "message_too_large", f"message larger than {max_size} octets")
    raw = await _content_checks(ctx.settings, account.address, draft.recipients(), raw,
                                request.remote or "")
    try:
        from delivery.limits import LimitReached
        from delivery.submit import SubmitError, submit_message
    except ImportError:  # pragma: no cover - a deployment without mtad
        raise ApiError(503, "unavailable", "sending is not available") from None
    try:
        result = await submit_message(
            ctx.storage, ctx.settings, account, account.address, draft.recipients(), raw
        )
    except LimitReached as err:
        # RFC 6585 section 4: 429 Too Many Requests, Retry-After the window's end.
        return web.json_response(
            {"error": {"code": "sending_limit", "limit": err.limit, "allowed": err.allowed,
                       "message": str(err)}},
            status=429,
            headers={"Retry-After": str(err.retry_after)},
        )
    except SubmitError as err:
        status = err.http_status
        detail = {"code": err.kind.name.lower(), "message": str(err)}
        if err.recipient:
            detail["recipient"] = err.recipient
        headers = retry_later() if err.kind is ErrorKind.TEMPORARY else None
        return web.json_response({"error": detail}, status=status, headers=headers)
    except StorageError as err:
        if err.kind is ErrorKind.TOO_BIG:
            raise ApiError(413, "message_too_large", str(err)) from None
        raise
    MESSAGES_RECEIVED.inc(protocol="http")
    sent = getattr(result, "sent", None)
    return web.json_response(
        {
            "message_id": msgid,
            "sent_id": (
                (await folder_ids(request)).message_id(sent.mailbox_id, sent.uid)
                if sent is not None
                else None
            ),
            "delivered": sorted(getattr(result, "delivered", {}) or {}),
            "queued": list(getattr(result, "queued", ()) or ()),
        },
        status=202,
    )


"""Messages for the contract suites, built without the MIME parser: raw
RFC 5322 bytes plus a matching ParsedMessage made from storage.model values
(offsets are real, so header searches that read the blob work)."""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass

from storage.backend import SqlStorage
from storage.model import Account, Address, BodyPart, Envelope, ParsedMessage

_counter = itertools.count(1)


@dataclass(frozen=True)
class Made:
    message_id: int  # the stored message row
    raw: bytes
    blob_key: str


def build(
    subject: str = "Hello",
    body: str = "Hello world",
    sender: str = "alice@example.net",
    to: str = "bob@example.org",
    cc: str = "",
    date: dt.datetime | None = None,
    extra_headers: tuple[tuple[str, str], ...] = (),
    message_id: str | None = None,
    in_reply_to: str | None = None,
) -> tuple[bytes, ParsedMessage]:
    date = date or dt.datetime(2024, 3, 5, 12, 0, tzinfo=dt.UTC)
    message_id = message_id or f"<m{next(_counter)}@example.net>"
    fields = [
        ("From", sender),
        ("To", to),
        *((("Cc", cc),) if cc else ()),
        ("Subject", subject),
        ("Date", date.strftime("%a, %d %b %Y %H:%M:%S %z")),
        ("Message-ID", message_id),
        *((("In-Reply-To", in_reply_to),) if in_reply_to else ()),
        *extra_headers,
    ]
    header = "".join(f"{k}: {v}\r\n" for k, v in fields).encode() + b"\r\n"
    body_bytes = body.encode().replace(b"\n", b"\r\n")
    raw = header + body_bytes
    local, _, host = sender.partition("@")
    env = Envelope(
        date=fields[3 if not cc else 4][1],
        subject=subject,
        from_=(Address(None, None, local, host),),
        sender=(Address(None, None, local, host),),
        reply_to=(Address(None, None, local, host),),
        to=(Address(None, None, *to.split("@")),),
        cc=(Address(None, None, *cc.split("@")),) if cc else (),
        bcc=(),
        in_reply_to=in_reply_to,
        message_id=message_id,
    )
    part = BodyPart(
        type="text",
        subtype="plain",
        params=(("charset", "utf-8"),),
        id=None,
        description=None,
        encoding="8BIT",
        size=len(body_bytes),
        lines=body_bytes.count(b"\n") + 1,
        md5=None,
        disposition=None,
        language=None,
        location=None,
        header_start=0,
        body_start=len(header),
        end=len(raw),
    )
    parsed = ParsedMessage(
        size=len(raw),
        envelope=env,
        body=part,
        subject=subject,
        from_text=sender,
        to_text=to,
        cc_text=cc,
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=(in_reply_to,) if in_reply_to else (),
        sent_date=date,
        body_text=body,
        preview=body[:200],
        has_attachments=False,
    )
    return raw, parsed


async def store_message(storage: SqlStorage, account: Account, **kwargs: object) -> Made:
    """Puts the blob and adds the message row (in no mailbox yet)."""
    raw, parsed = build(**kwargs)  # type: ignore[arg-type]
    key = await storage.blobs.put(raw)
    mid = await storage.mail(account).add_message(account.id, key, parsed)
    return Made(mid, raw, key)


async def deliver(
    storage: SqlStorage,
    account: Account,
    mailbox: str = "INBOX",
    flags: tuple[str, ...] = (),
    internal_date: dt.datetime | None = None,
    **kwargs: object,
) -> int:
    """Stores and appends one message; returns its UID."""
    made = await store_message(storage, account, **kwargs)
    mail = storage.mail(account)
    box = await mail.get_mailbox(account.id, mailbox)
    result = await mail.append(account.id, box.id, made.message_id, flags, internal_date)
    return result.uid


async def staged_rows(storage: SqlStorage, account: Account) -> int:
    """Message rows of ``account`` that no mailbox entry names (what a
    failed ``storage.ingest.ingest_many`` must not leave behind)."""
    from sqlalchemy import exists, func, select

    from storage.sql.schema import mailbox_entries, messages

    async with storage.mail(account).db.read() as conn:
        query = (
            select(func.count())
            .select_from(messages)
            .where(
                messages.c.account_id == account.id,
                ~exists().where(mailbox_entries.c.message_id == messages.c.id),
            )
        )
        return int((await conn.execute(query)).scalar_one())

"""Delivery status notifications (RFC 3464), built and parsed purely.

:func:`build_dsn` makes the multipart/report a bounce or delay warning is:
a human-readable part, a message/delivery-status part (per-message fields,
then one block per recipient) and the original's header as
text/rfc822-headers (defined by RFC 6522, which obsoletes RFC 3462; RFC 3464
section 2).
:func:`parse_dsn` reads one back (ours or anyone's) into frozen values.
No I/O here.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.utils import format_datetime, make_msgid

from delivery.headers import header_block_end

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
# RFC 3464 section 2.3.3: action values.
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block (RFC 3464 section 2.3)."""

    final_recipient: str  # the address, without the "rfc822;" type
    action: str  # failed, delayed, ...
    status: str  # RFC 3463 code, e.g. "5.1.1"
    diagnostic: str | None = None  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_mta: str | None = None
    last_attempt: dt.datetime | None = None
    will_retry_until: dt.datetime | None = None  # delayed only (section 2.3.9)
    # RFC 3464 section 2.3.1: "addr-type;address" from the RCPT's ORCPT (RFC
    # 3461 section 4.2), xtext decoded; None when the client gave none.
    original_recipient: str | None = None

    @property
    def hard(self) -> bool:
        """A permanent failure (5.x.x, RFC 3463 section 3.1)."""
        return self.status.startswith("5")


@dataclass(frozen=True)
class DsnReport:
    reporting_mta: str | None
    arrival_date: str | None
    recipients: tuple[RecipientStatus, ...]
    original_message_id: str | None  # from the returned header, if any
    envelope_id: str | None = None  # Original-Envelope-Id (RFC 3464 section 2.2.1)


def _fold_value(value: str) -> str:
    # Keep report fields on one line; strip anything that would break them.
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def _xtext_safe(address: str) -> str:
    return _fold_value(address)


def original_header(original: bytes) -> bytes:
    """The header block of ``original`` (up to, not including, the blank line)."""
    end = header_block_end(original)
    head = original[:end]
    if head.endswith(b"\r\n\r\n"):
        head = head[:-2]
    elif not head.endswith(b"\r\n"):
        head += b"\r\n"
    return head


def _subject_of(original: bytes) -> str | None:
    parsed = email.message_from_bytes(original_header(original) + b"\r\n")
    subject = parsed.get("Subject")
    return str(subject) if subject else None


def build_dsn(
    *,
    reporting_mta: str,
    to: str,
    original: bytes,
    arrival: dt.datetime,
    recipients: Sequence[RecipientStatus],
    now: dt.datetime | None = None,
    envelope_id: str | None = None,
    full: bool = False,
) -> bytes:
    """The complete RFC 5322 bounce (or delay warning if every recipient is
    ``delayed``, success report if every one is ``delivered`` or
    ``relayed``) for ``to``, the original's envelope sender. From is the
    MAILER-DAEMON of ``reporting_mta``; Auto-Submitted keeps auto-responders
    quiet (RFC 3834 section 5). ``envelope_id``: the decoded ENVID, as
    Original-Envelope-Id (RFC 3464 section 2.2.1). ``full`` (RET=FULL on a
    failure, RFC 3461 section 4.3): the whole original as message/rfc822
    instead of its header as text/rfc822-headers (RFC 6522 section 3)."""
    now = now or dt.datetime.now(dt.UTC)
    delayed = all(r.action == DELAYED for r in recipients)
    success = all(r.action in (DELIVERED, RELAYED) for r in recipients)
    boundary = f"=_shardmail_{secrets.token_hex(12)}"
    if success:
        subject = "Successful Mail Delivery Report"
    elif delayed:
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Undelivered Mail Returned to Sender"
    original_subject = _subject_of(original)
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
    ]
    if success:
        lines += [
            "Your message was delivered to the recipients below, or handed on",
            "to a mail system that does not report delivery.",
        ]
    elif delayed:
        lines += [
            "Your message could not be delivered yet to the recipients below.",
            "It is still in the queue and delivery will be retried; you do not",
            "need to send it again.",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients.",
        ]
    if original_subject:
        lines += ["", f"Subject: {_fold_value(original_subject)}"]
    lines.append("")
    for r in recipients:
        lines.append(f"<{r.final_recipient}>: {r.diagnostic or r.status}")
    human = "\r\n".join(lines) + "\r\n"

    # RFC 3464 section 2.2: per-message fields.
    status_blocks = [
        (f"Original-Envelope-Id: {_fold_value(envelope_id)}\r\n" if envelope_id else "")
        + f"Reporting-MTA: dns; {reporting_mta}\r\n"
        f"Arrival-Date: {format_datetime(arrival.astimezone(dt.UTC))}\r\n"
    ]
    for r in recipients:
        block = (
            # RFC 3464 section 2.3 (its ABNF): before Final-Recipient.
            (
                f"Original-Recipient: {_fold_value(r.original_recipient)}\r\n"
                if r.original_recipient
                else ""
            )
            + f"Final-Recipient: rfc822; {_xtext_safe(r.final_recipient)}\r\n"
            f"Action: {r.action}\r\n"
            f"Status: {r.status}\r\n"
        )
        if r.remote_mta:
            block += f"Remote-MTA: dns; {_fold_value(r.remote_mta)}\r\n"
        if r.diagnostic:
            block += f"Diagnostic-Code: smtp; {_fold_value(r.diagnostic)}\r\n"
        if r.last_attempt:
            block += f"Last-Attempt-Date: {format_datetime(r.last_attempt.astimezone(dt.UTC))}\r\n"
        if r.will_retry_until:
            until = format_datetime(r.will_retry_until.astimezone(dt.UTC))
            block += f"Will-Retry-Until: {until}\r\n"
        status_blocks.append(block)
    delivery_status = "\r\n".join(status_blocks)

    message_id = make_msgid(domain=reporting_mta)
    header = (
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {format_datetime(now.astimezone(dt.UTC))}\r\n"
        f"Message-ID: {message_id}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n'
    )
    body = (
        "This is a MIME-encapsulated message.\r\n\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        f"{human}\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        f"{delivery_status}\r\n"
        f"--{boundary}\r\n"
    ).encode()
    if full:
        returned = (
            b"Content-Description: Undelivered Message\r\n"
            b"Content-Type: message/rfc822\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + original
        )
        if not returned.endswith(b"\r\n"):
            returned += b"\r\n"
    else:
        label = "Message Headers" if success or delayed else "Undelivered Message Headers"
        returned = (
            f"Content-Description: {label}\r\n"
            "Content-Type: text/rfc822-headers\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode() + original_header(original)
    return header.encode() + b"\r\n" + body + returned + f"\r\n--{boundary}--\r\n".encode()


def _field(block: Message, name: str) -> str | None:
    value = block.get(name)
    return _fold_value(str(value)) if value is not None else None


def _typed(value: str | None) -> str | None:
    """``rfc822; a@b`` -> ``a@b`` (RFC 3464 section 2.1.2 address-type)."""
    if value is None:
        return None
    _type, sep, rest = value.partition(";")
    return rest.strip() if sep else value.strip()


def parse_dsn(raw: bytes) -> DsnReport | None:
    """The report of an RFC 3464 DSN, or None if ``raw`` is not one (no
    message/delivery-status part). Malformed blocks are skipped."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:
        return None
    status_part: Message | None = None
    headers_part: Message | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status" and status_part is None:
            status_part = part
        elif ctype in ("text/rfc822-headers", "message/rfc822") and headers_part is None:
            headers_part = part
    if status_part is None:
        return None
    payload = status_part.get_payload()
    blocks: list[Message]
    if isinstance(payload, list):
        blocks = [b for b in payload if isinstance(b, Message)]
    else:  # some parsers leave it as text: split on blank lines
        text = str(payload).replace("\r\n", "\n")
        blocks = [email.message_from_string(chunk) for chunk in re.split(r"\n\s*\n", text) if chunk]
    if not blocks:
        return None
    first = blocks[0]
    recipients: list[RecipientStatus] = []
    for block in blocks[1:] if len(blocks) > 1 else blocks:
        final = _typed(_field(block, "Final-Recipient") or _field(block, "Original-Recipient"))
        action = (_field(block, "Action") or "").lower()
        status = (_field(block, "Status") or "").split(" ")[0]
        if not final or action not in ACTIONS or not _STATUS.match(status):
            continue
        recipients.append(
            RecipientStatus(
                final_recipient=final,
                action=action,
                status=status,
                diagnostic=_typed(_field(block, "Diagnostic-Code")),
                remote_mta=_typed(_field(block, "Remote-MTA")),
                original_recipient=_field(block, "Original-Recipient"),
            )
        )
    original_id = None
    if headers_part is not None:
        inner = headers_part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            original_id = inner[0].get("Message-ID")
        else:
            text = inner if isinstance(inner, str) else ""
            original_id = email.message_from_string(text).get("Message-ID")
    return DsnReport(
        reporting_mta=_typed(_field(first, "Reporting-MTA")),
        arrival_date=_field(first, "Arrival-Date"),
        recipients=tuple(recipients),
        original_message_id=str(original_id).strip() if original_id else None,
        envelope_id=_field(first, "Original-Envelope-Id"),
    )

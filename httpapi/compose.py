"""Building an outgoing RFC 5322 message from an API send request.

Contract: :func:`parse_json_draft` / :func:`parse_multipart_draft` validate
client input into a :class:`Draft` (raising :class:`ApiError` 400/413 with
a precise code), and :func:`build_message` serialises it with the stdlib
``email`` package: From is the sender's account address, Date and
Message-ID are set here (RFC 5322 section 3.6.1 and 3.6.4), and Bcc
recipients go only to the envelope, never into the stored header (RFC 5322
section 3.6.3 allows either; leaking them in the Sent copy and to the To
recipients would be worse). Lines end in CRLF as SMTP requires.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.policy
import email.utils
import mimetypes
import re
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from httpapi.errors import ApiError, bad_request

MAX_RECIPIENTS = 100  # RFC 5321 section 4.5.3.1.8: at least 100 must be accepted
MAX_SUBJECT = 998  # RFC 5322 section 2.1.1 line limit
MAX_ATTACHMENTS = 100
# A practical addr-spec check: local@domain, no spaces or angle brackets.
_ADDR = re.compile(r"^[^\s@<>()\[\],;:\"\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_CONTENT_TYPE = re.compile(r"^[a-zA-Z0-9!#$&^_.+-]+/[a-zA-Z0-9!#$&^_.+-]+$")


@dataclass(frozen=True)
class Upload:
    filename: str
    content_type: str
    data: bytes


@dataclass
class Draft:
    to: list[tuple[str, str]] = field(default_factory=list)  # (display name, address)
    cc: list[tuple[str, str]] = field(default_factory=list)
    bcc: list[tuple[str, str]] = field(default_factory=list)
    subject: str = ""
    text: str | None = None
    html: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    attachments: list[Upload] = field(default_factory=list)

    def recipients(self) -> list[str]:
        """Envelope recipients: To, Cc and Bcc, each address once."""
        seen: dict[str, str] = {}
        for _, addr in [*self.to, *self.cc, *self.bcc]:
            seen.setdefault(addr.lower(), addr)
        return list(seen.values())

    def payload_size(self) -> int:
        return (
            len((self.text or "").encode())
            + len((self.html or "").encode())
            + sum(len(a.data) for a in self.attachments)
        )


def _no_newlines(value: str, name: str) -> str:
    # Header injection: a CR or LF would start a new header field.
    if "\r" in value or "\n" in value or "\0" in value:
        raise bad_request(f"{name} must not contain line breaks", "invalid_field")
    return value


def parse_addresses(value: Any, name: str) -> list[tuple[str, str]]:
    """A list of strings or one comma-separated string of RFC 5322 addresses."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise bad_request(f"{name} must be a string or a list of strings", "invalid_field")
    out: list[tuple[str, str]] = []
    for item in items:
        _no_newlines(item, name)
        parsed = [(d, a) for d, a in email.utils.getaddresses([item]) if d or a]
        if item.strip() and not parsed:
            raise bad_request(f"{name}: {item!r} is not an email address", "invalid_address")
        for display, addr in parsed:
            if not _ADDR.match(addr) or len(addr) > 254:  # RFC 5321 section 4.5.3.1.3
                raise bad_request(f"{name}: {addr or item!r} is not an email address",
                                  "invalid_address")
            out.append((display, addr))
    return out


def _text_field(body: dict[str, Any], name: str, limit: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string", "invalid_field")
    if limit is not None and len(value) > limit:
        raise bad_request(f"{name} longer than {limit} characters", "invalid_field")
    return value


def _content_type(value: str | None, filename: str) -> str:
    if value and _CONTENT_TYPE.match(value.split(";")[0].strip()):
        return value.split(";")[0].strip().lower()
    guessed, _ = mimetypes.guess_type(filename)
    return guessed or "application/octet-stream"


def _filename(value: Any, index: int) -> str:
    if not isinstance(value, str) or not value.strip():
        return f"attachment-{index + 1}"
    # A path from the client's disk is not ours to keep.
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    return _no_newlines(name, "attachment filename")[:255] or f"attachment-{index + 1}"


def finish_draft(draft: Draft, max_size: int) -> Draft:
    """Checks shared by both request formats."""
    if not draft.recipients():
        raise bad_request("at least one recipient (to, cc or bcc) is required", "no_recipients")
    if len(draft.recipients()) > MAX_RECIPIENTS:
        raise bad_request(f"at most {MAX_RECIPIENTS} recipients", "too_many_recipients")
    if draft.text is None and draft.html is None and not draft.attachments:
        draft.text = ""
    if len(draft.attachments) > MAX_ATTACHMENTS:
        raise bad_request(f"at most {MAX_ATTACHMENTS} attachments", "too_many_attachments")
    if draft.payload_size() > max_size:
        raise ApiError(413, "message_too_large", f"message larger than {max_size} octets")
    return draft


def parse_json_draft(body: Any, max_size: int) -> Draft:
    """``{"to", "cc", "bcc", "subject", "text", "html", "in_reply_to",
    "references", "attachments": [{"filename", "content_type", "content"
    (base64)}]}``."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    unknown = set(body) - {
        "to", "cc", "bcc", "subject", "text", "html", "in_reply_to", "references", "attachments",
    }
    if unknown:
        raise bad_request(f"unknown field {sorted(unknown)[0]!r}", "unknown_field")
    draft = Draft(
        to=parse_addresses(body.get("to"), "to"),
        cc=parse_addresses(body.get("cc"), "cc"),
        bcc=parse_addresses(body.get("bcc"), "bcc"),
        subject=_no_newlines(_text_field(body, "subject", MAX_SUBJECT) or "", "subject"),
        text=_text_field(body, "text"),
        html=_text_field(body, "html"),
        in_reply_to=_text_field(body, "in_reply_to", 998),
    )
    if draft.in_reply_to is not None:
        _no_newlines(draft.in_reply_to, "in_reply_to")
    refs = body.get("references")
    refs = [] if refs is None else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise bad_request("references must be a list of strings", "invalid_field")
    draft.references = [_no_newlines(r, "references") for r in refs]
    attachments = body.get("attachments")
    attachments = [] if attachments is None else attachments
    if not isinstance(attachments, list):
        raise bad_request("attachments must be a list", "invalid_field")
    for index, item in enumerate(attachments):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise bad_request(f"attachments[{index}] needs base64 'content'", "invalid_attachment")
        try:
            data = base64.b64decode(item["content"], validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"attachments[{index}].content is not base64",
                              "invalid_attachment") from None
        name = _filename(item.get("filename"), index)
        ctype = item.get("content_type")
        draft.attachments.append(
            Upload(name, _content_type(ctype if isinstance(ctype, str) else None, name), data)
        )
    return finish_draft(draft, max_size)


def _thread_headers(msg: EmailMessage, draft: Draft) -> None:
    # RFC 5322 section 3.6.4: replies carry In-Reply-To and References.
    if draft.in_reply_to:
        msg["In-Reply-To"] = draft.in_reply_to
        refs = [*draft.references]
        if draft.in_reply_to not in refs:
            refs.append(draft.in_reply_to)
        msg["References"] = " ".join(refs)
    elif draft.references:
        msg["References"] = " ".join(draft.references)


def _address(display: str, addr: str) -> Address:
    local, _, domain = addr.rpartition("@")
    return Address(display_name=display, username=local, domain=domain)


def build_message(
    draft: Draft, sender: str, hostname: str, now: dt.datetime | None = None
) -> tuple[bytes, str]:
    """The RFC 5322 bytes (CRLF line ends) and the Message-ID. CPU-bound for
    big attachments: run through ``asyncio.to_thread``."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = _address("", sender)
    if draft.to:
        msg["To"] = [_address(n, a) for n, a in draft.to]
    if draft.cc:
        msg["Cc"] = [_address(n, a) for n, a in draft.cc]
    if not draft.to and not draft.cc:
        # RFC 5322 section 3.6.3: Bcc-only mail gets an empty group in To.
        msg["To"] = "undisclosed-recipients:;"
    msg["Subject"] = draft.subject
    msg["Date"] = email.utils.format_datetime(now or dt.datetime.now(dt.UTC))
    domain = sender.rpartition("@")[2] or hostname
    message_id = email.utils.make_msgid(domain=domain)
    msg["Message-ID"] = message_id
    _thread_headers(msg, draft)
    msg["MIME-Version"] = "1.0"
    if draft.text is not None:
        msg.set_content(draft.text, cte=_text_cte(draft.text))
        if draft.html is not None:
            msg.add_alternative(draft.html, subtype="html", cte=_text_cte(draft.html))
    elif draft.html is not None:
        msg.set_content(draft.html, subtype="html", cte=_text_cte(draft.html))
    for upload in draft.attachments:
        maintype, _, subtype = upload.content_type.partition("/")
        msg.add_attachment(
            upload.data, maintype=maintype, subtype=subtype, filename=upload.filename
        )
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # RFC 2045 section 4: top level only
    return msg.as_bytes(policy=email.policy.SMTP), message_id


def _text_cte(text: str) -> str:
    # RFC 5322 section 2.1.1: lines over 998 octets need an encoding.
    long_lines = any(len(line.encode()) > 900 for line in text.splitlines())
    if not long_lines and text.isascii():
        return "7bit"
    return "quoted-printable"

"""JSON form of :class:`storage.model.ParsedMessage` as stored in ``messages.parsed``.

``storage.mime`` owns the canonical codec (``parsed_to_json`` /
``parsed_from_json``); this module uses it when present and otherwise a
small private codec of the same dataclasses, so the store works on its own.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from storage.model import Address, BodyPart, Envelope, ParsedMessage


def parsed_to_json(parsed: ParsedMessage) -> str:
    """Serialises ``parsed`` for the ``messages.parsed`` column."""
    mime = _mime()
    if mime is not None:
        return mime.parsed_to_json(parsed)
    return json.dumps(_parsed_dict(parsed), separators=(",", ":"))


def parsed_from_json(data: str) -> ParsedMessage:
    """The inverse of :func:`parsed_to_json`."""
    mime = _mime()
    if mime is not None:
        return mime.parsed_from_json(data)
    return _parsed_from_dict(json.loads(data))


_MIME: Any = False  # False: not looked up yet; None: absent


def _mime() -> Any:
    global _MIME
    if _MIME is False:
        try:
            from storage import mime  # another helper's module; optional here

            _MIME = (
                mime
                if hasattr(mime, "parsed_to_json") and hasattr(mime, "parsed_from_json")
                else None
            )
        except ImportError:
            _MIME = None
    return _MIME


# --- the private codec ----------------------------------------------------------


def _addr(a: Address) -> list[str | None]:
    return [a.name, a.adl, a.mailbox, a.host]


def _env(e: Envelope) -> dict[str, Any]:
    return {
        "date": e.date,
        "subject": e.subject,
        "from": [_addr(a) for a in e.from_],
        "sender": [_addr(a) for a in e.sender],
        "reply_to": [_addr(a) for a in e.reply_to],
        "to": [_addr(a) for a in e.to],
        "cc": [_addr(a) for a in e.cc],
        "bcc": [_addr(a) for a in e.bcc],
        "in_reply_to": e.in_reply_to,
        "message_id": e.message_id,
    }


def _part(p: BodyPart) -> dict[str, Any]:
    return {
        "type": p.type,
        "subtype": p.subtype,
        "params": [list(kv) for kv in p.params],
        "id": p.id,
        "description": p.description,
        "encoding": p.encoding,
        "size": p.size,
        "lines": p.lines,
        "md5": p.md5,
        "disposition": None
        if p.disposition is None
        else [p.disposition[0], [list(kv) for kv in p.disposition[1]]],
        "language": None if p.language is None else list(p.language),
        "location": p.location,
        "header_start": p.header_start,
        "body_start": p.body_start,
        "end": p.end,
        "children": [_part(c) for c in p.children],
        "message_envelope": None if p.message_envelope is None else _env(p.message_envelope),
        "message_body": None if p.message_body is None else _part(p.message_body),
    }


def _parsed_dict(m: ParsedMessage) -> dict[str, Any]:
    return {
        "size": m.size,
        "envelope": _env(m.envelope),
        "body": _part(m.body),
        "subject": m.subject,
        "from_text": m.from_text,
        "to_text": m.to_text,
        "cc_text": m.cc_text,
        "message_id": m.message_id,
        "in_reply_to": m.in_reply_to,
        "references": list(m.references),
        "sent_date": None if m.sent_date is None else m.sent_date.isoformat(),
        "body_text": m.body_text,
        "preview": m.preview,
        "has_attachments": m.has_attachments,
    }


def _addr_from(v: list[str | None]) -> Address:
    return Address(v[0], v[1], v[2], v[3])


def _env_from(d: dict[str, Any]) -> Envelope:
    return Envelope(
        date=d["date"],
        subject=d["subject"],
        from_=tuple(_addr_from(a) for a in d["from"]),
        sender=tuple(_addr_from(a) for a in d["sender"]),
        reply_to=tuple(_addr_from(a) for a in d["reply_to"]),
        to=tuple(_addr_from(a) for a in d["to"]),
        cc=tuple(_addr_from(a) for a in d["cc"]),
        bcc=tuple(_addr_from(a) for a in d["bcc"]),
        in_reply_to=d["in_reply_to"],
        message_id=d["message_id"],
    )


def _pairs(v: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((k, val) for k, val in v)


def _part_from(d: dict[str, Any]) -> BodyPart:
    disp = d["disposition"]
    return BodyPart(
        type=d["type"],
        subtype=d["subtype"],
        params=_pairs(d["params"]),
        id=d["id"],
        description=d["description"],
        encoding=d["encoding"],
        size=d["size"],
        lines=d["lines"],
        md5=d["md5"],
        disposition=None if disp is None else (disp[0], _pairs(disp[1])),
        language=None if d["language"] is None else tuple(d["language"]),
        location=d["location"],
        header_start=d["header_start"],
        body_start=d["body_start"],
        end=d["end"],
        children=tuple(_part_from(c) for c in d["children"]),
        message_envelope=None
        if d["message_envelope"] is None
        else _env_from(d["message_envelope"]),
        message_body=None if d["message_body"] is None else _part_from(d["message_body"]),
    )


def _parsed_from_dict(d: dict[str, Any]) -> ParsedMessage:
    return ParsedMessage(
        size=d["size"],
        envelope=_env_from(d["envelope"]),
        body=_part_from(d["body"]),
        subject=d["subject"],
        from_text=d["from_text"],
        to_text=d["to_text"],
        cc_text=d["cc_text"],
        message_id=d["message_id"],
        in_reply_to=d["in_reply_to"],
        references=tuple(d["references"]),
        sent_date=None if d["sent_date"] is None else dt.datetime.fromisoformat(d["sent_date"]),
        body_text=d["body_text"],
        preview=d["preview"],
        has_attachments=d["has_attachments"],
    )

"""Building the outgoing RFC 5322 message from a send request."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest

from httpapi.compose import build_message, parse_json_draft
from httpapi.errors import ApiError


def test_build_message_headers_body_and_no_bcc() -> None:
    draft = parse_json_draft({
        "to": ["Bob Example <bob@example.test>", "carol@example.test"],
        "cc": "dave@example.test", "bcc": ["eve@example.test"],
        "subject": "Grüße", "text": "Hallo\n", "html": "<p>Hallo</p>",
        "in_reply_to": "<parent@example.test>",
        "attachments": [{"filename": "C:\\Users\\me\\notes.txt",
                         "content": base64.b64encode(b"notes").decode()}],
    }, max_size=10_000)
    assert draft.recipients() == ["bob@example.test", "carol@example.test",
                                  "dave@example.test", "eve@example.test"]
    raw, message_id = build_message(draft, "alice@example.test", "mail.test")
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] == "alice@example.test"
    assert msg["To"] == "Bob Example <bob@example.test>, carol@example.test"
    assert msg["Cc"] == "dave@example.test" and msg["Bcc"] is None
    assert msg["Subject"] == "Grüße" and msg["Message-ID"] == message_id
    assert msg["In-Reply-To"] == "<parent@example.test>"
    assert msg["References"] == "<parent@example.test>"
    assert msg["Date"] is not None
    assert msg.get_body(("plain",)).get_content().splitlines() == ["Hallo"]
    assert msg.get_body(("html",)).get_content().strip() == "<p>Hallo</p>"
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "notes.txt" and att.get_content() == "notes"
    assert raw.count(b"MIME-Version") == 1


def test_bcc_only_mail_gets_undisclosed_recipients() -> None:
    draft = parse_json_draft({"bcc": "eve@example.test", "text": "x"}, 10_000)
    raw, _ = build_message(draft, "alice@example.test", "mail.test")
    assert b"To: undisclosed-recipients:;" in raw and b"eve@" not in raw


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], "invalid_request"),
        ({"to": 5}, "invalid_field"),
        ({"to": "a@b.test", "subject": 5}, "invalid_field"),
        ({"to": "a@b.test\r\nX: y"}, "invalid_field"),
        ({"to": "<>"}, "invalid_address"),
        ({"to": "a@b.test", "references": "x"}, "invalid_field"),
        ({"to": "a@b.test", "attachments": {}}, "invalid_field"),
    ],
)
def test_invalid_drafts(body: object, code: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_json_draft(body, 10_000)
    assert info.value.status == 400
    assert info.value.code == code


def test_many_distinct_recipients_are_refused() -> None:
    with pytest.raises(ApiError) as info:
        parse_json_draft({"to": [f"u{i}@b.test" for i in range(101)]}, 10_000)
    assert info.value.code == "too_many_recipients"


def test_size_limit_is_413() -> None:
    with pytest.raises(ApiError) as info:
        parse_json_draft({"to": "a@b.test", "text": "x" * 101}, 100)
    assert (info.value.status, info.value.code) == (413, "message_too_large")

"""RFC 3464 DSNs: what we build parses back, and foreign DSNs parse too."""

from __future__ import annotations

import datetime as dt
import email
import email.policy

from mtad.outbound.dsn import RecipientStatus, build_dsn, original_header, parse_dsn

ORIGINAL = (
    b"From: alice@example.net\r\nTo: x@remote.test\r\nSubject: Report\r\n"
    b"Message-ID: <orig-1@example.net>\r\n\r\nBody text that must not be returned.\r\n"
)
ARRIVAL = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_bounce_structure() -> None:
    raw = build_dsn(
        reporting_mta="mail.test",
        to="alice@example.net",
        original=ORIGINAL,
        arrival=ARRIVAL,
        recipients=[
            RecipientStatus(
                "x@remote.test", "failed", "5.1.1", "550 5.1.1 no such user", "mx.remote.test"
            )
        ],
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["To"].addresses[0].addr_spec == "alice@example.net"
    human, status, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "x@remote.test" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.test"
    assert per_message["Arrival-Date"] == "Fri, 02 Jan 2026 03:04:05 +0000"
    assert per_rcpt["Final-Recipient"] == "rfc822; x@remote.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload(decode=True)
    assert b"Message-ID: <orig-1@example.net>" in returned
    assert b"Body text" not in raw  # only the header is returned
    report = parse_dsn(raw)
    assert report is not None
    assert report.reporting_mta == "mail.test"
    assert report.original_message_id == "<orig-1@example.net>"
    [r] = report.recipients
    assert (r.final_recipient, r.action, r.status, r.hard) == (
        "x@remote.test",
        "failed",
        "5.1.1",
        True,
    )
    assert r.diagnostic == "550 5.1.1 no such user"


def test_delay_warning() -> None:
    raw = build_dsn(
        reporting_mta="mail.test",
        to="alice@example.net",
        original=ORIGINAL,
        arrival=ARRIVAL,
        recipients=[
            RecipientStatus(
                "x@remote.test",
                "delayed",
                "4.4.1",
                "451 4.4.1 no answer",
                will_retry_until=ARRIVAL + dt.timedelta(days=5),
            )
        ],
    )
    assert b"Subject: Delayed Mail" in raw
    assert b"Will-Retry-Until: Wed, 07 Jan 2026" in raw
    [r] = parse_dsn(raw).recipients
    assert r.action == "delayed" and not r.hard


POSTFIX_STYLE = b"""From: MAILER-DAEMON@peer.test (Mail Delivery System)\r
To: alice@example.net\r
Subject: Undelivered Mail Returned to Sender\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r
\r
--B1\r
Content-Type: text/plain\r
\r
sorry\r
--B1\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; peer.test\r
X-Postfix-Queue-ID: 4ABC\r
\r
Final-Recipient: rfc822; gone@peer.test\r
Original-Recipient: rfc822;gone@peer.test\r
Action: failed\r
Status: 5.1.1\r
Diagnostic-Code: X-Postfix; unknown user: "gone"\r
\r
Final-Recipient: rfc822; full@peer.test\r
Action: failed\r
Status: 4.2.2\r
\r
Final-Recipient: rfc822; bogus\r
Action: exploded\r
Status: 9.9\r
--B1\r
Content-Type: message/rfc822\r
\r
From: alice@example.net\r
Message-ID: <m2@example.net>\r
\r
hi\r
--B1--\r
"""


def test_parse_foreign_dsn() -> None:
    report = parse_dsn(POSTFIX_STYLE)
    assert report is not None and report.reporting_mta == "peer.test"
    assert [(r.final_recipient, r.status, r.hard) for r in report.recipients] == [
        ("gone@peer.test", "5.1.1", True),
        ("full@peer.test", "4.2.2", False),
    ]
    assert report.original_message_id == "<m2@example.net>"


def test_not_a_dsn() -> None:
    assert parse_dsn(ORIGINAL) is None
    assert parse_dsn(b"\xff\xfe garbage") is None


def test_original_header_stops_at_blank_line() -> None:
    assert original_header(ORIGINAL).endswith(b"<orig-1@example.net>\r\n")

"""RFC 5965 complaint reports arriving on the MX port are delivered like any
mail and, when they are about mail we sent, suppress the complained-about
recipient in the outbound queue at once; reports about other senders, of
other types, and hostile ones change nothing and cost bounded time."""

from __future__ import annotations

import asyncio
import random
import secrets
import smtplib
import time

from tests.protocol.smtp.support import ALICE, mailbox_messages

REPORTER = "fbl@isp.example"


def send(port: int, raw: bytes, sender: str = REPORTER) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.sendmail(sender, [ALICE], raw)


def original(sender: str, rcpt: str, *, dkim_domain: str | None) -> bytes:
    """The complained-about message as the ISP embeds it (RFC 5965 section 2 d)."""
    sig = (
        f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n d={dkim_domain}; s=sel;"
        f" h=from:to:subject; bh=abc=; b=def=\r\n"
        if dkim_domain
        else ""
    )
    body = secrets.token_hex(random.randint(20, 400)).encode()
    return (
        (
            f"{sig}From: Sender <{sender}>\r\nTo: {rcpt}\r\nSubject: offer\r\n"
            f"Message-ID: <{secrets.token_hex(8)}@example.net>\r\n\r\n"
        ).encode()
        + body
        + b"\r\n"
    )


def arf(
    rcpt: str | None,
    embedded: bytes,
    feedback_type: str = "abuse",
    *,
    original_part: str = "message/rfc822",
) -> bytes:
    """An RFC 5965 report (section 2: text part, feedback-report part, original)."""
    boundary = "b" + secrets.token_hex(6)
    fields = f"Feedback-Type: {feedback_type}\r\nUser-Agent: TestFBL/1.0\r\nVersion: 1\r\n"
    if rcpt:
        fields += f"Original-Rcpt-To: {rcpt}\r\n"
    return (
        (
            f"From: {REPORTER}\r\nTo: {ALICE}\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"'
            f"\r\n\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
            f"--{boundary}\r\nContent-Type: message/feedback-report\r\n\r\n{fields}\r\n"
            f"--{boundary}\r\nContent-Type: {original_part}\r\n\r\n"
        ).encode()
        + embedded
        + f"\r\n--{boundary}--\r\n".encode()
    )


def victim() -> str:
    return f"user{secrets.token_hex(4)}@remote.example"


async def test_a_complaint_about_our_signed_mail_suppresses_the_recipient(mta, populated) -> None:
    rcpt = victim()
    raw = arf(rcpt, original(ALICE, rcpt, dkim_domain="example.net"))
    await asyncio.to_thread(send, mta.port("mx"), raw)
    assert len(await mailbox_messages(populated, ALICE)) == 1  # still delivered
    assert await populated.queue.suppressed([rcpt]) == {rcpt}
    [entry] = [s for s in await populated.queue.list_suppressions() if s.address == rcpt]
    assert entry.last_status == "5.7.1" and "abuse" in (entry.last_diagnostic or "")


async def test_the_recipient_is_taken_from_the_original_without_original_rcpt_to(
    mta, populated
) -> None:
    rcpt = victim()
    headers_only = original(ALICE, rcpt, dkim_domain="example.net").split(b"\r\n\r\n")[0]
    raw = arf(None, headers_only + b"\r\n", original_part="text/rfc822-headers")
    await asyncio.to_thread(send, mta.port("mx"), raw)
    assert await populated.queue.suppressed([rcpt]) == {rcpt}


async def test_reports_not_about_our_mail_or_not_complaints_change_nothing(mta, populated) -> None:
    cases = [
        (victim(), "abuse", "spammer@elsewhere.example", "elsewhere.example"),  # not our From
        (victim(), "abuse", ALICE, None),  # ours by From only: unsigned, never queued to it
        (victim(), "abuse", ALICE, "elsewhere.example"),  # signed by someone else
        (victim(), "not-spam", ALICE, "example.net"),  # not a complaint
        (victim(), "auth-failure", ALICE, "example.net"),
    ]
    for rcpt, kind, sender, dkim_domain in cases:
        raw = arf(rcpt, original(sender, rcpt, dkim_domain=dkim_domain), kind)
        await asyncio.to_thread(send, mta.port("mx"), raw)
    assert len(await mailbox_messages(populated, ALICE)) == len(cases)
    assert await populated.queue.suppressed([c[0] for c in cases]) == set()


async def test_hostile_reports_are_parsed_in_bounded_time(mta, populated) -> None:
    rcpt = victim()
    embedded = original(ALICE, rcpt, dkim_domain="example.net")
    many_fields = "".join(f"Original-Rcpt-To: x{i}@\r\n" for i in range(20_000)).encode()
    nested = b"".join(
        b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
        for i in range(15_000)
    )
    hostile = [
        arf(rcpt, embedded).replace(b"Feedback-Type: abuse\r\n", many_fields),  # 600 KB of junk
        arf(rcpt, nested + embedded),  # 15000 levels of nesting, 800 KB, in the original
        arf(rcpt, (b"\xff\xfe" * 38 + b"\r\n") * 8_000),  # binary junk as the original
        arf(rcpt, embedded).replace(b"--b", b"--x"),  # no parts at all
    ]
    for raw in hostile:
        started = time.monotonic()
        await asyncio.to_thread(send, mta.port("mx"), raw)
        assert time.monotonic() - started < 10
    assert len(await mailbox_messages(populated, ALICE)) == len(hostile)
    assert await populated.queue.suppressed([rcpt]) == set()


async def test_an_unsigned_original_counts_when_our_queue_delivered_to_the_recipient(
    mta, populated
) -> None:
    from storage.sql.queue import Outcome

    rcpt, stranger = victim(), victim()
    queue = populated.queue
    qid = await queue.enqueue(ALICE, [rcpt], "0" * 64)
    await queue.lease_due("w", 10, 60)
    await queue.record_attempt(qid, "w", {rcpt: Outcome("delivered", "250 ok")}, None)
    for address in (rcpt, stranger):  # only the first one was ever sent mail by us
        raw = arf(address, original(ALICE, address, dkim_domain=None))
        await asyncio.to_thread(send, mta.port("mx"), raw)
    assert await queue.suppressed([rcpt, stranger]) == {rcpt}
    assert (await queue.get(qid)).recipients[0].feedback == "hard"

"""RFC 3461 DSN parameters on the wire, against a real mtad.

Tables of client lines and expected replies after RFC 3461's own example
(section 9's MAIL/RCPT lines, on our recipients) and its syntax rules
(sections 4.1-4.4), then what the parameters do: the queue keeps them per
recipient, and a local delivery asked for with NOTIFY=SUCCESS sends the
sender a "delivered" report carrying the ENVID and ORCPT.
"""

from __future__ import annotations

import email
import email.policy

import pytest

from mtad.outbound.dsn import parse_dsn
from mtad.service import Service
from storage.sql.queue import DsnEnvelope, DsnRecipient
from tests.protocol.smtp.support import (
    ALICE,
    ALICE_PW,
    BOB,
    REMOTE,
    TEAM,
    SmtpDialogue,
    auth_plain,
    mailbox_messages,
    message,
)
from tests.protocol.smtp.test_smtp_dialogue import run

TABLE = [
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("MAIL FROM:<a@spf-pass.example> RET=HDRS ENVID=QQ314159", "250 2.1.0"),
            (f"RCPT TO:<{ALICE}> NOTIFY=SUCCESS ORCPT=rfc822;{ALICE}", "250 2.1.5"),
            (f"RCPT TO:<{BOB}> NOTIFY=FAILURE ORCPT=rfc822;{BOB}", "250 2.1.5"),
            (f"RCPT TO:<{TEAM}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;{TEAM}", "250 2.1.5"),
            ("RCPT TO:<anyone@catchall.example> NOTIFY=NEVER", "250 2.1.5"),
            (f"RCPT TO:<{ALICE}> notify=delay,failure orcpt=rfc822;x+2By@z", "250 2.1.5"),
        ],
        id="rfc3461-section9-example",
    ),
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("MAIL FROM:<a@spf-pass.example> RET=SOME", "501 5.5.4"),
            ("MAIL FROM:<a@spf-pass.example> RET", "501 5.5.4"),
            ("MAIL FROM:<a@spf-pass.example> ENVID=" + "x" * 101, "501 5.5.4"),
            ("MAIL FROM:<a@spf-pass.example> ENVID=a+zz", "501 5.5.4"),
            ("MAIL FROM:<a@spf-pass.example> ENVID=+0D+0A", "501 5.5.4"),
            ("MAIL FROM:<a@spf-pass.example> RET=FULL RET=HDRS", "501 5.1.7"),  # duplicate
            ("MAIL FROM:<a@spf-pass.example> ENVID=" + "x" * 100 + " RET=FULL", "250 2.1.0"),
        ],
        id="mail-syntax-and-lengths",
    ),
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("MAIL FROM:<a@spf-pass.example>", "250 2.1.0"),
            (f"RCPT TO:<{ALICE}> NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
            (f"RCPT TO:<{ALICE}> NOTIFY=SOMETIMES,DELAY", "501 5.5.4"),
            (f"RCPT TO:<{ALICE}> NOTIFY=", "501 5.1.3"),  # an empty esmtp-value
            (f"RCPT TO:<{ALICE}> ORCPT={ALICE}", "501 5.5.4"),  # no addr-type
            (f"RCPT TO:<{ALICE}> ORCPT=x;" + "a" * 499, "501 5.5.4"),  # 501 characters
            (f"RCPT TO:<{ALICE}> ORCPT=x;" + "a" * 498, "250 2.1.5"),  # 500: the longest
            (f"RCPT TO:<{ALICE}> NOTIFY=NEVER FOO=BAR", "555 5.5.4"),
        ],
        id="rcpt-syntax-and-lengths",
    ),
]


@pytest.mark.parametrize("steps", TABLE)
async def test_dsn_dialogue(mta: Service, steps: list[tuple[str, str]]) -> None:
    await run(mta.port("mx"), steps)


async def test_ehlo_advertises_dsn(mta: Service) -> None:
    [reply] = await run(mta.port("mx"), [("EHLO client.example", "250 ")])
    assert "DSN" in [line[4:] for line in reply.splitlines()]


async def test_helo_takes_no_dsn_parameters(mta: Service) -> None:
    await run(
        mta.port("mx"),
        [
            ("HELO client.example", "250 "),
            ("MAIL FROM:<a@spf-pass.example> RET=HDRS", "501 5.5.4"),
        ],
    )


async def submissions(client_tls_context, port: int, lines: list[str], body: bytes) -> list[str]:
    """As alice on 465: the lines, then DATA with ``body``; every reply."""
    async with await SmtpDialogue.open(port, client_tls_context) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        assert (await client.cmd("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW))).startswith("235")
        replies = [await client.cmd(line) for line in lines]
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(body + b".\r\n")
        replies.append(await client.reply())
    return replies


async def test_queue_keeps_the_parameters_per_recipient(
    mta: Service, populated, client_tls_context
) -> None:
    lines = [
        f"MAIL FROM:<{ALICE}> RET=HDRS ENVID=id+2B1",
        f"RCPT TO:<{REMOTE}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+2By@remote.example",
        "RCPT TO:<other@remote.example> NOTIFY=NEVER",
        "RCPT TO:<third@remote.example>",
    ]
    replies = await submissions(
        client_tls_context, mta.port("submissions"), lines, message(ALICE, REMOTE)
    )
    assert all(r.startswith("250") for r in replies), replies
    [entry] = await populated.queue.list()
    assert entry.dsn == DsnEnvelope("HDRS", "id+2B1")
    assert {r.address: r.dsn for r in entry.recipients} == {
        REMOTE: DsnRecipient("SUCCESS,FAILURE", "rfc822;x+2By@remote.example"),
        "other@remote.example": DsnRecipient("NEVER", None),
        "third@remote.example": DsnRecipient(None, None),
    }


async def test_notify_success_on_local_delivery_reports_delivered(
    mta: Service, populated, client_tls_context
) -> None:
    """RFC 3461 section 5.2.3: BOB asked for SUCCESS and is delivered here:
    ALICE (the sender) gets a "delivered" DSN naming him, with her ENVID and
    ORCPT decoded, and the message's header only; TEAM's copy (NOTIFY=
    FAILURE) and a recipient without NOTIFY get none."""
    lines = [
        f"MAIL FROM:<{ALICE}> RET=FULL ENVID=QQ+2B314159",
        f"RCPT TO:<{BOB}> NOTIFY=SUCCESS ORCPT=rfc822;Bob+2Bx@example.net",
        f"RCPT TO:<{TEAM}> NOTIFY=FAILURE",
    ]
    sent = message(ALICE, BOB, subject="report me", body="secret body text\r\n")
    replies = await submissions(client_tls_context, mta.port("submissions"), lines, sent)
    assert all(r.startswith("250") for r in replies), replies
    inbox = await mailbox_messages(populated, ALICE)
    reports = [m for m in inbox if b"multipart/report" in m]
    [report] = reports  # TEAM also reached alice: that copy is the message itself
    parsed = parse_dsn(report)
    assert parsed is not None and parsed.envelope_id == "QQ+314159"
    [status] = parsed.recipients
    assert (status.final_recipient, status.action, status.status) == (BOB, "delivered", "2.0.0")
    assert status.original_recipient == "rfc822;Bob+x@example.net"
    assert b"Return-Path: <>" in report  # a null reverse-path (RFC 3461 section 6.1)
    assert b"Subject: report me" in report and b"secret body text" not in report
    head = email.message_from_bytes(report, policy=email.policy.default)
    assert head["Subject"] == "Successful Mail Delivery Report"

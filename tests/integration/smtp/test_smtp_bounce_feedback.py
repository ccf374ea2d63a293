"""An RFC 3464 bounce arriving on the MX port (null sender) is delivered to
the sender's INBOX and counted against the failed recipient; repeated hard
bounces suppress the address for the outbound queue."""

from __future__ import annotations

import asyncio
import datetime as dt
import smtplib

from mtad.outbound.dsn import RecipientStatus, build_dsn
from tests.protocol.smtp.support import ALICE, mailbox_messages, message


def send_null_sender(port: int, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("", [ALICE], raw)  # MAIL FROM:<>


def bounce(status: str) -> bytes:
    return build_dsn(
        reporting_mta="mx.remote.example",
        to=ALICE,
        original=message(),
        arrival=dt.datetime.now(dt.UTC),
        recipients=[RecipientStatus("gone@remote.example", "failed", status, f"550 {status} no")],
    )


async def test_incoming_bounces_suppress_a_hard_bouncing_address(mta, populated) -> None:
    for n in range(2):
        await asyncio.to_thread(send_null_sender, mta.port("mx"), bounce("5.1.1"))
        assert len(await mailbox_messages(populated, ALICE)) == n + 1
    assert await populated.queue.suppressed(["gone@remote.example"]) == {"gone@remote.example"}


async def test_a_soft_bounce_does_not_suppress(mta, populated) -> None:
    await asyncio.to_thread(send_null_sender, mta.port("mx"), bounce("4.2.2"))
    assert len(await mailbox_messages(populated, ALICE)) == 1
    assert await populated.queue.suppressed(["gone@remote.example"]) == set()

"""Who an authenticated user may send as, on submission (RFC 6409 section 8.1
lets the MSA enforce it): the envelope sender and every address in the
header From must be the user's own address, an alias that reaches them, or
a plus-address of either (RFC 5233), each part configurable.
"""

from __future__ import annotations

import pytest

from mtad.service import Service
from tests.protocol.smtp.support import (
    ALICE,
    ALICE_PW,
    BOB,
    TEAM,
    SmtpDialogue,
    auth_plain,
    mailbox_messages,
    message,
)


@pytest.fixture
def smtp_overrides(request: pytest.FixtureRequest) -> dict:
    return getattr(request, "param", {})


async def submit(port: int, tls, mail_from: str, header_from: str) -> tuple[str, str | None]:
    """(MAIL reply, end-of-data reply or None) for alice sending to bob."""
    async with await SmtpDialogue.open(port, tls) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        assert (await client.cmd("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW))).startswith("235")
        mail = await client.cmd(f"MAIL FROM:<{mail_from}>")
        if not mail.startswith("250"):
            return mail, None
        assert (await client.cmd(f"RCPT TO:<{BOB}>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(message(sender=header_from, to=BOB) + b".\r\n")
        return mail, await client.reply()


DEFAULTS = [
    (ALICE, ALICE, "250 2.1.0", "250 2.0.0"),
    ("Alice+lists@Example.NET", "Alice <alice+lists@example.net>", "250 2.1.0", "250 2.0.0"),
    (TEAM, TEAM, "250 2.1.0", "250 2.0.0"),  # an alias that reaches alice
    ("team+x@example.net", ALICE, "250 2.1.0", "250 2.0.0"),
    (BOB, ALICE, "553 5.7.1", None),
    ("alice+x@other.example", ALICE, "553 5.7.1", None),
    ("alice@example.net", BOB, "250 2.1.0", "550 5.7.1 From: header"),
    (ALICE, f"{ALICE}, {BOB}", "250 2.1.0", "550 5.7.1 From: header"),
    (ALICE, "Bob <alice@example.net.evil.example>", "250 2.1.0", "550 5.7.1 From: header"),
]


@pytest.mark.parametrize(("mail_from", "header_from", "mail_reply", "data_reply"), DEFAULTS)
async def test_sender_addresses(
    mta: Service, populated, client_tls_context, mail_from: str, header_from: str,
    mail_reply: str, data_reply: str | None,
) -> None:
    mail, data = await submit(mta.port("submissions"), client_tls_context, mail_from, header_from)
    assert mail.startswith(mail_reply), mail
    if data_reply is None:
        assert data is None
    else:
        assert data is not None and data.startswith(data_reply), data
        if data_reply.startswith("550"):
            assert f"not owned by {ALICE}" in data
    delivered = data is not None and data.startswith("250")
    assert len(await mailbox_messages(populated, BOB)) == int(delivered)


@pytest.mark.parametrize(
    ("smtp_overrides", "mail_from", "header_from", "mail_reply", "data_reply"),
    [
        ({"sender_plus_addresses": False}, "alice+x@example.net", ALICE, "553 5.7.1", None),
        ({"sender_plus_addresses": False}, ALICE, "alice+x@example.net", "250", "550 5.7.1"),
        ({"sender_aliases": False}, TEAM, TEAM, "553 5.7.1", None),
        ({"sender_aliases": False}, ALICE, TEAM, "250", "550 5.7.1"),
        ({"header_from_must_match": False}, ALICE, BOB, "250", "250 2.0.0"),
    ],
    indirect=["smtp_overrides"],
)
async def test_sender_policy_settings(
    mta: Service, populated, client_tls_context, smtp_overrides: dict, mail_from: str,
    header_from: str, mail_reply: str, data_reply: str | None,
) -> None:
    mail, data = await submit(mta.port("submissions"), client_tls_context, mail_from, header_from)
    assert mail.startswith(mail_reply), mail
    assert data == data_reply or (data is not None and data.startswith(data_reply)), data

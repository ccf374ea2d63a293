"""postmaster (RFC 5321 section 4.5.1): every SMTP server takes mail for
``postmaster@`` each of its domains and for the bare ``<postmaster>``,
case-insensitively, without any configuration.

Who gets it: an explicit alias (or catch-all) of the domain wins; else the
address in smtp.postmaster; else the first account (oldest) of the primary
domain (the first domain added).
"""

from __future__ import annotations

import pytest

from mtad.service import Service
from tests.protocol.smtp.support import (
    ALICE,
    BOB,
    CATCHALL_DOMAIN,
    SmtpDialogue,
    mailbox_messages,
    message,
)


async def deliver_to(port: int, rcpt: str) -> str:
    async with await SmtpDialogue.open(port) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<someone@spf-pass.example>")
        reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        if reply.startswith("250"):
            await client.cmd("DATA")
            await client.send(message(to=rcpt) + b".\r\n")
            assert (await client.reply()).startswith("250 2.0.0")
    return reply


@pytest.mark.parametrize(
    ("rcpt", "owner"),
    [
        ("postmaster@example.net", ALICE),
        ("PostMaster@Example.NET", ALICE),
        ("postmaster", ALICE),
        ("POSTMASTER", ALICE),
        (f"postmaster@{CATCHALL_DOMAIN}", BOB),  # the domain's catch-all alias wins
    ],
)
async def test_postmaster_without_configuration(
    mta: Service, populated, rcpt: str, owner: str
) -> None:
    assert (await deliver_to(mta.port("mx"), rcpt)).startswith("250 2.1.5")
    assert len(await mailbox_messages(populated, owner)) == 1


async def test_postmaster_not_for_other_domains_or_other_names(mta: Service, populated) -> None:
    assert (await deliver_to(mta.port("mx"), "postmaster@elsewhere.example")).startswith("554")
    assert (await deliver_to(mta.port("mx"), "hostmaster")).startswith("501")


@pytest.fixture
def smtp_overrides(request: pytest.FixtureRequest) -> dict:
    return getattr(request, "param", {})


@pytest.mark.parametrize("smtp_overrides", [{"postmaster": BOB}], indirect=True)
async def test_configured_postmaster(mta: Service, populated, smtp_overrides: dict) -> None:
    for rcpt in ("postmaster@example.net", "postmaster"):
        assert (await deliver_to(mta.port("mx"), rcpt)).startswith("250 2.1.5")
    assert len(await mailbox_messages(populated, BOB)) == 2
    assert await mailbox_messages(populated, ALICE) == []


@pytest.mark.parametrize("smtp_overrides", [{"postmaster": BOB}], indirect=True)
async def test_explicit_alias_wins(mta: Service, populated, smtp_overrides: dict) -> None:
    await populated.directory.add_alias("postmaster@example.net", ALICE)
    assert (await deliver_to(mta.port("mx"), "postmaster@example.net")).startswith("250")
    assert len(await mailbox_messages(populated, ALICE)) == 1
    assert await mailbox_messages(populated, BOB) == []

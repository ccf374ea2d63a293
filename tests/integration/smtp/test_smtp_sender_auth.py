"""SPF, DKIM and DMARC on the MX, with records served by the test's dnsmasq.

The client connects from 127.0.0.1; the zone (tests/protocol/smtp/support.py
``standard_zone``) gives each sender domain the records its name promises.
"""

from __future__ import annotations

import re

import pytest

from mtad.service import Service
from tests.protocol.smtp.support import (
    ALICE,
    DkimKey,
    SmtpDialogue,
    mailbox_messages,
    message,
)


async def send_mx(port: int, mail_from: str, body: bytes, rcpt: str = ALICE) -> str:
    async with await SmtpDialogue.open(port) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        assert (await client.cmd(f"MAIL FROM:<{mail_from}>")).startswith("250")
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(body + b".\r\n")
        return await client.reply()


def auth_results(raw: bytes) -> str:
    """The unfolded Authentication-Results value of the stored message."""
    match = re.search(rb"^Authentication-Results: (.*?)\r\n(?![ \t])", raw, re.S | re.M)
    assert match, raw[:400]
    return re.sub(r"\r\n[ \t]+", " ", match[1].decode())


@pytest.mark.parametrize(
    ("domain", "spf"),
    [
        ("spf-pass.example", "pass"),
        ("spf-fail.example", "fail"),
        ("spf-soft.example", "softfail"),
        ("unlisted.example", "none"),
    ],
)
async def test_spf_results(mta: Service, populated, domain: str, spf: str) -> None:
    sender = f"someone@{domain}"
    reply = await send_mx(mta.port("mx"), sender, message(sender=sender))
    assert reply.startswith("250 2.0.0"), reply
    [raw] = await mailbox_messages(populated, ALICE)
    results = auth_results(raw)
    assert results.startswith("mail.test;")
    assert f"spf={spf} smtp.mailfrom={sender}" in results
    assert "dkim=none" in results
    # Authentication-Results comes first, then our Received, then the message.
    assert raw.index(b"Authentication-Results:") < raw.index(b"Received:")


async def test_dmarc_pass_via_spf(mta: Service, populated) -> None:
    sender = "news@spf-pass.example"
    await send_mx(mta.port("mx"), sender, message(sender=sender))
    [raw] = await mailbox_messages(populated, ALICE)
    assert "dmarc=pass (p=reject dis=none) header.from=spf-pass.example" in auth_results(raw)


async def test_dkim_signed_passes_and_tampered_fails(
    mta: Service, populated, dkim_key: DkimKey
) -> None:
    sender = "someone@dkim.example"
    signed = dkim_key.sign(message(sender=sender, subject="Signed", body="Genuine body.\r\n"))
    reply = await send_mx(mta.port("mx"), sender, signed)
    assert reply.startswith("250 2.0.0"), reply
    tampered = signed.replace(b"Genuine body.", b"Altered body.")
    reply = await send_mx(mta.port("mx"), sender, tampered)
    assert reply.startswith("250 2.0.0"), reply  # p=none: delivered, marked
    good, bad = await mailbox_messages(populated, ALICE)
    good_results, bad_results = auth_results(good), auth_results(bad)
    b_tag = re.search(rb"b=([A-Za-z0-9+/]{8})", signed.split(b"bh=")[1])
    assert b_tag
    assert (
        f"dkim=pass header.d=dkim.example header.s=sel header.b={b_tag[1].decode()}"
        in good_results
    )
    assert "spf=fail" in good_results  # "v=spf1 -all": DKIM alone carries DMARC
    assert "dmarc=pass (p=none dis=none) header.from=dkim.example" in good_results
    assert "dkim=fail header.d=dkim.example header.s=sel" in bad_results
    assert "dmarc=fail (p=none dis=none) header.from=dkim.example" in bad_results


async def test_dmarc_reject_refused(mta: Service, populated) -> None:
    sender = "ceo@reject.example"
    reply = await send_mx(mta.port("mx"), sender, message(sender=sender))
    assert reply.startswith("550 5.7.1"), reply
    assert await mailbox_messages(populated, ALICE) == []


async def test_dmarc_quarantine_goes_to_junk(mta: Service, populated) -> None:
    sender = "promo@quarantine.example"
    reply = await send_mx(mta.port("mx"), sender, message(sender=sender))
    assert reply.startswith("250 2.0.0")
    assert await mailbox_messages(populated, ALICE) == []
    [junk] = await mailbox_messages(populated, ALICE, "Junk")
    assert "dmarc=fail (p=quarantine dis=quarantine)" in auth_results(junk)


async def test_dmarc_reject_disabled_delivers_to_junk(settings, populated, tls_context) -> None:
    from mtad.service import start

    settings.smtp.dmarc_reject = False
    service = await start(settings, populated, tls_context)
    try:
        sender = "ceo@reject.example"
        reply = await send_mx(service.port("mx"), sender, message(sender=sender))
        assert reply.startswith("250 2.0.0")
        [junk] = await mailbox_messages(populated, ALICE, "Junk")
        assert "dmarc=fail (p=reject dis=reject)" in auth_results(junk)
    finally:
        await service.close()


async def test_forged_authentication_results_removed(mta: Service, populated) -> None:
    """RFC 8601 section 5: a sender's A-R field claiming our authserv-id goes."""
    sender = "someone@spf-fail.example"
    forged = (
        b"Authentication-Results: mail.test; spf=pass smtp.mailfrom=x@spf-fail.example\r\n"
        b"Authentication-Results: other.example; spf=pass\r\n" + message(sender=sender)
    )
    await send_mx(mta.port("mx"), sender, forged)
    [raw] = await mailbox_messages(populated, ALICE)
    assert raw.count(b"Authentication-Results: mail.test;") == 1
    assert b"Authentication-Results: other.example; spf=pass" in raw
    assert "spf=fail" in auth_results(raw)


async def test_null_sender_checks_helo(mta: Service, populated) -> None:
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO spf-pass.example")
        assert (await client.cmd("MAIL FROM:<>")).startswith("250")
        await client.cmd(f"RCPT TO:<{ALICE}>")
        await client.cmd("DATA")
        await client.send(message(sender="mailer-daemon@spf-pass.example") + b".\r\n")
        assert (await client.reply()).startswith("250")
    [raw] = await mailbox_messages(populated, ALICE)
    assert raw.startswith(b"Return-Path: <>\r\n")
    assert "spf=pass smtp.helo=spf-pass.example" in auth_results(raw)


@pytest.mark.parametrize("switch", ["dmarc", "spf_and_dkim"])
async def test_dmarc_skipped_when_off_or_without_spf_and_dkim(
    settings, populated, tls_context, switch: str
) -> None:
    """A p=reject domain is not refused when DMARC is switched off, nor when
    neither SPF nor DKIM ran (DMARC could then only fail)."""
    from mtad.service import start

    if switch == "dmarc":
        settings.smtp.dmarc = False
    else:
        settings.smtp.spf = False
        settings.smtp.dkim_verify = False
    service = await start(settings, populated, tls_context)
    try:
        sender = "ceo@reject.example"
        reply = await send_mx(service.port("mx"), sender, message(sender=sender))
        assert reply.startswith("250 2.0.0"), reply
        [raw] = await mailbox_messages(populated, ALICE)
        assert "dmarc=" not in auth_results(raw)
    finally:
        await service.close()

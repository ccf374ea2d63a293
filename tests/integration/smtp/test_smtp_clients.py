"""Real SMTP clients against a running mtad: smtplib, aiosmtplib and swaks.

Blocking clients (smtplib, the swaks process) run off the event loop that
serves mtad.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from mtad.service import Service
from tests.protocol.smtp.support import (
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    REMOTE,
    mailbox_entries,
    mailbox_messages,
    message,
)

SWAKS = "/usr/bin/swaks"


async def swaks(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        SWAKS,
        "--server",
        "127.0.0.1",
        "--helo",
        "client.example",
        "--timeout",
        "10",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode("utf-8", "replace")


# -- smtplib --------------------------------------------------------------


def _smtplib_submission(port: int, context: ssl.SSLContext, msg: EmailMessage) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        smtp.starttls(context=context)
        smtp.ehlo()
        assert smtp.has_extn("auth")
        smtp.login(ALICE, ALICE_PW)
        return smtp.send_message(msg)


async def test_smtplib_starttls_submission(mta: Service, client_tls_context, populated) -> None:
    msg = EmailMessage()
    msg["From"] = ALICE
    msg["To"] = f"{BOB}, {REMOTE}"
    msg["Subject"] = "smtplib"
    msg.set_content("Sent with smtplib.\n")
    refused = await asyncio.to_thread(
        _smtplib_submission, mta.port("submission"), client_tls_context, msg
    )
    assert refused == {}
    [inbox] = await mailbox_messages(populated, BOB)
    assert b"Subject: smtplib" in inbox and b"with ESMTPSA" in inbox
    # The client files its own Sent copy (smtp.save_sent_copy is off).
    assert await mailbox_entries(populated, ALICE, "Sent") == []
    [queued] = await populated.queue.list()
    assert [r.address for r in queued.recipients] == [REMOTE]


def _smtplib_auth_before_tls(port: int) -> smtplib.SMTPResponseException:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo()
        try:
            smtp.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUubmV0AGFsaWNlLXNlY3JldA==")
        except smtplib.SMTPResponseException as exc:  # pragma: no cover - docmd returns
            return exc
        code, text = smtp.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUubmV0AGFsaWNlLXNlY3JldA==")
        return smtplib.SMTPResponseException(code, text)


async def test_smtplib_auth_before_tls_refused(mta: Service) -> None:
    exc = await asyncio.to_thread(_smtplib_auth_before_tls, mta.port("submission"))
    assert exc.smtp_code == 538
    assert exc.smtp_error.startswith(b"5.7.11")


def _smtplib_mx(port: int, sender: str, rcpts: list[str], body: bytes, **kw) -> dict:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as smtp:
        return smtp.sendmail(sender, rcpts, body, **kw)


async def test_smtplib_unknown_user_and_relay(mta: Service, populated) -> None:
    refused = await asyncio.to_thread(
        _smtplib_mx,
        mta.port("mx"),
        "someone@spf-pass.example",
        [ALICE, "ghost@example.net", "victim@elsewhere.example"],
        message(),
    )
    assert refused["ghost@example.net"][0] == 550
    assert refused["ghost@example.net"][1].startswith(b"5.1.1")
    assert refused["victim@elsewhere.example"][0] == 554
    assert refused["victim@elsewhere.example"][1].startswith(b"5.7.1")
    assert len(await mailbox_messages(populated, ALICE)) == 1
    assert await populated.queue.list() == []  # never relays for outsiders


async def test_smtplib_only_outsiders_refused(mta: Service) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        await asyncio.to_thread(
            _smtplib_mx, mta.port("mx"), "a@spf-pass.example", ["x@gmail.example"], message()
        )
    assert info.value.recipients["x@gmail.example"][0] == 554


async def test_smtplib_smtputf8(mta: Service, populated) -> None:
    await populated.directory.add_alias("jos\u00e9@example.net", ALICE)
    body = "From: j\u00fcrgen@spf-pass.example\r\nSubject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    refused = await asyncio.to_thread(
        _smtplib_mx,
        mta.port("mx"),
        "j\u00fcrgen@spf-pass.example",
        ["jos\u00e9@example.net"],
        body,
        mail_options=["SMTPUTF8", "BODY=8BITMIME"],
    )
    assert refused == {}
    [raw] = await mailbox_messages(populated, ALICE)
    assert raw.startswith("Return-Path: <j\u00fcrgen@spf-pass.example>".encode())
    assert b"with UTF8SMTP" in raw
    assert raw.endswith(body)


# -- aiosmtplib -------------------------------------------------------------


async def test_aiosmtplib_implicit_tls(mta: Service, client_tls_context, populated) -> None:
    msg = EmailMessage()
    msg["From"] = BOB
    msg["To"] = ALICE
    msg["Subject"] = "aiosmtplib"
    msg.set_content("x" * 5000)
    errors, reply = await aiosmtplib.send(
        msg,
        hostname="127.0.0.1",
        port=mta.port("submissions"),
        use_tls=True,
        tls_context=client_tls_context,
        username=BOB,
        password=BOB_PW,
    )
    assert errors == {} and reply.startswith("2.0.0")
    [inbox] = await mailbox_messages(populated, ALICE)
    assert b"Subject: aiosmtplib" in inbox


async def test_aiosmtplib_sender_mismatch(mta: Service, client_tls_context) -> None:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=mta.port("submission"), tls_context=client_tls_context,
        start_tls=True,
    )
    await client.connect()
    await client.login(BOB, BOB_PW)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await client.sendmail(ALICE, [BOB], message(sender=ALICE, to=BOB))
    assert info.value.code == 553 and info.value.message.startswith("5.7.1")
    await client.quit()


async def test_aiosmtplib_pipelined_8bit(mta: Service, populated) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=mta.port("mx"), start_tls=False)
    await client.connect()
    await client.ehlo()
    assert client.supports_extension("pipelining") and client.supports_extension("8bitmime")
    body = "Subject: 8bit\r\n\r\nGr\u00fc\u00dfe\r\n".encode()
    errors, _ = await client.sendmail("a@spf-pass.example", [ALICE, BOB], body)
    assert errors == {}
    await client.quit()
    assert (await mailbox_messages(populated, BOB))[0].endswith(body)


async def test_aiosmtplib_oversize(settings, populated, tls_context) -> None:
    from mtad.service import start

    settings.server.max_message_size = 10_000
    service = await start(settings, populated, tls_context)
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=service.port("mx"), start_tls=False)
        await client.connect()
        await client.ehlo()
        assert client.esmtp_extensions["size"] == "10000"
        # Bypass the client's own SIZE check to test the DATA-phase limit.
        await client.mail("a@spf-pass.example")
        await client.rcpt(ALICE)
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await client.data(b"Subject: big\r\n\r\n" + (b"a" * 998 + b"\r\n") * 20)
        assert info.value.code == 552 and info.value.message.startswith("5.3.4")
        await client.quit()
        assert await mailbox_messages(populated, ALICE) == []
    finally:
        await service.close()


# -- swaks ----------------------------------------------------------------


async def test_swaks_plain_mx(mta: Service, populated) -> None:
    code, out = await swaks(
        "--port", str(mta.port("mx")), "--from", "a@spf-pass.example", "--to", ALICE
    )
    assert code == 0, out
    assert "250 2.0.0 OK: queued as" in out
    assert len(await mailbox_messages(populated, ALICE)) == 1


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
async def test_swaks_starttls_auth(mta: Service, populated, ca_file: Path, mech: str) -> None:
    code, out = await swaks(
        "--port", str(mta.port("submission")),
        "--tls", "--tls-verify", "--tls-ca-path", str(ca_file),
        "--auth", mech, "--auth-user", ALICE, "--auth-password", ALICE_PW,
        "--from", ALICE, "--to", BOB,
    )
    assert code == 0, out
    assert "235 2.7.0" in out
    assert len(await mailbox_messages(populated, BOB)) == 1


async def test_swaks_implicit_tls(mta: Service, populated) -> None:
    code, out = await swaks(
        "--port", str(mta.port("submissions")), "--tls-on-connect",
        "--auth", "PLAIN", "--auth-user", BOB, "--auth-password", BOB_PW,
        "--from", BOB, "--to", ALICE,
    )
    assert code == 0, out
    assert len(await mailbox_messages(populated, ALICE)) == 1


async def test_swaks_wrong_password(mta: Service) -> None:
    code, out = await swaks(
        "--port", str(mta.port("submissions")), "--tls-on-connect",
        "--auth", "LOGIN", "--auth-user", BOB, "--auth-password", "nope",
        "--from", BOB, "--to", ALICE,
    )
    assert code != 0
    assert "535 5.7.8" in out


async def test_swaks_auth_required_on_submission(mta: Service) -> None:
    code, out = await swaks(
        "--port", str(mta.port("submission")), "--tls", "--from", ALICE, "--to", BOB,
    )
    assert code != 0
    assert "530 5.7.0" in out


async def test_swaks_rate_limit_per_user(settings, populated, tls_context) -> None:
    from mtad.service import start

    settings.smtp.rate_limit_per_user = 1
    service = await start(settings, populated, tls_context)
    try:
        args = ("--port", str(service.port("submissions")), "--tls-on-connect",
                "--auth", "PLAIN", "--auth-user", BOB, "--auth-password", BOB_PW,
                "--from", BOB, "--to", ALICE)
        code, out = await swaks(*args)
        assert code == 0, out
        code, out = await swaks(*args)
        assert code != 0 and "450 4.7.1" in out
        assert len(await mailbox_messages(populated, ALICE)) == 1
    finally:
        await service.close()

"""SMTPUTF8 end to end, inbound (RFC 6531, RFC 6532, RFC 6855): a UTF-8
sender address and UTF-8 header fields sent by Debian's Postfix to our MX
(Postfix passes SMTPUTF8 on, its debug log shows the MAIL FROM it sent),
then read back over IMAP after ENABLE UTF8=ACCEPT, byte for byte."""

from __future__ import annotations

import asyncio
import imaplib
import random
import smtplib
import ssl

from mtad.service import Service
from tests.ports import free_port
from tests.postfixpeer import postfix_peer
from tests.protocol.smtp.support import ALICE, ALICE_PW, arrived
from tests.utf8text import utf8_message, utf8_subject

POSTFIX_IP = "127.0.0.15"


def _send(port: int, sender: str, message: bytes) -> None:
    with smtplib.SMTP(POSTFIX_IP, port, local_hostname="client.example", timeout=30) as smtp:
        smtp.ehlo()
        smtp.sendmail(sender, [ALICE], message, ["SMTPUTF8", "BODY=8BITMIME"])


def _imap_fetch(port: int, ctx: ssl.SSLContext) -> bytes:
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx) as imap:
        imap.login(ALICE, ALICE_PW)
        typ, data = imap.enable("UTF8=ACCEPT")  # RFC 6855 section 3
        assert typ == "OK", data
        imap.select("INBOX")
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK", data
        return data[0][1]


async def test_utf8_mail_from_postfix_reads_back_over_imap(
    mta: Service, populated, settings, tls_context, client_tls_context
) -> None:
    from imapd.imap.server import start_imap

    sender = f"jörg.{random.randrange(10**6)}@spf-pass.example"
    subject = utf8_subject()
    message = utf8_message(
        f"Jörg Überall <{sender}>", f"Alice <{ALICE}>", subject, "spf-pass.example"
    )
    port = free_port((POSTFIX_IP,))
    extra = (
        f"relayhost = [127.0.0.1]:{mta.port('mx')}\n"
        "smtp_tls_security_level = none\n"
        "debug_peer_list = 127.0.0.1\n"
    )
    with postfix_peer("postfix-sender.test", POSTFIX_IP, port, extra=extra) as peer:
        await asyncio.to_thread(_send, port, sender, message)
        stored = await arrived(populated, ALICE, peer.log)
        log = peer.log()
    # Postfix's smtp client, in its debug log: the MAIL FROM it sent us.
    [mail_from] = [line for line in log.splitlines() if f"MAIL FROM:<{sender}>" in line]
    assert "SMTPUTF8" in mail_from, mail_from
    servers = await start_imap(settings, populated, tls_context)
    try:
        imap_port = servers[1].sockets[0].getsockname()[1]
        fetched = await asyncio.to_thread(_imap_fetch, imap_port, client_tls_context)
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    [stored_copy] = stored
    assert fetched == stored_copy
    header, _, body = message.partition(b"\r\n\r\n")
    assert fetched.endswith(b"\r\n\r\n" + body)
    for field in header.split(b"\r\n"):
        assert field + b"\r\n" in fetched
    assert f"Return-Path: <{sender}>".encode() in fetched

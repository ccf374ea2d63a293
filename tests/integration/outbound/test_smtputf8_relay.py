"""SMTPUTF8 on the way out (RFC 6531, RFC 6532): a message with a UTF-8
address or UTF-8 header fields goes to a next hop with SMTPUTF8 on its
MAIL FROM, byte for byte, to Debian's Postfix (which offers SMTPUTF8);
to a server that does not offer it, it is never sent (no downgrade) and
the sender gets a bounce with the RFC 6531 section 3.7.4 status."""

from __future__ import annotations

import random
import ssl

from tests.integration.outbound.conftest import ALICE, FLAKY_IP, Node, eventually
from tests.integration.outbound.sink import SinkServer
from tests.integration.outbound.test_relay import dsn_parts, inbox, settled, submit
from tests.postfixpeer import PostfixPeer
from tests.utf8text import utf8_message, utf8_subject


def _utf8_message(to: str, subject: str) -> bytes:
    return utf8_message(f"Jörg Älice <{ALICE}>", to, subject, "example.net")


async def _submit(node: Node, ctx: ssl.SSLContext, rcpt: str, message: bytes) -> None:
    await submit(node, ctx, [rcpt], message=message, mail_options=["SMTPUTF8", "BODY=8BITMIME"])


async def test_utf8_address_and_header_reach_postfix_byte_for_byte(
    sender: Node, client_tls_context: ssl.SSLContext, postfix: PostfixPeer
) -> None:
    before = len(postfix.messages())
    rcpt = f"jörg.{random.randrange(10**6)}@postfix.test"
    subject = utf8_subject()
    message = _utf8_message(rcpt, subject)
    await _submit(sender, client_tls_context, rcpt, message)
    found = await eventually(
        lambda: [m for m in postfix.messages()[before:] if subject.encode() in m], timeout=30
    )
    [got] = found
    # Postfix's copy ends with ours (DKIM-Signature and Received go above it).
    header, _, body = message.partition(b"\r\n\r\n")
    assert got.replace(b"\n", b"\r\n").endswith(body), got[-300:]
    for field in header.split(b"\r\n"):
        assert field in got
    assert f"Delivered-To: {rcpt}".encode() in got
    [entry] = await settled(sender)
    assert entry.recipients[0].status == "delivered"


async def test_utf8_header_to_a_server_without_smtputf8_bounces(
    sender: Node, client_tls_context: ssl.SSLContext, relay_port: int
) -> None:
    ascii_only = ["PIPELINING", "SIZE 10000000", "8BITMIME"]
    async with SinkServer(FLAKY_IP, relay_port, extensions=ascii_only) as sink:
        subject = utf8_subject()
        await _submit(
            sender, client_tls_context, "eve@flaky.test", _utf8_message("eve@flaky.test", subject)
        )
        [entry] = await settled(sender)
        assert sink.received == []  # never downgraded, never sent
    assert entry.recipients[0].status == "failed"
    assert "5.6.9" in (entry.recipients[0].last_reply or "")

    async def bounced() -> list[bytes]:
        return await inbox(sender, ALICE)

    [bounce] = await eventually(bounced)
    _msg, _human, _per_message, [rcpt], _headers = dsn_parts(bounce)
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.6.9"
    assert rcpt["Final-Recipient"] == "rfc822; eve@flaky.test"

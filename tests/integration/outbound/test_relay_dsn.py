"""RFC 3461 through us to Debian's Postfix and back.

Alice submits on 465 with ``RET=HDRS ENVID=x`` and two recipients:
``dave@postfix.test`` with ``NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b`` and
``x@nullmx.test`` (a domain that takes no mail) with ``NOTIFY=FAILURE
ORCPT=rfc822;c@d``. Postfix offers DSN, so the outbound queue hands it
the parameters (section 5.2.1): Postfix delivers, and sends its own
"delivered" report back to alice through our MX, naming the ENVID and
ORCPT that only we could have passed on. The null-MX recipient fails at
once and our own RFC 3464 bounce carries the same ENVID and its ORCPT.
"""

from __future__ import annotations

import ssl

import aiosmtplib

from mtad.outbound.dsn import parse_dsn
from tests.integration.outbound.conftest import ALICE, ALICE_PW, Node, eventually
from tests.postfixpeer import PostfixPeer
from tests.protocol.smtp.support import mailbox_messages


def _postconf(peer: PostfixPeer, *args: str) -> None:
    import subprocess

    subprocess.run(["postconf", "-c", str(peer.config_dir), *args], check=True, capture_output=True)
    result = peer.postfix("reload")
    assert result.returncode == 0, result.stderr


async def test_dsn_parameters_reach_postfix_and_come_back(
    sender: Node, postfix: PostfixPeer, client_tls_context: ssl.SSLContext
) -> None:
    # Postfix sends its reports for example.net to the sender's MX.
    route = f"inline:{{ example.net=smtp:[127.0.0.1]:{sender.service.port('mx')} }}"
    _postconf(postfix, "-e", f"transport_maps = {route}")
    try:
        message = (
            f"From: {ALICE}\r\nTo: dave@postfix.test\r\nSubject: dsn flow\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <dsn.flow@example.net>\r\n"
            "\r\nBody that stays here.\r\n"
        ).encode()
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=sender.service.port("submissions"),
            use_tls=True,
            tls_context=client_tls_context,
            timeout=10,
        ) as client:
            await client.login(ALICE, ALICE_PW)
            assert "dsn" in client.esmtp_extensions
            await client.mail(ALICE, options=["RET=HDRS", "ENVID=x"])
            await client.rcpt(
                "dave@postfix.test", options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@b"]
            )
            await client.rcpt("x@nullmx.test", options=["NOTIFY=FAILURE", "ORCPT=rfc822;c@d"])
            code, _ = await client.data(message)
            assert code == 250

        async def reports() -> list:
            found = [parse_dsn(m) for m in await mailbox_messages(sender.storage, ALICE)]
            found = [r for r in found if r is not None]
            return found if len(found) == 2 else []

        found = await eventually(reports, timeout=60)
    finally:
        _postconf(postfix, "-X", "transport_maps")
    by_action = {r.recipients[0].action: r for r in found}
    delivered, failed = by_action["delivered"], by_action["failed"]
    # Postfix's own report: it got ENVID and ORCPT from us.
    assert delivered.reporting_mta == "mx.postfix.test"
    assert delivered.envelope_id == "x"
    assert delivered.recipients[0].final_recipient == "dave@postfix.test"
    assert delivered.recipients[0].original_recipient.replace(" ", "") == "rfc822;a@b"
    # Ours, for the recipient that failed.
    assert failed.reporting_mta == sender.settings.server.hostname
    assert failed.envelope_id == "x"
    [status] = failed.recipients
    assert (status.final_recipient, status.status) == ("x@nullmx.test", "5.1.10")
    assert status.original_recipient == "rfc822;c@d"
    at_postfix = postfix.messages()[-1]
    assert b"Subject: dsn flow" in at_postfix and b"Body that stays here." in at_postfix

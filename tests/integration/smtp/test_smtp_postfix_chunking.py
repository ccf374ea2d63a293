"""Debian's Postfix relaying to mtad's MX, which now offers CHUNKING and BINARYMIME.

Postfix (tests/postfixpeer.py) gets a message by SMTP from smtplib and
relays it to mtad (``relayhost``). Postfix's smtp client reads our EHLO
(its debug log shows CHUNKING and BINARYMIME received) but implements BDAT
on the server side only, so it sends DATA: the test checks that the new
keywords cost nothing in interoperability and that whichever command the
peer picks, the message arrives byte for byte (random sizes, 8-bit octets,
lines starting with dots). Which of DATA and BDAT it used is recorded and
checked against its own log, so a Postfix that starts using BDAT is still
tested by the same assertions.
"""

from __future__ import annotations

import asyncio
import random
import smtplib
from collections.abc import Iterator

import pytest

from mtad.service import Service
from mtad.session import SmtpSession
from tests.ports import free_port
from tests.postfixpeer import postfix_peer
from tests.protocol.smtp.support import ALICE, arrived

POSTFIX_IP = "127.0.0.13"


@pytest.fixture
def bdat_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The arguments of every BDAT command mtad runs in this test."""
    calls: list[str] = []
    real = SmtpSession.smtp_BDAT

    async def counted(self: SmtpSession, arg: str | None) -> None:
        calls.append(arg or "")
        await real(self, arg)

    monkeypatch.setattr(SmtpSession, "smtp_BDAT", counted)
    yield calls


def random_text_message(rng: random.Random, size: int) -> tuple[bytes, bytes]:
    """(header, body): 8-bit text lines of random lengths, some starting
    with "." (DATA would stuff them, BDAT must not touch them)."""
    header = (
        b"From: someone@spf-pass.example\r\nTo: alice@example.net\r\n"
        b"Subject: through postfix\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <chunking@spf-pass.example>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=latin1\r\nContent-Transfer-Encoding: 8bit\r\n"
    )
    alphabet = bytes(range(0x20, 0x7F)) + bytes(range(0xA0, 0x100))
    lines, total = [], 0
    while total < size:
        line = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
        if rng.random() < 0.05:
            line = b"." + line
        lines.append(line + b"\r\n")
        total += len(lines[-1])
    return header, b"".join(lines)


def _send(port: int, message: bytes) -> None:
    with smtplib.SMTP(POSTFIX_IP, port, local_hostname="client.example", timeout=30) as smtp:
        smtp.ehlo()
        smtp.sendmail("someone@spf-pass.example", [ALICE], message, ["BODY=8BITMIME"])


@pytest.mark.parametrize("size", [100, 1_500_000])
async def test_postfix_relays_to_us_with_bdat(
    mta: Service, populated, bdat_calls: list[str], size: int
) -> None:
    rng = random.Random()
    header, body = random_text_message(rng, rng.randrange(size, size * 2))
    port = free_port((POSTFIX_IP,))
    extra = (
        f"relayhost = [127.0.0.1]:{mta.port('mx')}\n"
        "smtp_tls_security_level = none\n"
        "debug_peer_list = 127.0.0.1\n"  # its smtp client logs our EHLO and its commands
    )
    with postfix_peer("postfix-sender.test", POSTFIX_IP, port, extra=extra) as peer:
        await asyncio.to_thread(_send, port, header + b"\r\n" + body)
        stored = await arrived(populated, ALICE, peer.log)
        log = peer.log()
    [copy] = stored
    assert "< 127.0.0.1[127.0.0.1]" in log and "250-CHUNKING" in log, log
    used_bdat = "> 127.0.0.1[127.0.0.1]:" in log and ": BDAT " in log
    assert bool(bdat_calls) == used_bdat, (bdat_calls, log)
    if bdat_calls:
        assert bdat_calls[-1].endswith("LAST")
    assert copy.endswith(b"\r\n\r\n" + body)  # the body byte for byte
    head = copy[: len(copy) - len(body)]
    for field in header.split(b"\r\n")[:-1]:
        assert field + b"\r\n" in head

"""DKIM on a spooled message (issue #21): the MX reads a message past
``smtp.spool_threshold`` whole only when its header has a DKIM-Signature
field (RFC 6376 section 3.5); without one its body stays in the spool
file, and a signed one is still verified from the whole message."""

from __future__ import annotations

import base64
import random

import pytest

from delivery.spool import Spooled
from mtad.service import Service
from tests.integration.smtp.test_smtp_sender_auth import auth_results, send_mx
from tests.protocol.smtp.support import ALICE, DkimKey, mailbox_messages, message

SPOOL_AT = 4096


@pytest.fixture
def smtp_overrides() -> dict:
    return {"spool_threshold": SPOOL_AT}


@pytest.fixture
def whole_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the spooled messages read whole into memory."""
    reads: list[int] = []
    read_all = Spooled.read_all

    def spy(self: Spooled) -> bytes:
        data = read_all(self)
        reads.append(len(data))
        return data

    monkeypatch.setattr(Spooled, "read_all", spy)
    return reads


def _body(rng: random.Random) -> str:
    """Random base64 lines, several times the spool threshold."""
    text = base64.b64encode(rng.randbytes(rng.randint(6 * SPOOL_AT, 60 * SPOOL_AT))).decode()
    return "".join(text[i : i + 76] + "\r\n" for i in range(0, len(text), 76))


async def test_unsigned_spooled_message_is_not_read_whole(
    mta: Service, populated, whole_reads: list[int]
) -> None:
    sender = "news@spf-pass.example"
    sent = message(sender=sender, subject="Unsigned", body=_body(random.Random()))
    reply = await send_mx(mta.port("mx"), sender, sent)
    assert reply.startswith("250 2.0.0"), reply
    assert whole_reads == []
    [raw] = await mailbox_messages(populated, ALICE)
    assert raw.endswith(sent)
    results = auth_results(raw)
    assert "spf=pass" in results and "dkim=none" in results
    assert "dmarc=pass" in results  # DMARC read the From field from the header alone


async def test_signed_spooled_message_is_verified_whole(
    mta: Service, populated, dkim_key: DkimKey, whole_reads: list[int]
) -> None:
    sender = "someone@dkim.example"
    rng = random.Random()
    signed = dkim_key.sign(message(sender=sender, subject="Signed", body=_body(rng)))
    at = rng.randrange(signed.index(b"\r\n\r\n") + 4, len(signed) - 2)
    while signed[at : at + 1] in b"\r\n":
        at -= 1
    tampered = signed[:at] + (b"A" if signed[at : at + 1] != b"A" else b"B") + signed[at + 1 :]
    for body in (signed, tampered):
        reply = await send_mx(mta.port("mx"), sender, body)
        assert reply.startswith("250 2.0.0"), reply
    assert len(whole_reads) == 2 and min(whole_reads) > SPOOL_AT
    good, bad = await mailbox_messages(populated, ALICE)
    assert good.endswith(signed) and bad.endswith(tampered)
    assert "dkim=pass header.d=dkim.example header.s=sel" in auth_results(good)
    assert "dkim=fail header.d=dkim.example header.s=sel" in auth_results(bad)

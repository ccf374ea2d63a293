"""Mail sent over SMTP to a running mtad comes back byte-exact through the
HTTP API: the body text (base64 and quoted-printable UTF-8), every
attachment (random bytes, random sizes including each residue mod 3) and
the raw source.

The cases are random; the seed is printed so a failure can be replayed with
``SHARDMAIL_MIME_SEED=<seed>``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import random
import re
import smtplib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from conf.settings import Settings
from httpapi.service import HttpService
from tests.integration.http.conftest import Api

CRLF = "\r\n"
# Code points a mail body plausibly holds: Latin-1, Latin Extended, Greek,
# Cyrillic, CJK, emoji (outside the BMP), and plain ASCII with spaces and tabs.
_RANGES = [(0x20, 0x7E), (0xA0, 0x17F), (0x391, 0x3C9), (0x410, 0x44F), (0x4E00, 0x4FFF),
           (0x1F600, 0x1F64F)]


@dataclass(frozen=True)
class Case:
    subject: str
    text: str
    text_encoding: str  # "base64" or "quoted-printable"
    attachments: tuple[bytes, ...]
    line_length: int  # base64 line length used by the "sender"


def random_text(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 40)):
        chars = []
        for _ in range(rng.randint(0, 120)):
            low, high = rng.choice(_RANGES)
            chars.append(chr(rng.randint(low, high)))
        if rng.random() < 0.3:
            chars.append(rng.choice([" ", "\t", "  "]))  # trailing whitespace survives QP
        lines.append("".join(chars))
    return CRLF.join(lines) + rng.choice(["", CRLF])


def random_case(rng: random.Random, index: int, sizes: list[int]) -> Case:
    return Case(
        subject=f"round trip {index}",
        text=random_text(rng),
        text_encoding=rng.choice(["base64", "quoted-printable"]),
        attachments=tuple(rng.randbytes(size) for size in sizes),
        # RFC 2045 section 6.8 caps lines at 76; senders use shorter ones
        # too, and not always a multiple of 4.
        line_length=rng.choice([76, 72, 64, 61, 57]),
    )


def b64_lines(data: bytes, width: int) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return CRLF.join(encoded[i : i + width] for i in range(0, len(encoded), width))


def build(case: Case) -> bytes:
    """The message as a sender writes it, CRLF throughout (RFC 5321 2.3.8)."""
    boundary = f"=_boundary_{random.getrandbits(64):x}"
    raw_text = case.text.encode("utf-8")
    if case.text_encoding == "base64":
        body = b64_lines(raw_text, case.line_length)
    else:
        # b2a_qp writes its soft line breaks as bare LF unless the text's
        # first line ends in CRLF; on the wire every line ends in CRLF.
        qp = binascii.b2a_qp(raw_text, istext=True).decode("ascii")
        body = re.sub(r"\r?\n", CRLF, qp)
    head = [
        "From: Carol <carol@remote.test>",
        "To: alice@example.test",
        f"Subject: {case.subject}",
        "Date: Fri, 04 Dec 2026 10:00:00 +0000",
        f"Message-ID: <{case.subject.replace(' ', '.')}@remote.test>",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Transfer-Encoding: {case.text_encoding}",
        "",
        body,
    ]
    for n, data in enumerate(case.attachments):
        head += [
            f"--{boundary}",
            "Content-Type: application/octet-stream",
            f'Content-Disposition: attachment; filename="blob-{n}.bin"',
            "Content-Transfer-Encoding: base64",
            "",
            b64_lines(data, case.line_length),
        ]
    head += [f"--{boundary}--", ""]
    return CRLF.join(head).encode("ascii")


def seed() -> int:
    value = int(os.environ.get("SHARDMAIL_MIME_SEED") or random.randrange(2**32))
    print(f"SHARDMAIL_MIME_SEED={value}")
    return value


@pytest.fixture
async def mta(http_settings: Settings, mailstore: Any, service: HttpService,
              tls_context: ssl.SSLContext) -> AsyncIterator[Any]:
    """mtad over the same storage as the running httpapi: the daemon set."""
    from mtad.service import start

    svc = await start(http_settings, mailstore, tls_context)
    try:
        yield svc
    finally:
        await svc.close()


def send(port: int, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.sendmail("carol@remote.test", ["alice@example.test"], raw)


async def fetch_case(api: Api, inbox: str, subject: str) -> dict[str, Any]:
    status, page = await api.get(f"/v1/folders/{inbox}/messages?limit=200")
    assert status == 200
    [item] = [m for m in page["messages"] if m["subject"] == subject]
    status, message = await api.get(f"/v1/messages/{item['id']}")
    assert status == 200
    return message  # type: ignore[no-any-return]


async def test_smtp_mail_reads_back_byte_exact(mta: Any, alice_api: Api) -> None:
    rng = random.Random(seed())
    # Every residue mod 3 (1 and 2 need padding), tiny ones, and the
    # 2 MiB attachment of the bug report, which spans several blob reads.
    sizes = [[2_097_152], [rng.randrange(1, 4)], [0, rng.randrange(5, 600)]]
    sizes += [[3 * rng.randrange(1, 200_000) + r for r in rng.sample([0, 1, 2], 3)]]
    sizes += [[rng.randrange(1, 400_000)] for _ in range(4)]
    cases = [random_case(rng, i, s) for i, s in enumerate(sizes)]
    port = mta.port("mx")
    raws = [build(case) for case in cases]
    for raw in raws:
        await asyncio.to_thread(send, port, raw)
    _, folders = await alice_api.get("/v1/folders")
    inbox = next(f["id"] for f in folders["folders"] if f["name"] == "INBOX")
    for case, raw in zip(cases, raws, strict=True):
        message = await fetch_case(alice_api, inbox, case.subject)
        assert message["text"] == case.text, case.text_encoding
        assert [a["filename"] for a in message["attachments"]] == [
            f"blob-{n}.bin" for n in range(len(case.attachments))
        ]
        for attachment, data in zip(message["attachments"], case.attachments, strict=True):
            assert attachment["size"] == len(data)  # what the download holds, not the base64
            status, body = await alice_api.get(attachment["url"])
            assert status == 200
            assert len(body) == len(data)
            assert body == data
        status, source = await alice_api.get(f"/v1/messages/{message['id']}/raw")
        assert status == 200
        # mtad prepends its trace fields (RFC 5321 section 4.4); the rest is as sent.
        assert source.endswith(raw)

"""Bare LF and CR in DATA (RFC 5321 section 2.3.8, issue #17).

A "." line beside a bare LF or CR (the SMTP smuggling shapes) is refused
on every port; any other bare LF or CR becomes CRLF on submission, and on
the MX unless smtp.mx_bare_lf = "reject". Real clients: curl uploads an
LF-only file without --crlf, and the stored message has CRLF line ends.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest

from conf.settings import Settings
from mtad.service import Service
from tests.protocol.smtp.support import (
    ALICE,
    ALICE_PW,
    BOB,
    SmtpDialogue,
    auth_plain,
    mailbox_messages,
)

HEAD = b"Subject: lines\r\n\r\n"

# (body after the header, policy on the MX, reply on the MX, reply on submission)
TABLE = [
    pytest.param(b"one\nline two\r\n", "normalize", "250 2.0.0", "250 2.0.0", id="lf-normalized"),
    pytest.param(b"one\n.two\r\n", "reject", "550 5.6.0 Bare LF", "250 2.0.0", id="lf-rejected-mx"),
    pytest.param(b"cr\rin text\r\n", "normalize", "250 2.0.0", "250 2.0.0", id="cr-normalized"),
    pytest.param(b"a\n.\nMAIL FROM:<x@y.example>\r\n", "normalize", "550 5.6.0 Message refused",
                 "550 5.6.0 Message refused", id="lf-dot-lf"),
    pytest.param(b"a\r.\rb\r\n", "normalize", "550 5.6.0 Message refused",
                 "550 5.6.0 Message refused", id="cr-dot-cr"),
    pytest.param(b"a\n.\r\nb\r\n", "reject", "550 5.6.0 Message refused",
                 "550 5.6.0 Message refused", id="lf-dot-crlf"),
    pytest.param(b"a\r\n.\nb\r\n", "normalize", "550 5.6.0 Message refused",
                 "550 5.6.0 Message refused", id="crlf-dot-lf"),
    pytest.param(b"a\r\n.\rb\r\n", "normalize", "550 5.6.0 Message refused",
                 "550 5.6.0 Message refused", id="crlf-dot-cr"),
]


@pytest.fixture
def smtp_overrides(request: pytest.FixtureRequest) -> dict:
    return {"mx_bare_lf": getattr(request, "param", "normalize")}


async def send(client: SmtpDialogue, sender: str, body: bytes) -> str:
    assert (await client.cmd(f"MAIL FROM:<{sender}>")).startswith("250")
    assert (await client.cmd(f"RCPT TO:<{BOB}>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    await client.send(HEAD + body + b".\r\n")
    return await client.reply()


@pytest.mark.parametrize(
    ("body", "smtp_overrides", "mx_reply", "submission_reply"),
    TABLE,
    indirect=["smtp_overrides"],
)
async def test_bare_line_ends(
    mta: Service, populated, client_tls_context, body: bytes, smtp_overrides: dict,
    mx_reply: str, submission_reply: str,
) -> None:
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        reply = await send(client, "someone@spf-pass.example", body)
        assert reply.startswith(mx_reply), reply
        assert (await client.cmd("NOOP")).startswith("250 2.0.0")  # nothing smuggled
    async with await SmtpDialogue.open(mta.port("submissions"), client_tls_context) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        assert (await client.cmd("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW))).startswith("235")
        reply = await send(client, ALICE, body)
        assert reply.startswith(submission_reply), reply
        assert (await client.cmd("NOOP")).startswith("250 2.0.0")
    stored = await mailbox_messages(populated, BOB)
    assert len(stored) == [mx_reply, submission_reply].count("250 2.0.0")
    normalised = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    for raw in stored:
        assert raw.endswith(HEAD + normalised)


def lf_text(rng: random.Random) -> bytes:
    """Random text lines with LF ends, some starting with a dot, some long."""
    lines = []
    for _ in range(rng.randrange(50, 400)):
        words = [rng.randbytes(rng.randrange(1, 9)).hex() for _ in range(rng.randrange(0, 12))]
        line = " ".join(words).encode()
        # A lone "." line would be the smuggling shape "<LF>.<LF>": refused.
        lines.append((b"." if line and rng.random() < 0.1 else b"") + line)
    return b"\n".join(lines) + b"\n"


async def curl_upload(port: int, path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        shutil.which("curl") or "curl", "--verbose",
        "--url", f"smtp://127.0.0.1:{port}/client.example",
        "--mail-from", "someone@spf-pass.example", "--mail-rcpt", BOB,
        "--upload-file", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_lf_file_is_stored_with_crlf(
    mta: Service, populated, settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random()
    text = lf_text(rng)
    message = b"From: someone@spf-pass.example\nTo: bob@example.net\nSubject: curl\n\n" + text
    upload = tmp_path / "message.txt"
    upload.write_bytes(message)
    code, out = await curl_upload(mta.port("mx"), upload)
    assert code == 0, out
    [stored] = await mailbox_messages(populated, BOB)
    # curl sends the file as it is (no --crlf, no dot-stuffing after a bare
    # LF): every line end is CRLF in the store and every line is intact.
    assert b"\r\nSubject: curl\r\n\r\n" + message.split(b"\n\n", 1)[1].replace(
        b"\n", b"\r\n"
    ) in stored
    assert b"\n" not in stored.replace(b"\r\n", b"")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize("smtp_overrides", ["reject"], indirect=True)
async def test_curl_lf_file_refused_when_mx_rejects(
    mta: Service, populated, tmp_path: Path, smtp_overrides: dict
) -> None:
    upload = tmp_path / "message.txt"
    upload.write_bytes(b"Subject: curl\n\nhello\n")
    code, out = await curl_upload(mta.port("mx"), upload)
    assert code != 0 and "550" in out, out
    assert await mailbox_messages(populated, BOB) == []

"""Issue #18 end to end: a real mtad takes hostile HTML mail, large (parsed
in its content pool, off the SMTP loop's GIL) and small (parsed inline),
promptly, and stores it byte-exact with its text indexed."""

from __future__ import annotations

import base64
import random
import time
from pathlib import Path

from storage import open_storage
from storage.model import UidSet
from tests.conftest import make_settings
from tests.dnsserver import DnsServer
from tests.integration.smtp.test_smtp_crash import mtad_site, start_mtad, stop_mtad
from tests.protocol.smtp.support import ALICE, SmtpDialogue, message

# Well under the 20 s the first of these took when HTML to text was quadratic.
PROMPT_SECONDS = 15.0


def _hostile_html_mail(size: int, word: str) -> bytes:
    markup = f"<p>{word}</p>" + "<" + "a" * size  # an unterminated tag to the end
    encoded = base64.encodebytes(markup.encode()).decode().replace("\n", "\r\n")
    body = message(subject=word).split(b"\r\n\r\n", 1)[0]
    return (
        body + b"\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + encoded.encode()
    )


async def _send(port: int, raw: bytes) -> tuple[str, float]:
    started = time.monotonic()
    async with await SmtpDialogue.open(port) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<someone@spf-pass.example>")
        await client.cmd(f"RCPT TO:<{ALICE}>")
        await client.cmd("DATA")
        await client.send(raw + b".\r\n")
        reply = await client.reply()
    return reply, time.monotonic() - started


async def test_hostile_html_mail_is_taken_promptly_and_indexed(
    tmp_path: Path, dns: DnsServer, populated_template: Path
) -> None:
    config, data_dir, ports = mtad_site(tmp_path, dns, populated_template, "content_workers = 1\n")
    words = [random.randbytes(6).hex() for _ in range(2)]
    mails = [
        _hostile_html_mail(random.randrange(150_000, 200_000), words[0]),  # inline parse
        _hostile_html_mail(random.randrange(1_500_000, 2_000_000), words[1]),  # pool
    ]
    proc = await start_mtad(config, ports)
    try:
        for raw in mails:
            reply, seconds = await _send(ports["mx"], raw)
            assert reply.startswith("250"), reply
            assert seconds < PROMPT_SECONDS
    finally:
        await stop_mtad(proc)
    store = await open_storage(make_settings(data_dir).storage)
    try:
        account = await store.directory.get_account(ALICE)
        mail = store.mail(account)
        box = await mail.get_mailbox(account.id, "INBOX")
        stored = await mail.fetch(account.id, box.id, UidSet.all())
        for s, raw, word in zip(stored, mails, words, strict=True):
            assert (await store.blobs.get(s.entry.blob_key)).endswith(raw)  # after trace fields
            assert s.parsed.body.type == "text" and s.parsed.body.subtype == "html"
            assert s.parsed.preview.startswith(word)
    finally:
        await store.close()

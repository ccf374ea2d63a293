"""DATA past smtp.spool_threshold goes to a file as it arrives (issue #17).

Unfinished DATA phases must not hold their text in memory, a large message
must come out byte-exact, and no spool file may outlive its transaction on
any path: delivered, refused, or the client gone mid-DATA.
"""

from __future__ import annotations

import asyncio
import base64
import random
import smtplib
import time
import tracemalloc
from pathlib import Path

import pytest

from conf.settings import Settings
from mtad.service import Service
from tests.protocol.smtp.support import ALICE, SmtpDialogue, mailbox_messages

THRESHOLD = 64 * 1024


@pytest.fixture
def smtp_overrides() -> dict:
    return {"spool_threshold": THRESHOLD}


def spool_dir(settings: Settings) -> Path:
    return settings.data_dir / "spool"


def spool_files(settings: Settings) -> list[Path]:
    folder = spool_dir(settings)
    return sorted(folder.iterdir()) if folder.exists() else []


def random_body(rng: random.Random, size: int) -> bytes:
    """Base64 lines of random octets (real bytes, not a repeated pattern)."""
    encoded = base64.encodebytes(rng.randbytes(size)).replace(b"\n", b"\r\n")
    return b"Subject: big\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded


async def open_data(port: int) -> SmtpDialogue:
    client = await SmtpDialogue.open(port)
    await client.reply()
    await client.cmd("EHLO client.example")
    assert (await client.cmd("MAIL FROM:<someone@spf-pass.example>")).startswith("250")
    assert (await client.cmd(f"RCPT TO:<{ALICE}>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    return client


async def wait_spooled(settings: Settings, sessions: int, seconds: float = 5.0) -> None:
    """Until ``sessions`` spool files stopped growing (or time is up)."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size for p in spool_files(settings)]
        if len(sizes) == sessions and sizes == last:
            return
        last = sizes
        await asyncio.sleep(0.2)


async def test_unfinished_data_phases_hold_no_text_in_memory(
    mta: Service, settings: Settings, populated
) -> None:
    rng = random.Random()
    bodies = [random_body(rng, rng.randrange(1_500_000, 2_500_000)) for _ in range(4)]
    clients = [await open_data(mta.port("mx")) for _ in bodies]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for client, body in zip(clients, bodies, strict=True):
            await client.send(body)
        await wait_spooled(settings, len(clients))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    sent = sum(map(len, bodies))
    # Each session keeps at most the threshold and one read block in memory.
    assert grown < len(clients) * (THRESHOLD + 256 * 1024), (grown, sent)
    assert len(spool_files(settings)) == len(clients)
    # One finishes and is stored byte-exact; the others hang up mid-DATA.
    await clients[0].send(b".\r\n")
    assert (await clients[0].reply()).startswith("250 2.0.0")
    await clients[0].cmd("QUIT")
    for client in clients:
        await client.close()
    [stored] = await mailbox_messages(populated, ALICE)
    assert stored.endswith(bodies[0][len(b"Subject: big\r\n") :])
    await asyncio.sleep(0.3)
    assert spool_files(settings) == []


async def test_refused_spooled_message_leaves_no_file(
    mta: Service, settings: Settings, populated
) -> None:
    rng = random.Random()
    client = await open_data(mta.port("mx"))
    async with client:
        await client.send(random_body(rng, rng.randrange(300_000, 400_000)))
        await wait_spooled(settings, 1)
        assert len(spool_files(settings)) == 1
        await client.send(b"then a smuggled\n.\nMAIL FROM:<x@y.example>\r\n.\r\n")
        assert (await client.reply()).startswith("550 5.6.0")
        assert spool_files(settings) == []
        assert (await client.cmd("RSET")).startswith("250")
    assert await mailbox_messages(populated, ALICE) == []


def _smtplib_send(port: int, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as smtp:
        smtp.sendmail("someone@spf-pass.example", [ALICE], body)


async def test_large_message_from_smtplib_is_byte_exact(
    mta: Service, settings: Settings, populated
) -> None:
    rng = random.Random()
    body = random_body(rng, rng.randrange(2_000_000, 3_000_000))
    body += b"\r\n.a line that smtplib dot-stuffs\r\n"
    await asyncio.to_thread(_smtplib_send, mta.port("mx"), body)
    [stored] = await mailbox_messages(populated, ALICE)
    assert stored.endswith(body[len(b"Subject: big\r\n") :])
    assert b"\r\nSubject: big\r\n" in stored
    assert spool_files(settings) == []


async def test_unwritable_spool_is_a_temporary_failure(
    mta: Service, settings: Settings, populated
) -> None:
    spool_dir(settings).parent.mkdir(parents=True, exist_ok=True)
    spool_dir(settings).write_bytes(b"")  # a file where the folder should be
    rng = random.Random()
    async with await open_data(mta.port("mx")) as client:
        await client.send(random_body(rng, rng.randrange(100_000, 200_000)) + b".\r\n")
        assert (await client.reply()).startswith("451 4.3.0")
        assert (await client.cmd("NOOP")).startswith("250")  # still in step
    assert await mailbox_messages(populated, ALICE) == []

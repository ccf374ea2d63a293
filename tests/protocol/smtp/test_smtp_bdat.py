"""BDAT and BINARYMIME (RFC 3030) on the wire, against a real mtad.

Tables of what the client sends (a command line, with its chunk octets
after it) and the reply expected, from RFC 3030's examples and its rules;
then content: random sizes, random binary octets, chunks cut at random,
everything pipelined, compared byte for byte with what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import smtplib
from collections.abc import AsyncIterator

import pytest

from conf.settings import Settings
from mtad.service import Service, start
from tests.protocol.smtp.support import ALICE, BOB, REMOTE, SmtpDialogue, mailbox_messages

THRESHOLD = 64 * 1024


@pytest.fixture
def smtp_overrides() -> dict:
    return {"spool_threshold": THRESHOLD}


def spool_files(settings: Settings) -> list:
    folder = settings.data_dir / "spool"
    return sorted(folder.iterdir()) if folder.exists() else []


@contextlib.asynccontextmanager
async def service(settings: Settings, populated, tls_context) -> AsyncIterator[Service]:
    """An mtad started with ``settings`` as the test changed them."""
    mta = await start(settings, populated, tls_context)
    try:
        yield mta
    finally:
        await mta.close()


def bdat(content: bytes, last: bool = False) -> bytes:
    return f"BDAT {len(content)}{' LAST' if last else ''}\r\n".encode() + content


def stored_text(stored: bytes, sent: bytes) -> bytes:
    """What follows our trace fields in a stored copy: the message as sent
    when it came through unchanged (the trace fields are only prepended)."""
    assert stored.endswith(sent), "stored copy does not end with the octets sent"
    return stored[len(stored) - len(sent) :]


async def deliver_in_one_chunk(client: SmtpDialogue, content: bytes) -> None:
    """A transaction to ALICE whose message is one ``BDAT n LAST``: 250."""
    await client.cmd("MAIL FROM:<someone@spf-pass.example> BODY=BINARYMIME")
    await client.cmd(f"RCPT TO:<{ALICE}>")
    await client.send(bdat(content, last=True))
    assert (await client.reply()).startswith("250 2.0.0")


# RFC 3030 section 4.1's first example, chunk sizes as it counts them.
EXAMPLE_1 = (
    b"To: ned@innosoft.com\r\n"
    b"Subject: Unix password file\r\n"
    b"\r\n"
    b"root:0:0:Super-user:/:/bin/sh\r\n"
    b"daemon:1:1:System:/:/bin/sh\r\n"
)
# Lines that end DATA, or smuggle with it, are plain octets inside a chunk.
DOTS = b"Subject: dots\r\n\r\n.\r\n..leading\r\nbare\nlf\n.\nand\r.\r\nend\r\n"

TABLE = [
    pytest.param(
        [
            (b"EHLO client.example\r\n", "250 "),
            (b"MAIL FROM:<a@spf-pass.example>\r\n", "250 2.1.0"),
            (f"RCPT TO:<{ALICE}>\r\n".encode(), "250 2.1.5"),
            (bdat(EXAMPLE_1, last=True), "250 2.0.0"),
        ],
        [EXAMPLE_1],
        id="rfc3030-4.1-single-chunk",
    ),
    pytest.param(
        [
            (b"EHLO client.example\r\n", "250 "),
            (b"MAIL FROM:<a@spf-pass.example> BODY=BINARYMIME\r\n", "250 2.1.0"),
            (f"RCPT TO:<{ALICE}>\r\n".encode(), "250 2.1.5"),
            (bdat(EXAMPLE_1[:40]), "250 2.0.0 40 octets"),
            (bdat(EXAMPLE_1[40:]), "250 2.0.0"),
            (b"BDAT 0 LAST\r\n", "250 2.0.0"),
        ],
        [EXAMPLE_1],
        id="rfc3030-4.2-chunks-then-bdat-0-last",
    ),
    pytest.param(
        [
            (b"EHLO client.example\r\n", "250 "),
            (b"MAIL FROM:<a@spf-pass.example>\r\n", "250 2.1.0"),
            (f"RCPT TO:<{ALICE}>\r\n".encode(), "250 2.1.5"),
            (bdat(DOTS, last=True), "250 2.0.0"),
            (b"NOOP\r\n", "250 2.0.0"),
        ],
        [DOTS],
        id="dots-and-bare-lf-are-content",
    ),
    pytest.param(
        [
            (b"EHLO client.example\r\n", "250 "),
            (bdat(b"MAIL FROM:<x@y.example>\r\n"), "503 5.5.1"),  # no transaction
            (b"NOOP\r\n", "250 2.0.0"),  # the chunk was read: still in sync
            (b"MAIL FROM:<a@spf-pass.example>\r\n", "250 2.1.0"),
            (bdat(b"RCPT TO:<bob@example.net>\r\n", last=True), "503 5.5.1"),  # no RCPT
            (f"RCPT TO:<{ALICE}>\r\n".encode(), "250 2.1.5"),
            (bdat(b"Subject: first\r\n\r\n"), "250 2.0.0"),
            (b"DATA\r\n", "503 5.5.1"),  # RFC 3030 section 2: no DATA after BDAT
            (b"RSET\r\n", "250 2.0.0"),  # discards the chunk
            (b"MAIL FROM:<a@spf-pass.example>\r\n", "250 2.1.0"),
            (f"RCPT TO:<{ALICE}>\r\n".encode(), "250 2.1.5"),
            (bdat(EXAMPLE_1, last=True), "250 2.0.0"),
        ],
        [EXAMPLE_1],
        id="sequence-rules-and-rset",
    ),
    pytest.param(
        [
            (b"EHLO client.example\r\n", "250 "),
            (b"MAIL FROM:<a@spf-pass.example> BODY=BINARYMIME\r\n", "250 2.1.0"),
            (f"RCPT TO:<{ALICE}>\r\n".encode(), "250 2.1.5"),
            (b"DATA\r\n", "503 5.5.1"),  # RFC 3030 section 3
            (b"MAIL FROM:<a@spf-pass.example> BODY=SIXBIT\r\n", "503 5.5.1"),
            (b"RSET\r\n", "250 2.0.0"),
            (b"MAIL FROM:<a@spf-pass.example> BODY=SIXBIT\r\n", "501 5.5.4"),
        ],
        [],
        id="binarymime-requires-bdat",
    ),
    pytest.param(
        [
            (b"EHLO client.example\r\n", "250 "),
            (b"MAIL FROM:<a@spf-pass.example> BODY=BINARYMIME\r\n", "250 2.1.0"),
            (f"RCPT TO:<{REMOTE}>\r\n".encode(), "554 5.7.1"),  # the MX relays nothing
            (b"RCPT TO:<fwd@example.net>\r\n", "550 5.6.3"),  # a forward would relay it
            (f"RCPT TO:<{BOB}>\r\n".encode(), "250 2.1.5"),
            (bdat(EXAMPLE_1, last=True), "250 2.0.0"),
        ],
        [],
        id="binarymime-not-relayed",
    ),
    pytest.param(
        [
            (b"HELO client.example\r\n", "250 "),
            (b"MAIL FROM:<a@spf-pass.example>\r\n", "250 2.1.0"),
            (f"RCPT TO:<{ALICE}>\r\n".encode(), "250 2.1.5"),
            (bdat(EXAMPLE_1, last=True), "503 5.5.1 BDAT requires EHLO"),
            (b"NOOP\r\n", "250 2.0.0"),
        ],
        [],
        id="bdat-needs-ehlo",
    ),
]


@pytest.mark.parametrize(("steps", "alice_gets"), TABLE)
async def test_bdat_dialogue(
    mta: Service, populated, steps: list[tuple[bytes, str]], alice_gets: list[bytes]
) -> None:
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        assert (await client.reply()).startswith("220 ")
        for sent, expected in steps:
            await client.send(sent)
            reply = (await client.reply()).splitlines()[-1]
            assert reply.startswith(expected), f"{sent[:60]!r}: {reply!r}, wanted {expected!r}"
    stored = await mailbox_messages(populated, ALICE)
    assert len(stored) == len(alice_gets)
    for copy, sent in zip(stored, alice_gets, strict=True):
        stored_text(copy, sent)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"BDAT -1\r\n", "501 5.5.4"),
        (b"BDAT 12x\r\n", "501 5.5.4"),
        (b"BDAT\r\n", "501 5.5.4"),
        (b"BDAT 10 FIRST\r\n", "501 5.5.4"),
        (b"BDAT 10 LAST EXTRA\r\n", "501 5.5.4"),
        ("BDAT \u0664\u0662\r\n".encode(), "501 5.5.4"),  # Arabic-Indic digits
        (b"BDAT -" + b"9" * 60_000 + b"\r\n", "501 5.5.4"),
        (b"BDAT " + b"0" * 400 + b"1 LAST\r\nx", "250 2.0.0"),  # leading zeros: size 1
    ],
)
async def test_hostile_chunk_sizes(mta: Service, line: bytes, expected: str) -> None:
    """A size that is not 1*DIGIT is refused at once, nothing of that size
    is allocated or read, and the connection is closed: where its chunk
    ends cannot be known."""
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<a@spf-pass.example>")
        await client.cmd(f"RCPT TO:<{ALICE}>")
        await client.send(line)
        reply = await client.reply()
        assert reply.startswith(expected), reply
        if expected.startswith("5"):
            assert await asyncio.wait_for(client.reader.read(), 5) == b""  # closed


@pytest.mark.parametrize(
    "line",
    [
        b"BDAT 99999999999999999999\r\n",
        b"BDAT " + b"9" * 400 + b" LAST\r\n",
        b"BDAT 1" + b"0" * 999 + b" LAST\r\n",  # a 1000-digit size
        b"BDAT " + b"9" * 60_000 + b" LAST\r\n",
    ],
)
async def test_sizes_past_any_connection_are_chunk_octets(mta: Service, line: bytes) -> None:
    """RFC 3030 section 2: the octets after a BDAT line are its chunk, however
    large the size (more than any client sends): what follows is never read
    as commands, no reply comes before the chunk's end, and the session ends
    when the client does, with no reply at all."""
    rng = random.Random()
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<a@spf-pass.example>")
        await client.cmd(f"RCPT TO:<{ALICE}>")
        await client.send(line + rng.randbytes(rng.randrange(1, 300_000)) + b"\r\nNOOP\r\n")
        client.writer.write_eof()
        assert await asyncio.wait_for(client.reader.read(), 30) == b""


async def test_chunk_over_limit_is_read_and_discarded(
    settings: Settings, populated, tls_context
) -> None:
    """RFC 3030 section 2: "If a failure occurs after a BDAT command is
    received, the receiver-SMTP MUST accept and discard the associated
    message data before sending the appropriate 5XX or 4XX code." A chunk
    larger than server.max_message_size on its own (random binary octets
    with command lines inside) is read to its end, then refused 552 5.3.4;
    the transaction has failed, so chunks of it already pipelined (more than
    smtp.max_errors of them: they repeat one error) are read, discarded and
    refused too; RSET (RFC 3030 section 2) clears it and the next
    transaction on the same connection is stored byte for byte."""
    rng = random.Random()
    limit = settings.server.max_message_size = rng.randrange(100_000, 300_000)
    pipelined = settings.smtp.max_errors + rng.randrange(1, 5)
    commands = f"\r\nRSET\r\nMAIL FROM:<x@spf-pass.example>\r\nRCPT TO:<{ALICE}>\r\n"
    big = (
        rng.randbytes(rng.randrange(limit + 1, 4 * limit)) + commands.encode() + b"BDAT 1 LAST\r\n"
    )
    async with (
        service(settings, populated, tls_context) as mta,
        await SmtpDialogue.open(mta.port("mx")) as client,
    ):
        await client.reply()
        await client.cmd("EHLO client.example")
        for end in (b"RSET\r\n", bdat(b"end", last=True)):
            await client.send(
                b"MAIL FROM:<a@spf-pass.example> BODY=BINARYMIME\r\n"
                + f"RCPT TO:<{ALICE}>\r\n".encode()
                + bdat(big)
                + b"".join(bdat(rng.randbytes(rng.randrange(0, 1000))) for _ in range(pipelined))
                + end
                + b"NOOP\r\n"
            )
            replies = [await client.reply(timeout=60) for _ in range(5 + pipelined)]
            assert [r[:9] for r in replies] == [
                "250 2.1.0",
                "250 2.1.5",
                "552 5.3.4",
                *["552 5.3.4"] * pipelined,
                "250 2.0.0" if end.startswith(b"RSET") else "552 5.3.4",
                "250 2.0.0",
            ], replies
            assert (await client.cmd(f"RCPT TO:<{ALICE}>")).startswith("503")  # ended
            assert spool_files(settings) == []
        content = random_binary_message(rng, rng.randrange(1, limit // 2))
        await deliver_in_one_chunk(client, content)
    [stored] = await mailbox_messages(populated, ALICE)
    stored_text(stored, content)
    assert spool_files(settings) == []


async def test_size_limit_as_chunks_arrive(settings: Settings, populated, tls_context) -> None:
    """A message growing past server.max_message_size in chunks: 552 on the
    chunk that crossed it, later chunks already pipelined are read and
    discarded (RFC 3030 section 2), the session stays in sync and the next
    transaction goes through; nothing is stored of the refused one."""
    rng = random.Random()
    limit = settings.server.max_message_size = rng.randrange(200_000, 400_000)
    piece = rng.randbytes(limit // 2 + 1)
    async with (
        service(settings, populated, tls_context) as mta,
        await SmtpDialogue.open(mta.port("mx")) as client,
    ):
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.send(
            b"MAIL FROM:<a@spf-pass.example> BODY=BINARYMIME\r\n"
            + f"RCPT TO:<{ALICE}>\r\n".encode()
            + bdat(piece)
            + bdat(piece)  # crosses the limit
            + bdat(b"more")
            + bdat(b"end", last=True)
            + b"NOOP\r\n"
        )
        replies = [await client.reply(timeout=60) for _ in range(7)]
        assert [r[:9] for r in replies] == [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0",
            "552 5.3.4",
            "552 5.3.4",
            "552 5.3.4",
            "250 2.0.0",
        ], replies
        assert (await client.cmd("RCPT TO:<alice@example.net>")).startswith("503")  # reset
        await deliver_in_one_chunk(client, EXAMPLE_1)
    [stored] = await mailbox_messages(populated, ALICE)
    stored_text(stored, EXAMPLE_1)
    assert spool_files(settings) == []


def random_binary_message(rng: random.Random, size: int) -> bytes:
    """A MIME message whose body is ``size`` random octets (BINARYMIME):
    CR, LF, NUL, ``.`` lines and 8-bit octets anywhere."""
    header = (
        b"From: someone@spf-pass.example\r\nTo: alice@example.net\r\n"
        b"Subject: binary\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    )
    return header + rng.randbytes(size)


def cut(rng: random.Random, data: bytes, pieces: int) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), pieces - 1))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.mark.parametrize("size", [10, 5_000, 300_000, 2_500_000])
async def test_binary_chunks_pipelined_byte_exact(
    mta: Service, settings: Settings, populated, size: int
) -> None:
    """Random octets in chunks of random sizes, every command and chunk sent
    in one write (PIPELINING): each chunk gets its 250 in order, and the
    stored copy ends with exactly the octets sent. Past the spool threshold
    the message went through a spool file, removed afterwards."""
    rng = random.Random()
    content = random_binary_message(rng, rng.randrange(size, size * 2))
    chunks = cut(rng, content, rng.randrange(2, 9))
    wire = b"MAIL FROM:<someone@spf-pass.example> BODY=BINARYMIME\r\n" + (
        f"RCPT TO:<{ALICE}>\r\n".encode()
    )
    wire += b"".join(bdat(c) for c in chunks[:-1]) + bdat(chunks[-1], last=True)
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.send(wire)
        replies = [await client.reply(timeout=60) for _ in range(2 + len(chunks))]
        assert all(r.startswith("250 ") for r in replies), replies
        for chunk, reply in zip(chunks[:-1], replies[2:], strict=False):
            assert f"{len(chunk)} octets" in reply
    [stored] = await mailbox_messages(populated, ALICE)
    stored_text(stored, content)
    assert spool_files(settings) == []


async def test_client_gone_between_chunks_leaves_no_spool(
    mta: Service, settings: Settings, populated
) -> None:
    """A client that sends chunks past the spool threshold and goes away (in
    the middle of a chunk, or between chunks) leaves no spool file and no
    message."""
    rng = random.Random()
    for tail in (b"BDAT 100000\r\nonly part", b""):
        async with await SmtpDialogue.open(mta.port("mx")) as client:
            await client.reply()
            await client.cmd("EHLO client.example")
            await client.cmd("MAIL FROM:<a@spf-pass.example>")
            await client.cmd(f"RCPT TO:<{ALICE}>")
            await client.send(bdat(rng.randbytes(THRESHOLD * 3)))
            assert (await client.reply()).startswith("250 2.0.0")
            assert spool_files(settings), "the chunk should be spooled"
            await client.send(tail)
        for _ in range(50):
            if not spool_files(settings):
                break
            await asyncio.sleep(0.1)
        assert spool_files(settings) == []
    assert await mailbox_messages(populated, ALICE) == []


async def test_starttls_discards_pipelined_bdat(mta: Service, client_tls_context) -> None:
    """RFC 3207 section 4.2 with BDAT: a transaction and its chunk pipelined
    after STARTTLS in plaintext are gone once TLS is up."""
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.send(
            b"EHLO client.example\r\nSTARTTLS\r\nMAIL FROM:<injected@spf-pass.example>\r\n"
            + f"RCPT TO:<{ALICE}>\r\n".encode()
            + bdat(EXAMPLE_1)
        )
        assert (await client.reply()).startswith("250")
        assert (await client.reply()).startswith("220 2.0.0")
        await client.starttls(client_tls_context)
        assert (await client.cmd("EHLO client.example")).startswith("250")
        assert (await client.cmd("BDAT 0 LAST")).startswith("503 5.5.1")


def _smtplib_bdat(port: int, chunks: list[bytes]) -> tuple[tuple[int, bytes], list]:
    """smtplib has no BDAT: its EHLO/MAIL/RCPT, then the chunks as raw
    octets on its socket and its reply reader."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as smtp:
        code, _ = smtp.ehlo()
        assert code == 250 and smtp.has_extn("chunking") and smtp.has_extn("binarymime")
        assert smtp.mail("someone@spf-pass.example", ["BODY=BINARYMIME"])[0] == 250
        assert smtp.rcpt(ALICE)[0] == 250
        smtp.send(b"".join(bdat(c, last=i == len(chunks) - 1) for i, c in enumerate(chunks)))
        replies = [smtp.getreply() for _ in chunks]
        return replies[-1], replies


async def test_smtplib_with_raw_bdat(mta: Service, populated) -> None:
    rng = random.Random()
    content = random_binary_message(rng, rng.randrange(1_000, 200_000))
    chunks = cut(rng, content, 3)
    last, replies = await asyncio.to_thread(_smtplib_bdat, mta.port("mx"), chunks)
    assert [code for code, _ in replies] == [250, 250, 250]
    assert last[1].startswith(b"2.0.0 OK: queued as ")
    [stored] = await mailbox_messages(populated, ALICE)
    stored_text(stored, content)

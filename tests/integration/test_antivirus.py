"""Anti-virus on the SMTP entry points, through a real clamd (tests/clamdserver.py)
whose database the suite builds from the EICAR test file.

EICAR in a plain body, in a base64 attachment and inside a zip is refused at
the end of DATA on the MX (554 5.7.1 naming the signature, RFC 5321 section
4.2.5, RFC 3463 X.7.1) and on submission, and nothing is stored; clean mail
of random content and size is stored byte-exact, spooled or not; clamd down
is 451 4.7.1 with the default on_error and nothing stored, or with
on_error = "accept" a delivery marked as not scanned.
"""

from __future__ import annotations

import asyncio
import io
import random
import smtplib
import ssl
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from conf.settings import Settings
from delivery.checks_clamd import ClamdClient, ClamdError
from mtad.service import Service
from tests.clamdserver import EICAR, SIGNATURE_PREFIX, ClamdServer, clamd  # noqa: F401
from tests.conftest import make_settings
from tests.dnsserver import DnsServer
from tests.protocol.smtp.conftest import (  # noqa: F401
    dkim_key,
    dns,
    mta,
    populated,
    populated_template,
)
from tests.protocol.smtp.support import (
    ALICE,
    ALICE_PW,
    BOB,
    SmtpDialogue,
    mailbox_messages,
)

SPOOL_AT = 64 * 1024
TCP = "tcp"  # in av_overrides: clamd's TCP socket instead of its Unix socket


@pytest.fixture
def av_overrides() -> dict:
    """Override (parametrize) to change [antivirus] for a test."""
    return {}


@pytest.fixture
def settings(
    tmp_path: Path, dns: DnsServer, clamd: ClamdServer, av_overrides: dict  # noqa: F811
) -> Settings:
    antivirus = {"enabled": True, "clamd_socket": clamd.socket_path, **av_overrides}
    if antivirus["clamd_socket"] == TCP:
        antivirus["clamd_socket"] = clamd.tcp_address
    return make_settings(
        tmp_path / "data",
        dns=dns.settings(),
        smtp={"spool_threshold": SPOOL_AT},
        antivirus=antivirus,
    )


def crlf(msg: EmailMessage) -> bytes:
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def infected(kind: str, padding: int = 0) -> bytes:
    """A message carrying EICAR: in the text itself, as a base64 attachment,
    or as a deflated member of a zipped attachment; ``padding`` octets of
    random base64 text after it (to make it spool)."""
    msg = EmailMessage()
    msg["From"] = "someone@unlisted.example"
    msg["To"] = ALICE
    msg["Subject"] = f"eicar {kind}"
    if kind == "plain":
        msg.set_content(b"Hello,\n" + EICAR + b"\nbye\n", "text", "plain", cte="7bit")
    else:
        msg.set_content("See the attachment.\n")
        if kind == "base64":
            msg.add_attachment(EICAR, "application", "octet-stream", filename="eicar.com")
        else:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("inner/eicar.com", EICAR)
            assert EICAR not in buf.getvalue()  # clamd must unpack it to find it
            msg.add_attachment(buf.getvalue(), "application", "zip", filename="files.zip")
    if padding:
        msg.add_attachment(random.randbytes(padding), "application", "octet-stream",
                           filename="pad.bin")
    raw = crlf(msg)
    assert kind == "plain" or EICAR not in raw  # encoded: clamd decodes MIME
    return raw


def random_clean(size: int, rng: random.Random) -> bytes:
    """A message of about ``size`` octets of random printable lines, some
    starting with a dot (SMTP transparency) or holding 8-bit octets."""
    head = (f"From: someone@unlisted.example\r\nTo: {ALICE}\r\n"
            f"Subject: clean {size}\r\n\r\n").encode()
    lines = [head]
    total = len(head)
    alphabet = bytes(range(0x20, 0x7F)) + bytes(range(0xA0, 0x100))
    while total < size:
        line = bytes(rng.choices(alphabet, k=rng.randrange(0, 900)))
        if rng.random() < 0.05:
            line = b"." + line
        lines.append(line + b"\r\n")
        total += len(line) + 2
    return b"".join(lines)


def dot_stuffed(body: bytes) -> bytes:
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in body.split(b"\r\n"))


async def send_mx(port: int, body: bytes, rcpt: str = ALICE, source: str | None = None) -> str:
    async with await SmtpDialogue.open(port, source=source) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        assert (await client.cmd("MAIL FROM:<someone@unlisted.example> BODY=8BITMIME")).startswith(
            "250"
        )
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(dot_stuffed(body) + b".\r\n")
        reply = await client.reply(timeout=60)
        assert (await client.cmd("QUIT")).startswith("221")  # the session goes on
        return reply


@pytest.mark.parametrize("padding", [0, 3 * SPOOL_AT], ids=["memory", "spooled"])
@pytest.mark.parametrize("kind", ["plain", "base64", "zip"])
async def test_mx_refuses_eicar_at_end_of_data(
    mta: Service, populated, kind: str, padding: int  # noqa: F811
) -> None:
    reply = await send_mx(mta.port("mx"), infected(kind, padding))
    assert reply.startswith("554 5.7.1 "), reply
    assert SIGNATURE_PREFIX in reply, reply
    assert await mailbox_messages(populated, ALICE) == []
    assert await mailbox_messages(populated, ALICE, "Junk") == []


@pytest.mark.parametrize("seed", range(3))
async def test_mx_stores_clean_mail_byte_exact(mta: Service, populated, seed: int) -> None:  # noqa: F811
    rng = random.Random(seed)
    sizes = [rng.randrange(100, 5000), rng.randrange(SPOOL_AT, 4 * SPOOL_AT)]
    bodies = [random_clean(size, rng) for size in sizes]
    for body in bodies:
        reply = await send_mx(mta.port("mx"), body)
        assert reply.startswith("250 2.0.0"), reply
    stored = await mailbox_messages(populated, ALICE)
    assert len(stored) == len(bodies)
    for raw, body in zip(stored, bodies, strict=True):
        assert raw.endswith(body)
        assert b"X-Virus-Scanned" not in raw[: len(raw) - len(body)]


def submit(port: int, context: ssl.SSLContext, body: bytes) -> tuple[int, bytes]:
    """Authenticated submission with smtplib (STARTTLS, AUTH PLAIN); the
    reply to the end of DATA."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=60) as smtp:
        smtp.ehlo()
        smtp.starttls(context=context)
        smtp.ehlo()
        smtp.login(ALICE, ALICE_PW)
        try:
            smtp.sendmail(ALICE, [BOB], body)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        return 250, b""


@pytest.mark.parametrize("kind", ["plain", "base64", "zip"])
async def test_submission_refuses_eicar(
    mta: Service, populated, client_tls_context, kind: str  # noqa: F811
) -> None:
    body = infected(kind).replace(b"From: someone@unlisted.example", f"From: {ALICE}".encode())
    code, text = await asyncio.to_thread(submit, mta.port("submission"), client_tls_context, body)
    assert code == 554 and text.startswith(b"5.7.1 "), (code, text)
    assert SIGNATURE_PREFIX.encode() in text
    assert await mailbox_messages(populated, BOB) == []
    assert await mailbox_messages(populated, ALICE, "Sent") == []


async def test_submission_passes_clean_mail(
    mta: Service, populated, client_tls_context  # noqa: F811
) -> None:
    body = random_clean(20_000, random.Random(7)).replace(
        b"From: someone@unlisted.example", f"From: {ALICE}".encode()
    )
    code, _ = await asyncio.to_thread(submit, mta.port("submission"), client_tls_context, body)
    assert code == 250
    [raw] = await mailbox_messages(populated, BOB)
    assert raw.endswith(body)


async def test_clamd_down_is_451_and_nothing_stored(
    mta: Service, populated, clamd: ClamdServer  # noqa: F811
) -> None:
    body = random_clean(3000, random.Random(11))
    clamd.pause()
    try:
        reply = await send_mx(mta.port("mx"), body)
        assert reply.startswith("451 4.7.1 "), reply
        assert await mailbox_messages(populated, ALICE) == []
    finally:
        clamd.resume()
    reply = await send_mx(mta.port("mx"), body)  # the sender's retry, once clamd is back
    assert reply.startswith("250 2.0.0"), reply
    [raw] = await mailbox_messages(populated, ALICE)
    assert raw.endswith(body)


@pytest.mark.parametrize("av_overrides", [{"clamd_socket": TCP}])
async def test_clamd_over_tcp(mta: Service, populated, av_overrides: dict) -> None:  # noqa: F811
    assert mta.context.settings.antivirus.clamd_socket.startswith("127.0.0.1:")
    reply = await send_mx(mta.port("mx"), infected("zip"))
    assert reply.startswith("554 5.7.1 ") and SIGNATURE_PREFIX in reply, reply
    body = random_clean(5000, random.Random(3))
    assert (await send_mx(mta.port("mx"), body)).startswith("250 2.0.0")
    [raw] = await mailbox_messages(populated, ALICE)
    assert raw.endswith(body)


@pytest.mark.parametrize("av_overrides", [{"on_error": "accept"}])
async def test_on_error_accept_delivers_marked_not_scanned(
    mta: Service, populated, clamd: ClamdServer, av_overrides: dict  # noqa: F811
) -> None:
    body = random_clean(3000, random.Random(13))
    clamd.pause()
    try:
        reply = await send_mx(mta.port("mx"), body)
    finally:
        clamd.resume()
    assert reply.startswith("250 2.0.0"), reply
    [raw] = await mailbox_messages(populated, ALICE)
    assert raw.endswith(body)
    trace = raw[: len(raw) - len(body)]
    assert trace.count(b"\r\nX-Virus-Scanned: no, scanner unavailable at mail.test\r\n") == 1


async def test_a_stuck_clamd_costs_only_its_own_scans(clamd: ClamdServer) -> None:  # noqa: F811
    """A clamd that accepts and never answers: its scan ends at the timeout
    with an error, while scans on the real clamd started after it all finish
    first with the right verdicts."""
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.transport.abort()

    stuck = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = stuck.sockets[0].getsockname()[1]
    finished: list[str] = []

    async def hostile() -> None:
        with pytest.raises(ClamdError, match="no answer"):
            await ClamdClient(f"127.0.0.1:{port}", 5.0).scan(infected("zip"))
        finished.append("hostile")

    async def real(n: int) -> None:
        found = await ClamdClient(clamd.socket_path, 30).scan(infected("base64"))
        assert found is not None and found.startswith(SIGNATURE_PREFIX)
        assert await ClamdClient(clamd.tcp_address, 30).scan(random_clean(9000, rng)) is None
        finished.append(f"real{n}")

    rng = random.Random(17)
    try:
        task = asyncio.ensure_future(hostile())
        await asyncio.sleep(0)
        await asyncio.gather(*(real(n) for n in range(4)))
        assert not task.done()
        await task
    finally:
        stuck.close()
    assert finished[-1] == "hostile" and len(finished) == 5

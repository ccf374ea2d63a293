"""SMTP dialogues on the wire, as tables of client lines and expected replies.

Each step is (client line, expected reply prefix). Runs against a real mtad
service on loopback, with a raw client so every byte is under the test's
control (pipelining, bare LF, STARTTLS buffering).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from delivery.srs import srs_of
from mtad.service import Service, start
from tests.protocol.smtp.support import (
    ALICE,
    ALICE_PW,
    BOB,
    CATCHALL_DOMAIN,
    FORWARD,
    REMOTE,
    TEAM,
    SmtpDialogue,
    auth_plain,
    mailbox_messages,
    message,
)


async def run(port: int, steps: list[tuple[str, str]], tls=None) -> list[str]:
    """Play ``steps`` after the greeting; assert each reply starts as expected."""
    got = []
    async with await SmtpDialogue.open(port, tls) as client:
        greeting = await client.reply()
        assert greeting.startswith("220 mail.test ESMTP"), greeting
        for line, expected in steps:
            reply = await client.cmd(line)
            got.append(reply)
            last = reply.splitlines()[-1]
            assert last.startswith(expected), f"{line!r}: {reply!r}, wanted {expected!r}"
    return got


@pytest.fixture
def mta_with(
    settings, populated, tls_context
) -> Callable[..., AbstractAsyncContextManager[Service]]:
    """``async with mta_with(max_errors=3) as service``: an mtad whose
    ``[smtp]`` settings are changed as given, closed at the end."""

    @contextlib.asynccontextmanager
    async def started(**smtp: object) -> AsyncIterator[Service]:
        for key, value in smtp.items():
            setattr(settings.smtp, key, value)
        service = await start(settings, populated, tls_context)
        try:
            yield service
        finally:
            await service.close()

    return started


async def open_data(client: SmtpDialogue) -> None:
    """Greeting, EHLO, a sender and ALICE as recipient, then DATA: the client
    may send the message."""
    await client.reply()
    await client.cmd("EHLO c.example")
    await client.cmd("MAIL FROM:<a@spf-pass.example>")
    await client.cmd(f"RCPT TO:<{ALICE}>")
    await client.cmd("DATA")


MX_TABLE = [
    pytest.param(
        [("MAIL FROM:<a@spf-pass.example>", "503 5.5.1")],
        id="mail-before-ehlo",
    ),
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("RCPT TO:<alice@example.net>", "503 5.5.1"),
        ],
        id="rcpt-before-mail",
    ),
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("MAIL FROM:<a@spf-pass.example>", "250 2.1.0"),
            ("DATA", "503 5.5.1"),
        ],
        id="data-before-rcpt",
    ),
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("MAIL FROM:<a@spf-pass.example>", "250 2.1.0"),
            ("RCPT TO:<nobody@example.net>", "550 5.1.1"),
            ("RCPT TO:<x@elsewhere.example>", "554 5.7.1"),
            ("RCPT TO:<alice@example.net>", "250 2.1.5"),
            ("RCPT TO:<alice+tag@example.net>", "250 2.1.5"),
            (f"RCPT TO:<{TEAM}>", "250 2.1.5"),
            (f"RCPT TO:<anything@{CATCHALL_DOMAIN}>", "250 2.1.5"),
            ("MAIL FROM:<b@spf-pass.example>", "503 5.5.1"),
            ("RSET", "250 2.0.0"),
            ("RCPT TO:<alice@example.net>", "503 5.5.1"),
            ("QUIT", "221 2.0.0"),
        ],
        id="recipients",
    ),
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("MAIL FROM:<>", "250 2.1.0"),
            ("RCPT TO:<>", "501 5.1.3"),
            ("RCPT TO:alice@example.net", "501 5.1.3"),
            ("RCPT TO:<alice@example.net> XFOO=BAR", "555 5.5.4"),
            ("MAIL FROM:<a@b.example>", "503 5.5.1"),
        ],
        id="null-sender-and-syntax",
    ),
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("MAIL FROM:<a@spf-pass.example> SIZE=999999999999", "552 5.3.4"),
            ("MAIL FROM:<a@spf-pass.example> BODY=SIXBIT", "501 5.5.4"),
            ("MAIL FROM:<a@spf-pass.example> FOO=BAR", "555 5.5.4"),
            ("MAIL FROM:<ü@spf-pass.example>", "553 5.6.7"),
            ("MAIL FROM:<ü@spf-pass.example> SMTPUTF8", "250 2.1.0"),
            ("RCPT TO:<alice@example.net>", "250 2.1.5"),
        ],
        id="mail-parameters",
    ),
    pytest.param(
        [
            ("EHLO client.example", "250 "),
            ("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW), "502 5.5.1"),
            ("VRFY alice@example.net", "252 2.1.5"),
            ("NOOP", "250 2.0.0"),
            ("BOGUS", "500 5.5.2"),
            ("X" * 600, "500 5.5.2"),
        ],
        id="no-auth-on-mx-and-misc",
    ),
]


@pytest.mark.parametrize("steps", MX_TABLE)
async def test_mx_dialogue(mta: Service, steps: list[tuple[str, str]]) -> None:
    await run(mta.port("mx"), steps)


# Lines as raw bytes (CRLF added unless the line carries its own ending):
# invalid UTF-8, address literals and bare line endings (issue #18).
RAW_TABLE = [
    pytest.param(
        [
            (b"EHLO client.example", "250 "),
            (b"MAIL FROM:<\xff@spf-pass.example> SMTPUTF8", "501 5.1.7"),
            (b"MAIL FROM:<a@spf-pass.example> SIZE=\xc3", "501 5.1.7"),
            ("MAIL FROM:<\u00fc@spf-pass.example> SMTPUTF8".encode(), "250 2.1.0"),
            (b"RCPT TO:<alice@exam\xe9ple.net>", "501 5.1.3"),
            (b"RCPT TO:<\xed\xa0\x80@example.net>", "501 5.1.3"),
            (b"RCPT TO:<alice@example.net>", "250 2.1.5"),
        ],
        id="invalid-utf8",
    ),
    pytest.param(
        [
            (b"EHLO client.example", "250 "),
            (b"MAIL FROM:<u@[1<2]>", "501 5.1.7"),
            (b"MAIL FROM:<a@spf-pass.example>", "250 2.1.0"),
            (b"RCPT TO:<u@[1<2]>", "501 5.1.3"),
            (b"RCPT TO:<u@[300.0.0.1]>", "501 5.1.3"),
        ],
        id="address-literals",
    ),
    pytest.param(
        [
            (b"EHLO client.example\n", "500 5.5.2 Bare LF"),
            (b"EHLO client.example\r\r\n", "500 5.5.2 Bare CR"),
            (b"EHLO client.example", "250 "),
            (b"MAIL FROM:<a@spf-pass.example>\n", "500 5.5.2 Bare LF"),
            (b"RCPT TO:<alice@example.net>", "503 5.5.1"),  # the MAIL was not run
            (b"MAIL FROM:<a@spf-pass.example>\rRCPT TO:<bob@example.net>", "500 5.5.2"),
            (b"RCPT TO:<alice@example.net>", "503 5.5.1"),
            (b"NOOP", "250 2.0.0"),
        ],
        id="bare-line-endings",
    ),
    pytest.param(
        [(b"EHLO \xff\xfe.example", "250 "), (b"HELO \xc3", "250 ")],
        id="invalid-utf8-helo-echo",
    ),
]


@pytest.mark.parametrize("steps", RAW_TABLE)
async def test_mx_raw_dialogue(mta: Service, steps: list[tuple[bytes, str]]) -> None:
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        assert (await client.reply()).startswith("220 ")
        for line, expected in steps:
            await client.send(line if line.endswith(b"\n") else line + b"\r\n")
            reply = (await client.reply()).splitlines()[-1]
            assert reply.startswith(expected), f"{line!r}: {reply!r}, wanted {expected!r}"
        assert (await client.cmd("QUIT")).startswith("221")  # the session survived


async def test_ehlo_advertises_extensions(mta: Service) -> None:
    [reply] = await run(mta.port("mx"), [("EHLO client.example", "250 ")])
    lines = [line[4:] for line in reply.splitlines()]
    assert lines[0].startswith("mail.test")
    for ext in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS",
                "CHUNKING", "BINARYMIME"):
        assert ext in lines
    assert f"SIZE {25 * 1024 * 1024}" in lines  # server.max_message_size: 25 MiB (issue #21)
    assert not any(line.startswith("AUTH") for line in lines)  # not on the MX


async def test_submission_requires_tls_then_auth(mta: Service, client_tls_context) -> None:
    port = mta.port("submission")
    async with await SmtpDialogue.open(port) as client:
        await client.reply()
        ehlo = await client.cmd("EHLO client.example")
        assert "STARTTLS" in ehlo and "AUTH" not in ehlo
        assert (await client.cmd("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW))).startswith(
            "538 5.7.11"
        )
        assert (await client.cmd(f"MAIL FROM:<{ALICE}>")).startswith("530 5.7.0")
        assert (await client.cmd("STARTTLS")).startswith("220 2.0.0")
        await client.starttls(client_tls_context)
        ehlo = await client.cmd("EHLO client.example")
        assert "AUTH PLAIN LOGIN" in ehlo and "STARTTLS" not in ehlo
        assert (await client.cmd(f"MAIL FROM:<{ALICE}>")).startswith("530 5.7.0")
        bad = await client.cmd("AUTH PLAIN " + auth_plain(ALICE, "wrong"))
        assert bad.startswith("535 5.7.8")
        ok = await client.cmd("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW))
        assert ok.startswith("235 2.7.0")
        assert (await client.cmd("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW))).startswith("503")
        assert (await client.cmd(f"MAIL FROM:<{BOB}>")).startswith("553 5.7.1")
        assert (await client.cmd("MAIL FROM:<bob+x@example.net>")).startswith("553 5.7.1")
        assert (await client.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250 2.1.0")


async def test_auth_login_challenges(mta: Service, client_tls_context) -> None:
    import base64

    async with await SmtpDialogue.open(mta.port("submissions"), client_tls_context) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        assert (await client.cmd("AUTH LOGIN")) == "334 " + base64.b64encode(b"Username:").decode()
        assert (await client.cmd(base64.b64encode(ALICE.encode()).decode())).startswith("334 ")
        assert (await client.cmd(base64.b64encode(ALICE_PW.encode()).decode())).startswith("235")
        # "*" cancels an exchange (RFC 4954 section 4); bad base64 is a 501.
    async with await SmtpDialogue.open(mta.port("submissions"), client_tls_context) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        assert (await client.cmd("AUTH PLAIN")) == "334 "
        assert (await client.cmd("*")).startswith("501")
        assert (await client.cmd("AUTH PLAIN !!!notbase64")).startswith("501 5.5.2")


async def test_pipelined_transaction_delivers(mta: Service, populated) -> None:
    body = message(subject="Pipelined")
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        # RFC 2920: the whole transaction in one write.
        await client.send(
            "MAIL FROM:<someone@spf-pass.example>\r\n"
            f"RCPT TO:<{ALICE}>\r\nRCPT TO:<nobody@example.net>\r\nRCPT TO:<{TEAM}>\r\nDATA\r\n"
        )
        replies = [await client.reply() for _ in range(5)]
        assert [r[:9] for r in replies] == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5",
                                            "354 End d"]
        await client.send(body + b".\r\nQUIT\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
        assert (await client.reply()).startswith("221 2.0.0")
    alice = await mailbox_messages(populated, ALICE)
    bob = await mailbox_messages(populated, BOB)
    assert len(alice) == 1 and len(bob) == 1  # the alias reached both, alice once
    assert alice[0].startswith(b"Return-Path: <someone@spf-pass.example>\r\n")
    assert b"Received: from client.example ([127.0.0.1])" in alice[0]
    assert alice[0].endswith(body)


async def test_forward_alias_is_queued(mta: Service, populated) -> None:
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<someone@spf-pass.example>")
        assert (await client.cmd(f"RCPT TO:<{FORWARD}>")).startswith("250")
        await client.cmd("DATA")
        await client.send(message(to=FORWARD) + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
    [queued] = await populated.queue.list()
    # Forwarded out with an SRS reverse-path of ours (delivery/srs.py) that
    # gives the original sender back.
    assert queued.sender.startswith("SRS0=") and queued.sender.endswith("@example.net")
    srs = await srs_of(mta.context.settings, populated)
    assert srs is not None and srs.reverse(queued.sender) == "someone@spf-pass.example"
    assert [r.address for r in queued.recipients] == [REMOTE]
    raw = await populated.blobs.get(queued.blob_key)
    assert not raw.startswith(b"Return-Path:")  # only final delivery adds it
    assert raw.endswith(message(to=FORWARD))


async def _queued_recipients(storage) -> list[str]:
    return [r.address for m in await storage.queue.list() for r in m.recipients]


async def test_dot_stuffing_and_8bit(mta: Service, populated) -> None:
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<someone@spf-pass.example> BODY=8BITMIME")
        await client.cmd(f"RCPT TO:<{ALICE}>")
        await client.cmd("DATA")
        await client.send(
            b"Subject: dots\r\n\r\n..leading dot\r\n.\r\nfoo\r\n".replace(b".\r\nfoo", b"x\r\nfoo")
            + "caf\u00e9\r\n".encode()
            + b".\r\n"
        )
        assert (await client.reply()).startswith("250 2.0.0")
    [raw] = await mailbox_messages(populated, ALICE)
    assert raw.endswith(b"\r\n.leading dot\r\nx\r\nfoo\r\ncaf\xc3\xa9\r\n")


async def test_data_read_in_runs_and_line_by_line_is_byte_exact(mta: Service, populated) -> None:
    """The session reads DATA in runs of lines up to each ".CRLF", and line
    by line once a run outgrows its reader (a big message with no line
    ending in a dot): both give the same bytes, and a command the client
    sends right behind the end of data is still read as a command."""
    big = b"Subject: big\r\n\r\n" + b"".join(b"line %05d of text\r\n" % i for i in range(3000))
    dotty = (
        b"Subject: dots\r\n\r\nEnds in a dot.\r\n..stuffed\r\n...two\r\n.x.\r\n"
        + b"".join(b"Sentence %d.\r\n" % i for i in range(200))
    )
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        for body in (big, dotty):
            await client.cmd("MAIL FROM:<someone@spf-pass.example>")
            await client.cmd(f"RCPT TO:<{ALICE}>")
            assert (await client.cmd("DATA")).startswith("354")
            await client.send(body + b".\r\nNOOP\r\n")
            assert (await client.reply()).startswith("250 2.0.0")
            assert (await client.reply()).startswith("250 2.0.0")  # the NOOP
    stored = await mailbox_messages(populated, ALICE)
    assert len(stored) == 2
    assert stored[0].endswith(big[len(b"Subject: big\r\n") :])
    unstuffed = dotty.replace(b"\r\n..", b"\r\n.").replace(b"\r\n.x.", b"\r\nx.")
    assert stored[1].endswith(unstuffed[len(b"Subject: dots\r\n") :])


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"],
    ids=["lf-dot-lf", "crlf-dot-lf", "lf-dot-crlf", "cr-dot-crlf"],
)
async def test_bare_lf_smuggling_refused(mta: Service, populated, smuggle: bytes) -> None:
    """RFC 5321 section 2.3.8: only CRLF.CRLF ends DATA; a message with a bare
    LF/CR is refused and the smuggled transaction is never executed."""
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.cmd("EHLO client.example")
        await client.cmd("MAIL FROM:<someone@spf-pass.example>")
        await client.cmd(f"RCPT TO:<{ALICE}>")
        assert (await client.cmd("DATA")).startswith("354")
        await client.send(
            b"Subject: innocent\r\n\r\nhello"
            + smuggle
            + b"MAIL FROM:<admin@spf-pass.example>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
            + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
        )
        reply = await client.reply()
        assert reply.startswith("550 5.6.0"), reply
        # Exactly one reply: nothing else was executed.
        assert (await client.cmd("NOOP")).startswith("250 2.0.0")
    assert await mailbox_messages(populated, ALICE) == []
    assert await mailbox_messages(populated, BOB) == []


async def test_starttls_discards_plaintext_buffer(mta: Service, client_tls_context) -> None:
    """RFC 3207 section 4.2: commands pipelined after STARTTLS in plaintext
    must not be executed in the TLS session."""
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        await client.send(
            "EHLO client.example\r\nSTARTTLS\r\nMAIL FROM:<injected@spf-pass.example>\r\n"
        )
        assert (await client.reply()).startswith("250")
        assert (await client.reply()).startswith("220 2.0.0")
        await client.starttls(client_tls_context)
        assert (await client.cmd("EHLO client.example")).startswith("250")
        # Had the injected MAIL survived, this would be 250.
        assert (await client.cmd(f"RCPT TO:<{ALICE}>")).startswith("503 5.5.1")
        assert (await client.cmd("MAIL FROM:<a@spf-pass.example>")).startswith("250 2.1.0")


async def test_implicit_tls_submission(mta: Service, client_tls_context, populated) -> None:
    async with await SmtpDialogue.open(mta.port("submissions"), client_tls_context) as client:
        await client.reply()
        ehlo = await client.cmd("EHLO client.example")
        assert "AUTH PLAIN LOGIN" in ehlo and "STARTTLS" not in ehlo
        assert (await client.cmd("STARTTLS")).startswith("503")
        assert (await client.cmd("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW))).startswith("235")
        assert (await client.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250")
        assert (await client.cmd(f"RCPT TO:<{BOB}>")).startswith("250")
        assert (await client.cmd(f"RCPT TO:<{REMOTE}>")).startswith("250")
        assert (await client.cmd("RCPT TO:<ghost@example.net>")).startswith("550 5.1.1")
        await client.cmd("DATA")
        await client.send(message(sender=ALICE, to=BOB) + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
    [inbox] = await mailbox_messages(populated, BOB)
    assert b"with ESMTPSA" in inbox
    assert inbox.startswith(b"Return-Path: <alice@example.net>")
    # Mail clients file their own Sent copy: none from the server by default.
    assert await mailbox_entries_flags(populated, ALICE, "Sent") == []
    assert REMOTE in await _queued_recipients(populated)


async def test_sent_copy_when_configured(mta_with, populated, client_tls_context) -> None:
    async with mta_with(save_sent_copy=True) as service:
        async with await SmtpDialogue.open(service.port("submissions"), client_tls_context) as c:
            await c.reply()
            await c.cmd("EHLO client.example")
            assert (await c.cmd("AUTH PLAIN " + auth_plain(ALICE, ALICE_PW))).startswith("235")
            await c.cmd(f"MAIL FROM:<{ALICE}>")
            await c.cmd(f"RCPT TO:<{BOB}>")
            await c.cmd("DATA")
            await c.send(message(sender=ALICE, to=BOB) + b".\r\n")
            assert (await c.reply()).startswith("250 2.0.0")
    [sent] = await mailbox_entries_flags(populated, ALICE, "Sent")
    assert "\\Seen" in sent


async def mailbox_entries_flags(storage, address: str, mailbox: str) -> list[frozenset]:
    from tests.protocol.smtp.support import mailbox_entries

    return [e.flags for e in await mailbox_entries(storage, address, mailbox)]


async def test_session_closed_after_too_many_errors(mta_with) -> None:
    async with mta_with(max_errors=3) as service:
        async with await SmtpDialogue.open(service.port("mx")) as client:
            await client.reply()
            for _ in range(3):
                assert (await client.cmd("MAIL FROM:<x@y.example>")).startswith("503")
            assert (await client.cmd("MAIL FROM:<x@y.example>")).startswith("421 4.7.0")
            assert await client.closed()


async def test_command_timeout(mta_with) -> None:
    async with mta_with(command_timeout_seconds=0.3) as service:
        async with await SmtpDialogue.open(service.port("mx")) as client:
            await client.reply()
            assert (await client.reply(timeout=5)).startswith("421 4.4.2")
            assert await client.closed()


async def test_data_timeout(mta_with, populated) -> None:
    async with mta_with(data_timeout_seconds=0.3) as service:
        async with await SmtpDialogue.open(service.port("mx")) as client:
            await open_data(client)
            await client.send(b"Subject: slow\r\n")
            assert (await client.reply(timeout=5)).startswith("421 4.4.2")
            assert await client.closed()
        assert await mailbox_messages(populated, ALICE) == []


async def test_connections_per_ip(mta_with) -> None:
    async with mta_with(max_connections_per_ip=2) as service:
        first = await SmtpDialogue.open(service.port("mx"))
        second = await SmtpDialogue.open(service.port("submission"))
        assert (await first.reply()).startswith("220")
        assert (await second.reply()).startswith("220")
        async with await SmtpDialogue.open(service.port("mx")) as third:
            assert (await third.reply()).startswith("421 4.7.0")
            assert await third.closed()
        await first.cmd("QUIT")
        await first.close()
        await asyncio.sleep(0.1)
        async with await SmtpDialogue.open(service.port("mx")) as fourth:
            assert (await fourth.reply()).startswith("220")
        await second.close()


async def test_recipient_limit(mta_with) -> None:
    async with mta_with(max_recipients=2) as service:
        await run(
            service.port("mx"),
            [
                ("EHLO c.example", "250 "),
                ("MAIL FROM:<a@spf-pass.example>", "250"),
                (f"RCPT TO:<{ALICE}>", "250"),
                (f"RCPT TO:<{BOB}>", "250"),
                (f"RCPT TO:<{TEAM}>", "452 4.5.3"),
            ],
        )


async def test_oversize_message(mta_with, populated, settings) -> None:
    settings.server.max_message_size = 2000  # the one limit (conf/settings.py)
    async with mta_with() as service:
        async with await SmtpDialogue.open(service.port("mx")) as client:
            await client.reply()
            await client.cmd("EHLO c.example")
            assert (await client.cmd("MAIL FROM:<a@spf-pass.example> SIZE=2001")).startswith(
                "552 5.3.4"
            )
            await client.cmd("MAIL FROM:<a@spf-pass.example>")
            await client.cmd(f"RCPT TO:<{ALICE}>")
            await client.cmd("DATA")
            await client.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0)
            await client.send((b"y" * 78 + b"\r\n") * 100 + b".\r\n")
            assert (await client.reply()).startswith("552 5.3.4")
            # The session is still in sync and usable.
            assert (await client.cmd("MAIL FROM:<a@spf-pass.example>")).startswith("250")
            await client.cmd(f"RCPT TO:<{ALICE}>")
            await client.cmd("DATA")
            await client.send(message() + b".\r\n")
            assert (await client.reply()).startswith("250 2.0.0")
        assert len(await mailbox_messages(populated, ALICE)) == 1


async def _send_line(port: int, line: bytes) -> str:
    async with await SmtpDialogue.open(port) as client:
        await open_data(client)
        await client.send(b"Subject: long\r\n\r\n" + line + b"\r\n.\r\n")
        reply = await client.reply()
        assert (await client.cmd("NOOP")).startswith("250")  # still in step
    return reply


async def test_long_data_lines_accepted_up_to_the_limit(mta: Service, populated) -> None:
    """RFC 5321 section 4.5.3.1.6 sets 1000 octets as the least a server must
    take and asks for no limit where possible: like Postfix, we take lines
    up to smtp.max_line_length (64 KiB) and store them as they came."""
    rng = random.Random()
    line = base64.b64encode(rng.randbytes(rng.randrange(800, 48_000)))  # 1068..64000 octets
    assert (await _send_line(mta.port("mx"), line)).startswith("250 2.0.0")
    [stored] = await mailbox_messages(populated, ALICE)
    assert stored.endswith(b"\r\n\r\n" + line + b"\r\n")


async def test_data_line_over_the_limit_refused(mta: Service, populated) -> None:
    reply = await _send_line(mta.port("mx"), b"z" * 70_000)
    assert reply.startswith("500 5.5.2") and "65536" in reply, reply
    assert await mailbox_messages(populated, ALICE) == []


async def test_configured_line_limit_named_in_reply(mta_with) -> None:
    async with mta_with(max_line_length=2000) as service:
        assert (await _send_line(service.port("mx"), b"y" * 1998)).startswith("250")
        reply = await _send_line(service.port("mx"), b"y" * 1999)
        assert reply.startswith("500 5.5.2") and "2000" in reply, reply


async def test_rate_limit_per_ip(mta_with) -> None:
    async with mta_with(rate_limit_per_ip=2) as service:
        async with await SmtpDialogue.open(service.port("mx")) as client:
            await client.reply()
            await client.cmd("EHLO c.example")
            for _ in range(2):
                await client.cmd("MAIL FROM:<a@spf-pass.example>")
                await client.cmd(f"RCPT TO:<{ALICE}>")
                await client.cmd("DATA")
                await client.send(message() + b".\r\n")
                assert (await client.reply()).startswith("250 2.0.0")
            assert (await client.cmd("MAIL FROM:<a@spf-pass.example>")).startswith("450 4.7.1")
            assert (await client.cmd("MAIL FROM:<a@spf-pass.example>")).startswith("421 4.7.0")
            assert await client.closed()


async def test_close_sends_421(settings, populated, tls_context) -> None:
    service = await start(settings, populated, tls_context)
    client = await SmtpDialogue.open(service.port("mx"))
    await client.reply()
    await service.close()
    assert (await client.reply()).startswith("421 4.3.2")
    await client.close()


@pytest.mark.parametrize("listener", ["mx", "submission", "submissions"])
async def test_ports_are_bound(mta: Service, listener: str) -> None:
    assert mta.port(listener) > 0


async def test_unknown_recipients_are_not_protocol_errors(mta: Service, populated) -> None:
    """A list with stale addresses is not abuse: twelve unknown recipients
    (more than smtp.max_errors) and one valid one, and the valid one gets it."""
    stale = [f"gone{i}@example.net" for i in range(12)]
    steps = [("EHLO client.example", "250"), ("MAIL FROM:<a@spf-pass.example>", "250 2.1.0")]
    steps += [(f"RCPT TO:<{rcpt}>", "550 5.1.1") for rcpt in stale]
    steps += [(f"RCPT TO:<{ALICE}>", "250 2.1.5"), ("DATA", "354")]
    async with await SmtpDialogue.open(mta.port("mx")) as client:
        await client.reply()
        for line, expected in steps:
            assert (await client.cmd(line)).startswith(expected), line
        await client.send(message() + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0")
    assert len(await mailbox_messages(populated, ALICE)) == 1


async def test_unknown_recipient_limit_closes(mta_with) -> None:
    async with mta_with(max_unknown_recipients=3) as service:
        async with await SmtpDialogue.open(service.port("mx")) as client:
            await client.reply()
            await client.cmd("EHLO c.example")
            await client.cmd("MAIL FROM:<a@spf-pass.example>")
            for i in range(3):
                assert (await client.cmd(f"RCPT TO:<gone{i}@example.net>")).startswith("550")
            assert (await client.cmd("RCPT TO:<gone9@example.net>")).startswith("421 4.7.0")
            assert await client.closed()

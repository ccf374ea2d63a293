"""The SMTP client and one delivery attempt, against scripted loopback peers.

Every peer listens on the same port on its own 127.0.0.x address, as real
MX hosts listen on port 25; a fake resolver maps names to those addresses.
"""

from __future__ import annotations

import random
import ssl
import string

import pytest

from conf.settings import QueueSettings
from mtad.dns import MxRecord
from mtad.outbound.client import Reply, dot_stuff
from mtad.outbound.delivery import Destination, TlsPolicy, deliver_domain
from tests.integration.outbound.sink import SinkServer, dead_host
from tests.ports import free_port
from tests.unit.test_outbound_mx import FakeResolver

MESSAGE = b"From: a@example.net\r\nTo: x@d.test\r\nSubject: t\r\n\r\n.leading dot\r\nbody\r\n"


@pytest.fixture
def port() -> int:
    return free_port(("127.0.0.2", "127.0.0.3", "127.0.0.4"))


def destination(port: int, mx: dict, a: dict, **queue) -> Destination:
    settings = QueueSettings(
        smtp_port=port, connect_timeout_seconds=2, command_timeout_seconds=5, **queue
    )
    return Destination(
        resolver=FakeResolver(mx=mx, a=a),
        settings=settings,
        helo_name="mail.test",
        tls=TlsPolicy.from_settings(settings),
    )


ONE_MX = {"d.test": [MxRecord(10, "mx.d.test")]}


def rcpt_script(address: str) -> str:
    if address.startswith("gone"):
        return "550 5.1.1 no such user"
    if address.startswith("busy"):
        return "450 4.2.1 try later"
    return "250 2.1.5 ok"


@pytest.mark.parametrize("chunking", [False, True])
@pytest.mark.parametrize("pipelining", [True, False])
async def test_per_recipient_outcomes(port: int, pipelining: bool, chunking: bool) -> None:
    exts = ["SIZE 100000", "8BITMIME"] + (["PIPELINING"] if pipelining else [])
    exts += ["CHUNKING"] if chunking else []
    async with SinkServer("127.0.0.2", port, extensions=exts, rcpt_reply=rcpt_script) as sink:
        dest = destination(port, ONE_MX, {"mx.d.test": ["127.0.0.2"]})
        rcpts = ["ok1@d.test", "gone@d.test", "busy@d.test", "ok2@d.test"]
        results = await deliver_domain(dest, "d.test", "a@example.net", rcpts, MESSAGE)
    assert {r: v.status for r, v in results.items()} == {
        "ok1@d.test": "delivered",
        "gone@d.test": "failed",
        "busy@d.test": "deferred",
        "ok2@d.test": "delivered",
    }
    assert results["gone@d.test"].reply.enhanced == "5.1.1"
    assert results["ok1@d.test"].remote_mta == "mx.d.test"
    [got] = sink.received
    assert got.rcpt_to == ["ok1@d.test", "ok2@d.test"]  # one transaction, many recipients
    assert got.data == MESSAGE  # dot-stuffing undone by the peer: transparent
    assert f"SIZE={len(MESSAGE)}" in got.mail_params
    assert sink.bdat_chunks == (1 if chunking else 0)  # RFC 3030: one chunk, LAST


@pytest.mark.parametrize("pipelining", [True, False])
async def test_bdat_carries_the_message_as_data_would(port: int, pipelining: bool) -> None:
    """RFC 3030: to a peer offering CHUNKING the message goes as one BDAT
    chunk, byte for byte what DATA would have delivered (lines starting
    with a dot unstuffed, lone CR or LF made CRLF, a CRLF at the end); a
    refusal of the chunk decides for the accepted recipients; with every
    recipient refused no chunk is sent at all (RSET instead)."""
    rng = random.Random()
    lines = [
        "".join(rng.choice(string.ascii_letters + ". ") for _ in range(rng.randint(0, 300)))
        for _ in range(rng.randint(1, 60))
    ]
    message = ("Subject: chunk\r\n\r\n" + "\n".join(lines)).encode()
    exts = ["CHUNKING", "8BITMIME"] + (["PIPELINING"] if pipelining else [])
    async with SinkServer("127.0.0.2", port, extensions=exts, rcpt_reply=rcpt_script) as sink:
        dest = destination(port, ONE_MX, {"mx.d.test": ["127.0.0.2"]})
        results = await deliver_domain(dest, "d.test", "a@example.net", ["ok@d.test"], message)
        assert results["ok@d.test"].status == "delivered"
        [got] = sink.received
        assert got.data == dot_unstuffed(dot_stuff(message))
        sink.data_replies.append("554 5.6.0 content rejected")
        results = await deliver_domain(dest, "d.test", "a@example.net", ["ok@d.test"], message)
        assert results["ok@d.test"].status == "failed"
        assert results["ok@d.test"].reply.enhanced == "5.6.0"
        results = await deliver_domain(dest, "d.test", "a@example.net", ["gone@d.test"], message)
        assert results["gone@d.test"].status == "failed"
        assert sink.bdat_chunks == 2 and len(sink.received) == 1


def dot_unstuffed(wire: bytes) -> bytes:
    """What a DATA receiver stores of ``wire`` (RFC 5321 section 4.5.2)."""
    assert wire.endswith(b"\r\n.\r\n")
    lines = wire[: -len(b".\r\n")].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


async def test_data_refusal_decides_for_accepted_recipients(port: int) -> None:
    async with SinkServer("127.0.0.2", port, data_replies=["554 5.6.0 content rejected"]) as sink:
        dest = destination(port, ONE_MX, {"mx.d.test": ["127.0.0.2"]})
        results = await deliver_domain(dest, "d.test", "a@example.net", ["x@d.test"], MESSAGE)
    assert results["x@d.test"].status == "failed"
    assert str(results["x@d.test"].reply) == "554 5.6.0 content rejected"
    assert sink.received == []


async def test_dead_primary_fails_over_to_secondary(port: int) -> None:
    mx = {"d.test": [MxRecord(10, "dead.d.test"), MxRecord(20, "backup.d.test")]}
    a = {"dead.d.test": ["127.0.0.3"], "backup.d.test": ["127.0.0.4"]}
    dead = dead_host("127.0.0.3", port)
    async with SinkServer("127.0.0.4", port) as backup:
        results = await deliver_domain(
            destination(port, mx, a), "d.test", "", ["x@d.test"], MESSAGE
        )
    dead.close()
    assert results["x@d.test"].status == "delivered"
    assert results["x@d.test"].remote_mta == "backup.d.test"
    assert backup.received[0].mail_from == ""


async def test_4xx_from_primary_tries_secondary(port: int) -> None:
    mx = {"d.test": [MxRecord(10, "busy.d.test"), MxRecord(20, "backup.d.test")]}
    a = {"busy.d.test": ["127.0.0.3"], "backup.d.test": ["127.0.0.4"]}
    async with (
        SinkServer("127.0.0.3", port, data_replies=["451 4.3.0 overloaded"]) as busy,
        SinkServer("127.0.0.4", port) as backup,
    ):
        results = await deliver_domain(
            destination(port, mx, a), "d.test", "a@x.test", ["r@d.test"], MESSAGE
        )
    assert results["r@d.test"].status == "delivered"
    assert busy.transactions == 1 and len(backup.received) == 1


async def test_all_hosts_down_defers(port: int) -> None:
    dest = destination(port, ONE_MX, {"mx.d.test": ["127.0.0.3"]})
    with dead_host("127.0.0.3", port):
        results = await deliver_domain(dest, "d.test", "a@x.test", ["r@d.test"], MESSAGE)
    assert results["r@d.test"].status == "deferred"
    assert results["r@d.test"].reply.enhanced == "4.4.1"


async def test_null_mx_and_missing_domain_fail_at_once(port: int) -> None:
    dest = destination(port, {"null.test": [MxRecord(0, "")]}, {})
    results = await deliver_domain(dest, "null.test", "a@x.test", ["r@null.test"], MESSAGE)
    assert results["r@null.test"].status == "failed"
    assert results["r@null.test"].reply.enhanced == "5.1.10"
    results = await deliver_domain(dest, "nowhere.test", "a@x.test", ["r@nowhere.test"], MESSAGE)
    assert results["r@nowhere.test"].status == "failed"


@pytest.mark.parametrize(
    ("extensions", "message", "rcpt", "enhanced"),
    [
        (["SIZE 10"], MESSAGE, "r@d.test", "5.3.4"),  # RFC 1870
        (["PIPELINING"], "Subject: x\r\n\r\né\r\n".encode(), "r@d.test", "5.6.3"),  # RFC 6152
        # RFC 6531 section 3.7.4: a UTF-8 header needs SMTPUTF8 first.
        (["PIPELINING", "8BITMIME"], "Subject: é\r\n\r\nx\r\n".encode(), "r@d.test", "5.6.9"),
        (["8BITMIME"], MESSAGE, "rené@d.test", "5.6.7"),  # RFC 6531
    ],
)
async def test_extension_requirements(port, extensions, message, rcpt, enhanced) -> None:
    async with SinkServer("127.0.0.2", port, extensions=extensions) as sink:
        dest = destination(port, ONE_MX, {"mx.d.test": ["127.0.0.2"]})
        results = await deliver_domain(dest, "d.test", "a@x.test", [rcpt], message)
    assert results[rcpt].status == "failed" and results[rcpt].reply.enhanced == enhanced
    assert sink.received == []


async def test_8bit_and_smtputf8_when_offered(port: int) -> None:
    body = "Subject: é\r\n\r\nx\r\n".encode()
    async with SinkServer("127.0.0.2", port) as sink:
        dest = destination(port, ONE_MX, {"mx.d.test": ["127.0.0.2"]})
        results = await deliver_domain(dest, "d.test", "a@x.test", ["rené@d.test"], body)
    assert results["rené@d.test"].status == "delivered"
    assert "BODY=8BITMIME" in sink.received[0].mail_params
    assert "SMTPUTF8" in sink.received[0].mail_params


async def test_opportunistic_starttls(port: int, tls_context: ssl.SSLContext) -> None:
    async with SinkServer("127.0.0.2", port, tls=tls_context) as sink:
        dest = destination(port, ONE_MX, {"mx.d.test": ["127.0.0.2"]})
        results = await deliver_domain(dest, "d.test", "a@x.test", ["r@d.test"], MESSAGE)
    assert results["r@d.test"].status == "delivered"
    assert sink.received[0].tls  # self-signed is fine when opportunistic


async def test_required_tls_verifies_the_certificate(
    port: int, tls_context: ssl.SSLContext, ca_file
) -> None:
    # The test certificate names mail.test: the MX host name must match it.
    mx = {"d.test": [MxRecord(10, "mail.test")]}
    a = {"mail.test": ["127.0.0.2"]}
    async with SinkServer("127.0.0.2", port, tls=tls_context) as sink:
        untrusted = destination(port, mx, a, require_tls_domains=["d.test"])
        results = await deliver_domain(untrusted, "d.test", "a@x.test", ["r@d.test"], MESSAGE)
        assert results["r@d.test"].status == "deferred"
        assert results["r@d.test"].reply.enhanced == "4.7.5"
        trusted = destination(port, mx, a, require_tls_domains=["d.test"], tls_ca_file=str(ca_file))
        results = await deliver_domain(trusted, "d.test", "a@x.test", ["r@d.test"], MESSAGE)
    assert results["r@d.test"].status == "delivered" and sink.received[0].tls
    async with SinkServer("127.0.0.2", port) as plain:  # no STARTTLS offered
        results = await deliver_domain(trusted, "d.test", "a@x.test", ["r@d.test"], MESSAGE)
    assert results["r@d.test"].reply.enhanced == "4.7.4" and plain.received == []


def test_dot_stuff() -> None:
    assert dot_stuff(b".a\r\nb\n..c") == b"..a\r\nb\r\n...c\r\n.\r\n"


def test_reply_enhanced_code() -> None:
    assert Reply(550, ("5.1.1 gone",)).enhanced == "5.1.1"
    assert Reply(550, ("no code",)).enhanced == "5.0.0"
    assert Reply(450, ("5.1.1 mismatched",)).enhanced == "4.0.0"

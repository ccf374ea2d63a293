"""Anti-spam through a real rspamd (tests/rspamdserver.py) on the MX and
submission, read back with imaplib; Junk that learns, seen in rspamd's own
statistics.

rspamd scores a test token past its "add header" score: the message is
stored in the Junk of every recipient with X-Spam-* fields; GTUBE is
rspamd's reject: 550 5.7.1 at the end of DATA (RFC 5321 section 4.2.5)
and nothing stored; clean mail of random content and size, spooled or
not, is stored byte-exact in INBOX with ``X-Spam-Status: No``. Moving a
message out of Junk over IMAP teaches rspamd ham, into Junk spam. rspamd
unreachable is 451 4.7.1 with the default on_error.
"""

from __future__ import annotations

import asyncio
import imaplib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conf.settings import Settings
from delivery.learn import learner
from mtad.service import Service
from tests.conftest import make_settings
from tests.dnsserver import DnsServer
from tests.integration.test_antivirus import random_clean, send_mx, submit
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
    BOB_PW,
    TEAM,
    mailbox_messages,
)
from tests.rspamdserver import (
    ADD_HEADER_SCORE,
    GTUBE,
    REJECT_SCORE,
    SPAM_TOKEN,
    SPAM_TOKEN_SYMBOL,
    RspamdServer,
    _free_port,
    rspamd,  # noqa: F401
)

SPOOL_AT = 64 * 1024
CLOSED = "closed"  # in spam_overrides: an rspamd URL where nothing listens


@pytest.fixture
def spam_overrides() -> dict:
    """Override (parametrize) to change [antispam] for a test."""
    return {}


@pytest.fixture
def settings(
    tmp_path: Path, dns: DnsServer, rspamd: RspamdServer, spam_overrides: dict  # noqa: F811
) -> Settings:
    antispam = {
        "rspamd_url": rspamd.url,
        "controller_url": rspamd.controller_url,
        "password": rspamd.password,
        **spam_overrides,
    }
    if antispam["rspamd_url"] == CLOSED:
        antispam["rspamd_url"] = f"http://127.0.0.1:{_free_port()}"
    return make_settings(
        tmp_path / "data",
        dns=dns.settings(),
        smtp={"spool_threshold": SPOOL_AT},
        auth={"allow_plaintext": True},
        antispam=antispam,
    )


@pytest.fixture
async def imap_port(settings: Settings, populated, tls_context) -> AsyncIterator[int]:  # noqa: F811
    from imapd.imap.server import start_imap

    servers = await start_imap(settings, populated, tls_context)
    try:
        yield servers[0].sockets[0].getsockname()[1]
    finally:
        for server in servers:
            server.close()


def words(rng: random.Random, n: int) -> str:
    """``n`` random lowercase words (rspamd's Bayes wants enough tokens)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(
        "".join(rng.choices(letters, k=rng.randrange(4, 10))) for _ in range(n)
    )


def message(rng: random.Random, body: str, to: str = ALICE) -> bytes:
    """A well-formed message (Date, Message-ID) whose text is ``body`` plus
    random words: rspamd's own rules score it near zero."""
    mid = f"<{rng.getrandbits(64):x}@unlisted.example>"
    text = f"{body}\r\n{words(rng, 60)}\r\n"
    return (
        f"From: Some One <someone@unlisted.example>\r\nTo: {to}\r\n"
        f"Subject: {words(rng, 3)}\r\nDate: Sun, 06 Dec 2026 02:00:00 +0000\r\n"
        f"Message-ID: {mid}\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{text}"
    ).encode()


def imap_fetch(port: int, user: str, password: str, mailbox: str) -> list[bytes]:
    """Every message of ``mailbox`` as imaplib FETCHes it, in UID order."""
    client = imaplib.IMAP4("127.0.0.1", port)
    try:
        assert client.login(user, password)[0] == "OK"
        typ, data = client.select(mailbox, readonly=True)
        assert typ == "OK", data
        if data[0] == b"0":
            return []
        typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK", data
        return [part[1] for part in data if isinstance(part, tuple)]
    finally:
        client.logout()


def imap_file(port: int, source: str, dest: str, command: str = "MOVE") -> None:
    """alice's every message of ``source`` MOVEd (or COPYd) to ``dest``."""
    client = imaplib.IMAP4("127.0.0.1", port)
    try:
        assert client.login(ALICE, ALICE_PW)[0] == "OK"
        assert client.select(source)[0] == "OK"
        typ, data = client.uid(command, "1:*", dest)
        assert typ == "OK", data
    finally:
        client.logout()


def header_of(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")


def field(raw: bytes, name: str) -> str:
    """The unfolded value of the first ``name`` field of ``raw``'s header."""
    lines = header_of(raw).split("\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            value = line.split(":", 1)[1]
            for cont in lines[i + 1 :]:
                if not cont[:1].isspace():
                    break
                value += cont
            return value.strip()
    raise AssertionError(f"no {name} in {header_of(raw)!r}")


async def test_spam_lands_in_every_recipients_junk_with_its_score(
    mta: Service, populated, imap_port: int  # noqa: F811
) -> None:
    rng = random.Random()
    body = message(rng, f"Buy now {SPAM_TOKEN}", to=TEAM)
    reply = await send_mx(mta.port("mx"), body, rcpt=TEAM)
    assert reply.startswith("250 2.0.0"), reply
    for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
        junk = await asyncio.to_thread(imap_fetch, imap_port, user, password, "Junk")
        assert len(junk) == 1, user
        assert junk[0].endswith(body)  # byte-exact after our fields
        score = float(field(junk[0], "X-Spam-Score"))
        assert ADD_HEADER_SCORE <= score < REJECT_SCORE
        status = field(junk[0], "X-Spam-Status")
        assert status.startswith(f"Yes, score={score:.2f} required={REJECT_SCORE:.2f}"), status
        assert f"{SPAM_TOKEN_SYMBOL}(" in field(junk[0], "X-Spam-Symbols")
        for line in header_of(junk[0]).split("\r\n"):
            assert len(line) <= 998  # RFC 5322 section 2.1.1
        assert await asyncio.to_thread(imap_fetch, imap_port, user, password, "INBOX") == []


async def test_gtube_is_refused_at_end_of_data(
    mta: Service, populated, imap_port: int  # noqa: F811
) -> None:
    reply = await send_mx(mta.port("mx"), message(random.Random(), GTUBE))
    assert reply.startswith("550 5.7.1 "), reply
    for box in ("INBOX", "Junk"):
        assert await mailbox_messages(populated, ALICE, box) == []


@pytest.mark.parametrize("seed", range(2))
async def test_clean_mail_lands_in_inbox_byte_exact(
    mta: Service, populated, imap_port: int, seed: int  # noqa: F811
) -> None:
    rng = random.Random(seed)
    bodies = [
        message(rng, words(rng, rng.randrange(10, 300))),
        random_clean(rng.randrange(SPOOL_AT, 3 * SPOOL_AT), rng),  # spooled: streamed
    ]
    for body in bodies:
        reply = await send_mx(mta.port("mx"), body)
        assert reply.startswith("250 2.0.0"), reply
    inbox = await asyncio.to_thread(imap_fetch, imap_port, ALICE, ALICE_PW, "INBOX")
    assert len(inbox) == len(bodies)
    for raw, body in zip(inbox, bodies, strict=True):
        assert raw.endswith(body)
        assert field(raw, "X-Spam-Status").startswith("No, score=")
        assert float(field(raw, "X-Spam-Score")) < ADD_HEADER_SCORE
    assert await mailbox_messages(populated, ALICE, "Junk") == []


async def test_moving_out_of_junk_learns_ham_and_into_junk_learns_spam(
    mta: Service, populated, imap_port: int, rspamd: RspamdServer  # noqa: F811
) -> None:
    rng = random.Random()
    spam = message(rng, f"{SPAM_TOKEN} {words(rng, 40)}")
    assert (await send_mx(mta.port("mx"), spam)).startswith("250")
    assert len(await mailbox_messages(populated, ALICE, "Junk")) == 1

    before = rspamd.learns()
    await asyncio.to_thread(imap_file, imap_port, "Junk", "INBOX")  # not spam after all
    await learner().idle()
    want = {"spam": before["spam"], "ham": before["ham"] + 1}
    after_ham = rspamd.learns_reach(want)
    assert after_ham == want, (before, after_ham)
    assert await mailbox_messages(populated, ALICE, "Junk") == []

    ham = message(rng, words(rng, 50))
    assert (await send_mx(mta.port("mx"), ham)).startswith("250")
    # Both INBOX messages into Junk: the new one learned as spam, and the one
    # just learned as ham relearned as spam (its ham learn undone).
    await asyncio.to_thread(imap_file, imap_port, "INBOX", "Junk")
    await learner().idle()
    want = {"spam": after_ham["spam"] + 2, "ham": after_ham["ham"] - 1}
    after_spam = rspamd.learns_reach(want)
    assert after_spam == want, (after_ham, after_spam)

    # COPY out of Junk teaches ham too (both relearned)...
    await asyncio.to_thread(imap_file, imap_port, "Junk", "INBOX", "COPY")
    await learner().idle()
    want = {"spam": after_spam["spam"] - 2, "ham": after_spam["ham"] + 2}
    after_copy = rspamd.learns_reach(want)
    assert after_copy == want, (after_spam, after_copy)
    # ...but deleting spam (Junk to Trash) teaches nothing.
    await asyncio.to_thread(imap_file, imap_port, "Junk", "Trash", "COPY")
    await learner().idle()
    assert rspamd.learns() == after_copy
    # The learned counts are rspamd's own: its controller reports them too.
    assert int(rspamd.stat()["learned"]) >= 3  # type: ignore[call-overload]


@pytest.mark.parametrize("spam_overrides", [{"rspamd_url": CLOSED}])
async def test_rspamd_down_is_451_and_nothing_stored(mta: Service, populated) -> None:  # noqa: F811
    reply = await send_mx(mta.port("mx"), message(random.Random(), "hello"))
    assert reply.startswith("451 4.7.1 "), reply
    for box in ("INBOX", "Junk"):
        assert await mailbox_messages(populated, ALICE, box) == []


@pytest.mark.parametrize("spam_overrides", [{"rspamd_url": CLOSED, "on_error": "accept"}])
async def test_rspamd_down_with_accept_delivers_marked(mta: Service, populated) -> None:  # noqa: F811
    body = message(random.Random(), "hello")
    assert (await send_mx(mta.port("mx"), body)).startswith("250")
    stored = await mailbox_messages(populated, ALICE)
    assert len(stored) == 1 and stored[0].endswith(body)
    assert field(stored[0], "X-Spam-Checked").startswith("no, spam filter unavailable")


async def test_submission_refuses_spam_it_cannot_put_in_junk(
    mta: Service, populated, client_tls_context  # noqa: F811
) -> None:
    body = message(random.Random(), SPAM_TOKEN, to=BOB).replace(
        b"From: Some One <someone@unlisted.example>", f"From: {ALICE}".encode()
    )
    code, text = await asyncio.to_thread(submit, mta.port("submission"), client_tls_context, body)
    assert code == 550 and text.startswith(b"5.7.1 "), (code, text)
    for box in ("INBOX", "Junk"):
        assert await mailbox_messages(populated, BOB, box) == []


async def test_closing_the_mta_closes_its_rspamd_connections(
    mta: Service, populated  # noqa: F811
) -> None:
    """The rspamd client outlives each message, not the daemon: after
    ``close`` no aiohttp session is left open (an "Unclosed client session"
    at exit)."""
    from delivery import checks_rspamd

    rng = random.Random()
    assert (await send_mx(mta.port("mx"), message(rng, words(rng, 50)))).startswith("250")
    clients = list(checks_rspamd._CLIENTS[asyncio.get_running_loop()].values())
    assert clients and all(c._session is not None and not c._session.closed for c in clients)
    sessions = [c._session for c in clients]
    await mta.close()
    assert all(s is not None and s.closed for s in sessions)
    assert asyncio.get_running_loop() not in checks_rspamd._CLIENTS

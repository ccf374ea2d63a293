"""Zero loss across a failover (issue #19): a real mtad process over a
PostgreSQL primary with a synchronous streaming replica. smtplib clients
send messages with unique Message-IDs while the primary is SIGKILLed and
the replica promoted (``pg_ctl promote``); mtad is not restarted.

Afterwards every message that got a 250 is in the promoted replica, with
its bytes intact (RFC 5321 section 4.1.1.4 and DESIGN.md: a 250 to end of
data is sent only once the message is durable, and with
``synchronous_standby_names`` a commit is durable on the replica too).
Clients refused during the gap got 4xx (RFC 5321 section 4.2.1: "try
again"), never 5xx, and mail flows again within seconds."""

from __future__ import annotations

import asyncio
import random
import re
import smtplib
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage.backend import failover_url, open_storage_from_url
from tests.dnsserver import DnsServer
from tests.integration.smtp.test_smtp_crash import free_port, start_mtad, stop_mtad
from tests.pgserver import PgServer, primary_with_replica
from tests.protocol.smtp.support import ALICE, BOB, mailbox_messages, populate

CLIENTS = 4
ACKED_BEFORE_KILL = 20  # 250s seen before the primary dies: it dies under load
ACKED_AFTER_PROMOTION = 10  # 250s after the promotion: mail flows again
RECOVER_WITHIN = 30.0  # seconds from the promotion until those 250s
SENDER = "someone@spf-pass.example"  # SPF passes from 127.0.0.1 (the test zone)
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r$", re.MULTILINE | re.IGNORECASE)


@dataclass
class Ledger:
    """What the clients were told, per Message-ID."""

    acked: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id -> (rcpt, message)
    refused: list[tuple[str, int, bytes]] = field(default_factory=list)  # (id, code, text)
    unanswered: list[str] = field(default_factory=list)  # connection lost before a reply
    acked_at: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _message(message_id: str, rcpt: str) -> bytes:
    """A message of random length (real text, lines of random width)."""
    words = []
    for _ in range(random.randint(1, 400)):
        words.append("".join(random.choices(string.ascii_letters, k=random.randint(1, 12))))
    lines, line = [], ""
    for word in words:
        if len(line) + len(word) > random.randint(20, 76):
            lines.append(line)
            line = ""
        line += word + " "
    lines.append(line)
    body = "\r\n".join(lines)
    return (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: failover {message_id[:8]}\r\n"
        f"Date: Sat, 05 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{message_id}>\r\n\r\n{body}\r\n"
    ).encode()


def _client(port: int, ledger: Ledger, stop: threading.Event) -> None:
    """Sends one message per transaction until ``stop``, reconnecting
    after any failure, and writes down every outcome."""
    smtp: smtplib.SMTP | None = None
    while not stop.is_set():
        message_id = f"{uuid.uuid4().hex}@failover.test"
        rcpt = random.choice((ALICE, BOB))
        raw = _message(message_id, rcpt)
        try:
            if smtp is None:
                smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20)
            smtp.sendmail(SENDER, [rcpt], raw)
        except smtplib.SMTPRecipientsRefused as refused:
            code, text = refused.recipients[rcpt]
            _record(ledger, refused=(message_id, code, text))
        except smtplib.SMTPResponseException as failed:  # MAIL or DATA refused
            _record(ledger, refused=(message_id, failed.smtp_code, failed.smtp_error))
            smtp = _reset(smtp)
        except (smtplib.SMTPServerDisconnected, OSError):
            _record(ledger, unanswered=message_id)
            smtp = _close(smtp)
            time.sleep(0.05)
        else:
            _record(ledger, acked=(message_id, rcpt, raw))
    _close(smtp)


def _record(
    ledger: Ledger,
    acked: tuple[str, str, bytes] | None = None,
    refused: tuple[str, int, bytes] | None = None,
    unanswered: str | None = None,
) -> None:
    with ledger.lock:
        if acked is not None:
            ledger.acked[acked[0]] = (acked[1], acked[2])
            ledger.acked_at.append(time.monotonic())
        if refused is not None:
            ledger.refused.append(refused)
        if unanswered is not None:
            ledger.unanswered.append(unanswered)


def _reset(smtp: smtplib.SMTP | None) -> smtplib.SMTP | None:
    """RSET after a refused transaction; a dead session is closed."""
    if smtp is None:
        return None
    try:
        smtp.rset()
        return smtp
    except (smtplib.SMTPException, OSError):
        return _close(smtp)


def _close(smtp: smtplib.SMTP | None) -> None:
    if smtp is not None:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()
    return None


@pytest.fixture
def pair() -> Iterator[tuple[PgServer, PgServer]]:
    """A durable primary (fsync, synchronous_commit) and its synchronous
    streaming replica: the primary's commits wait for the replica's flush."""
    with primary_with_replica(durable=True) as servers:  # raises if PostgreSQL cannot run
        yield servers


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_sigkill_of_the_primary_loses_no_acknowledged_message(
    pair: tuple[PgServer, PgServer], tmp_path: Path, dns: DnsServer
) -> None:
    primary, replica = pair
    url = await primary.create_database()
    name = url.rsplit("/", 1)[1]
    await asyncio.to_thread(replica.wait_replayed, primary)
    # The directory through a multi-host URL; the mail shard through its
    # ``replicas`` (both forms docs/failover.md describes).
    directory_url = failover_url(url, [replica.url(name)])
    blob_dir = tmp_path / "blobs"
    store = await open_storage_from_url(directory_url, blob_dir)
    try:
        await populate(store)
    finally:
        await store.close()
    config = tmp_path / "shardmail.toml"
    config.write_text(
        f'[server]\nhostname = "mail.test"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\n'
        f'[storage]\nurl = "{directory_url}"\nblob_dir = "{blob_dir}"\n'
        f'[storage.shards.default]\nurl = "{url}"\nreplicas = ["{replica.url(name)}"]\n'
    )
    (tmp_path / "data").mkdir()
    ports = {n: free_port() for n in ("mx", "submission", "submissions")}
    proc = await start_mtad(config, ports)
    ledger, stop = Ledger(), threading.Event()
    clients = [
        asyncio.create_task(asyncio.to_thread(_client, ports["mx"], ledger, stop))
        for _ in range(CLIENTS)
    ]
    try:
        await _until(lambda: len(ledger.acked) >= ACKED_BEFORE_KILL, 60, "mail before the kill")
        await asyncio.to_thread(primary.kill)
        await asyncio.to_thread(replica.promote)
        promoted = time.monotonic()
        await _until(
            lambda: sum(t > promoted for t in ledger.acked_at) >= ACKED_AFTER_PROMOTION,
            RECOVER_WITHIN,
            "mail after the promotion, without restarting mtad",
        )
    finally:
        stop.set()
        await asyncio.gather(*clients)
        await stop_mtad(proc)

    codes = sorted({code for _, code, _ in ledger.refused})
    assert all(400 <= code < 500 for code in codes), ledger.refused
    store = await open_storage_from_url(replica.url(name), blob_dir)
    try:
        stored = {}
        for address in (ALICE, BOB):
            for raw in await mailbox_messages(store, address):
                found = MESSAGE_ID.search(raw)
                assert found is not None
                stored[found.group(1).decode()] = (address, raw)
    finally:
        await store.close()
    missing = [mid for mid in ledger.acked if mid not in stored]
    assert not missing, f"{len(missing)} of {len(ledger.acked)} acknowledged messages lost"
    for mid, (rcpt, raw) in ledger.acked.items():
        address, got = stored[mid]
        assert address == rcpt and got.endswith(raw), mid
    # Nothing was stored that no client sent.
    sent = set(ledger.acked) | {mid for mid, _, _ in ledger.refused} | set(ledger.unanswered)
    assert set(stored) <= sent

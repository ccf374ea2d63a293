"""The directory and the mail shards as separate roles (issue #19), with
real PostgreSQL servers stopped under real clients (imaplib, smtplib):

- a shard's server down: its users get temporary errors (IMAP
  NO [UNAVAILABLE] on SELECT, SMTP 4xx after DATA), every other user sees
  nothing, and everyone still logs in (the directory is up);
- the directory's server down: every login is a temporary failure, never
  "wrong password", and none counts toward the login throttle.
"""

from __future__ import annotations

import asyncio
import imaplib
import random
import signal
import smtplib
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import argon2
import pytest

from conf.settings import Settings
from storage.backend import ShardSpec, open_storage_from_url
from tests.conftest import make_settings
from tests.integration.test_auth_outage import _start_postgres
from tests.pgserver import PgServer

NEAR = "alice@example.org"  # on shard "default", on the directory's server
FAR = "bob@example.org"  # on shard "far", on a server of its own
PASSWORD = "correct horse battery"
# Large enough that a counted failure would show in the next login's time,
# even with the pools reconnecting on a busy machine.
FAILURE_DELAY = 4.0


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, PgServer]]:
    """Two PostgreSQL servers: "dir" (the directory and shard "default",
    separate databases) and "far" (shard "far")."""
    started: dict[str, PgServer] = {}
    try:
        for name in ("dir", "far"):
            started[name] = PgServer.start()  # raises (the test errors) if it cannot
        yield started
    finally:
        for server in started.values():
            server.stop()


async def _stop(pg: PgServer) -> None:
    """A fast shutdown (ends every session), keeping its files."""
    pg.proc.send_signal(signal.SIGINT)
    await asyncio.to_thread(pg.proc.wait, 20)


async def _restart(pg: PgServer) -> None:
    if pg.proc.poll() is None:
        return
    pg.proc = await asyncio.to_thread(_start_postgres, pg)
    assert await asyncio.to_thread(pg._wait_ready)


@dataclass
class Site:
    servers: dict[str, PgServer]
    settings: Settings
    imap_port: int
    mx_port: int
    client_tls: ssl.SSLContext


@pytest.fixture
async def site(
    servers: dict[str, PgServer],
    tmp_path: Path,
    tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
) -> AsyncIterator[Site]:
    from imapd.imap.server import start_imap
    from mtad.service import start as start_mtad

    directory = await servers["dir"].create_database()
    shards = {
        "default": ShardSpec(await servers["dir"].create_database()),
        "far": ShardSpec(await servers["far"].create_database()),
    }
    storage = await open_storage_from_url(
        directory,
        tmp_path / "blobs",
        shards,
        password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
        events="inprocess",
    )
    await storage.directory.add_domain("example.org")
    await storage.directory.add_account(NEAR, PASSWORD, shard="default")
    await storage.directory.add_account(FAR, PASSWORD, shard="far")
    settings = make_settings(
        tmp_path / "data",
        auth={"failure_delay_seconds": FAILURE_DELAY, "failure_delay_max_seconds": 8.0},
        smtp={"spf": False, "dkim_verify": False, "dmarc": False},
    )
    imap = await start_imap(settings, storage, tls_context)
    mta = await start_mtad(settings, storage, tls_context)
    try:
        yield Site(
            servers,
            settings,
            imap[1].sockets[0].getsockname()[1],
            mta.port("mx"),
            client_tls_context,
        )
    finally:
        for server in servers.values():
            await _restart(server)
        await mta.close()
        for server in imap:
            server.close()
        await storage.close()


def _select_inbox(site: Site, user: str, timings: list[float] | None = None) -> tuple[str, Any]:
    """Logs in and SELECTs INBOX; (status, data) of the SELECT. A failed
    LOGIN raises imaplib.IMAP4.error with the server's text. ``timings``
    gets the LOGIN's seconds."""
    with imaplib.IMAP4_SSL("127.0.0.1", site.imap_port, ssl_context=site.client_tls) as imap:
        started = time.monotonic()
        imap.login(user, PASSWORD)
        if timings is not None:
            timings.append(time.monotonic() - started)
        typ, data = imap.select("INBOX")
        if typ != "OK":
            return typ, data
        return typ, imap.response("UIDVALIDITY")


def _deliver(site: Site, rcpt: str) -> tuple[int, bytes]:
    """One message to ``rcpt`` over the MX port; the reply to its DATA (or
    the first refusal)."""
    body = random.randbytes(random.randint(100, 3000)).hex()
    message = f"From: x@remote.test\r\nTo: {rcpt}\r\nSubject: t\r\n\r\n{body}\r\n"
    with smtplib.SMTP("127.0.0.1", site.mx_port, timeout=30) as smtp:
        smtp.ehlo("remote.test")
        try:
            smtp.sendmail("x@remote.test", [rcpt], message)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients[rcpt]
    return 250, b""


async def test_a_shard_down_fails_only_its_own_users(site: Site) -> None:
    await _stop(site.servers["far"])
    # Its user logs in (the directory is up) and is told to come back later.
    typ, data = await asyncio.to_thread(_select_inbox, site, FAR)
    assert typ == "NO" and b"[UNAVAILABLE]" in data[0], data
    code, reply = await asyncio.to_thread(_deliver, site, FAR)
    assert 400 <= code < 500, (code, reply)
    # Everyone else sees nothing.
    typ, _ = await asyncio.to_thread(_select_inbox, site, NEAR)
    assert typ == "OK"
    assert (await asyncio.to_thread(_deliver, site, NEAR))[0] == 250
    # Back up: the shard's user is served again, without a restart.
    await _restart(site.servers["far"])
    typ, _ = await asyncio.to_thread(_select_inbox, site, FAR)
    assert typ == "OK"
    assert (await asyncio.to_thread(_deliver, site, FAR))[0] == 250


async def test_the_directory_down_is_temporary_for_everyone(site: Site) -> None:
    await _stop(site.servers["dir"])
    for user in (NEAR, FAR) * 2:
        with pytest.raises(imaplib.IMAP4.error) as failed:
            await asyncio.to_thread(_select_inbox, site, user)
        # RFC 5530 section 3: UNAVAILABLE, not AUTHENTICATIONFAILED.
        assert "[UNAVAILABLE]" in str(failed.value), failed.value
    # The shard "far" is up, but who is where is not known: SMTP says 4xx.
    code, reply = await asyncio.to_thread(_deliver, site, FAR)
    assert 400 <= code < 500, (code, reply)
    await _restart(site.servers["dir"])
    for user in (NEAR, FAR):
        timings: list[float] = []
        typ, _ = await asyncio.to_thread(_select_inbox, site, user, timings)
        assert typ == "OK"
        # The failed logins were not counted: no failure delay.
        assert timings[0] < FAILURE_DELAY / 2


async def test_storage_opens_with_a_shard_down_and_takes_it_back(
    servers: dict[str, PgServer], tmp_path: Path
) -> None:
    """A daemon (re)started during a shard's outage serves every other
    shard, and the shard's users once it is back, without a restart."""
    from storage.errors import ErrorKind, StorageError

    directory = await servers["dir"].create_database()
    shards = {"far": ShardSpec(await servers["far"].create_database())}
    first = await open_storage_from_url(directory, tmp_path / "blobs", shards, events="inprocess")
    try:
        await first.directory.add_domain("example.org")
        near = await first.directory.add_account(NEAR, PASSWORD, shard="default")
        far = await first.directory.add_account(FAR, PASSWORD, shard="far")
    finally:
        await first.close()
    await _stop(servers["far"])
    try:
        restarted = await open_storage_from_url(
            directory, tmp_path / "blobs", shards, events="inprocess"
        )
        try:
            assert len(await restarted.mail(near).list_mailboxes(near.id)) == 6
            with pytest.raises(StorageError) as err:
                await restarted.mail(far).list_mailboxes(far.id)
            assert err.value.kind is ErrorKind.TEMPORARY
            await _restart(servers["far"])
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert len(await restarted.mail(far).list_mailboxes(far.id)) == 6
                    break
                except StorageError as exc:
                    assert exc.kind is ErrorKind.TEMPORARY and time.monotonic() < deadline
                    await asyncio.sleep(0.2)
        finally:
            await restarted.close()
    finally:
        await _restart(servers["far"])

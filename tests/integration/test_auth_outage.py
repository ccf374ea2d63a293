"""A directory database that cannot be reached is a temporary failure on
every protocol, never "wrong password", and never feeds the login throttle
(issue #17). Real clients (imaplib, poplib, smtplib, urllib) talk to the
real daemons over a PostgreSQL stopped mid-run."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import json
import os
import poplib
import pwd
import signal
import smtplib
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import argon2
import pytest

from conf.settings import Settings
from tests.conftest import make_settings
from tests.pgserver import PgServer

USER = "alice@example.org"
PASSWORD = "correct horse battery"
# Large enough that a counted failure would show in the next login's time.
FAILURE_DELAY = 2.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer.start()  # raises (the test errors) if PostgreSQL cannot run
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Site:
    """Storage on its own database of a PostgreSQL we can stop and start."""

    pg: PgServer
    storage: Any
    settings: Settings
    stopped: bool = False

    async def cut_off(self) -> None:
        """Stops PostgreSQL (a fast shutdown ends every session), keeping its files."""
        self.pg.proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(self.pg.proc.wait, 20)
        self.stopped = True

    async def restore(self) -> None:
        """Starts PostgreSQL again on the same port and data."""
        if not self.stopped:
            return
        self.pg.proc = await asyncio.to_thread(_start_postgres, self.pg)
        assert await asyncio.to_thread(self.pg._wait_ready)
        self.stopped = False


def _start_postgres(pg: PgServer) -> subprocess.Popen[bytes]:
    """``pg``'s postgres process again, as :meth:`PgServer.start` ran it."""
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # postgres refuses to run as root
        pw = pwd.getpwnam("postgres")
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    return subprocess.Popen(
        pg.proc.args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C.UTF-8", "HOME": str(pg.root)},
        cwd=pg.root,
        **run_as,
    )


@pytest.fixture
async def site(pg: PgServer, tmp_path: Path) -> AsyncIterator[Site]:
    from storage.backend import open_storage_from_url

    url = await pg.create_database()
    storage = await open_storage_from_url(
        url,
        tmp_path / "blobs",
        password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
        events="inprocess",
    )
    await storage.directory.add_domain("example.org")
    await storage.directory.add_account(USER, PASSWORD)
    settings = make_settings(
        tmp_path / "data",
        auth={"failure_delay_seconds": FAILURE_DELAY, "failure_delay_max_seconds": 8.0},
        http={"listen": ["127.0.0.1:0"]},
    )
    s = Site(pg, storage, settings)
    try:
        yield s
    finally:
        await s.restore()
        await storage.close()


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


async def outage_drill(
    site: Site, attempts: list[Callable[[], Any]], temporary: Callable[[Exception], bool]
) -> None:
    """With the database stopped every attempt fails in a way ``temporary``
    accepts; once it is back, a correct login (``attempts[0]``) is answered
    without a failure delay: the failed attempts were not counted."""
    await site.cut_off()
    for attempt in attempts * 3:
        with pytest.raises(Exception) as failed:
            await in_thread(attempt)
        assert temporary(failed.value), failed.value
    await site.restore()
    started = time.monotonic()
    await in_thread(attempts[0])
    assert time.monotonic() - started < FAILURE_DELAY / 2


async def test_imap_login_answers_unavailable(
    site: Site, tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    from imapd.imap.server import start_imap

    servers = await start_imap(site.settings, site.storage, tls_context)
    port = servers[1].sockets[0].getsockname()[1]

    def login() -> None:
        with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_tls_context) as imap:
            imap.login(USER, PASSWORD)

    try:
        # RFC 5530 section 3: UNAVAILABLE, not AUTHENTICATIONFAILED.
        await outage_drill(site, [login], lambda e: "[UNAVAILABLE]" in str(e))
    finally:
        for server in servers:
            server.close()


async def test_imap_returning_login_answers_unavailable(
    site: Site, tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    """A login the authentication cache holds (storage/authcache.py) still
    reads the account: with the database gone it is UNAVAILABLE too."""
    from imapd.imap.server import start_imap
    from storage.throttle import login_gate

    servers = await start_imap(site.settings, site.storage, tls_context)
    port = servers[1].sockets[0].getsockname()[1]
    cache = login_gate(site.storage, site.settings.auth).cache
    assert cache is not None

    def login() -> None:
        with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_tls_context) as imap:
            imap.login(USER, PASSWORD)

    try:
        await in_thread(login)
        await in_thread(login)
        assert cache.hits == 1  # warm: the next one would not verify
        await outage_drill(site, [login], lambda e: "[UNAVAILABLE]" in str(e))
    finally:
        for server in servers:
            server.close()


async def test_pop3_pass_answers_sys_temp(
    site: Site, tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    from imapd.pop3.server import start_pop3_service

    service = await start_pop3_service(site.settings, site.storage, tls_context)
    port = service.servers[1].sockets[0].getsockname()[1]

    def login() -> None:
        pop = poplib.POP3_SSL("127.0.0.1", port, context=client_tls_context)
        try:
            pop.user(USER)
            pop.pass_(PASSWORD)
        finally:
            pop.quit()

    try:
        # RFC 3206 section 4: SYS/TEMP, not AUTH.
        await outage_drill(site, [login], lambda e: str(e).startswith("b'-ERR [SYS/TEMP]"))
    finally:
        await service.close()


async def test_smtp_auth_answers_454(
    site: Site, tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    from mtad.service import start

    service = await start(site.settings, site.storage, tls_context)
    port = service.port("submissions")

    def login() -> None:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls_context) as smtp:
            smtp.login(USER, PASSWORD)

    try:
        # RFC 4954 section 6: 454 4.7.0 Temporary authentication failure.
        await outage_drill(
            site,
            [login],
            lambda e: isinstance(e, smtplib.SMTPAuthenticationError)
            and e.smtp_code == 454
            and e.smtp_error.startswith(b"4.7.0"),
        )
    finally:
        await service.close()


async def test_http_login_answers_503(site: Site) -> None:
    from httpapi.service import start

    service = await start(site.settings, site.storage, None)
    base = f"http://127.0.0.1:{service.ports[0]}"

    def login() -> str:
        body = json.dumps({"address": USER, "password": PASSWORD}).encode()
        request = urllib.request.Request(
            base + "/v1/login", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return str(json.load(resp)["token"])

    def get_me(authorization: str) -> int:
        request = urllib.request.Request(base + "/v1/me", headers={"Authorization": authorization})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status)

    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    try:
        token = await in_thread(login)
        await outage_drill(
            site,
            [login, lambda: get_me(basic), lambda: get_me("Bearer " + token)],
            lambda e: isinstance(e, urllib.error.HTTPError) and e.code == 503,
        )
    finally:
        await service.close()

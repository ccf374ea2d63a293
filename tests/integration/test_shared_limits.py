"""Limits shared by instances (issue #19): two imapd and two mtad processes
over one data dir and one real redis-server. Wrong passwords given to one
instance delay logins on the other; an SMTP per-IP limit counts the messages
of both, and an HTTP per-IP limit the requests of two API instances. With
Redis stopped, every instance goes on serving (limits counted per process),
and nobody is told their password is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from argon2 import PasswordHasher, profiles

from conf.tls import server_context
from storage import open_storage
from tests.conftest import make_settings
from tests.integration.test_cross_process_push import (
    Lines,
    free_port,
    smtp_reply,
    start_daemon,
    stop,
)
from tests.integration.test_cross_process_push import write_config as cross_process_config

DOMAIN = "example.net"
ALICE = f"alice@{DOMAIN}"
ALICE_PW = "alice-secret"
BASE_DELAY = 0.6  # auth.failure_delay_seconds: doubled per failure
SMTP_LIMIT = random.randint(2, 5)  # messages per client IP, for the whole site


@dataclass
class Site:
    imap: list[int]  # one port per instance
    mx: list[int]
    config: list[Path]


def write_config(path: Path, data_dir: Path, imap: int, mx: int, redis_url: str) -> None:
    cross_process_config(
        path,
        data_dir,
        {"imap": imap, "mx": mx},
        server={"metrics_listen": []},
        auth={
            "failure_delay_seconds": BASE_DELAY,
            "failure_delay_max_seconds": 8 * BASE_DELAY,
            # Cheap hashes: the test times the throttle, not argon2.
            "argon2_time_cost": 1,
            "argon2_memory_kib": 8,
            "argon2_parallelism": 1,
        },
        smtp={"rate_limit_per_ip": SMTP_LIMIT},
        redis={"url": redis_url, "retry_seconds": 0.5},
    )


async def prepare_site(tmp_path: Path, redis_url: str) -> Site:
    data_dir = tmp_path / "data"
    settings = make_settings(data_dir)
    data_dir.mkdir()
    store = await open_storage(
        settings.storage, password_hasher=PasswordHasher.from_parameters(profiles.CHEAPEST)
    )
    try:
        await store.directory.add_domain(DOMAIN)
        await store.directory.add_account(ALICE, ALICE_PW)
    finally:
        await store.close()
    await asyncio.to_thread(server_context, settings)  # one certificate, not raced
    site = Site([free_port(), free_port()], [free_port(), free_port()], [])
    for i in range(2):
        (tmp_path / f"instance{i}").mkdir()  # each its own daemon logs
        site.config.append(tmp_path / f"instance{i}" / "shardmail.toml")
        write_config(site.config[i], data_dir, site.imap[i], site.mx[i], redis_url)
    return site


@pytest.fixture
async def site(tmp_path: Path, redis_url: str) -> AsyncIterator[Site]:
    """Instances 0 and 1, each an imapd and an mtad process, on one data dir."""
    site = await prepare_site(tmp_path, redis_url)
    starts = [
        start_daemon(name, site.config[i], 0) for i in range(2) for name in ("imapd", "mtad")
    ]
    procs = await asyncio.gather(*starts, return_exceptions=True)
    started = [p for p in procs if isinstance(p, asyncio.subprocess.Process)]
    try:
        for p in procs:
            if isinstance(p, BaseException):
                raise p
        yield site
    finally:
        await asyncio.gather(*(stop(p) for p in started))
    for p in started:
        assert p.returncode == 0, f"daemon exited with {p.returncode}"


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Lines]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Lines(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def imap_login(port: int, password: str) -> tuple[str, float]:
    """The tagged reply to LOGIN on a new connection, and how long it took."""
    async with connect(port) as imap:
        assert (await imap.line()).startswith("* OK")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await imap.send(f'a1 LOGIN {ALICE} "{password}"')
        reply = (await imap.until("a1 ", timeout=30))[-1]
        return reply, loop.time() - started


async def smtp_send(port: int) -> str:
    """Sends one message; the reply that ended the attempt (250 after DATA,
    or the refusal of MAIL FROM)."""
    async with connect(port) as smtp:
        await smtp.until("220 ")
        await smtp.send("EHLO client.example")
        await smtp_reply(smtp)
        await smtp.send("MAIL FROM:<someone@sender.example>")
        reply = await smtp_reply(smtp)
        if not reply.startswith("250"):
            return reply
        for command in (f"RCPT TO:<{ALICE}>", "DATA"):
            await smtp.send(command)
            assert (await smtp_reply(smtp))[:1] in "23", command
        body = f"From: someone@sender.example\r\nTo: {ALICE}\r\nSubject: n\r\n\r\nHi.\r\n"
        smtp.writer.write(body.encode() + b".\r\n")
        reply = await smtp_reply(smtp)
        await smtp.send("QUIT")
        return reply


async def test_failures_on_one_instance_delay_logins_on_the_other(site: Site) -> None:
    # Instance 1 has seen nothing of this client: a clean login is fast.
    reply, took = await imap_login(site.imap[1], ALICE_PW)
    assert reply.startswith("a1 OK") and took < BASE_DELAY
    failures = random.randint(2, 3)
    for _ in range(failures):
        reply, _ = await imap_login(site.imap[0], "wrong " + str(random.random()))
        assert reply.startswith("a1 NO [AUTHENTICATIONFAILED]")
    # Instance 1 owes the delay that instance 0's failures earned.
    reply, took = await imap_login(site.imap[1], ALICE_PW)
    assert reply.startswith("a1 OK")
    assert took >= BASE_DELAY * 2 ** (failures - 1) * 0.95
    # The success cleared the record for every instance.
    reply, took = await imap_login(site.imap[0], ALICE_PW)
    assert reply.startswith("a1 OK") and took < BASE_DELAY


async def test_smtp_per_ip_limit_counts_both_instances(site: Site) -> None:
    replies = [await smtp_send(site.mx[i % 2]) for i in range(SMTP_LIMIT)]
    assert all(r.startswith("250 ") for r in replies), replies
    # RFC 5321 section 4.2.5: 450 when the action is not taken for now (4.7.1, RFC 3463).
    assert (await smtp_send(site.mx[0])).startswith("450 4.7.1")
    assert (await smtp_send(site.mx[1])).startswith("450 4.7.1")


async def test_without_redis_every_instance_still_serves(site: Site, redis_server) -> None:
    redis_server.pause()
    # Logins: right passwords pass, wrong ones are wrong, never a temporary error.
    reply, _ = await imap_login(site.imap[0], ALICE_PW)
    assert reply.startswith("a1 OK")
    reply, _ = await imap_login(site.imap[1], "wrong")
    assert reply.startswith("a1 NO [AUTHENTICATIONFAILED]")
    # Each instance now limits its own share of the mail.
    for port in site.mx:
        assert (await smtp_send(port)).startswith("250 ")
    redis_server.resume()
    await asyncio.sleep(0.6)  # redis.retry_seconds: the instances use Redis again
    replies = [await smtp_send(site.mx[i % 2]) for i in range(SMTP_LIMIT + 1)]
    assert [r[:3] for r in replies] == ["250"] * SMTP_LIMIT + ["450"]


async def test_http_per_ip_limit_counts_both_instances(tmp_path: Path, redis_url: str) -> None:
    """Two API instances (each its own storage, as two hosts would have) over
    one database: the per-IP request limit is the site's, not each one's."""
    import aiohttp

    from httpapi.service import start as start_http
    from storage.backend import open_storage_from_url
    from storage.shared import close_shared_state

    limit = random.randint(2, 6)
    settings = make_settings(
        tmp_path / "data", http={"rate_limit_per_ip": limit}, redis={"url": redis_url}
    )
    settings.data_dir.mkdir(parents=True)
    hasher = PasswordHasher.from_parameters(profiles.CHEAPEST)
    stores = [
        await open_storage_from_url(
            f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "blobs",
            password_hasher=hasher,
        )
        for _ in range(2)
    ]
    services = [await start_http(settings, store, None) for store in stores]
    try:
        statuses, retry_after = [], []
        async with aiohttp.ClientSession() as http:
            for i in range(limit + 2):
                url = f"http://127.0.0.1:{services[i % 2].ports[0]}/v1/folders"
                async with http.get(url) as resp:
                    statuses.append(resp.status)
                    retry_after.append(resp.headers.get("Retry-After"))
        # No token: 401 while within the limit, then 429 (RFC 6585 section 4) on both.
        assert statuses == [401] * limit + [429, 429]
        assert all(int(value) >= 1 for value in retry_after[limit:])
    finally:
        for service in services:
            await service.close()
        for store in stores:
            await close_shared_state(store)
            await store.close()

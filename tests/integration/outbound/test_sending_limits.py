"""Per-account sending limits (issue #22, delivery/limits.py), end to end.

An account past its limit, submitting with smtplib (STARTTLS + AUTH) and
through the HTTP API's POST /v1/messages, gets every message accepted (250,
202); the queue workers deliver the ones within the limit to Debian's
Postfix and never the ones past it, which wait held with the reason in
``mailctl queue list`` until ``mailctl queue release --account`` sends them.
Another account is not affected. Two instances sharing the suite's Redis
count together; with Redis unreachable each counts alone and nothing is
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import smtplib
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from conf.settings import LimitsSettings, RedisSettings, Settings
from runtime.metrics import OUTBOUND_HELD
from tests.dnsserver import DnsServer
from tests.integration.outbound.conftest import (
    ALICE,
    ALICE_PW,
    HASHER,
    DkimSetup,
    eventually,
    sender_settings,
)
from tests.integration.outbound.sink import free_port
from tests.integration.outbound.test_mailctl_queue import run as mailctl
from tests.postfixpeer import PostfixPeer

BOB = "bob@example.net"
BOB_PW = "bob-secret"
LIMIT = random.randint(2, 4)  # user_messages_per_hour
EXTRA = random.randint(1, 3)  # messages past it
RCPT_LIMIT = random.randint(3, 6)  # user_recipients_per_hour


def limited(
    data_dir: Path, dns: DnsServer, port: int, dkim: DkimSetup, redis_url: str, **limits: int
) -> Settings:
    settings = sender_settings(data_dir, dns, port, dkim)
    off = dict.fromkeys(LimitsSettings.model_fields, 0)
    settings.limits = LimitsSettings(**{**off, **limits})
    settings.redis = RedisSettings(url=redis_url, retry_seconds=0.5)
    return settings


class Instance:
    """One mtad (and HTTP API) over the site's storage, with its own
    storage object and so its own shared state, as another process has."""

    def __init__(self, settings: Settings, storage: Any, mtad: Any, http: Any) -> None:
        self.settings, self.storage, self.mtad, self.http = settings, storage, mtad, http

    @property
    def submission(self) -> int:
        return int(self.mtad.port("submission"))


@contextlib.asynccontextmanager
async def instance(settings: Settings, tls_context: ssl.SSLContext, *, accounts: bool):
    from httpapi.service import start as start_http
    from mtad.service import start as start_mtad
    from storage import open_storage

    await asyncio.to_thread(settings.data_dir.mkdir, parents=True, exist_ok=True)
    storage = await open_storage(settings.storage, password_hasher=HASHER)
    try:
        if accounts:
            await storage.directory.add_domain("example.net")
            await storage.directory.add_account(ALICE, ALICE_PW)
            await storage.directory.add_account(BOB, BOB_PW)
        mtad = await start_mtad(settings, storage, tls_context)
        try:
            http = await start_http(settings, storage, None)
            try:
                yield Instance(settings, storage, mtad, http)
            finally:
                await http.close()
        finally:
            await mtad.close()
    finally:
        await storage.close()


def message(sender: str, rcpts: list[str], subject: str) -> bytes:
    body = "".join(f"{uuid.uuid4().hex}\r\n" for _ in range(random.randint(1, 40)))
    return (
        f"From: <{sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.net>\r\n\r\n{body}"
    ).encode()


def smtp_submit(
    port: int, ctx: ssl.SSLContext, user: str, pw: str, rcpts: list[str], subject: str
) -> None:
    """Submits like a mail client on 587 and checks each reply is success."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        client.login(user, pw)
        assert client.mail(user)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(message(user, rcpts, subject))
        assert code == 250, reply


async def api_submit(node: Instance, user: str, pw: str, rcpts: list[str], subject: str) -> None:
    base = f"http://127.0.0.1:{node.http.ports[0]}"
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/login", json={"address": user, "password": pw}) as r:
            assert r.status == 200, await r.text()
            token = (await r.json())["token"]
        async with session.post(
            base + "/v1/messages",
            json={"to": rcpts, "subject": subject, "text": uuid.uuid4().hex},
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            assert r.status == 202, await r.text()


async def subjects_of(storage: Any, entries: list[Any]) -> set[str]:
    found = set()
    for entry in entries:
        head = (await storage.blobs.get(entry.blob_key)).split(b"\r\n\r\n", 1)[0]
        [line] = [x for x in head.split(b"\r\n") if x.startswith(b"Subject: ")]
        found.add(line.removeprefix(b"Subject: ").decode())
    return found


def at_postfix(postfix: PostfixPeer, token: str) -> set[str]:
    return {
        line.removeprefix(b"Subject: ").decode()
        for raw in postfix.messages()
        for line in raw.split(b"\n")
        if line.startswith(b"Subject: " + token.encode())
    }


@contextlib.asynccontextmanager
async def one_site(tmp_path, relay_dns, relay_port, dkim_setup, tls_context, redis_url,
                   count: int, workers: int = 0, **limits: int) -> AsyncIterator[list[Instance]]:
    """``count`` instances over one storage, sharing ``redis_url``."""
    nodes: list[Instance] = []
    async with contextlib.AsyncExitStack() as stack:
        for i in range(count):
            settings = limited(tmp_path / "site", relay_dns, relay_port, dkim_setup, redis_url,
                               **limits)
            settings.queue.workers = workers
            nodes.append(await stack.enter_async_context(
                instance(settings, tls_context, accounts=i == 0)))
        yield nodes


async def test_over_the_limit_is_accepted_held_then_released(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int, dkim_setup: DkimSetup,
    tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext, postfix: PostfixPeer,
    redis_url: str, capsys: Any,
) -> None:
    token = f"limit-{uuid.uuid4().hex[:8]}"
    held_before = OUTBOUND_HELD.value(limit="messages_per_hour")
    async with one_site(tmp_path, relay_dns, relay_port, dkim_setup, tls_context, redis_url,
                        1, workers=4, user_messages_per_hour=LIMIT) as [node]:
        subjects = [f"{token}-{i}" for i in range(LIMIT + EXTRA)]
        for i, subject in enumerate(subjects):  # submission and the API, alternately
            rcpts = [f"user{i}@postfix.test"]
            if i % 2:
                await api_submit(node, ALICE, ALICE_PW, rcpts, subject)
            else:
                await asyncio.to_thread(smtp_submit, node.submission, client_tls_context,
                                        ALICE, ALICE_PW, rcpts, subject)
        # Another account of the site is not held.
        await asyncio.to_thread(smtp_submit, node.submission, client_tls_context,
                                BOB, BOB_PW, ["bob-peer@postfix.test"], f"{token}-bob")

        sent = {*subjects[:LIMIT], f"{token}-bob"}
        await eventually(lambda: at_postfix(postfix, token) == sent or None)

        async def settled() -> list[Any] | None:
            entries = await node.storage.queue.list()
            moving = [e for e in entries if not e.held and e.status != "done"]
            return None if moving else entries

        entries = await eventually(settled)
        held = [e for e in entries if e.held]
        assert await subjects_of(node.storage, held) == set(subjects[LIMIT:])
        assert all(e.sender == ALICE and e.attempts == 0 for e in held)
        assert at_postfix(postfix, token) == sent  # never the held ones
        assert OUTBOUND_HELD.value(limit="messages_per_hour") == held_before + EXTRA
        assert all(e.error.startswith(f"sending limit: {ALICE}: over user_messages_per_hour")
                   for e in held)

        settings = node.settings
        code, out, _ = await asyncio.to_thread(mailctl, settings, capsys, "queue", "list")
        assert code == 0
        for e in held:
            assert f"{e.id:>6}  held" in out
        assert f"held: sending limit: {ALICE}: over user_messages_per_hour = {LIMIT}" in out

        code, out, _ = await asyncio.to_thread(
            mailctl, settings, capsys, "queue", "release", "--account", ALICE.upper()
        )
        assert code == 0, out
        assert f"{EXTRA} queue entr" in out and "account no longer held" in out
        await eventually(lambda: at_postfix(postfix, token) == {*subjects, f"{token}-bob"} or None)


async def test_two_instances_count_together(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int, dkim_setup: DkimSetup,
    tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext, redis_url: str,
) -> None:
    async with one_site(tmp_path, relay_dns, relay_port, dkim_setup, tls_context, redis_url,
                        2, user_recipients_per_hour=RCPT_LIMIT) as nodes:
        total, sizes = 0, []
        while total <= RCPT_LIMIT:  # past the limit, over both instances in turn
            size = random.randint(1, 3)
            node = nodes[len(sizes) % 2]
            rcpts = [f"r{total + k}@postfix.test" for k in range(size)]
            subject = f"rcpts-{len(sizes)}"
            if random.random() < 0.5:
                await api_submit(node, ALICE, ALICE_PW, rcpts, subject)
            else:
                await asyncio.to_thread(smtp_submit, node.submission, client_tls_context,
                                        ALICE, ALICE_PW, rcpts, subject)
            total += size
            sizes.append(size)
        # The first message whose recipients pass the limit, and all after it, are held.
        running, first_over = 0, None
        for index, size in enumerate(sizes):
            running += size
            if running > RCPT_LIMIT and first_over is None:
                first_over = index
        entries = await nodes[1].storage.queue.list()
        assert len(entries) == len(sizes)
        held = {s for s in await subjects_of(nodes[0].storage, [e for e in entries if e.held])}
        assert held == {f"rcpts-{i}" for i in range(first_over, len(sizes))}
        # Bob's mail from either instance goes out.
        await asyncio.to_thread(smtp_submit, nodes[1].submission, client_tls_context,
                                BOB, BOB_PW, ["b@postfix.test"], "bob-free")
        [bobs] = [e for e in await nodes[0].storage.queue.list() if e.sender == BOB]
        assert not bobs.held


async def test_redis_down_counts_per_instance_and_refuses_nothing(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int, dkim_setup: DkimSetup,
    tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port(('127.0.0.1',))}/0"  # nothing listens
    async with one_site(tmp_path, relay_dns, relay_port, dkim_setup, tls_context, nowhere,
                        2, user_messages_per_hour=LIMIT) as nodes:
        # Each instance alone lets LIMIT through, then holds: LIMIT + 1 each.
        for node in nodes:
            for i in range(LIMIT + 1):
                subject = f"down-{nodes.index(node)}-{i}"
                if i % 2:
                    await api_submit(node, ALICE, ALICE_PW, ["x@postfix.test"], subject)
                else:
                    await asyncio.to_thread(smtp_submit, node.submission, client_tls_context,
                                            ALICE, ALICE_PW, ["x@postfix.test"], subject)
        entries = await nodes[0].storage.queue.list()
        assert len(entries) == 2 * (LIMIT + 1)
        held = await subjects_of(nodes[0].storage, [e for e in entries if e.held])
        assert held == {f"down-0-{LIMIT}", f"down-1-{LIMIT}"}

"""Per-account sending limits (issue #22, delivery/limits.py), end to end.

An account submitting with smtplib (STARTTLS + AUTH) and through the HTTP
API's POST /v1/messages is refused the message that would take it past
its limit (450 4.7.1 at DATA, 429 with Retry-After), from either of two
instances sharing the suite's Redis; nothing is queued for it. Its mail
still queued (workers off) is held, with the reason, at that moment; while
flagged its later mail is queued held, until ``mailctl queue release
--account`` sends it all to Debian's Postfix. Another account is not
affected. With Redis unreachable each instance counts alone, no crash.
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
from tests.integration.outbound.test_mailctl_queue import run as mailctl
from tests.ports import free_port
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
) -> tuple[int, str]:
    """Submits like a mail client on 587; the reply to the end of DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=ctx)
        client.login(user, pw)
        assert client.mail(user)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(message(user, rcpts, subject))
        return code, reply.decode()


async def api_submit(
    node: Instance, user: str, pw: str, rcpts: list[str], subject: str
) -> tuple[int, dict[str, str], Any]:
    """POST /v1/messages as the webmail does: (status, headers, JSON body)."""
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
            return r.status, dict(r.headers), await r.json()


async def send(
    node: Instance, ctx: ssl.SSLContext, api: bool, user: str, pw: str, rcpts: list[str],
    subject: str,
) -> str | None:
    """Submits through the API or SMTP; None if accepted, else the refusal's
    text after its checks: 450 4.7.1 on SMTP, 429 with Retry-After (at
    most an hour here, every limit under test being hourly) on the API."""
    if api:
        status, headers, body = await api_submit(node, user, pw, rcpts, subject)
        if status == 202:
            return None
        assert status == 429, body
        assert 0 < int(headers["Retry-After"]) <= 3600
        assert body["error"]["code"] == "sending_limit"
        return str(body["error"]["message"])
    code, reply = await asyncio.to_thread(smtp_submit, node.submission, ctx, user, pw, rcpts,
                                          subject)
    if code == 250:
        return None
    assert code == 450 and reply.startswith("4.7.1 "), (code, reply)
    return reply.removeprefix("4.7.1 ")


def refusal(limit: int, what: str, account: str = ALICE) -> str:
    return f"Sending limit reached: {limit} {what} per hour for {account}; try later"


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


async def test_past_the_limit_is_refused_queue_held_then_released(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int, dkim_setup: DkimSetup,
    tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext, postfix: PostfixPeer,
    redis_url: str, capsys: Any,
) -> None:
    token = f"limit-{uuid.uuid4().hex[:8]}"
    tripped_before = OUTBOUND_HELD.value(limit="messages_per_hour")
    async with one_site(tmp_path, relay_dns, relay_port, dkim_setup, tls_context, redis_url,
                        1, workers=0, user_messages_per_hour=LIMIT) as [node]:
        # Workers off: what is accepted stays queued, undelivered.
        subjects = [f"{token}-{i}" for i in range(LIMIT)]
        for i, subject in enumerate(subjects):  # submission and the API, alternately
            assert await send(node, client_tls_context, i % 2 == 1, ALICE, ALICE_PW,
                              [f"user{i}@postfix.test"], subject) is None
        assert await send(node, client_tls_context, False, BOB, BOB_PW,
                          ["bob-peer@postfix.test"], f"{token}-bob") is None
        assert not any(e.held for e in await node.storage.queue.list())

        for i in range(EXTRA):  # past the limit: refused on both paths, nothing queued
            got = await send(node, client_tls_context, i % 2 == 0, ALICE, ALICE_PW,
                             [f"over{i}@postfix.test"], f"{token}-over-{i}")
            assert got == refusal(LIMIT, "messages")
        entries = await node.storage.queue.list()
        assert len(entries) == LIMIT + 1
        # The first trip held everything Alice had queued, and only hers.
        held = [e for e in entries if e.held]
        assert await subjects_of(node.storage, held) == set(subjects)
        assert all(e.sender == ALICE and e.attempts == 0 for e in held)
        assert all(e.error == f"sending limit: {ALICE}: over user_messages_per_hour = {LIMIT}"
                   for e in held)
        [bobs] = [e for e in entries if e.sender == BOB]
        assert not bobs.held
        assert OUTBOUND_HELD.value(limit="messages_per_hour") == tripped_before + 1

        # Under the limits again (the admin raised them): accepted, queued held.
        node.settings.limits.user_messages_per_hour = LIMIT + EXTRA + 10
        later = [f"{token}-later-{i}" for i in range(2)]
        for i, subject in enumerate(later):
            assert await send(node, client_tls_context, i == 1, ALICE, ALICE_PW,
                              ["later@postfix.test"], subject) is None
        entries = await node.storage.queue.list()
        held = [e for e in entries if e.held]
        assert await subjects_of(node.storage, held) == {*subjects, *later}

        settings = node.settings
        code, out, _ = await asyncio.to_thread(mailctl, settings, capsys, "queue", "list")
        assert code == 0
        for e in held:
            assert f"{e.id:>6}  held" in out
        assert f"held: sending limit: {ALICE}: over user_messages_per_hour = {LIMIT}" in out
        assert f"held: sending limit: {ALICE}: account held after going over a limit" in out

        code, out, _ = await asyncio.to_thread(
            mailctl, settings, capsys, "queue", "release", "--account", ALICE.upper()
        )
        assert code == 0, out
        assert f"{LIMIT + len(later)} queue entr" in out and "account no longer held" in out
        assert not any(e.held for e in await node.storage.queue.list())

    # Workers on (another instance of the site): everything accepted goes out.
    settings = limited(tmp_path / "site", relay_dns, relay_port, dkim_setup, redis_url,
                       user_messages_per_hour=LIMIT)
    settings.queue.workers = 4
    async with instance(settings, tls_context, accounts=False):
        sent = {*subjects, *later, f"{token}-bob"}
        await eventually(lambda: at_postfix(postfix, token) == sent or None)


async def test_two_instances_count_together(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int, dkim_setup: DkimSetup,
    tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext, redis_url: str,
) -> None:
    async with one_site(tmp_path, relay_dns, relay_port, dkim_setup, tls_context, redis_url,
                        2, user_recipients_per_hour=RCPT_LIMIT) as nodes:
        total, turn = 0, 0
        while True:  # towards the limit, over both instances in turn
            size = random.randint(1, 3)
            api = random.random() < 0.5
            rcpts = [f"r{total + k}@postfix.test" for k in range(size)]
            got = await send(nodes[turn % 2], client_tls_context, api, ALICE, ALICE_PW,
                             rcpts, f"rcpts-{turn}")
            if got is not None:
                assert total + size > RCPT_LIMIT, (total, size)
                break
            total += size
            turn += 1
        assert total <= RCPT_LIMIT
        # Refused from the other instance too, on the other path.
        other = nodes[(turn + 1) % 2]
        rcpts = [f"o{k}@postfix.test" for k in range(RCPT_LIMIT - total + 1)]
        assert got == refusal(RCPT_LIMIT, "recipients")
        assert await send(other, client_tls_context, not api, ALICE, ALICE_PW, rcpts,
                          "other") == refusal(RCPT_LIMIT, "recipients")
        entries = await nodes[1].storage.queue.list()
        assert len(entries) == turn  # the refused ones were not queued
        assert all(e.held for e in entries)  # workers off: all still queued, now held
        # Bob's mail from either instance is neither refused nor held.
        for node in nodes:
            assert await send(node, client_tls_context, node is nodes[0], BOB, BOB_PW,
                              ["b@postfix.test"], "bob-free") is None
        bobs = [e for e in await nodes[0].storage.queue.list() if e.sender == BOB]
        assert len(bobs) == 2 and not any(e.held for e in bobs)


async def test_redis_down_counts_per_instance_without_crashing(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int, dkim_setup: DkimSetup,
    tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port(('127.0.0.1',))}/0"  # nothing listens
    async with one_site(tmp_path, relay_dns, relay_port, dkim_setup, tls_context, nowhere,
                        2, user_messages_per_hour=LIMIT) as nodes:
        # Each instance alone lets LIMIT through, then refuses and holds.
        for n, node in enumerate(nodes):
            for i in range(LIMIT + 1):
                got = await send(node, client_tls_context, i % 2 == 1, ALICE, ALICE_PW,
                                 ["x@postfix.test"], f"down-{n}-{i}")
                assert got == (refusal(LIMIT, "messages") if i == LIMIT else None)
            entries = await nodes[0].storage.queue.list()
            assert len(entries) == (n + 1) * LIMIT
            held = await subjects_of(nodes[0].storage, [e for e in entries if e.held])
            assert held == {f"down-{m}-{i}" for m in range(n + 1) for i in range(LIMIT)}

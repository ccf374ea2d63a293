"""Fixtures for the HTTP API suites: a fresh SQLite storage, a running
httpapi service on 127.0.0.1:0, accounts, and an aiohttp client."""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import pytest

from conf.settings import Settings
from httpapi.service import HttpService, start
from storage.backend import open_storage_from_url
from storage.ingest import Delivery, ingest
from storage.model import Account
from tests.conftest import make_settings, storage_url

PASSWORD = "correct horse battery staple"


@pytest.fixture
def http_settings(tmp_path: Path) -> Settings:
    return make_settings(
        tmp_path / "data",
        http={"rate_limit_per_user": 10_000, "rate_limit_per_ip": 10_000},
    )


@pytest.fixture
async def mailstore(tmp_path: Path) -> AsyncIterator[Any]:
    store = await open_storage_from_url(
        storage_url(tmp_path / "data") or "sqlite+aiosqlite:///" + str(tmp_path / "db.sqlite"),
        tmp_path / "blobs",
        password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
    )
    await store.directory.add_domain("example.test")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def service(http_settings: Settings, mailstore: Any) -> AsyncIterator[HttpService]:
    svc = await start(http_settings, mailstore, None)
    try:
        yield svc
    finally:
        await svc.close()


@dataclass
class Api:
    """A logged-in client of the running service."""

    base: str
    session: aiohttp.ClientSession
    account: Account
    token: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.session.request(method, self.base + path, headers=headers,
                                        **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.read()

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        return await self.request("GET", path, **kwargs)


async def login(base: str, session: aiohttp.ClientSession, account: Account) -> Api:
    async with session.post(base + "/v1/login",
                            json={"address": account.address, "password": PASSWORD}) as resp:
        assert resp.status == 200, await resp.text()
        token = (await resp.json())["token"]
    return Api(base, session, account, token, {"Authorization": f"Bearer {token}"})


@pytest.fixture
def base_url(service: HttpService) -> str:
    return f"http://127.0.0.1:{service.ports[0]}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def alice(mailstore: Any) -> Account:
    return await mailstore.directory.add_account("alice@example.test", PASSWORD)


@pytest.fixture
async def bob(mailstore: Any) -> Account:
    return await mailstore.directory.add_account("bob@example.test", PASSWORD)


@pytest.fixture
async def alice_api(base_url: str, http: aiohttp.ClientSession, alice: Account) -> Api:
    return await login(base_url, http, alice)


@pytest.fixture
async def bob_api(base_url: str, http: aiohttp.ClientSession, bob: Account) -> Api:
    return await login(base_url, http, bob)


def make_mail(
    subject: str = "Hello",
    sender: str = "Carol Sender <carol@remote.test>",
    to: str = "alice@example.test",
    body: str = "Hello there.",
    *,
    html: str | None = None,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: str | None = None,
    attachment: tuple[str, str, bytes] | None = None,
    date: dt.datetime | None = None,
) -> bytes:
    """A small RFC 5322 message for delivery in tests."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.format_datetime(date or dt.datetime.now(dt.UTC))
    msg["Message-ID"] = message_id or email.utils.make_msgid(domain="remote.test")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if attachment is not None:
        name, ctype, data = attachment
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


async def deliver(storage: Any, account: Account, raw: bytes, mailbox: str = "INBOX",
                  flags: tuple[str, ...] = ()) -> int:
    """Stores a message through the single ingest path; returns its UID."""
    results = await ingest(storage, [Delivery(account, mailbox, flags)], raw)
    return results[0].uid

"""Fixtures for the SMTP suites: a dnsmasq with the test zone, settings
pointing at it, a populated storage and a running mtad service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conf.settings import Settings
from tests.conftest import copy_test_storage, make_settings
from tests.dnsserver import DnsServer, dns_server
from tests.protocol.smtp.support import DkimKey, make_dkim_key, populate, standard_zone


@pytest.fixture(scope="session")
def dkim_key() -> DkimKey:
    return make_dkim_key("dkim.example")


@pytest.fixture(scope="session")
def dns(dkim_key: DkimKey) -> Iterator[DnsServer]:
    with dns_server(standard_zone(dkim_key)) as server:
        yield server


@pytest.fixture
def smtp_overrides() -> dict:
    """Override in a module to change settings.smtp for its service."""
    return {}


@pytest.fixture
def settings(tmp_path: Path, dns: DnsServer, smtp_overrides: dict) -> Settings:
    return make_settings(
        tmp_path / "data",
        dns=dns.settings(),
        smtp=smtp_overrides,
    )


@pytest.fixture(scope="session")
def populated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the populated database, built once: argon2 hashing
    and migrations are slow, copying a file is not."""
    from storage import open_storage

    data_dir = tmp_path_factory.mktemp("smtp-template") / "data"
    data_dir.mkdir()
    template = make_settings(data_dir)

    async def build() -> None:
        store = await open_storage(template.storage)
        try:
            await populate(store)
        finally:
            await store.close()

    asyncio.run(build())
    return data_dir


@pytest.fixture
async def populated(settings: Settings, populated_template: Path):
    """A fresh copy of the populated storage for this test."""
    from storage import open_storage

    copy_test_storage(populated_template, settings)
    store = await open_storage(settings.storage)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def mta(settings: Settings, populated, tls_context) -> AsyncIterator[object]:
    from mtad.service import start

    service = await start(settings, populated, tls_context)
    try:
        yield service
    finally:
        await service.close()

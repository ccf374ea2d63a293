"""DKIM keys are secrets of the site, kept in the directory (issue #19): a
key made by ``mailctl dkim generate`` on one host signs the mail relayed by
the queue workers of another (their own data dirs), and ``dkim show`` on
any host prints the same record."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import dkim
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from mtad.outbound.worker import QueueRunner
from storage import open_storage_from_url
from tests.conftest import make_settings
from tests.integration.outbound.sink import SinkServer
from tests.unit.test_outbound_mx import FakeResolver
from tests.unit.test_outbound_worker import SENDER, Clock, enqueue, port  # noqa: F401

DOMAIN = "example.net"


def _mailctl(data_dir: Path, url: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mailctl", "dkim", *args,
         "-o", f"server.data_dir={data_dir}", "-o", f"storage.url={url}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _record(output: str) -> str:
    found = re.search(r"\(value: (v=DKIM1;[^)]*)\)", output)
    assert found, output
    return found.group(1)


async def test_a_key_made_on_one_host_signs_on_another(tmp_path: Path, port: int) -> None:  # noqa: F811
    url = f"sqlite+aiosqlite:///{tmp_path / 'site.db'}"
    record = _record(_mailctl(tmp_path / "admin-host", url, "generate", DOMAIN, "--bits", "1024"))
    # No key file left on the admin host, where the other hosts cannot see it.
    assert not list((tmp_path / "admin-host").rglob("*.key"))
    assert _record(_mailctl(tmp_path / "other-host", url, "show", DOMAIN)) == record

    settings = make_settings(tmp_path / "relay-host", queue={"smtp_port": port, "workers": 1})
    storage = await open_storage_from_url(
        url, tmp_path / "blobs", password_hasher=PasswordHasher.from_parameters(CHEAPEST)
    )
    resolver = FakeResolver(mx={}, a={"d.test": ["127.0.0.2"]})
    runner = QueueRunner(settings, storage, resolver, owner="test", clock=Clock())
    try:
        async with SinkServer("127.0.0.2", port) as sink:
            await enqueue(storage, ["x@d.test"])
            await runner.drain()
    finally:
        await runner.close()
        await storage.close()
    data = sink.received[0].data
    assert data.startswith(b"DKIM-Signature:")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"shardmail._domainkey.{DOMAIN}.".encode()
        return record.encode()

    assert dkim.verify(data, dnsfunc=dnsfunc)

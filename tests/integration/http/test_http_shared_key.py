"""The token key is a secret of the site, kept in the directory (issue #19):
instances on different hosts (different data dirs) over one directory
accept each other's tokens, and a key kept in ``data_dir/http_secret`` by
an older version is adopted, so tokens issued before an upgrade stay good."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import aiohttp

from httpapi.auth import SECRET_BYTES, SECRET_FILE, TokenSigner
from httpapi.service import start
from storage.model import Account
from tests.conftest import make_settings
from tests.integration.http.conftest import login


async def _me(http: aiohttp.ClientSession, port: int, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(f"http://127.0.0.1:{port}/v1/me", headers=headers) as resp:
        return resp.status


async def test_instances_on_two_hosts_accept_each_others_tokens(
    tmp_path: Path, mailstore: Any, alice: Account, http: aiohttp.ClientSession
) -> None:
    one = await start(make_settings(tmp_path / "host1"), mailstore, None)
    two = await start(make_settings(tmp_path / "host2"), mailstore, None)
    try:
        api = await login(f"http://127.0.0.1:{one.ports[0]}", http, alice)
        assert await _me(http, two.ports[0], api.token) == 200
        back = await login(f"http://127.0.0.1:{two.ports[0]}", http, alice)
        assert await _me(http, one.ports[0], back.token) == 200
    finally:
        await one.close()
        await two.close()
    # No key is left in a data dir, where a host's copy would drift.
    assert not (tmp_path / "host1" / SECRET_FILE).exists()
    assert not (tmp_path / "host2" / SECRET_FILE).exists()


async def test_a_key_from_the_data_dir_is_adopted(
    tmp_path: Path, mailstore: Any, alice: Account, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path / "old")
    settings.data_dir.mkdir(parents=True)
    key = secrets.token_bytes(SECRET_BYTES + secrets.randbelow(16))
    (settings.data_dir / SECRET_FILE).write_bytes(key)
    issued_before, _ = TokenSigner(key, 3600).issue(alice)
    service = await start(settings, mailstore, None)
    other = await start(make_settings(tmp_path / "new"), mailstore, None)
    try:
        assert await _me(http, service.ports[0], issued_before) == 200
        assert await _me(http, other.ports[0], issued_before) == 200
    finally:
        await service.close()
        await other.close()

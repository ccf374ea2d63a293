"""The argon2 cost comes from ``[auth]`` (argon2_time_cost, argon2_memory_kib,
argon2_parallelism): mailctl hashes new passwords with it, and a daemon
upgrades an older hash when its owner next logs in."""

from __future__ import annotations

import asyncio
import imaplib
import random
import ssl
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from conf.settings import Settings
from tests.conftest import make_settings
from tests.integration.test_mailctl import mailctl, ok, run_with_storage


def cost(t: int, m: int, p: int) -> str:
    return f"m={m},t={t},p={p}"  # as argon2 encodes it in the hash (RFC 9106 PHC string)


def test_defaults_are_the_rfc_9106_low_memory_profile() -> None:
    auth = Settings.model_validate({}).auth
    assert (auth.argon2_time_cost, auth.argon2_memory_kib, auth.argon2_parallelism) == (3, 65536, 4)


def test_mailctl_hashes_with_the_configured_cost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    t, m, p = random.randint(1, 2), random.randint(8200, 20000), random.randint(1, 3)
    options = [
        "-o", f"auth.argon2_time_cost={t}",
        "-o", f"auth.argon2_memory_kib={m}",
        "-o", f"auth.argon2_parallelism={p}",
    ]
    ok(mailctl(data, "domain", "add", "example.org"))
    ok(mailctl(data, "account", *options, "add", "alice@example.org", stdin="pw-alice\n"))

    async def stored(storage):  # type: ignore[no-untyped-def]
        return (await storage.directory.get_account("alice@example.org")).password_hash

    assert cost(t, m, p) in run_with_storage(data, stored)


@pytest.mark.parametrize(
    "key, value",
    [
        ("argon2_memory_kib", 4),  # under RFC 9106's 8 KiB per lane
        ("argon2_memory_kib", 4 * 1024 * 1024 + 1),  # over 4 GiB per verification
        ("argon2_time_cost", 0),
        ("argon2_time_cost", 65),
        ("argon2_parallelism", 256),
    ],
)
def test_bad_cost_is_refused_naming_the_key(tmp_path: Path, key: str, value: int) -> None:
    out = mailctl(tmp_path / "data", "domain", "-o", f"auth.{key}={value}", "list")
    assert out.returncode == 2 and key in out.stderr, out.stderr
    assert "unknown key" not in out.stderr
    assert "Traceback" not in out.stderr


async def test_login_upgrades_an_older_hash(
    tmp_path: Path, tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    from imapd.imap.server import start_imap
    from storage import open_storage, password_hasher

    t, m, p = 1, random.randint(8200, 12000), 1
    settings = make_settings(
        tmp_path / "data",
        auth={"argon2_time_cost": t, "argon2_memory_kib": m, "argon2_parallelism": p},
    )
    settings.data_dir.mkdir(parents=True)
    old = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    storage = await open_storage(settings.storage, data_dir=settings.data_dir,
                                 password_hasher=old)
    await storage.directory.add_domain("example.org")
    await storage.directory.add_account("alice@example.org", "pw-alice")
    await storage.close()

    storage = await open_storage(settings.storage, data_dir=settings.data_dir,
                                 password_hasher=password_hasher(settings.auth))
    servers = await start_imap(settings, storage, tls_context)
    port = servers[1].sockets[0].getsockname()[1]

    def login() -> None:
        with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_tls_context) as imap:
            imap.login("alice@example.org", "pw-alice")

    try:
        await asyncio.to_thread(login)
        account = await storage.directory.get_account("alice@example.org")
        assert cost(t, m, p) in account.password_hash
        await asyncio.to_thread(login)  # the upgraded hash still takes the password
    finally:
        for server in servers:
            server.close()
        await storage.close()

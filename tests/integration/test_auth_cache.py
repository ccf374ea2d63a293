"""The authentication cache (storage/authcache.py, issue #24) on a real
directory behind the real login gate, and through a real imapd: a returning
login costs no argon2 run, a wrong password always does, an entry lasts
``[auth] cache_ttl_seconds``, and a password changed by ``mailctl`` in its
own process is refused at once by the running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import imaplib
import secrets
import ssl
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest

from conf.settings import Settings
from storage.authcache import AuthCache
from storage.sodium_argon2 import SodiumPasswordHasher
from storage.throttle import LoginClient, LoginGate, login_gate
from tests.conftest import make_settings
from tests.integration.test_mailctl import mailctl, ok

USER = "alice@example.org"
OTHER = "bob@example.org"


UNICODE = string.ascii_letters + string.digits + "äöü €!#"
ASCII = string.ascii_letters + string.digits + " !#-_."  # what imaplib sends (it encodes ASCII)


def random_password(alphabet: str = UNICODE) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(secrets.randbelow(20) + 8))


class CountingHasher(SodiumPasswordHasher):
    """The production hasher at a cheap cost, counting its verifications."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8192, parallelism=1)
        self.verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifications += 1
        return super().verify(hash, password)


@dataclass
class Site:
    storage: Any
    hasher: CountingHasher
    gate: LoginGate
    passwords: dict[str, str]

    async def login(self, login: str, password: str, ip: str = "127.0.0.9") -> Any:
        return await self.gate.authenticate(
            self.storage.directory, login, password, LoginClient(ip)
        )


async def open_site(settings: Settings, alphabet: str = UNICODE) -> Site:
    from storage import open_storage

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    hasher = CountingHasher()
    storage = await open_storage(
        settings.storage, data_dir=settings.data_dir, password_hasher=hasher
    )
    await storage.directory.add_domain("example.org")
    passwords = {USER: random_password(alphabet), OTHER: random_password(alphabet)}
    for address, password in passwords.items():
        await storage.directory.add_account(address, password)
    return Site(storage, hasher, login_gate(storage, settings.auth), passwords)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    s = await open_site(make_settings(tmp_path / "data", auth={"cache_ttl_seconds": 300}))
    try:
        yield s
    finally:
        s.gate.pool.close()
        await s.storage.close()


async def test_a_returning_login_costs_no_verification(site: Site) -> None:
    password = site.passwords[USER]
    first = await site.login(USER, password)
    assert first is not None and first.address == USER
    assert site.hasher.verifications == 1
    for login in (USER, USER.upper(), f"  {USER} "):  # every spelling of the account
        again = await site.login(login, password)
        assert again is not None and again.id == first.id
    assert site.hasher.verifications == 1, "a cache hit ran argon2"
    assert site.gate.cache is not None and site.gate.cache.hits == 3
    # The other account's first login is its own: verified.
    assert await site.login(OTHER, site.passwords[OTHER]) is not None
    assert site.hasher.verifications == 2


async def test_a_wrong_password_never_hits(site: Site) -> None:
    password = site.passwords[USER]
    assert await site.login(USER, password) is not None  # now cached
    wrong = [
        password + "x",
        password[:-1],
        password.swapcase() if password.swapcase() != password else password + "Z",
        "",
        site.passwords[OTHER],  # another account's right password
        random_password(),
    ]
    for n, guess in enumerate(wrong, start=1):
        assert await site.login(USER, guess, ip=f"127.0.1.{n}") is None
        assert site.hasher.verifications == 1 + n, f"{guess!r} answered without argon2"
    # ... and each failure was counted: the login name now owes a delay.
    keys = site.gate.keys(USER, LoginClient("127.0.2.1"))
    assert await site.gate.throttle.delay_for(*keys) > 0
    assert site.gate.cache is not None and site.gate.cache.hits == 0
    assert len(site.gate.cache) == 1  # the failures stored nothing


async def test_an_entry_lasts_the_configured_ttl(tmp_path: Path) -> None:
    ttl = float(secrets.randbelow(600) + 5)
    s = await open_site(make_settings(tmp_path / "data", auth={"cache_ttl_seconds": ttl}))
    try:
        assert s.gate.cache is not None and s.gate.cache.ttl == ttl
        now = [1000.0]  # the cache's clock, moved by hand: no timing in the test
        s.gate.cache = AuthCache(ttl, clock=lambda: now[0])
        password = s.passwords[USER]
        assert await s.login(USER, password) is not None
        now[0] += ttl - 0.01
        assert await s.login(USER, password) is not None
        assert s.hasher.verifications == 1
        now[0] += 0.02  # past the first check's expiry: hits do not extend it
        assert await s.login(USER, password) is not None
        assert s.hasher.verifications == 2, "an expired entry was used"
        assert await s.login(USER, password) is not None  # remembered again
        assert s.hasher.verifications == 2
    finally:
        s.gate.pool.close()
        await s.storage.close()


async def test_ttl_zero_verifies_every_login(tmp_path: Path) -> None:
    s = await open_site(make_settings(tmp_path / "data", auth={"cache_ttl_seconds": 0}))
    try:
        assert s.gate.cache is None
        rounds = secrets.randbelow(3) + 2
        for _ in range(rounds):
            assert await s.login(USER, s.passwords[USER]) is not None
        assert s.hasher.verifications == rounds
    finally:
        s.gate.pool.close()
        await s.storage.close()


async def test_a_password_set_here_or_elsewhere_misses(site: Site) -> None:
    """A new hash in the row (set through any directory object, as another
    process would) makes the entry miss: the old password is verified, and
    refused."""
    old = site.passwords[USER]
    assert await site.login(USER, old) is not None
    new = random_password()
    await site.storage.directory.set_password(USER, new)
    assert await site.login(USER, old) is None
    assert site.hasher.verifications == 2
    assert await site.login(USER, new) is not None
    assert await site.login(USER, new) is not None
    assert site.hasher.verifications == 3


async def test_a_returning_login_needs_no_place_a_guess_still_does(tmp_path: Path) -> None:
    """Issue #23: an address whose ``per_ip`` places in the verification
    pool are all taken (a pool of sessions from one address logging in at
    once) still logs in a returning user with the right password, from the
    cache and without argon2; everything that may need a check (a guess, a
    first login, an old password after a change, an address owed a delay)
    is refused TEMPORARY as before (RFC 4954 section 6: 454)."""
    from storage.errors import ErrorKind, StorageError

    per_ip = secrets.randbelow(4) + 1
    settings = make_settings(
        tmp_path / "data", auth={"cache_ttl_seconds": 300, "verify_queue_per_ip": per_ip}
    )
    s = await open_site(settings)
    ip = f"127.0.{secrets.randbelow(200)}.{secrets.randbelow(200) + 1}"

    async def refused(login: str, password: str, at: str = ip) -> None:
        with pytest.raises(StorageError) as caught:
            await s.login(login, password, ip=at)
        assert caught.value.kind is ErrorKind.TEMPORARY

    try:
        password = s.passwords[USER]
        first = await s.login(USER, password, ip=ip)
        assert first is not None and s.hasher.verifications == 1
        with contextlib.ExitStack() as taken:
            for _ in range(per_ip):  # every place of the address in flight
                taken.enter_context(s.gate.pool.place(ip))
            sessions = secrets.randbelow(16) + per_ip + 1
            logged = await asyncio.gather(
                *(s.login(f" {USER.upper()}", password, ip=ip) for _ in range(sessions))
            )
            assert all(a is not None and a.id == first.id for a in logged)
            assert s.hasher.verifications == 1, "a returning login ran argon2"
            assert s.gate.pool.in_flight(ip) == per_ip  # none took a place
            await refused(USER, password + "x")  # a guess
            await refused(OTHER, s.passwords[OTHER])  # a first login
            assert s.hasher.verifications == 1
            new = random_password()
            await s.storage.directory.set_password(USER, new)
            await refused(USER, password)  # known, but the row's hash changed
            s.passwords[USER] = new
        assert await s.login(USER, new, ip=ip) is not None  # cached again
        other_ip = "127.0.250.1"
        await s.gate.throttle.failed(f"ip:{other_ip}")
        with contextlib.ExitStack() as taken:
            for _ in range(per_ip):
                taken.enter_context(s.gate.pool.place(other_ip))
            await refused(USER, new, at=other_ip)  # owed a delay: the whole way
            assert await s.login(USER, new, ip=ip) is not None  # not this address
        assert s.gate.pool.in_flight(ip) == 0 and s.gate.pool.in_flight(other_ip) == 0
    finally:
        s.gate.pool.close()
        await s.storage.close()


def test_the_cache_holds_no_password() -> None:
    """Keys are HMACs under a per-process key; values the matched hash."""
    from storage.model import Account

    password = random_password()
    stored = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g"
    account = Account(7, USER, stored, "default", None, dt.datetime.now(dt.UTC))
    cache = AuthCache(60)
    cache.remember(account, password)
    other = AuthCache(60)
    other.remember(account, password)
    [(key, (_, matched))] = cache._entries.items()
    [other_key] = other._entries
    assert matched == account.password_hash
    assert key != other_key  # a key of its own per process
    assert password.encode() not in key
    assert cache.hit(account, password) and not other.hit(account, password + "!")
    cache.remember_login(USER, password)
    [login_key] = cache._logins
    assert password.encode() not in login_key and USER.encode() not in login_key
    assert cache.knows_login(f" {USER.upper()}", password)
    assert not cache.knows_login(USER, password + "!") and not other.knows_login(USER, password)


@pytest.mark.parametrize("value", ["-1", "-0.5", "1e9"])
def test_a_ttl_that_cannot_work_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="cache_ttl_seconds"):
        make_settings(tmp_path / "data", auth={"cache_ttl_seconds": float(value)})
    out = mailctl(tmp_path / "data", "domain", "-o", f"auth.cache_ttl_seconds={value}", "list")
    assert out.returncode == 2 and "cache_ttl_seconds" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


async def test_mailctl_passwd_is_seen_by_a_running_imapd(
    tmp_path: Path, tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    """imapd (here) caches alice's login; ``mailctl account passwd`` (its
    own process) sets a new password; the very next IMAP LOGIN with the old
    one is refused and the new one works, with no restart and no wait."""
    from imapd.imap.server import start_imap

    settings = make_settings(tmp_path / "data", auth={"cache_ttl_seconds": 300})
    s = await open_site(settings, ASCII)
    servers = await start_imap(settings, s.storage, tls_context)
    port = servers[1].sockets[0].getsockname()[1]

    def login(password: str) -> str:
        with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_tls_context) as imap:
            try:
                return str(imap.login(USER, password)[0])
            except imaplib.IMAP4.error as exc:
                return str(exc)

    try:
        old = s.passwords[USER]
        for _ in range(3):
            assert await asyncio.to_thread(login, old) == "OK"
        assert s.hasher.verifications == 1  # the second and third were hits
        new = random_password(ASCII)
        ok(mailctl(settings.data_dir, "account", "passwd", USER, stdin=new + "\n"))
        refused = await asyncio.to_thread(login, old)
        assert "AUTHENTICATIONFAILED" in refused, refused  # RFC 5530 section 3
        assert await asyncio.to_thread(login, new) == "OK"
        assert await asyncio.to_thread(login, new) == "OK"
        assert s.hasher.verifications == 3  # the old one checked and refused, the new once
    finally:
        for server in servers:
            server.close()
        await s.storage.close()

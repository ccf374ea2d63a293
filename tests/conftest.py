"""Fixtures shared by every suite.

``settings``: Settings with a data dir in tmp_path and every listener on
127.0.0.1 port 0 (ephemeral), plaintext auth allowed off (as in production).
Every Settings built here resolves through :func:`loopback_dns`, a dnsmasq on
127.0.0.1 that answers NXDOMAIN to everything, so no test's SPF, DKIM, DMARC
or MX lookup leaves the machine; tests with records start their own server.
``storage``: a fresh SQLite-backed Storage over that data dir.
``SHARDMAIL_TEST_BACKEND=postgresql``: every storage built through
:func:`make_settings` or :func:`storage_url` (the integration and protocol
suites) is a fresh database on one throwaway PostgreSQL per session instead.
``redis_server`` / ``redis_url``: a real redis-server on a free loopback port.
``tls_context`` / ``client_tls_context``: a trustme CA and a server
certificate for 127.0.0.1/localhost, and a client context trusting it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conf.settings import Settings

LOOPBACK_ANY_PORT = ["127.0.0.1:0"]
# Tests that time latencies (a second for another client, a parser's
# budget on hostile input, IDLE within a second) or load the machine on
# purpose (floods, cluster drills, failover): marked ``serial``, which
# tests/run.sh runs alone after the rest has run in parallel
# (pytest-xdist), so no other test's load can make them fail or slow.
SERIAL = (
    "tests/hostile/",
    # SIGKILL under three senders of multi-megabyte mail, then a restart:
    # beside other tests its stop took over 30 s.
    "tests/integration/test_attachments_once.py::test_sigkill_during_ingest",
    "tests/cluster/",
    "tests/contract/test_failover.py",
    # A stopped PostgreSQL must give 503 within seconds (a time budget).
    "tests/integration/http/test_http_pg_reads.py::test_a_hung_server_makes_reads_503_quickly",
    "tests/contract/test_shared_state.py",
    "tests/integration/http/test_realtime.py",
    "tests/integration/imap/test_imap_login_gate.py",
    "tests/protocol/imap/test_imap_rfc_rules.py",
    "tests/protocol/imap/test_imap_session.py",
    # NOTIFY: hostile lines answered BAD within a time budget.
    "tests/protocol/imap/test_imap_notify.py::test_hostile_notify_is_bad_quickly",
    "tests/protocol/imap/test_imap_notify.py::test_many_mailboxes_cost_a_lookup",
    "tests/unit/test_imap_wire_fuzz.py",
    "tests/unit/test_login_gate.py",
    "tests/unit/test_smtp_fuzz.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SERIAL):
            item.add_marker(pytest.mark.serial)
_LOOPBACK_DNS: list[object] = []


def loopback_dns() -> dict[str, object]:
    """The ``[dns]`` section of an empty-zone dnsmasq on 127.0.0.1, started
    on first use and stopped at the end of the session (see
    :func:`_stop_loopback_dns`)."""
    from tests.dnsserver import Zone, start_dns_server

    if not _LOOPBACK_DNS:
        _LOOPBACK_DNS.append(start_dns_server(Zone()))
    return _LOOPBACK_DNS[0].settings(timeout=2.0)  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def _stop_loopback_dns():
    yield
    from tests.dnsserver import stop_dns_server

    while _LOOPBACK_DNS:
        stop_dns_server(_LOOPBACK_DNS.pop())  # type: ignore[arg-type]


# "postgresql": the suites' storage on PostgreSQL (see storage_url).
TEST_BACKEND = os.environ.get("SHARDMAIL_TEST_BACKEND", "sqlite")
_PG_SERVER: list[object] = []
_PG_URLS: dict[Path, str] = {}


def storage_url(data_dir: Path) -> str | None:
    """The storage URL of a test site whose data dir is ``data_dir``: None
    (SQLite in the data dir, the default), or with
    ``SHARDMAIL_TEST_BACKEND=postgresql`` a fresh database, the same for
    every call with that data dir, on a PostgreSQL started on first use and
    stopped at the end of the session (:func:`_stop_test_servers`)."""
    if TEST_BACKEND == "sqlite":
        return None
    if TEST_BACKEND != "postgresql":
        raise ValueError(f"SHARDMAIL_TEST_BACKEND={TEST_BACKEND!r}: sqlite or postgresql")
    from tests.pgserver import PgServer

    key = Path(data_dir).absolute()
    if key not in _PG_URLS:
        if not _PG_SERVER:
            _PG_SERVER.append(PgServer.start())  # raises: the test fails, never skips
        _PG_URLS[key] = _new_database(None)
    return _PG_URLS[key]


def _new_database(template: str | None) -> str:
    server = _PG_SERVER[0]
    name = None if template is None else template.rsplit("/", 1)[1]
    # Callable from sync code inside a running loop (fixtures, make_settings).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, server.create_database(name)).result()  # type: ignore[attr-defined]


def copy_test_storage(template_dir: Path, settings: Settings) -> None:
    """Starts a test's site from a data dir populated once per session
    (copied into ``settings.data_dir``); on PostgreSQL from a copy of that
    data dir's database too, which ``settings`` then names."""
    shutil.copytree(template_dir, settings.data_dir, dirs_exist_ok=True)
    template = storage_url(template_dir)
    if template is not None:
        url = _new_database(template)
        _PG_URLS[Path(settings.data_dir).absolute()] = url
        settings.storage.url = url


@pytest.fixture(scope="session", autouse=True)
def _no_host_config(tmp_path_factory: pytest.TempPathFactory):
    """No test, nor any daemon or mailctl a test starts, reads the machine's
    own /etc/shardmail/shardmail.toml: on a host that followed the README
    (a second shard configured there) the defaults a test expects were not
    the defaults any more. An empty file stands in for it (SHARDMAIL_CONFIG,
    which processes inherit)."""
    from conf.settings import CONFIG_ENV

    empty = tmp_path_factory.mktemp("config") / "shardmail.toml"
    empty.write_text("")
    before = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = str(empty)
    yield
    if before is None:
        os.environ.pop(CONFIG_ENV, None)
    else:
        os.environ[CONFIG_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def _stop_test_servers():
    yield
    while _PG_SERVER:
        _PG_SERVER.pop().stop()  # type: ignore[attr-defined]
    _PG_URLS.clear()


def make_settings(data_dir: Path, **sections: dict) -> Settings:
    """Settings for tests: loopback port-0 listeners, fast auth delays."""
    base: dict[str, dict] = {
        "server": {"hostname": "mail.test", "data_dir": str(data_dir)},
        "auth": {"failure_delay_seconds": 0.05, "failure_delay_max_seconds": 0.2},
        "smtp": {
            "mx_listen": LOOPBACK_ANY_PORT,
            "submission_listen": LOOPBACK_ANY_PORT,
            "submissions_listen": LOOPBACK_ANY_PORT,
        },
        "imap": {"listen": LOOPBACK_ANY_PORT, "tls_listen": LOOPBACK_ANY_PORT},
        "pop3": {"listen": LOOPBACK_ANY_PORT, "tls_listen": LOOPBACK_ANY_PORT},
        "http": {"listen": LOOPBACK_ANY_PORT},
        # Outbound workers off unless a test turns them on: queued mail stays put.
        "queue": {"workers": 0},
        "dns": loopback_dns(),
    }
    url = storage_url(data_dir)
    if url is not None:
        base["storage"] = {"url": url}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Settings.model_validate(base)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
async def storage(settings: Settings) -> AsyncIterator[object]:
    from argon2 import PasswordHasher, profiles

    from storage import open_storage

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The cheapest argon2 profile: tests log in often; production keeps the RFC 9106 default.
    hasher = PasswordHasher.from_parameters(profiles.CHEAPEST)
    store = await open_storage(settings.storage, password_hasher=hasher)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session (tests/redisserver.py); fails, never
    skips, when it cannot start."""
    from tests.redisserver import RedisServer

    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The URL of the session's Redis, emptied for this test; restarted
    first if an earlier test paused it."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.resume()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def tls_ca():
    import trustme

    return trustme.CA()


@pytest.fixture(scope="session")
def tls_context(tls_ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost", "mail.test").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def client_tls_context(tls_ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="session")
def ca_file(tls_ca, tmp_path_factory) -> Path:
    """The test CA as a PEM file, for mbsync, fetchmail, mpop and swaks."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path

"""The API's hot reads on PostgreSQL (issue #20): a message list and a
message read are one round trip each once the account's token, folder ids
and thread index are known (counted by the server itself,
``log_statement = all``: no pool ping, no separate owner check); and a
server that stops answering (SIGSTOP, as a host that died without a word)
makes them answer 503 within seconds, never hang, and answer again once it
is back."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import asyncpg
import pytest
from sqlalchemy import event

from storage.backend import open_storage_from_url
from storage.sql import pgreaders
from storage.sql.db import PING_TIMEOUT
from tests.integration.http.conftest import Api, deliver, make_mail
from tests.pgserver import PgServer

# The latest a read may answer 503 after the server stopped: the watchdog's
# wait, its probe's time limit, and slack for a loaded machine.
UNANSWERED_WITHIN = pgreaders.READ_CHECK_AFTER + PING_TIMEOUT + 5.0


@pytest.fixture
def pg() -> Iterator[PgServer]:
    """A server of this test's own: one test stops it."""
    server = PgServer.start()  # raises (the test errors) if PostgreSQL cannot run
    try:
        yield server
    finally:
        server.kill()  # SIGKILL ends a stopped server too
        server.stop()


@pytest.fixture
async def mailstore(pg: PgServer, tmp_path: Path) -> AsyncIterator[Any]:
    url = await pg.create_database()
    admin = await asyncpg.connect(
        host="127.0.0.1", port=pg.port, user=pg.user, database=url.rsplit("/", 1)[1]
    )
    try:
        await admin.execute(f"ALTER DATABASE \"{url.rsplit('/', 1)[1]}\" SET log_statement = 'all'")
    finally:
        await admin.close()
    store = await open_storage_from_url(
        url,
        tmp_path / "blobs",
        password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
        fts_indexer=False,  # its merger's checkouts, once a second, are not the requests'
    )
    await store.directory.add_domain("example.test")
    try:
        yield store
    finally:
        await store.close()


async def _filled(api: Api, mailstore: Any, count: int) -> tuple[str, list[str]]:
    """``count`` messages delivered; the INBOX's id and the messages' ids,
    each listed and read once (what a client opening the folder does)."""
    for n in range(count):
        body = random.randbytes(random.randint(10, 2000)).hex()
        await deliver(mailstore, api.account, make_mail(subject=f"m{n}", body=body))
    status, folders = await api.get("/v1/folders")
    assert status == 200, folders
    inbox = next(f["id"] for f in folders["folders"] if f["name"] == "INBOX")
    status, page = await api.get(f"/v1/folders/{inbox}/messages?limit=50")
    assert status == 200, page
    ids = [m["id"] for m in page["messages"]]
    assert len(ids) == count
    for message_id in ids:
        status, _ = await api.get(f"/v1/messages/{message_id}")
        assert status == 200
    return inbox, ids


def _statements(log: Path, start: int) -> list[str]:
    text = log.read_bytes()[start:].decode(errors="replace")
    return [s.strip() for s in re.findall(r"(?:statement|execute [^:]*): (.*)", text)]


# Not per request: the thread index's look at the account's change counter
# (at most once a second while the index knows every message shown).
_NOT_PER_REQUEST = ("SELECT shard_accounts.last_change_id",)


async def test_a_list_and_a_read_are_one_round_trip_each(
    pg: PgServer, alice_api: Api, mailstore: Any
) -> None:
    count = random.randint(5, 20)
    inbox, ids = await _filled(alice_api, mailstore, count)
    log = pg.root / "postgres.log"
    # The pool's checkouts: each pings the server first (a round trip the
    # server's log does not show: the ping is an empty statement).
    checkouts: list[object] = []
    engine = mailstore.databases["default"].engine.sync_engine
    event.listen(engine, "checkout", lambda *args: checkouts.append(args))
    requests = random.randint(20, 40)
    for path in (f"/v1/folders/{inbox}/messages?limit=50", "/v1/messages/{}"):
        start = log.stat().st_size
        checkouts.clear()
        for _ in range(requests):
            status, body = await alice_api.get(path.format(random.choice(ids)))
            assert status == 200, body
        await asyncio.sleep(0.2)  # the server's log is written behind
        ran = [s for s in _statements(log, start) if s and not s.startswith(_NOT_PER_REQUEST)]
        # Every request is one statement: no ping before it, no owner
        # check of its own.
        assert len(ran) == requests, (path, ran)
        assert checkouts == [], (path, len(checkouts))


async def test_a_hung_server_makes_reads_503_quickly_and_they_recover(
    pg: PgServer, alice_api: Api, mailstore: Any
) -> None:
    inbox, ids = await _filled(alice_api, mailstore, random.randint(2, 6))
    paths = [f"/v1/folders/{inbox}/messages?limit=50", f"/v1/messages/{random.choice(ids)}"]
    await asyncio.to_thread(pg.freeze)
    started = time.monotonic()
    try:
        timeout = aiohttp.ClientTimeout(total=UNANSWERED_WITHIN + 30)
        answers = await asyncio.gather(
            *(alice_api.get(p, timeout=timeout) for p in paths for _ in range(3))
        )
        waited = time.monotonic() - started
    finally:
        await asyncio.to_thread(pg.thaw)
    for status, body in answers:
        assert status == 503, body  # RFC 9110 section 15.6.4: try again later
    assert waited < UNANSWERED_WITHIN, waited
    deadline = time.monotonic() + 30
    for path in paths:  # the server answers again: so do the reads
        while True:
            status, body = await alice_api.get(path)
            if status == 200 or time.monotonic() > deadline:
                break
            assert status == 503, body
            await asyncio.sleep(0.2)
        assert status == 200, body

"""Storage roles of issue #19 on every SQL backend: the directory in a
database of its own, shards with replicas and weights, placement of new
accounts, and every instance dropping a cached route when an account's
shard changes."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage.backend import ShardSpec, SqlStorage, open_storage_from_url
from storage.errors import ErrorKind, StorageError
from storage.sql import schema
from tests.contract.conftest import TEST_HASHER

# How long another instance may take to hear of a route change.
ROUTE_EVENT_WAIT = 5.0


@pytest.fixture
async def new_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[str], object]]:
    """``await new_url(name)``: one more empty database of the backend."""
    made: list[str] = []

    async def make(name: str) -> str:
        if backend == "sqlite":
            return f"sqlite+aiosqlite:///{tmp_path / (name + '.db')}"
        url = await request.getfixturevalue("pg_server").server.create_database()
        made.append(url)
        return url

    yield make
    if made:
        server = request.getfixturevalue("pg_server").server
        for url in made:
            await server.drop_database(url)


async def _count(storage: SqlStorage, db_name: str, table: object) -> int:
    db = storage.directory.db if db_name == "directory" else storage.databases[db_name]
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar())


async def test_the_directory_is_a_database_of_its_own(new_url, tmp_path: Path) -> None:
    directory, default, s2 = await new_url("dir"), await new_url("default"), await new_url("s2")
    shards = {"default": ShardSpec(default), "s2": s2}
    storage = await open_storage_from_url(
        directory, tmp_path / "blobs", shards, password_hasher=TEST_HASHER
    )
    try:
        assert list(storage.shards) == ["default", "s2"]
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw", shard="default")
        eve = await storage.directory.add_account("eve@example.org", "pw", shard="s2")
        # The directory holds the accounts, the shards their mailboxes.
        assert await _count(storage, "directory", schema.accounts) == 2
        assert await _count(storage, "directory", schema.mailboxes) == 0
        assert await _count(storage, "default", schema.accounts) == 0
        assert len(await storage.mail(bob).list_mailboxes(bob.id)) == 6
        assert len(await storage.mail(eve).list_mailboxes(eve.id)) == 6
        assert await _count(storage, "default", schema.mailboxes) == 6
        assert await _count(storage, "s2", schema.mailboxes) == 6
        assert (await storage.directory.authenticate("eve@example.org", "pw")) is not None
    finally:
        await storage.close()


async def test_a_shard_is_reached_through_its_replica_when_the_primary_is_gone(
    backend: str, new_url, tmp_path: Path
) -> None:
    """``replicas`` are failover hosts: with the primary's host refusing
    connections, the shard is served by whichever host is read-write."""
    if backend == "sqlite":
        return  # SQLite has no replicas (the settings refuse them)
    live = await new_url("s2")
    with socket.socket() as probe:  # a loopback port nobody listens on: the dead primary
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    host = live.rpartition("@")[2].partition("/")[0]
    dead = live.replace(f"@{host}/", f"@127.0.0.1:{dead_port}/")
    storage = await open_storage_from_url(
        await new_url("dir"),
        tmp_path / "blobs",
        {"s2": ShardSpec(dead, replicas=(live,))},
        password_hasher=TEST_HASHER,
    )
    try:
        await storage.directory.add_domain("example.org")
        eve = await storage.directory.add_account("eve@example.org", "pw", shard="s2")
        assert len(await storage.mail(eve).list_mailboxes(eve.id)) == 6
    finally:
        await storage.close()


async def test_placement_follows_weight_and_current_size(new_url, tmp_path: Path) -> None:
    weights = {"default": 1.0, "a": 2.0, "b": 1.0, "off": 0.0}
    shards = {name: ShardSpec(await new_url(name), weight=w) for name, w in weights.items()}
    shards.pop("default")  # the directory's own database, weight 1
    storage = await open_storage_from_url(
        await new_url("dir"), tmp_path / "blobs", shards, password_hasher=TEST_HASHER
    )
    try:
        d = storage.directory
        await d.add_domain("example.org")
        # Accounts already on "b" (placed by hand) count as its current size.
        preplaced = random.randint(3, 6)
        for i in range(preplaced):
            await d.add_account(f"old{i}@example.org", "pw", shard="b")
        # --shard still overrides, even onto a shard of weight 0.
        assert (await d.add_account("pinned@example.org", "pw", shard="off")).shard == "off"
        # Enough that the weighted shards end with a multiple of the weights' sum.
        share = random.randint(preplaced, preplaced + 4)
        total = 4 * share - preplaced
        placed = [(await d.add_account(f"u{i}@example.org", "pw")).shard for i in range(total)]
        counts = {name: placed.count(name) for name in weights}
        assert counts == {"default": share, "a": 2 * share, "b": share - preplaced, "off": 0}
    finally:
        await storage.close()


async def test_no_shard_taking_new_accounts_is_a_clear_error(new_url, tmp_path: Path) -> None:
    storage = await open_storage_from_url(
        await new_url("dir"),
        tmp_path / "blobs",
        {"default": ShardSpec(await new_url("default"), weight=0)},
        password_hasher=TEST_HASHER,
    )
    try:
        await storage.directory.add_domain("example.org")
        with pytest.raises(StorageError) as err:
            await storage.directory.add_account("bob@example.org", "pw")
        assert err.value.kind is ErrorKind.INVALID and "weight" in str(err.value)
        assert await storage.directory.list_accounts() == []
    finally:
        await storage.close()


async def _until(predicate: Callable[[], bool]) -> bool:
    deadline = asyncio.get_running_loop().time() + ROUTE_EVENT_WAIT
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_set_shard_drops_every_instances_cached_route(new_url, tmp_path: Path) -> None:
    """Two instances over the same databases (LISTEN/NOTIFY on PostgreSQL,
    local sockets on SQLite): once one repoints an account, the other routes
    it to the new shard, by id and by an Account it read before."""
    directory = await new_url("dir")
    shards = {"s2": await new_url("s2")}
    a = await open_storage_from_url(
        directory, tmp_path / "blobs", shards, password_hasher=TEST_HASHER
    )
    b = await open_storage_from_url(directory, tmp_path / "blobs", shards)
    try:
        await a.directory.add_domain("example.org")
        bob = await a.directory.add_account("bob@example.org", "pw", shard="default")
        stale = await b.directory.get_account("bob@example.org")
        assert b.mail(bob.id) is b.stores["default"]  # cached by b
        route = await b.directory.resolve("bob@example.org")
        await a.directory.set_shard("bob@example.org", "s2")
        assert a.mail(bob.id) is a.stores["s2"]
        assert await _until(lambda: b.mail(bob.id) is b.stores["s2"])
        assert b.mail(stale) is b.stores["s2"]
        assert b.mail(route.accounts[0]) is b.stores["s2"]
        assert (await b.directory.resolve("bob@example.org")).accounts[0].shard == "s2"
        # And back, through the other instance.
        await b.directory.set_shard("bob@example.org", "default")
        assert await _until(lambda: a.mail(bob.id) is a.stores["default"])
    finally:
        await a.close()
        await b.close()


async def test_a_shared_secret_is_one_per_site(new_url, tmp_path: Path) -> None:
    """Instances starting at once each offer a key; all keep the one stored
    first, and it outlives them (the directory's database holds it)."""
    directory = await new_url("dir")
    sites = [
        await open_storage_from_url(directory, tmp_path / "blobs", password_hasher=TEST_HASHER)
        for _ in range(3)
    ]
    try:
        offered = [random.randbytes(random.randint(32, 64)) for _ in sites]
        pairs = zip(sites, offered, strict=True)
        kept = await asyncio.gather(
            *(s.directory.shared_secret("http token", key) for s, key in pairs)
        )
        assert len(set(kept)) == 1 and kept[0] in offered
        other = await sites[0].directory.shared_secret("dkim", random.randbytes(40))
        assert other != kept[0]
    finally:
        for s in sites:
            await s.close()
    again = await open_storage_from_url(directory, tmp_path / "blobs")
    try:
        assert await again.directory.shared_secret("http token", b"x" * 32) == kept[0]
    finally:
        await again.close()


async def test_dkim_keys_are_kept_in_the_directory(storage: SqlStorage) -> None:
    d = storage.directory
    assert await d.dkim_key("example.org", "shardmail") is None
    pem = random.randbytes(random.randint(100, 300))
    await d.add_dkim_key("Example.ORG", "s2024", pem)
    # The configured selector, else the domain's first (rotated by hand).
    assert await d.dkim_key("example.org", "shardmail") == ("s2024", pem)
    newer = random.randbytes(random.randint(100, 300))
    await d.add_dkim_key("example.org", "shardmail", newer)
    assert await d.dkim_key("EXAMPLE.org", "shardmail") == ("shardmail", newer)
    with pytest.raises(StorageError) as err:
        await d.add_dkim_key("example.org", "shardmail", pem)
    assert err.value.kind is ErrorKind.EXISTS
    assert await d.dkim_key("example.org", "shardmail") == ("shardmail", newer)

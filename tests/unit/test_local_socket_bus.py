"""The local socket bus: changes between processes of one host over Unix
datagram sockets. Two buses in one loop stand in for two processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.backend import open_storage_from_url, sqlite_events_dir
from storage.events import InProcessEventBus, LocalSocketEventBus
from storage.model import Change, ChangeKind

ACCOUNT = 7


def new_mail(change_id: int = 1, uid: int = 1) -> Change:
    return Change(
        id=change_id,
        account_id=ACCOUNT,
        kind=ChangeKind.NEW,
        mailbox_id=3,
        uid=uid,
        modseq=change_id + 10,
        at=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        data={"flags": ["\\Recent"]},
    )


@pytest.fixture
async def buses() -> AsyncIterator[tuple[LocalSocketEventBus, LocalSocketEventBus]]:
    # A short folder: tmp_path under pytest-xdist (…/popen-gw0/test_…0/) leaves
    # too little of the 107 octets a Unix socket path may have for the names
    # the tests bind there themselves.
    with tempfile.TemporaryDirectory(prefix="smbus-") as root:
        directory = Path(root) / "shardmail.db-events"
        a, b = LocalSocketEventBus(directory), LocalSocketEventBus(directory)
        await a.start()
        await b.start()
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()


async def test_change_reaches_local_and_remote_subscribers_once(buses) -> None:
    a, b = buses
    on_a, on_b = a.subscribe(ACCOUNT), b.subscribe(ACCOUNT)
    change = new_mail()
    await a.publish(change)
    assert await on_b.get(timeout=1.0) == change
    assert await on_a.get(timeout=1.0) == change
    # Exactly once each: nothing echoes back to A, nothing doubles on B.
    assert await on_a.get(timeout=0.2) is None
    assert await on_b.get(timeout=0.05) is None


async def test_other_accounts_do_not_hear(buses) -> None:
    a, b = buses
    other = b.subscribe(ACCOUNT + 1)
    await a.publish(new_mail())
    assert await other.get(timeout=0.2) is None


async def test_directory_is_private(buses) -> None:
    a, _ = buses
    assert stat.S_IMODE(a.directory.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(a.path.stat().st_mode)


async def test_malformed_datagrams_are_ignored(buses) -> None:
    a, b = buses
    on_b = b.subscribe(ACCOUNT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stray:
        for junk in (b"not json", b"\xff\xfe", b"[1, 2]", b'{"id": 1}', b"null",
                     b'{"id":1,"account_id":7,"kind":"bogus","mailbox_id":null,'
                     b'"uid":null,"modseq":1,"at":0,"data":{}}'):
            # Bare, and behind the account id of a subscriber, so it is decoded.
            for datagram in (junk, b"%d %s" % (ACCOUNT, junk), b"x " + junk):
                stray.sendto(datagram, b._address(b.name))  # tmp paths may outgrow sun_path
                await asyncio.sleep(0.001)  # B reads: its queue holds only a few datagrams
    await asyncio.sleep(0.05)
    assert await on_b.get(timeout=0.05) is None
    change = new_mail(2, uid=2)
    await a.publish(change)
    assert await on_b.get(timeout=1.0) == change


async def test_stale_socket_is_removed_on_publish(buses) -> None:
    a, b = buses
    stale = a.directory / "4242-deadbeef.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(stale))
    dead.close()  # a process that died without unlinking
    assert stale.exists()
    a._peers_listed = float("-inf")  # do not wait out the listing cache
    on_b = b.subscribe(ACCOUNT)
    await a.publish(new_mail())
    assert not stale.exists()
    assert (await on_b.get(timeout=1.0)) is not None  # the live peer still heard


async def test_full_peer_queue_drops_without_blocking(buses) -> None:
    a, b = buses
    # B never gets to read while A publishes more than a datagram queue holds.
    b._loop.remove_reader(b._sock.fileno())
    for i in range(1, 200):
        await a.publish(new_mail(i, uid=i))
    on_b = b.subscribe(ACCOUNT)
    b._loop.add_reader(b._sock.fileno(), b._on_readable)
    await a.publish(new_mail(500, uid=500))
    heard = []
    while (change := await on_b.get(timeout=0.3)) is not None:
        heard.append(change.id)
    # What fit in B's receive queue arrives; the rest was dropped, not queued in A.
    assert 0 < len(heard) < 199
    assert heard == sorted(heard)


async def test_new_peer_is_found_after_the_listing_ttl(tmp_path: Path) -> None:
    directory = tmp_path / "events"
    a = LocalSocketEventBus(directory)
    await a.start()
    b = LocalSocketEventBus(directory)
    try:
        await b.start()  # after A listed its peers
        on_b = b.subscribe(ACCOUNT)
        a._peers_listed -= 1.0  # as if a second went by
        await a.publish(new_mail())
        assert (await on_b.get(timeout=1.0)) is not None
    finally:
        await a.close()
        await b.close()


async def test_close_unlinks_its_socket_and_ends_subscriptions(tmp_path: Path) -> None:
    bus = LocalSocketEventBus(tmp_path / "events")
    await bus.start()
    sub = bus.subscribe(ACCOUNT)
    assert bus.path.exists()
    await bus.close()
    assert not bus.path.exists()
    assert await sub.get(timeout=0.5) is None
    await bus.close()  # idempotent
    await bus.publish(new_mail())  # after close: no error


async def test_long_directory_paths_work(tmp_path: Path) -> None:
    # sun_path holds 108 bytes; pytest's tmp dirs plus a data dir can exceed it.
    directory = tmp_path / ("d" * 120) / "events"
    a, b = LocalSocketEventBus(directory), LocalSocketEventBus(directory)
    await a.start()
    await b.start()
    try:
        on_b = b.subscribe(ACCOUNT)
        await a.publish(new_mail())
        assert (await on_b.get(timeout=1.0)) is not None
    finally:
        await a.close()
        await b.close()
    assert os.listdir(directory) == []


async def test_sqlite_storage_uses_the_socket_bus(tmp_path: Path) -> None:
    db = tmp_path / "shardmail.db"
    url = f"sqlite+aiosqlite:///{db}"
    assert sqlite_events_dir(url) == tmp_path / "shardmail.db-events"
    assert sqlite_events_dir("sqlite+aiosqlite:///:memory:") is None
    store = await open_storage_from_url(url, tmp_path / "blobs")
    try:
        assert isinstance(store.events, LocalSocketEventBus)
        path = store.events.path
        assert path.exists()
    finally:
        await store.close()
    assert not path.exists()
    store = await open_storage_from_url(url, tmp_path / "blobs", events="inprocess")
    try:
        assert type(store.events) is InProcessEventBus
    finally:
        await store.close()


async def test_unusable_directory_leaves_the_bus_local(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    bus = LocalSocketEventBus(blocker / "events")
    await bus.start()  # logs a warning; mail is still served
    try:
        sub = bus.subscribe(ACCOUNT)
        await bus.publish(new_mail())
        assert (await sub.get(timeout=1.0)) is not None
    finally:
        await bus.close()

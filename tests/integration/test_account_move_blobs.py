"""Per-shard blob locations (issue #19: each shard has "a blob location").

Shard "east" keeps its blobs in a folder of its own
(``[storage.shards.east] blob_dir``). An account with messages of random
sizes (attachments of random bytes) moves from "default" to "east" with a
mover SIGKILLed halfway and run again; afterwards a real imapd serves every
message byte for byte from east's folder, and the source's blob store no
longer holds the account's blobs.
"""

from __future__ import annotations

import asyncio
import imaplib
import random
import signal
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from conf.settings import load_settings
from storage.backend import SqlStorage
from storage.blob import FsBlobStore, S3BlobStore, gc
from storage.ingest import Delivery, ingest
from storage.model import Account, UidSet
from storage.move import move_account
from tests.integration.test_account_move import (
    BOB,
    BOB_PW,
    DOMAIN,
    MOVE_TIMEOUT,
    _mover,
    _site,
    _storage,
)
from tests.integration.test_cross_process_push import start_daemon, stop

# Above the SQLite pack's 256 KiB: some blobs are files, the rest packed.
MAX_ATTACHMENT = 400_000


def _message(rng: random.Random, n: int) -> bytes:
    """A message with an attachment of random bytes and random length."""
    msg = EmailMessage()
    msg["From"] = f"ann@{DOMAIN}"
    msg["To"] = BOB
    msg["Subject"] = f"blob {n}"
    msg["Message-ID"] = f"<blob{n}.{rng.randrange(10**9)}@{DOMAIN}>"
    msg.set_content("see attached\n" * rng.randint(1, 50))
    data = rng.randbytes(rng.randint(1, MAX_ATTACHMENT))
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename="a.bin")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _fetch_all(port: int, user: str = BOB, password: str = BOB_PW) -> dict[str, bytes]:
    """Every INBOX message of ``user`` through IMAP: Message-ID -> BODY[] bytes."""
    found: dict[str, bytes] = {}
    with imaplib.IMAP4("127.0.0.1", port, timeout=60) as imap:
        imap.login(user, password)
        imap.select("INBOX", readonly=True)
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK", data
        for item in data:
            if isinstance(item, tuple):
                found[_message_id(item[1])] = item[1]
    return found


async def _deliver(store: SqlStorage, account: Account, raw: bytes) -> str:
    """Ingests ``raw`` into the account's INBOX; returns its blob key."""
    (result,) = await ingest(store, [Delivery(account)], raw)
    (stored,) = await store.mail(account).fetch(
        account.id, result.mailbox_id, UidSet.of([result.uid])
    )
    return stored.entry.blob_key


def _message_id(raw: bytes) -> str:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"message-id:")
    )


async def test_a_move_carries_blobs_to_the_target_shards_own_blob_dir(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = await _site(tmp_path, "sqlite", request, blob_dir=str(tmp_path / "east-blobs"))
    rng = random.Random()
    sent = [_message(rng, n) for n in range(rng.randint(25, 40))]
    async with _storage(load_settings(config)) as store:
        assert store.stores["east"].blobs is not store.stores["default"].blobs
        bob = await store.directory.get_account(BOB)
        keys = set()
        for raw in sent:
            keys.add(await _deliver(store, bob, raw))
        for key in keys:  # delivered to default: its blob store holds them, east's not
            assert await store.stores["default"].blobs.exists(key)
            assert not await store.stores["east"].blobs.exists(key)
    east_dir = tmp_path / "east-blobs"
    proc = await _mover(config)
    # Killed while it copies blobs: once east's folder holds some.
    for _ in range(int(MOVE_TIMEOUT / 0.01)):
        if proc.returncode is not None or any(p.is_file() for p in east_dir.glob("??/*")):
            break
        await asyncio.sleep(0.01)
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the move ended before it could be killed"
    again = await _mover(config)
    out, err = await asyncio.wait_for(again.communicate(), MOVE_TIMEOUT)
    assert again.returncode == 0, err.decode()
    assert f"{BOB} is on shard east" in out.decode()
    port = int(config.with_suffix(".ports").read_text().split()[1])
    imapd = await start_daemon("imapd", config, port)
    try:
        fetched = await asyncio.to_thread(_fetch_all, port)
    finally:
        await stop(imapd)
    assert fetched == {_message_id(raw): raw for raw in sent}
    async with _storage(load_settings(config)) as store:
        for key in keys:
            assert await store.stores["east"].blobs.exists(key)
            assert not await store.stores["default"].blobs.exists(key), "left on the source"
        # New mail for BOB now lands in east's blob store.
        bob = await store.directory.get_account(BOB)
        raw = _message(rng, len(sent))
        key = await _deliver(store, bob, raw)
        assert await store.stores["east"].blobs.get(key) == raw
        assert not await store.stores["default"].blobs.exists(key)


CAROL = f"carol@{DOMAIN}"
DAVE = f"dave@{DOMAIN}"
PW = "carol-secret"


async def _all_keys(blobs: Any, keys: set[str]) -> set[str]:
    """``keys`` and every attachment part they refer to."""
    out = set(keys)
    for key in keys:
        out |= await blobs.references(key)
    return out


@pytest.mark.parametrize("east_store", ["fs", "s3"])
async def test_gc_reclaims_a_moved_accounts_blobs_from_its_source_shards_own_store(
    tmp_path: Path, request: pytest.FixtureRequest, east_store: str
) -> None:
    """CAROL lives on shard "east", whose blobs are in a store of its own
    (a folder, or a bucket prefix on the suite's S3 server through
    ``[storage.shards.east] blob_url``);
    DAVE, staying there, holds one of her messages too. While another
    instance holds the GC lease of east's store (a pass running there) she
    moves to "default": the move leaves east's store to that pass. Then a
    GC pass (every store of the site, each under its own lease) removes
    from east's store every blob of hers no one else references, parts
    included, keeps the shared message's, and default's store holds all of
    hers: every message reads back byte for byte over IMAP."""
    if east_store == "s3":
        from tests.swiftserver import SwiftServer

        server = await asyncio.to_thread(SwiftServer.shared)
        where = {"blob_url": server.blob_url(f"east-{uuid.uuid4().hex}")}
    else:
        where = {"blob_dir": str(tmp_path / "east-blobs")}
    config = await _site(tmp_path, "sqlite", request, **where)
    rng = random.Random()
    sent = [_message(rng, n) for n in range(rng.randint(8, 14))]
    async with _storage(load_settings(config)) as store:
        carol = await store.directory.add_account(CAROL, PW, shard="east")
        dave = await store.directory.add_account(DAVE, PW, shard="east")
        east, site = store.stores["east"].blobs, store.blobs
        assert east is not site and east in store.blob_stores()
        assert isinstance(east.inner, S3BlobStore if east_store == "s3" else FsBlobStore)
        keys = {await _deliver(store, carol, raw) for raw in sent}
        shared = await _deliver(store, dave, sent[0])
        mine = await _all_keys(east, keys)
        kept = await _all_keys(east, {shared})
        assert mine - kept, "every blob of hers is shared"
        for key in mine:
            assert await east.exists(key) and not await site.exists(key)
        lease = gc.lease_name(store, east)
        assert lease != gc.LEASE_NAME
        assert await store.stores["default"].acquire_lock(lease, "another-host:1", 600.0)
        await move_account(store, CAROL, "default")
        for key in mine:  # the move left them to the pass holding the lease
            assert await east.exists(key)
        await store.stores["default"].release_lock(lease, "another-host:1")
        report = await gc.collect_once(store, grace_seconds=0.0)
        assert report is not None and report.removed >= len(mine - kept)
        for key in mine - kept:
            assert not await east.exists(key), "left in the source's store"
        for key in kept:
            assert await east.exists(key)
        for key in mine:
            assert await site.exists(key)
    port = int(config.with_suffix(".ports").read_text().split()[1])
    imapd = await start_daemon("imapd", config, port)
    try:
        carols = await asyncio.to_thread(_fetch_all, port, CAROL, PW)
        daves = await asyncio.to_thread(_fetch_all, port, DAVE, PW)
    finally:
        await stop(imapd)
    assert carols == {_message_id(raw): raw for raw in sent}
    assert daves == {_message_id(sent[0]): sent[0]}

"""Shards with blob stores of their own (``[storage.shards.NAME] blob_dir``,
issue #19) on every SQL backend: ingest writes to the account's shard's
store, a move copies the account's blobs to the target's store before the
flip and removes them from the source's after it, and a move killed at any
point leaves every visible message readable and, run again, nothing behind.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from storage import move as mv
from storage.backend import ShardSpec, SqlStorage, open_storage_from_url
from storage.ingest import Delivery, ingest
from storage.model import Account, UidSet
from tests.contract.conftest import TEST_HASHER
from tests.contract.test_move import (
    SOURCE,
    TARGET,
    _after,
    _Killed,
    _raising_at,
    second_shard_url,
)


@pytest.fixture
async def sharded(
    backend: str, database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[SqlStorage]:
    """Shards "default" (blobs in tmp_path/blobs) and "east" (tmp_path/east-blobs)."""
    second = await second_shard_url(backend, tmp_path, request)
    east = ShardSpec(second, blob_dir=str(tmp_path / "east-blobs"))
    storage = await open_storage_from_url(
        database_url, tmp_path / "blobs", {TARGET: east}, password_hasher=TEST_HASHER
    )
    try:
        yield storage
    finally:
        await storage.close()


def _message(rng: random.Random, n: int, to: str) -> bytes:
    """A message whose attachment is random bytes of a random length:
    some blobs are packed (small), some files (above the 256 KiB pack limit)."""
    msg = EmailMessage()
    msg["From"] = "ann@example.org"
    msg["To"] = to
    msg["Subject"] = f"blob {n}"
    msg["Message-ID"] = f"<blob{n}.{rng.randrange(10**9)}@example.org>"
    msg.set_content("attached\n" * rng.randint(1, 30))
    size = rng.choice([rng.randint(1, 5000), rng.randint(260_000, 400_000)])
    msg.add_attachment(rng.randbytes(size), maintype="application", subtype="octet-stream")
    return msg.as_bytes()


async def _contents(storage: SqlStorage, account: Account) -> dict[str, bytes]:
    """Every message the account's shard shows, read from that shard's blob
    store: Message-ID -> raw bytes (a missing blob raises NOT_FOUND)."""
    mail, blobs = storage.mail(account), storage.blobs_for(account)
    found: dict[str, bytes] = {}
    for box in await mail.list_mailboxes(account.id):
        uids = [e.uid for e in await mail.uids(account.id, box.id)]
        for m in await mail.fetch(account.id, box.id, UidSet.of(uids)) if uids else []:
            found[m.parsed.message_id or ""] = await blobs.get(m.entry.blob_key)
    return found


async def _populate(storage: SqlStorage, rng: random.Random) -> tuple[Account, Account, dict]:
    """BOB with messages in two mailboxes, and ANN (same shard) holding a
    copy of one of them: those bytes are hers too and stay on the source."""
    await storage.directory.add_domain("example.org")
    bob = await storage.directory.add_account("bob@example.org", "pw", shard=SOURCE)
    ann = await storage.directory.add_account("ann@example.org", "pw", shard=SOURCE)
    await storage.mail(bob).create_mailbox(bob.id, "Projects")
    sent = {}
    for n in range(rng.randint(12, 20)):
        raw = _message(rng, n, bob.address)
        await ingest(storage, [Delivery(bob, rng.choice(["INBOX", "Projects"]))], raw)
        sent[_message_id(raw)] = raw
    shared = rng.choice(list(sent.values()))
    await ingest(storage, [Delivery(ann)], shared)
    return bob, ann, sent


def _message_id(raw: bytes) -> str:
    from email import message_from_bytes

    return str(message_from_bytes(raw)["Message-ID"])


async def _keys(storage: SqlStorage, account: Account) -> set[str]:
    mail = storage.mail(account)
    keys = set()
    for box in await mail.list_mailboxes(account.id):
        keys |= {e.blob_key for e in await mail.uids(account.id, box.id)}
    return keys


async def test_ingest_writes_each_accounts_shard_blob_store(sharded: SqlStorage) -> None:
    rng = random.Random()
    await sharded.directory.add_domain("example.org")
    bob = await sharded.directory.add_account("bob@example.org", "pw", shard=SOURCE)
    carol = await sharded.directory.add_account("carol@example.org", "pw", shard=TARGET)
    assert sharded.blobs_for(bob) is not sharded.blobs_for(carol)
    for n in range(rng.randint(3, 6)):
        raw = _message(rng, n, bob.address)
        await ingest(sharded, [Delivery(bob), Delivery(carol)], raw)  # one message, two stores
        only_carol = _message(rng, 100 + n, carol.address)
        await ingest(sharded, [Delivery(carol)], only_carol)
        assert (await _contents(sharded, bob))[_message_id(raw)] == raw
        carols = await _contents(sharded, carol)
        assert (carols[_message_id(raw)], carols[_message_id(only_carol)]) == (raw, only_carol)
    for key in await _keys(sharded, carol) - await _keys(sharded, bob):
        assert not await sharded.blobs_for(bob).exists(key)


async def test_garbage_collection_covers_every_shards_blob_store(sharded: SqlStorage) -> None:
    rng = random.Random()
    bob, _, sent = await _populate(sharded, rng)
    await mv.move_account(sharded, bob.address, TARGET)
    east = sharded.stores[TARGET].blobs
    assert east is not None
    stray = await east.put(rng.randbytes(rng.randint(1, 9999)))
    removed = await sharded.collect_garbage(min_age_seconds=0)
    assert removed >= 1 and not await east.exists(stray)
    bob = await sharded.directory.get_account(bob.address)
    assert await _contents(sharded, bob) == sent


KILL_POINTS = ["mid-copy", "fenced", "after-flip", "after-retire", "mid-blob-removal"]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
async def test_a_move_takes_the_blobs_along_and_resumes(
    sharded: SqlStorage, kill_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random()
    bob, ann, sent = await _populate(sharded, rng)
    anns = await _contents(sharded, ann)
    source_blobs = sharded.stores[SOURCE].blobs
    monkeypatch.setattr(mv, "BATCH", rng.randint(2, 4))  # several batches per mailbox
    progress = None
    if kill_at == "mid-copy":
        _after(mv.AccountMove, "_copy_entries", monkeypatch, calls=2)
    elif kill_at == "fenced":
        progress = _raising_at(None, lambda p: p.state is mv.MoveState.FENCED)
    elif kill_at == "after-flip":
        _after(sharded.directory, "set_shard", monkeypatch)
    elif kill_at == "after-retire":
        _after(mv.SqlMailStore, "retire_account", monkeypatch)
    else:
        _after(source_blobs, "delete", monkeypatch, calls=rng.randint(1, 3))
    with pytest.raises(_Killed):
        await mv.move_account(sharded, bob.address, TARGET, progress=progress)
    monkeypatch.undo()
    # Wherever the directory says the account is, every message shown there
    # reads back from that shard's blob store.
    bob = await sharded.directory.get_account(bob.address)
    if bob.shard == SOURCE or kill_at in ("after-flip",):
        assert await _contents(sharded, bob) == sent
    await mv.move_account(sharded, bob.address, TARGET)
    bob = await sharded.directory.get_account(bob.address)
    assert bob.shard == TARGET and sharded.blobs_for(bob) is sharded.stores[TARGET].blobs
    assert await _contents(sharded, bob) == sent
    # Gone from the source's store, but for the bytes ANN still has there.
    kept = await _keys(sharded, ann)
    for key in await _keys(sharded, bob):
        assert await source_blobs.exists(key) == (key in kept)
    assert await _contents(sharded, ann) == anns


async def test_a_move_copies_again_what_the_targets_gc_deleted_meanwhile(
    sharded: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target's store already holds BOB's blobs, unreferenced (so the
    move copies none of them), and its garbage collection deletes them
    after that look, before the move writes the rows naming them: the
    move's transaction finds them marked (``storage/blob/deleting.py``),
    copies them again and commits; every message reads back."""
    from storage.blob import gc

    rng = random.Random()
    bob, _, sent = await _populate(sharded, rng)
    east = sharded.stores[TARGET].blobs
    assert east is not None
    for raw in sent.values():
        await east.put(raw)  # there, named by no row of east
    keys = await _keys(sharded, bob)
    write = mv.AccountMove._write_entries
    passes: list[gc.GcReport] = []

    async def after_gc(self: mv.AccountMove, *args: object) -> None:
        if not passes:
            passes.append(gc.GcReport())
            await gc.collect_store(sharded, east, 0.0, passes[0])
            assert not any([await east.exists(k) for k in keys]), "GC kept them"
        await write(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(mv.AccountMove, "_write_entries", after_gc)
    await mv.move_account(sharded, bob.address, TARGET)
    assert passes and passes[0].removed >= len(keys)
    bob = await sharded.directory.get_account(bob.address)
    assert await _contents(sharded, bob) == sent

"""The HTTP API on an account fenced for a move to another shard (issue
#19, ``storage/move.py``): a write is 503 Service Unavailable (RFC 9110
section 15.6.4), never a 404 or 500, and it lands nowhere."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import pytest

from httpapi.service import start
from storage.backend import SqlStorage, open_storage_from_url
from storage.move import AccountMove, move_account
from tests.integration.http.conftest import PASSWORD, Api, deliver, login, make_mail


async def test_a_write_during_the_fence_is_503_and_changes_nothing(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    await deliver(mailstore, alice, make_mail())
    _, folders = await alice_api.get("/v1/folders")
    inbox = next(f["id"] for f in folders["folders"] if f["name"] == "INBOX")
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    message = page["messages"][0]["id"]
    store = mailstore.stores["default"]
    mover = AccountMove(alice.id, store, store)
    await mover.set_fence(store, "out:east")
    status, body = await alice_api.request(
        "PATCH", f"/v1/messages/{message}", json={"flagged": True}
    )
    assert status == 503, body
    await mover.set_fence(store, None)
    _, after = await alice_api.get(f"/v1/messages/{message}")
    assert after["flagged"] is False, after


@pytest.fixture
async def two_shards(tmp_path: Path) -> AsyncIterator[SqlStorage]:
    """Shards "default" and "east" (SQLite files); on east, another account's
    mailboxes already take the first row ids, so a moved account's mailboxes
    get other row ids there than on default."""
    store = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        tmp_path / "blobs",
        {"east": f"sqlite+aiosqlite:///{tmp_path / 'east.sqlite'}"},
        password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
        events="inprocess",
    )
    try:
        await store.directory.add_domain("example.test")
        await store.directory.add_account("early@example.test", PASSWORD, shard="east")
        yield store
    finally:
        await store.close()


async def test_message_and_folder_ids_survive_a_move(
    http_settings: Any, two_shards: SqlStorage
) -> None:
    rng = random.Random()
    alice = await two_shards.directory.add_account("alice@example.test", PASSWORD, shard="default")
    await two_shards.mail(alice).create_mailbox(alice.id, "Projects")
    for n in range(rng.randint(3, 8)):
        data = rng.randbytes(rng.randint(1, 20_000))
        raw = make_mail(subject=f"m{n}", attachment=("a.bin", "application/octet-stream", data))
        await deliver(two_shards, alice, raw, rng.choice(["INBOX", "Projects"]))
    svc = await start(http_settings, two_shards, None)
    try:
        async with aiohttp.ClientSession() as http:
            api = await login(f"http://127.0.0.1:{svc.ports[0]}", http, alice)
            before = await _listing(api)
            ids = [m for messages in before.values() for m in messages]
            raws = {m: (await api.get(f"/v1/messages/{m}/raw"))[1] for m in ids}
            await move_account(two_shards, alice.address, "east")
            # The ids a client kept still name the same folders and bytes...
            for folder, messages in before.items():
                status, page = await api.get(f"/v1/folders/{folder}/messages")
                assert status == 200, page
                assert {m["id"] for m in page["messages"]} == set(messages)
            for message_id, raw in raws.items():
                assert await api.get(f"/v1/messages/{message_id}/raw") == (200, raw)
            # ...and a fresh listing gives the very same ids.
            assert await _listing(api) == before
    finally:
        await svc.close()


async def _listing(api: Api) -> dict[str, set[str]]:
    """Folder id -> the ids of its messages."""
    _, folders = await api.get("/v1/folders")
    found = {}
    for folder in folders["folders"]:
        _, page = await api.get(f"/v1/folders/{folder['id']}/messages")
        found[folder["id"]] = {m["id"] for m in page["messages"]}
    return found


async def test_threads_follow_the_account_to_its_new_shard(
    http_settings: Any, two_shards: SqlStorage
) -> None:
    """The thread index kept for the account is the old shard's (its keys
    are row ids there): after a move it is rebuilt, though the change log
    ids, which say whether it is current, moved along unchanged."""
    rng = random.Random()
    alice = await two_shards.directory.add_account("alice@example.test", PASSWORD, shard="default")
    roots = [f"<root{n}.{rng.randrange(10**9)}@remote.test>" for n in range(rng.randint(2, 4))]
    for n, root in enumerate(roots):
        await deliver(two_shards, alice, make_mail(f"Plan {n}", message_id=root))
        for _ in range(rng.randint(1, 3)):
            reply = make_mail(f"Re: Plan {n}", in_reply_to=root, references=root)
            await deliver(two_shards, alice, reply)
    svc = await start(http_settings, two_shards, None)
    try:
        async with aiohttp.ClientSession() as http:
            api = await login(f"http://127.0.0.1:{svc.ports[0]}", http, alice)
            threads = await _threads(api)
            assert len(threads) == len(roots)
            await move_account(two_shards, alice.address, "east")
            assert await _threads(api) == threads
    finally:
        await svc.close()


async def _threads(api: Api) -> dict[str, set[str]]:
    """Thread id -> the ids of its messages, as GET /v1/threads/{id} lists them."""
    _, page = await api.get("/v1/search", params={"q": "Plan"})
    found = {}
    for thread_id in {m["thread_id"] for m in page["messages"]}:
        status, thread = await api.get(f"/v1/threads/{thread_id}")
        assert status == 200, thread
        found[thread_id] = {m["id"] for m in thread["messages"]}
    return found

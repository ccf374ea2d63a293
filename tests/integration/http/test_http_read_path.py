"""The API's read path: tokens checked from a short in-process cache that
still honours revocation, list pages and message reads served from caches
that change nothing a client sees (issue #20)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import pytest

from httpapi import auth as auth_module
from httpapi.context import CONTEXT
from httpapi.service import start
from storage.backend import open_storage_from_url
from storage.model import DELETED, SEEN, StoreMode, UidSet
from tests.conftest import storage_url
from tests.integration.http.conftest import Api, deliver, login, make_mail


class Calls:
    """Counts the awaited calls of methods replaced through ``monkeypatch``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._monkeypatch = monkeypatch

    def watch(self, target: Any, name: str) -> Calls:
        original = getattr(target, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await original(*args, **kwargs)

        self._monkeypatch.setattr(target, name, counted)
        return self


async def test_a_token_from_the_login_that_upgrades_the_hash_is_valid(
    base_url: str, http: aiohttp.ClientSession, mailstore: Any, alice: Any
) -> None:
    """A login that rehashes the password with the current argon2 cost
    issues a token bound to the new hash, not to the one it replaced."""
    mailstore.directory.hasher = argon2.PasswordHasher(
        time_cost=1, memory_cost=16, parallelism=1
    )
    api = await login(base_url, http, alice)
    status, me = await api.get("/v1/me")
    assert status == 200, me
    assert me["address"] == alice.address


async def test_a_token_is_checked_against_the_directory_once_per_burst(
    alice_api: Api, mailstore: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests with one token within the cache time read the account once,
    not once each."""
    reads = Calls(monkeypatch).watch(mailstore.directory, "get_account_by_id")
    for _ in range(random.randint(5, 12)):
        assert (await alice_api.get("/v1/me"))[0] == 200
    assert reads.count <= 1


async def test_another_process_changing_the_password_revokes_within_the_cache_time(
    tmp_path: Path, http_settings: Any, mailstore: Any, alice: Any, http: aiohttp.ClientSession
) -> None:
    """A password changed by another process (mailctl) is not heard of: a
    token this process checked stays good at most ``token_cache_seconds``."""
    service = await start(http_settings, mailstore, None)
    try:
        auth = service.app[CONTEXT].auth
        auth.token_cache_seconds = 0.3
        api = await login(f"http://127.0.0.1:{service.ports[0]}", http, alice)
        assert (await api.get("/v1/me"))[0] == 200
        other = await open_storage_from_url(
            storage_url(tmp_path / "data") or "sqlite+aiosqlite:///" + str(tmp_path / "db.sqlite"),
            tmp_path / "blobs",
            password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
        )
        try:
            await other.directory.set_password(alice.address, "changed elsewhere")
        finally:
            await other.close()
        await asyncio.sleep(0.35)
        status, body = await api.get("/v1/me")
        assert status == 401, body
    finally:
        await service.close()


async def test_a_password_changed_here_revokes_a_remembered_token_at_once(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    for _ in range(3):
        assert (await alice_api.get("/v1/me"))[0] == 200
    await mailstore.directory.set_password(alice.address, "a new password entirely")
    assert (await alice_api.get("/v1/me"))[0] == 401


async def test_a_list_of_an_unchanged_account_does_not_read_its_change_log(
    alice_api: Api, mailstore: Any, alice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread index is known current from the account's change counter:
    the change log is read only when something changed."""
    for i in range(random.randint(2, 6)):
        await deliver(mailstore, alice, make_mail(f"Note {i}"))
    status, folders = await alice_api.get("/v1/folders")
    inbox = folders["folders"][0]["id"]
    assert (await alice_api.get(f"/v1/folders/{inbox}/messages"))[0] == 200
    store = mailstore.mail(alice)
    reads = Calls(monkeypatch).watch(store, "account_changes")
    for _ in range(random.randint(3, 8)):
        status, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
        assert status == 200
        assert all(m["thread_id"] for m in page["messages"])
    assert reads.count == 0
    # A reply arriving now is threaded with its parent on the next list.
    parent = page["messages"][-1]
    _, full = await alice_api.get(f"/v1/messages/{parent['id']}")
    await deliver(mailstore, alice, make_mail(
        "Re: " + parent["subject"], in_reply_to=full["message_id"],
        references=full["message_id"]))
    status, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    reply = page["messages"][0]
    assert reply["subject"] == "Re: " + parent["subject"]
    assert reply["thread_id"] == parent["thread_id"]


async def _inbox(api: Api) -> str:
    status, folders = await api.get("/v1/folders")
    assert status == 200
    return str(folders["folders"][0]["id"])


async def test_a_list_page_is_one_read_and_shows_flags_changed_elsewhere(
    alice_api: Api, mailstore: Any, alice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page read checks the folder itself (no mailbox read of its own);
    remembered items never hide a flag change made over IMAP."""
    uids = [await deliver(mailstore, alice, make_mail(f"Item {i}"))
            for i in range(random.randint(3, 7))]
    inbox = await _inbox(alice_api)
    store = mailstore.mail(alice)
    mailbox_reads = Calls(monkeypatch).watch(store, "get_mailbox_by_id")
    status, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    assert status == 200 and all(m["unread"] for m in page["messages"])
    assert mailbox_reads.count == 0
    seen = random.choice(uids)
    inbox_row = (await store.get_mailbox(alice.id, "INBOX")).id
    await store.store_flags(alice.id, inbox_row, UidSet.of([seen]), StoreMode.ADD, [SEEN])
    _, again = await alice_api.get(f"/v1/folders/{inbox}/messages")
    read = {m["subject"] for m in again["messages"] if not m["unread"]}
    assert read == {f"Item {uids.index(seen)}"}
    assert [m["id"] for m in again["messages"]] == [m["id"] for m in page["messages"]]


async def test_a_repeated_list_is_answered_kept_and_follows_changes_made_elsewhere(
    alice_api: Api,
    mailstore: Any,
    alice: Any,
    service: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unchanged folder page is answered with the bytes built for it
    before (nothing encoded again, no page query); flags, an expunge and new
    mail written by another process show on the very next list, each
    answer the same as one built afresh."""
    from httpapi import folders as folders_module

    subjects = [f"Kept {i} {random.randbytes(3).hex()}" for i in range(random.randint(3, 8))]
    uids = [await deliver(mailstore, alice, make_mail(s)) for s in subjects]
    inbox = await _inbox(alice_api)
    path = f"/v1/folders/{inbox}/messages?limit={random.randint(2, 9)}"
    encoded: list[Any] = []
    encode = folders_module.encode_json
    monkeypatch.setattr(folders_module, "encode_json", lambda d: encoded.append(d) or encode(d))
    pages = service.app[CONTEXT].list_pages

    async def listed() -> Any:
        status, page = await alice_api.get(path)
        assert status == 200, page
        return page

    first = await listed()
    assert len(encoded) == 1
    for _ in range(random.randint(2, 5)):
        assert await listed() == first
    assert len(encoded) == 1  # the kept answer, not built again

    other = await open_storage_from_url(
        storage_url(tmp_path / "data") or "sqlite+aiosqlite:///" + str(tmp_path / "db.sqlite"),
        tmp_path / "blobs",
        password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
    )
    try:
        theirs = other.mail(alice)
        box = (await theirs.get_mailbox(alice.id, "INBOX")).id
        newest = UidSet.of([uids[-1]])
        changes = [
            lambda: theirs.store_flags(alice.id, box, newest, StoreMode.ADD, [SEEN]),
            lambda: theirs.store_flags(alice.id, box, newest, StoreMode.ADD, [DELETED]),
            lambda: theirs.expunge(alice.id, box, newest),
            lambda: deliver(other, alice, make_mail("Arrived elsewhere")),
        ]
        for change in changes:
            await change()
            before = len(encoded)
            page = await listed()
            assert len(encoded) == before + 1
            monkeypatch.setattr(pages, "_pages", {})  # nothing kept: built afresh
            assert await listed() == page
    finally:
        await other.close()
    assert page["messages"][0]["subject"] == "Arrived elsewhere"
    assert subjects[-1] not in {m["subject"] for m in page["messages"]}


async def test_listing_an_unknown_or_foreign_folder_is_404_before_bad_parameters(
    alice_api: Api, bob_api: Api
) -> None:
    bobs = await _inbox(bob_api)
    for query in ("", "?limit=0", "?cursor=junk"):
        status, body = await alice_api.get(f"/v1/folders/{bobs}/messages{query}")
        assert status == 404, body
        assert body["error"]["code"] == "not_found"
    status, body = await alice_api.get(f"/v1/folders/{await _inbox(alice_api)}/messages?limit=0")
    assert status == 400


async def test_reading_a_message_again_reads_no_blob_and_answers_the_same(
    alice_api: Api, mailstore: Any, alice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message's content (headers, text, sanitized HTML, attachment sizes)
    is kept by its content-addressed blob: a second read, and a read of a
    copy in another folder, answer the same without touching the blob or
    reading the folder apart from the entry."""
    data = random.randbytes(random.randint(1, 5000))
    raw = make_mail("Read twice", body="text " * random.randint(1, 99),
                    html="<p>hi <script>x()</script></p>",
                    attachment=("data.bin", "application/octet-stream", data))
    await deliver(mailstore, alice, raw)
    inbox = await _inbox(alice_api)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    message_url = f"/v1/messages/{page['messages'][0]['id']}"
    status, first = await alice_api.get(message_url)
    assert status == 200 and first["attachments"][0]["size"] == len(data)
    blobs = mailstore.blobs_for(alice)
    store = mailstore.mail(alice)
    touched = Calls(monkeypatch)
    for target, name in ((blobs, "get_range"), (blobs, "get"), (store, "get_mailbox_by_id")):
        touched.watch(target, name)
    status, second = await alice_api.get(message_url)
    assert status == 200
    assert second == first
    assert touched.count == 0
    status, moved = await alice_api.request(
        "PATCH", message_url, json={"folder_id": (await alice_api.get("/v1/folders"))[1][
            "folders"][-1]["id"]})
    assert status == 200
    status, third = await alice_api.get(f"/v1/messages/{moved['id']}")
    assert status == 200
    assert {k: v for k, v in third.items() if k not in ("id", "folder_id", "attachments")} == {
        k: v for k, v in first.items() if k not in ("id", "folder_id", "attachments")}
    assert third["attachments"][0]["url"] == f"/v1/messages/{moved['id']}/attachments/0"


async def test_lists_within_a_second_read_nothing_for_threads_and_regroup_after(
    base_url: str, alice_api: Api, mailstore: Any, alice: Any, service: Any,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shown messages the thread index knows need no storage read while it
    was checked less than ``check_seconds`` ago; a regrouping (the thread's
    first message deleted over IMAP) shows once that time has passed."""
    threads = service.app[CONTEXT].threads
    threads.check_seconds = 0.3
    root_id = f"<root.{random.randbytes(4).hex()}@remote.test>"
    root_uid = await deliver(mailstore, alice, make_mail("Plan", message_id=root_id))
    await deliver(mailstore, alice, make_mail("Re: Plan", in_reply_to=root_id,
                                              references=root_id))
    inbox = await _inbox(alice_api)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    [before] = {m["thread_id"] for m in page["messages"]}
    store = mailstore.mail(alice)
    reads = Calls(monkeypatch).watch(store, "last_change_id")
    for _ in range(random.randint(2, 5)):
        assert (await alice_api.get(f"/v1/folders/{inbox}/messages"))[0] == 200
    assert reads.count == 0
    box = (await store.get_mailbox(alice.id, "INBOX")).id
    await store.store_flags(alice.id, box, UidSet.of([root_uid]), StoreMode.ADD, [DELETED])
    await store.expunge(alice.id, box, UidSet.of([root_uid]))
    await asyncio.sleep(0.35)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    [reply] = page["messages"]
    assert reply["thread_id"] not in (None, before)


async def test_folder_ids_are_remembered_and_a_new_folder_is_found_at_once(
    alice_api: Api, mailstore: Any, alice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lists and reads of known folders read no mailbox list; a folder
    created over IMAP since is resolved and rendered in its own ids."""
    await deliver(mailstore, alice, make_mail("Known"))
    inbox = await _inbox(alice_api)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    listed = Calls(monkeypatch).watch(mailstore.mail(alice), "list_mailboxes")
    for _ in range(random.randint(2, 5)):
        assert (await alice_api.get(f"/v1/folders/{inbox}/messages"))[0] == 200
        assert (await alice_api.get(f"/v1/messages/{page['messages'][0]['id']}"))[0] == 200
    assert listed.count == 0
    name = f"Projects {random.randbytes(3).hex()}"
    await mailstore.mail(alice).create_mailbox(alice.id, name)
    await deliver(mailstore, alice, make_mail("In the new folder"), mailbox=name)
    _, folders = await alice_api.get("/v1/folders")
    [new] = [f for f in folders["folders"] if f["name"] == name]
    status, page = await alice_api.get(f"/v1/folders/{new['id']}/messages")
    assert status == 200, page
    [item] = page["messages"]
    assert item["folder_id"] == new["id"]
    status, read = await alice_api.get(f"/v1/messages/{item['id']}")
    assert status == 200 and read["id"] == item["id"] and read["folder_id"] == new["id"]


async def test_remembered_tokens_are_bounded_and_bad_ones_never_kept(
    alice_api: Api, service: Any, alice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client presenting many tokens (valid, or forged) cannot grow the
    process: at most TOKEN_CACHE_MAX are kept, and refused ones never."""
    limit = random.randint(3, 9)
    monkeypatch.setattr(auth_module, "TOKEN_CACHE_MAX", limit)
    auth = service.app[CONTEXT].auth
    for n in range(limit * 3):
        token, _ = auth.signer.issue(alice, now=time.time() - n)
        status, _ = await alice_api.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert status == 200
        assert len(auth._tokens) <= limit
    before = len(auth._tokens)
    for _ in range(random.randint(5, 20)):
        forged = "sm1." + random.randbytes(random.randint(10, 60)).hex() + ".x"
        status, _ = await alice_api.get("/v1/me", headers={"Authorization": f"Bearer {forged}"})
        assert status == 401
    assert len(auth._tokens) == before

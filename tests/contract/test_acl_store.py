"""RFC 4314 ACLs in the mail store and the one place that enforces them
(storage/acl.py), on every SQL backend: entries set and removed, RENAME
keeps and DELETE drops a mailbox's ACL, removing the owner or the
grantee drops their rows, a grantee finds what was granted on another
shard, an account move carries the ACL, and a granted store refuses
what the rights do not allow."""

from __future__ import annotations

import asyncio
import random

import pytest

from storage import acl
from storage import move as mv
from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.ingest import Delivery, ingest
from storage.model import DELETED, SEEN, Account, StoreMode, UidSet
from tests.contract.test_move import SOURCE, TARGET, sharded  # noqa: F401 (fixture)


def _message() -> bytes:
    body = random.randbytes(random.randint(10, 3000)).hex()
    return f"From: a@example.net\r\nSubject: s\r\n\r\n{body}\r\n".encode()


async def _people(storage: SqlStorage) -> tuple[Account, Account]:
    await storage.directory.add_domain("example.org")
    alice = await storage.directory.add_account("alice@example.org", "pw", shard=SOURCE)
    bob = await storage.directory.add_account("bob@example.org", "pw", shard=TARGET)
    return alice, bob


async def test_set_list_remove(sharded: SqlStorage) -> None:  # noqa: F811
    alice, bob = await _people(sharded)
    mail = sharded.mail(alice)
    team = await mail.create_mailbox(alice.id, "Team")
    await mail.set_acl(alice.id, team.id, bob.id, "lr")
    await mail.set_acl(alice.id, team.id, acl.ANYONE_ID, "l")
    assert await mail.acl(alice.id, team.id) == {bob.id: "lr", acl.ANYONE_ID: "l"}
    await mail.set_acl(alice.id, team.id, bob.id, "lrswi")
    assert (await mail.acl(alice.id, team.id))[bob.id] == "lrswi"
    await mail.set_acl(alice.id, team.id, bob.id, "")
    assert await mail.acl(alice.id, team.id) == {acl.ANYONE_ID: "l"}
    # Only the owner's own mailbox: carol's INBOX (same shard) is not alice's.
    carol = await sharded.directory.add_account("carol@example.org", "pw", shard=SOURCE)
    theirs = await sharded.mail(carol).get_mailbox(carol.id, "INBOX")
    with pytest.raises(StorageError) as err:
        await mail.set_acl(alice.id, theirs.id, bob.id, "lr")
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_grants_across_shards_follow_rename_and_delete(sharded: SqlStorage) -> None:  # noqa: F811
    alice, bob = await _people(sharded)
    assert sharded.mail(alice) is not sharded.mail(bob)  # two shards
    mail = sharded.mail(alice)
    team = await mail.create_mailbox(alice.id, "Team")
    await mail.set_acl(alice.id, team.id, bob.id, "lr")
    found = await acl.grants_to(sharded, bob)
    assert [(g.owner_id, g.name, g.rights) for g in found] == [(alice.id, "Team", "lr")]
    assert await acl.grants_to(sharded, alice) == []  # nothing granted to the owner
    await mail.rename_mailbox(alice.id, "Team", "Crew")
    assert [g.name for g in await acl.grants_to(sharded, bob)] == ["Crew"]
    access = await acl.open_mailbox(sharded, bob, alice.address, "Crew")
    assert access.rights == frozenset("lr") and access.mailbox.id == team.id
    await mail.delete_mailbox(alice.id, "Crew")
    assert await acl.grants_to(sharded, bob) == []
    again = await mail.create_mailbox(alice.id, "Crew")
    assert await mail.acl(alice.id, again.id) == {}


async def test_removing_grantee_or_owner_drops_rows(sharded: SqlStorage) -> None:  # noqa: F811
    alice, bob = await _people(sharded)
    carol = await sharded.directory.add_account("carol@example.org", "pw", shard=TARGET)
    mail = sharded.mail(alice)
    team = await mail.create_mailbox(alice.id, "Team")
    await mail.set_acl(alice.id, team.id, bob.id, "lr")
    await mail.set_acl(alice.id, team.id, carol.id, "lri")
    bobs = await sharded.mail(bob).create_mailbox(bob.id, "Bob's")
    await sharded.mail(bob).set_acl(bob.id, bobs.id, carol.id, "l")
    await sharded.directory.remove_account(bob.address)
    assert await mail.acl(alice.id, team.id) == {carol.id: "lri"}
    assert [g.owner_id for g in await acl.grants_to(sharded, carol)] == [alice.id]
    await sharded.directory.remove_account(alice.address)
    assert await acl.grants_to(sharded, carol) == []


async def test_move_carries_the_acl(sharded: SqlStorage) -> None:  # noqa: F811
    alice, bob = await _people(sharded)
    mail = sharded.mail(alice)
    team = await mail.create_mailbox(alice.id, "Team")
    await mail.set_acl(alice.id, team.id, bob.id, "lrs")
    await mv.move_account(sharded, alice.address, TARGET)
    moved = await sharded.directory.get_account(alice.address)
    assert moved.shard == TARGET
    access = await acl.open_mailbox(sharded, bob, alice.address, "Team")
    assert access.rights == frozenset("lrs")
    assert [g.name for g in await acl.grants_to(sharded, bob)] == ["Team"]


async def test_granted_store_enforces_rights(sharded: SqlStorage) -> None:  # noqa: F811
    """RFC 4314 section 4, in the storage layer: reads need "r", \\Seen
    "s", \\Deleted "t", other flags "w", EXPUNGE "e"; a STORE with some
    allowed flags changes those alone; other mailboxes are NOT_FOUND;
    without "l" or "r" the mailbox is as good as absent."""
    alice, bob = await _people(sharded)
    mail = sharded.mail(alice)
    team = await mail.create_mailbox(alice.id, "Team")
    raw = _message()
    await ingest(sharded, [Delivery(alice, team.id)], raw)
    with pytest.raises(StorageError) as err:
        await acl.open_mailbox(sharded, bob, alice.address, "Team")
    assert err.value.kind is ErrorKind.NOT_FOUND
    await mail.set_acl(alice.id, team.id, bob.id, "l")
    access = await acl.open_mailbox(sharded, bob, alice.address, "Team")
    store = access.store
    one = UidSet.of([1])
    with pytest.raises(StorageError) as err:
        await store.fetch(alice.id, team.id, one)
    assert err.value.kind is ErrorKind.NO_PERMISSION
    store.rights = frozenset("lrs")
    (fetched,) = await store.fetch(alice.id, team.id, one)
    assert await sharded.blobs_for(alice).get(fetched.entry.blob_key) == raw
    result = await store.store_flags(alice.id, team.id, one, StoreMode.ADD, [SEEN, "\\Flagged"])
    assert [e.flags for e in result.updated] == [frozenset({SEEN})]
    with pytest.raises(StorageError) as err:
        await store.store_flags(alice.id, team.id, one, StoreMode.ADD, [DELETED])
    assert err.value.kind is ErrorKind.NO_PERMISSION
    # A replacing STORE sets what "s" allows and keeps the rest as it is.
    await mail.store_flags(alice.id, team.id, one, StoreMode.ADD, ["\\Flagged", "$Team"])
    result = await store.store_flags(alice.id, team.id, one, StoreMode.REPLACE, [])
    assert [e.flags for e in result.updated] == [frozenset({"\\Flagged", "$Team"})]
    result = await store.store_flags(alice.id, team.id, one, StoreMode.REPLACE, [SEEN, DELETED])
    assert [e.flags for e in result.updated] == [frozenset({SEEN, "\\Flagged", "$Team"})]
    store.rights = frozenset("lr")
    with pytest.raises(StorageError) as err:
        await store.store_flags(alice.id, team.id, one, StoreMode.REPLACE, [SEEN])
    assert err.value.kind is ErrorKind.NO_PERMISSION
    store.rights = frozenset("lrs")
    with pytest.raises(StorageError) as err:
        await store.expunge(alice.id, team.id)
    assert err.value.kind is ErrorKind.NO_PERMISSION
    inbox = await mail.get_mailbox(alice.id, "INBOX")
    with pytest.raises(StorageError) as err:
        await store.fetch(alice.id, inbox.id, one)
    assert err.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(AttributeError):
        store.delete_mailbox  # noqa: B018 (deny by default: no such method here)
    store.rights = frozenset("lrte")
    await store.store_flags(alice.id, team.id, one, StoreMode.ADD, [DELETED])
    assert await store.expunge(alice.id, team.id) == [1]


async def test_concurrent_changes_all_hold(sharded: SqlStorage) -> None:  # noqa: F811
    """SETACL "+x" read-modify-writes under the owner's lock: rights added
    at once by several sessions are all kept, then all taken away."""
    alice, bob = await _people(sharded)
    mail = sharded.mail(alice)
    team = await mail.create_mailbox(alice.id, "Team")
    letters = random.sample(acl.RIGHTS, 6)
    await asyncio.gather(
        *(acl.change_rights(mail, alice.id, team.id, bob.id, f"+{r}") for r in letters)
    )
    assert frozenset((await mail.acl(alice.id, team.id))[bob.id]) == frozenset(letters)
    await asyncio.gather(
        *(acl.change_rights(mail, alice.id, team.id, bob.id, f"-{r}") for r in letters)
    )
    assert await mail.acl(alice.id, team.id) == {}

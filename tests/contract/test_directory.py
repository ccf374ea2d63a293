"""Directory contract: domains, accounts, aliases, resolve and authenticate,
on every SQL backend."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.model import DEFAULT_MAILBOXES


@pytest.fixture
async def site(storage: SqlStorage) -> SqlStorage:
    await storage.directory.add_domain("example.org")
    await storage.directory.add_domain("Example.COM")
    return storage


async def test_domains(site: SqlStorage) -> None:
    d = site.directory
    assert [x.name for x in await d.list_domains()] == ["example.com", "example.org"]
    assert await d.is_local_domain("EXAMPLE.org")
    assert not await d.is_local_domain("example.net")
    with pytest.raises(StorageError) as err:
        await d.add_domain("example.org")
    assert err.value.kind is ErrorKind.EXISTS


async def test_remove_domain_refused_while_used(site: SqlStorage) -> None:
    d = site.directory
    await d.add_account("bob@example.org", "pw")
    with pytest.raises(StorageError) as err:
        await d.remove_domain("example.org")
    assert err.value.kind is ErrorKind.INVALID
    await d.add_alias("@example.com", "bob@example.org")
    await d.add_alias("info@example.com", "bob@example.org")
    with pytest.raises(StorageError):
        await d.remove_domain("example.com")
    await d.remove_alias("@example.com")
    with pytest.raises(StorageError):
        await d.remove_domain("example.com")
    await d.remove_alias("info@example.com")
    await d.remove_domain("example.com")
    assert not await d.is_local_domain("example.com")
    with pytest.raises(StorageError) as err:
        await d.remove_domain("example.com")
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_accounts(site: SqlStorage) -> None:
    d = site.directory
    bob = await d.add_account("Bob@Example.ORG", "secret", quota_bytes=1000)
    assert bob.address == "bob@example.org"
    assert bob.shard == "default" and bob.quota_bytes == 1000
    assert bob.password_hash.startswith("$argon2id$")
    assert (await d.get_account("BOB@example.org")).id == bob.id
    assert (await d.get_account_by_id(bob.id)).address == bob.address
    with pytest.raises(StorageError) as err:
        await d.add_account("bob@example.org", "x")
    assert err.value.kind is ErrorKind.EXISTS
    with pytest.raises(StorageError) as err:
        await d.add_account("eve@nowhere.test", "x")
    assert err.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(StorageError) as err:
        await d.get_account("nobody@example.org")
    assert err.value.kind is ErrorKind.NOT_FOUND
    await d.add_account("carol@example.com", "pw")
    assert [a.address for a in await d.list_accounts()] == [
        "bob@example.org",
        "carol@example.com",
    ]
    assert [a.address for a in await d.list_accounts("example.com")] == ["carol@example.com"]
    await d.set_quota("bob@example.org", None)
    assert (await d.get_account("bob@example.org")).quota_bytes is None


async def test_new_account_has_default_mailboxes(site: SqlStorage) -> None:
    bob = await site.directory.add_account("bob@example.org", "pw")
    boxes = {m.name: m.special_use for m in await site.mail(bob).list_mailboxes(bob.id)}
    assert boxes == dict(DEFAULT_MAILBOXES)


async def test_remove_account(site: SqlStorage) -> None:
    d = site.directory
    bob = await d.add_account("bob@example.org", "pw")
    await d.remove_account("bob@example.org")
    with pytest.raises(StorageError):
        await d.get_account("bob@example.org")
    assert await site.mail(bob.id).list_mailboxes(bob.id) == []
    again = await d.add_account("bob@example.org", "pw")
    assert len(await site.mail(again).list_mailboxes(again.id)) == len(DEFAULT_MAILBOXES)


async def test_authenticate(site: SqlStorage) -> None:
    d = site.directory
    bob = await d.add_account("bob@example.org", "correct horse")
    ok = await d.authenticate("BOB@example.org", "correct horse")
    assert ok is not None and ok.id == bob.id
    assert await d.authenticate("bob@example.org", "wrong") is None
    assert await d.authenticate("nobody@example.org", "correct horse") is None
    assert await d.authenticate("not an address", "x") is None
    await d.set_password("bob@example.org", "new one")
    assert await d.authenticate("bob@example.org", "correct horse") is None
    assert await d.authenticate("bob@example.org", "new one") is not None


async def test_authenticate_unknown_user_costs_a_verification(site: SqlStorage) -> None:
    """An unknown login runs one argon2 verification too (against a dummy
    hash), so response time does not reveal which logins exist."""
    verified: list[str] = []

    class CountingHasher(PasswordHasher):
        def verify(self, hash: str | bytes, password: str | bytes) -> bool:
            verified.append(str(hash))
            return super().verify(hash, password)

    d = site.directory
    d.hasher = CountingHasher.from_parameters(CHEAPEST)
    bob = await d.add_account("bob@example.org", "pw")
    assert await d.authenticate("bob@example.org", "wrong") is None
    assert await d.authenticate("ghost@example.org", "wrong") is None
    assert await d.authenticate("not an address", "wrong") is None
    assert len(verified) == 3
    assert verified[0] == bob.password_hash
    assert verified[1] == verified[2] != bob.password_hash


async def test_resolve(site: SqlStorage) -> None:
    d = site.directory
    bob = await d.add_account("bob@example.org", "pw")
    carol = await d.add_account("carol@example.org", "pw")
    await d.add_alias("team@example.org", "bob@example.org")
    await d.add_alias("team@example.org", "carol@example.org")
    await d.add_alias("team@example.org", "friend@remote.test")
    await d.add_alias("postmaster@example.org", "team@example.org")

    r = await d.resolve("Bob@Example.org")
    assert r.local_domain and [a.id for a in r.accounts] == [bob.id] and r.forward == ()

    r = await d.resolve("team@example.org")
    assert {a.id for a in r.accounts} == {bob.id, carol.id}
    assert r.forward == ("friend@remote.test",)

    r = await d.resolve("postmaster@example.org")  # alias to alias
    assert {a.id for a in r.accounts} == {bob.id, carol.id}

    r = await d.resolve("bob+lists@example.org")  # RFC 5233 subaddress
    assert [a.id for a in r.accounts] == [bob.id]
    r = await d.resolve("team+x@example.org")
    assert {a.id for a in r.accounts} == {bob.id, carol.id}

    r = await d.resolve("nobody@example.org")
    assert r.local_domain and r.accounts == () and r.forward == ()

    r = await d.resolve("someone@remote.test")
    assert not r.local_domain and r.accounts == ()


async def test_catch_all(site: SqlStorage) -> None:
    d = site.directory
    bob = await d.add_account("bob@example.org", "pw")
    carol = await d.add_account("carol@example.com", "pw")
    await d.add_alias("@example.com", "bob@example.org")
    r = await d.resolve("anything@example.com")
    assert [a.id for a in r.accounts] == [bob.id]
    # An exact account wins over the catch-all.
    r = await d.resolve("carol@example.com")
    assert [a.id for a in r.accounts] == [carol.id]
    assert await d.addresses_of(bob) == ["bob@example.org", "@example.com"]


async def test_aliases(site: SqlStorage) -> None:
    d = site.directory
    await d.add_account("bob@example.org", "pw")
    a = await d.add_alias("Info@example.org", "bob@example.org")
    assert (a.source, a.target) == ("info@example.org", "bob@example.org")
    with pytest.raises(StorageError) as err:
        await d.add_alias("info@example.org", "bob@example.org")
    assert err.value.kind is ErrorKind.EXISTS
    with pytest.raises(StorageError) as err:
        await d.add_alias("info@elsewhere.test", "bob@example.org")
    assert err.value.kind is ErrorKind.NOT_FOUND
    assert [(x.source, x.target) for x in await d.list_aliases()] == [
        ("info@example.org", "bob@example.org")
    ]
    await d.remove_alias("info@example.org", "bob@example.org")
    assert await d.list_aliases() == []
    with pytest.raises(StorageError) as err:
        await d.remove_alias("info@example.org")
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_storage_mail_by_id_without_io(site: SqlStorage) -> None:
    bob = await site.directory.add_account("bob@example.org", "pw")
    assert site.mail(bob.id) is site.mail(bob)
    assert list(site.shards) == ["default"]

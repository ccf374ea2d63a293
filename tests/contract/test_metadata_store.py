"""RFC 5464 METADATA entries in the mail store, on every SQL backend:
server and mailbox entries apart, set and removed all or none, the
per-account limit, RENAME keeps a mailbox's entries, DELETE and account
removal drop them, an account move copies them to the new shard."""

from __future__ import annotations

import random

import pytest

from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.model import Account
from tests.contract.test_mailstore import bob  # noqa: F401 (fixture)


def _value() -> bytes:
    return random.randbytes(random.randint(0, 3000))  # any octets, NUL and all


async def test_server_and_mailbox_entries_apart(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    server = {"/private/comment": _value(), "/shared/vendor/x/y": _value()}
    box = {"/private/comment": _value()}
    await mail.set_metadata(bob.id, None, list(server.items()), 100)
    await mail.set_metadata(bob.id, inbox, list(box.items()), 100)
    assert await mail.metadata(bob.id, None) == server
    assert await mail.metadata(bob.id, inbox) == box
    # None removes; the last value given for a name wins; all in one step.
    await mail.set_metadata(
        bob.id, None, [("/private/comment", None), ("/shared/a", b"1"), ("/shared/a", b"2")], 100
    )
    assert await mail.metadata(bob.id, None) == {
        "/shared/vendor/x/y": server["/shared/vendor/x/y"],
        "/shared/a": b"2",
    }
    assert await mail.metadata(bob.id, inbox) == box


async def test_limit_is_per_account_and_all_or_none(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    limit = random.randint(3, 8)
    await mail.set_metadata(
        bob.id, None, [(f"/private/s{i}", b"v") for i in range(limit - 1)], limit
    )
    before = await mail.metadata(bob.id, inbox)
    with pytest.raises(StorageError) as err:
        await mail.set_metadata(bob.id, inbox, [("/private/a", b"1"), ("/private/b", b"2")], limit)
    assert err.value.kind is ErrorKind.OVER_QUOTA
    assert await mail.metadata(bob.id, inbox) == before == {}
    # Replacing or removing never counts against the limit.
    await mail.set_metadata(bob.id, None, [("/private/s0", b"new"), ("/private/s1", None)], limit)
    await mail.set_metadata(bob.id, inbox, [("/private/a", b"1"), ("/private/b", b"2")], limit)
    assert len(await mail.metadata(bob.id, None)) + 2 == limit


async def test_rename_keeps_delete_drops(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    mail = storage.mail(bob)
    box = await mail.create_mailbox(bob.id, "Work")
    value = _value()
    await mail.set_metadata(bob.id, box.id, [("/shared/comment", value)], 100)
    await mail.rename_mailbox(bob.id, "Work", "Play")
    renamed = await mail.get_mailbox(bob.id, "Play")
    assert await mail.metadata(bob.id, renamed.id) == {"/shared/comment": value}
    await mail.delete_mailbox(bob.id, "Play")
    again = await mail.create_mailbox(bob.id, "Play")
    assert await mail.metadata(bob.id, again.id) == {}
    assert await mail.metadata(bob.id, renamed.id) == {}
    with pytest.raises(StorageError) as err:
        await mail.set_metadata(bob.id, renamed.id, [("/shared/comment", b"x")], 100)
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_other_accounts_mailbox_is_not_found(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    carol = await storage.directory.add_account("carol@example.org", "pw")
    theirs = (await storage.mail(carol).get_mailbox(carol.id, "INBOX")).id
    with pytest.raises(StorageError) as err:
        await storage.mail(bob).set_metadata(bob.id, theirs, [("/private/x", b"1")], 100)
    assert err.value.kind is ErrorKind.NOT_FOUND
    assert await storage.mail(carol).metadata(carol.id, theirs) == {}


async def test_removing_the_account_removes_its_entries(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    from sqlalchemy import func, select

    from storage.sql.schema import metadata_entries

    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    await mail.set_metadata(bob.id, None, [("/private/a", b"1")], 100)
    await mail.set_metadata(bob.id, inbox, [("/shared/b", b"2")], 100)
    await storage.directory.remove_account(bob.address)
    async with mail.db.read() as conn:  # type: ignore[attr-defined]
        count = await conn.execute(
            select(func.count())
            .select_from(metadata_entries)
            .where(metadata_entries.c.account_id == bob.id)
        )
        assert count.scalar_one() == 0


async def test_grantee_private_entries_are_its_own(storage: SqlStorage, bob: Account) -> None:  # noqa: F811
    """RFC 5464 section 3.3 on a mailbox shared with carol: /shared entries
    are the mailbox's (both see and set them), /private ones each user's
    own; all or none; carol's own limit; RENAME keeps hers, DELETE drops
    them, and so does removing carol's account."""
    from sqlalchemy import func, select

    from storage.sql.schema import grantee_metadata

    carol = await storage.directory.add_account("carol@example.org", "pw")
    mail = storage.mail(bob)
    box = await mail.create_mailbox(bob.id, "Team")
    own, hers, shared = _value(), _value(), _value()
    await mail.set_metadata(bob.id, box.id, [("/private/note", own)], 100)
    await mail.set_metadata(
        bob.id, box.id, [("/private/note", hers), ("/shared/topic", shared)], 100, user_id=carol.id
    )
    assert await mail.metadata(bob.id, box.id) == {"/private/note": own, "/shared/topic": shared}
    assert await mail.metadata(bob.id, box.id, carol.id) == {
        "/private/note": hers,
        "/shared/topic": shared,
    }
    found = await mail.granted_metadata(carol.id, [box.id], ["/private/note", "/shared/none"])
    assert found == {box.id: {"/private/note": hers}}
    # Her limit counts her /private entries; a refused write changes nothing.
    with pytest.raises(StorageError) as err:
        await mail.set_metadata(
            bob.id, box.id, [("/shared/topic", None), ("/private/a", b"1")], 1, user_id=carol.id
        )
    assert err.value.kind is ErrorKind.OVER_QUOTA
    assert (await mail.metadata(bob.id, box.id, carol.id))["/shared/topic"] == shared
    with pytest.raises(StorageError) as err:  # another account's server entries: none
        await mail.set_metadata(bob.id, None, [("/private/a", b"1")], 100, user_id=carol.id)
    assert err.value.kind is ErrorKind.NOT_FOUND
    await mail.rename_mailbox(bob.id, "Team", "Crew")
    assert (await mail.metadata(bob.id, box.id, carol.id))["/private/note"] == hers
    second = await mail.create_mailbox(bob.id, "Other")
    await mail.set_metadata(bob.id, second.id, [("/private/x", b"1")], 100, user_id=carol.id)
    await mail.delete_mailbox(bob.id, "Crew")
    assert await mail.metadata(bob.id, box.id, carol.id) == {}
    await storage.directory.remove_account(carol.address)

    async with mail.db.read() as conn:  # type: ignore[attr-defined]
        count = await conn.execute(select(func.count()).select_from(grantee_metadata))
        assert count.scalar_one() == 0

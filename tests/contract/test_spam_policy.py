"""Per-account sender lists and Junk threshold (issue #22) in the mail
store, on every SQL backend: what is put is read back, an entry is on one
list at a time, a delivery's lookup reads only the entries it names, bad
values and the cap are INVALID with nothing changed, and the policy follows
the account across a shard move and goes with it when it is removed."""

from __future__ import annotations

import random
import string

import pytest

from storage import move as mv
from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.model import Account, SpamPolicy
from storage.sql import spampolicy
from storage.sql.schema import sender_lists
from tests.contract.test_move import SOURCE, TARGET, sharded  # noqa: F401


def _domain(rng: random.Random) -> str:
    label = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12)))
    return f"{label}.example"


@pytest.fixture
async def bob(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("bob@example.org", "pw")


async def test_a_new_account_has_no_policy(storage: SqlStorage, bob: Account) -> None:
    assert await storage.mail(bob).spam_policy(bob.id) == SpamPolicy()


async def test_entries_round_trip_and_move_between_lists(storage: SqlStorage, bob: Account) -> None:
    rng = random.Random()
    mail = storage.mail(bob)
    allowed = sorted({f"u{rng.randrange(10**6)}@{_domain(rng)}" for _ in range(rng.randint(2, 9))})
    blocked = sorted({_domain(rng) for _ in range(rng.randint(2, 9))} | {"*.spam.example"})
    for entry in allowed:
        assert await mail.set_sender_entry(bob.id, entry, "allow") is None
    for entry in blocked:
        assert await mail.set_sender_entry(bob.id, entry, "block") is None
    assert await mail.spam_policy(bob.id) == SpamPolicy(tuple(allowed), tuple(blocked))
    # Idempotent, and one list at a time: blocking an allowed entry moves it.
    assert await mail.set_sender_entry(bob.id, allowed[0], "allow") == "allow"
    assert await mail.set_sender_entry(bob.id, allowed[0], "block") == "allow"
    policy = await mail.spam_policy(bob.id)
    assert allowed[0] in policy.block and allowed[0] not in policy.allow
    # Removal says where it was; removing what is on no list is no error.
    assert await mail.set_sender_entry(bob.id, allowed[0], None) == "block"
    assert await mail.set_sender_entry(bob.id, allowed[0], None) is None
    assert await mail.spam_policy(bob.id) == SpamPolicy(tuple(allowed[1:]), tuple(blocked))


async def test_a_lookup_reads_only_the_named_entries(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    for entry, kind in (("a@x.example", "allow"), ("x.example", "block"), ("y.example", "block")):
        await mail.set_sender_entry(bob.id, entry, kind)
    await mail.set_junk_threshold(bob.id, 3.5)
    got = await mail.spam_policy(bob.id, ["x.example", "nobody@x.example", "*.example"])
    assert got == SpamPolicy((), ("x.example",), 3.5)
    assert await mail.spam_policy(bob.id, []) == SpamPolicy((), (), 3.5)


async def test_threshold_set_change_and_clear(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    value = round(random.uniform(-5, 20), 3)
    await mail.set_junk_threshold(bob.id, value)
    assert (await mail.spam_policy(bob.id)).junk_threshold == value
    await mail.set_junk_threshold(bob.id, value + 1)
    assert (await mail.spam_policy(bob.id)).junk_threshold == value + 1
    await mail.set_junk_threshold(bob.id, None)
    assert (await mail.spam_policy(bob.id)).junk_threshold is None


async def test_policies_are_per_account(storage: SqlStorage, bob: Account) -> None:
    carol = await storage.directory.add_account("carol@example.org", "pw")
    await storage.mail(bob).set_sender_entry(bob.id, "x.example", "block")
    await storage.mail(carol).set_junk_threshold(carol.id, 2.0)
    assert await storage.mail(bob).spam_policy(bob.id) == SpamPolicy((), ("x.example",))
    assert await storage.mail(carol).spam_policy(carol.id) == SpamPolicy(junk_threshold=2.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, a: m.set_sender_entry(a, "x.example", "maybe"),
        lambda m, a: m.set_sender_entry(a, "", "allow"),
        lambda m, a: m.set_sender_entry(a, "x" * 400, "block"),
        lambda m, a: m.set_junk_threshold(a, float("nan")),
        lambda m, a: m.set_junk_threshold(a, 1e9),
        lambda m, a: m.put_spam_policy(a, SpamPolicy(("x.example",), ("x.example",))),
        lambda m, a: m.put_spam_policy(a, SpamPolicy(("y.example", "y.example"))),
    ],
    ids=["list", "empty", "long", "nan", "huge", "both-lists", "twice"],
)
async def test_bad_values_are_invalid_and_change_nothing(
    storage: SqlStorage, bob: Account, call
) -> None:
    mail = storage.mail(bob)
    await mail.put_spam_policy(bob.id, SpamPolicy(("keep@x.example",), ("z.example",), 4.0))
    with pytest.raises(StorageError) as err:
        await call(mail, bob.id)
    assert err.value.kind is ErrorKind.INVALID
    assert await mail.spam_policy(bob.id) == SpamPolicy(("keep@x.example",), ("z.example",), 4.0)


async def test_put_replaces_everything_at_once(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    await mail.put_spam_policy(bob.id, SpamPolicy(("a.example",), ("b.example",), 1.0))
    await mail.put_spam_policy(bob.id, SpamPolicy(("c.example",), ("a.example",), None))
    assert await mail.spam_policy(bob.id) == SpamPolicy(("c.example",), ("a.example",), None)
    await mail.put_spam_policy(bob.id, SpamPolicy())
    assert await mail.spam_policy(bob.id) == SpamPolicy()


async def test_the_entry_cap(
    storage: SqlStorage, bob: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spampolicy, "MAX_ENTRIES", 5)
    mail = storage.mail(bob)
    for i in range(5):
        await mail.set_sender_entry(bob.id, f"d{i}.example", "block")
    with pytest.raises(StorageError) as err:
        await mail.set_sender_entry(bob.id, "one-too-many.example", "allow")
    assert err.value.kind is ErrorKind.INVALID
    # Moving an entry between lists is no new entry: still allowed at the cap.
    assert await mail.set_sender_entry(bob.id, "d0.example", "allow") == "block"
    with pytest.raises(StorageError):
        await mail.put_spam_policy(bob.id, SpamPolicy(tuple(f"e{i}.example" for i in range(6))))
    assert len((await mail.spam_policy(bob.id)).block) == 4


async def test_removing_the_account_removes_its_policy(storage: SqlStorage, bob: Account) -> None:
    await storage.mail(bob).put_spam_policy(bob.id, SpamPolicy(("a.example",), ("b.example",), 2))
    await storage.directory.remove_account(bob.address)
    async with storage.directory.db.read() as conn:
        left = (await conn.execute(sender_lists.select())).all()
    assert left == []


async def test_the_policy_moves_with_the_account(sharded: SqlStorage) -> None:  # noqa: F811
    await sharded.directory.add_domain("example.org")
    bob = await sharded.directory.add_account("bob@example.org", "pw", shard=SOURCE)
    policy = SpamPolicy(("friend@a.example",), ("*.b.example", "c.example"), 5.25)
    await sharded.mail(bob).put_spam_policy(bob.id, policy)
    moved = await mv.move_account(sharded, bob.address, TARGET)
    assert moved.shard == TARGET
    assert await sharded.mail(moved).spam_policy(bob.id) == policy
    async with sharded.stores[SOURCE].db.read() as conn:
        assert (await conn.execute(sender_lists.select())).all() == []

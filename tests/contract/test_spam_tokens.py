"""The built-in anti-spam engine's per-account Bayes counts on every SQL
backend (MailStore.spam_counts / learn_spam, schema v26): totals and token
counts come back as learned; a message learned twice counts once; learned
as the other class it is relearned (its first lesson taken back); counts
never go below zero; accounts do not see each other's counts; deleting an
account's mail deletes its counts."""

from __future__ import annotations

import random

import pytest

from storage.backend import SqlStorage
from storage.model import Account
from storage.sql.spamtokens import MAX_TOKENS


@pytest.fixture
async def accounts(storage: SqlStorage) -> tuple[Account, Account]:
    await storage.directory.add_domain("example.org")
    bob = await storage.directory.add_account("bob@example.org", "pw")
    carol = await storage.directory.add_account("carol@example.org", "pw")
    return bob, carol


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 2**63) for _ in range(n)]


async def test_counts_follow_what_was_learned(
    storage: SqlStorage, accounts: tuple[Account, Account]
) -> None:
    bob, carol = accounts
    mail = storage.mail(bob)
    rng = random.Random()
    shared, spammy, hammy = tokens(rng, 50), tokens(rng, 300), tokens(rng, 300)
    empty = await mail.spam_counts(bob.id, shared)
    assert (empty.spam_messages, empty.ham_messages, empty.tokens) == (0, 0, {})
    assert await mail.learn_spam(bob.id, "a" * 64, shared + spammy, True)
    assert await mail.learn_spam(bob.id, "b" * 64, shared + spammy[:100], True)
    assert await mail.learn_spam(bob.id, "c" * 64, shared + hammy, False)
    unseen = tokens(rng, 10)
    counts = await mail.spam_counts(bob.id, shared + spammy + hammy + unseen)
    assert (counts.spam_messages, counts.ham_messages) == (2, 1)
    assert all(counts.tokens[t] == (2, 1) for t in shared)
    assert all(counts.tokens[t] == (2, 0) for t in spammy[:100])
    assert all(counts.tokens[t] == (1, 0) for t in spammy[100:])
    assert all(counts.tokens[t] == (0, 1) for t in hammy)
    assert not any(t in counts.tokens for t in unseen)
    # carol learned nothing: bob's counts are his alone.
    other = await storage.mail(carol).spam_counts(carol.id, shared)
    assert (other.spam_messages, other.ham_messages, other.tokens) == (0, 0, {})


async def test_learning_again_counts_once_and_the_other_class_relearns(
    storage: SqlStorage, accounts: tuple[Account, Account]
) -> None:
    bob, _ = accounts
    mail = storage.mail(bob)
    rng = random.Random()
    words = tokens(rng, rng.randrange(20, 200))
    assert await mail.learn_spam(bob.id, "d" * 64, words, True)
    assert not await mail.learn_spam(bob.id, "d" * 64, words, True)  # already spam
    counts = await mail.spam_counts(bob.id, words)
    assert (counts.spam_messages, counts.ham_messages) == (1, 0)
    assert set(counts.tokens.values()) == {(1, 0)}
    # Moved back out of Junk: now ham, the spam lesson taken back.
    assert await mail.learn_spam(bob.id, "d" * 64, words, False)
    counts = await mail.spam_counts(bob.id, words)
    assert (counts.spam_messages, counts.ham_messages) == (0, 1)
    assert set(counts.tokens.values()) == {(0, 1)}
    assert await mail.learn_spam(bob.id, "d" * 64, words, True)
    counts = await mail.spam_counts(bob.id, words)
    assert (counts.spam_messages, counts.ham_messages) == (1, 0)
    assert set(counts.tokens.values()) == {(1, 0)}


async def test_a_message_at_the_token_limit_and_duplicates(
    storage: SqlStorage, accounts: tuple[Account, Account]
) -> None:
    bob, _ = accounts
    mail = storage.mail(bob)
    words = tokens(random.Random(), MAX_TOKENS)
    assert await mail.learn_spam(bob.id, "e" * 64, words, False)
    counts = await mail.spam_counts(bob.id, words)
    assert len(counts.tokens) == len(set(words))
    # The same token twice in one message counts once.
    assert await mail.learn_spam(bob.id, "f" * 64, [words[0]] * 3, False)
    assert (await mail.spam_counts(bob.id, words[:1])).tokens[words[0]] == (0, 2)
    with pytest.raises(ValueError):
        await mail.spam_counts(bob.id, [*words, 1])


async def test_removing_an_account_removes_its_counts(
    storage: SqlStorage, accounts: tuple[Account, Account]
) -> None:
    bob, _ = accounts
    words = tokens(random.Random(), 30)
    await storage.mail(bob).learn_spam(bob.id, "g" * 64, words, True)
    assert (await storage.mail(bob).spam_counts(bob.id, words)).spam_messages == 1
    await storage.directory.remove_account(bob.address)
    counts = await storage.mail(bob).spam_counts(bob.id, words)  # the rows, by the old id
    assert (counts.spam_messages, counts.tokens) == (0, {})

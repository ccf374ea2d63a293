"""COPY and MOVE between two accounts (a folder shared through RFC 4314),
with Python's imaplib: all or nothing. RFC 3501 section 6.4.7: "If the
COPY command is unsuccessful for any reason, server implementations MUST
restore the destination mailbox to its state before the COPY attempt";
RFC 6851 section 3.3 for MOVE, whose originals stay unless every copy
was made. Failures are injected midway: the target's quota runs out on
the Nth message, the target's shard stops answering while the messages
are being stored, the source's blobs stop answering on the Nth read. Each
time the target is unchanged (messages, bytes, flags, UIDNEXT), the
source intact, and nothing is left behind in the target's shard."""

from __future__ import annotations

import asyncio
import imaplib
import random
import re
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

from storage.errors import ErrorKind, StorageError
from tests.contract.mailfactory import staged_rows
from tests.integration.imap.test_imap_acl_clients import _login
from tests.protocol.imap.conftest import OTHER, USER, ImapEnv, message

imaplib.Commands.setdefault("MOVE", ("SELECTED",))  # RFC 6851

TEAM = "Team"
SHARED_TEAM = f'"Other Users/{USER}/{TEAM}"'


def _random_messages(rng: random.Random, n: int) -> list[bytes]:
    """Real messages of random sizes, 100 octets to about 200 KB."""
    bodies = [rng.randbytes(rng.randint(50, 100_000)).hex() + "\r\n" for _ in range(n)]
    return [message(f"m{i}-{rng.randrange(10**9)}", body) for i, body in enumerate(bodies)]


def _mailbox(m: imaplib.IMAP4, name: str) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(UIDNEXT, [(FLAGS, body) in UID order]) of a mailbox, read-only."""
    typ, data = m.status(name, "(UIDNEXT)")
    assert typ == "OK", data
    uidnext = int(re.search(rb"UIDNEXT (\d+)", data[0]).group(1))  # type: ignore[union-attr]
    typ, data = m.select(name, readonly=True)
    assert typ == "OK", data
    if data == [b"0"]:
        return uidnext, []
    typ, data = m.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
    assert typ == "OK", data
    found = []
    for item in data:
        if isinstance(item, tuple):
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0])
            # \Recent is per session (RFC 3501 section 2.3.2), not the message's.
            kept = sorted(set((flags.group(1) if flags else b"").split()) - {b"\\Recent"})
            found.append((b" ".join(kept), item[1]))
    return uidnext, found


def _move(m: imaplib.IMAP4, sequence: str, mailbox: str) -> tuple[str, list[Any]]:
    return m._simple_command("MOVE", sequence, mailbox)  # type: ignore[attr-defined,no-any-return]


def _is_no(result: tuple[str, list[Any]], code: str) -> bool:
    typ, data = result
    return typ == "NO" and f"[{code}]".encode() in data[0]


class _Site:
    """The test's view of the running site, from the client thread."""

    def __init__(self, env: ImapEnv, loop: asyncio.AbstractEventLoop) -> None:
        self.env = env
        self.loop = loop

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def staged_left(self, account: Any) -> int:
        """Message rows of ``account`` that no mailbox entry names."""
        return int(self.run(staged_rows(self.env.storage, account)))  # type: ignore[arg-type]


def _fail_on_call(n: int, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` that raises TEMPORARY on its ``n``th call (1-based) and after."""
    calls = [0]

    async def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] >= n:
            raise StorageError(ErrorKind.TEMPORARY, "injected: storage unreachable")
        return await call(*args, **kwargs)

    return failing


def _scenario(site: _Site, rng: random.Random, sources: list[bytes], team: list[bytes]) -> None:
    env = site.env
    alice = _login(env.port, env.client_tls, USER)
    bob = _login(env.port, env.client_tls, OTHER)
    n = len(sources)
    try:
        assert alice.setacl(TEAM, OTHER, "lrswite")[0] == "OK"
        team_before = _mailbox(alice, TEAM)
        assert [body for _, body in team_before[1]] == team
        inbox_before = _mailbox(bob, "INBOX")
        assert [body for _, body in inbox_before[1]] == sources
        assert bob.select("INBOX")[0] == "OK"

        def unchanged() -> None:
            assert _mailbox(alice, TEAM) == team_before  # messages, flags, bytes, UIDNEXT
            assert _mailbox(bob, "INBOX") == inbox_before
            assert site.staged_left(env.account) == 0
            assert bob.select("INBOX")[0] == "OK"

        # 1. Alice's quota holds all but the last few: refused on the Nth.
        fits = rng.randint(1, n - 1)
        used = site.run(env.storage.mail(env.account).quota_used(env.account.id))  # type: ignore[attr-defined]
        room = used + sum(len(m) for m in sources[:fits])
        site.run(env.storage.directory.set_quota(USER, room))  # type: ignore[attr-defined]
        assert _is_no(bob.copy(f"1:{n}", SHARED_TEAM), "OVERQUOTA")
        unchanged()
        assert _is_no(_move(bob, f"1:{n}", SHARED_TEAM), "OVERQUOTA")
        unchanged()
        site.run(env.storage.directory.set_quota(USER, None))  # type: ignore[attr-defined]

        # 2. Alice's shard stops answering midway while the copies are stored.
        store = env.storage.mail(env.account)  # type: ignore[attr-defined]
        real_add = store.add_message
        store.add_message = _fail_on_call(rng.randint(2, n), real_add)
        try:
            assert _is_no(bob.copy(f"1:{n}", SHARED_TEAM), "UNAVAILABLE")
        finally:
            store.add_message = real_add
        unchanged()

        # 3. Bob's blobs stop answering on the Nth read, during a MOVE.
        blobs = env.storage.blobs_for(env.other)  # type: ignore[attr-defined]
        real_get = blobs.get
        blobs.get = _fail_on_call(rng.randint(2, n), real_get)
        try:
            assert _is_no(_move(bob, f"1:{n}", SHARED_TEAM), "UNAVAILABLE")
        finally:
            blobs.get = real_get
        unchanged()

        # 4. Nothing in the way: every copy, byte for byte, flags and order kept.
        typ, data = bob.copy(f"1:{n}", SHARED_TEAM)
        assert typ == "OK" and b"COPYUID" in data[0], data
        uidnext, after = _mailbox(alice, TEAM)
        assert after[: len(team)] == team_before[1]
        assert after[len(team) :] == inbox_before[1]
        assert uidnext == team_before[0] + n
        assert site.staged_left(env.account) == 0

        # 5. MOVE them back out of the shared folder: bob's quota refuses
        # it first (Team keeps them), then it goes through.
        assert bob.select(SHARED_TEAM)[0] == "OK"
        copies = f"{len(team) + 1}:{len(team) + n}"
        mine = site.run(env.storage.mail(env.other).quota_used(env.other.id))  # type: ignore[attr-defined]
        site.run(env.storage.directory.set_quota(OTHER, mine + len(sources[0]) - 1))  # type: ignore[attr-defined]
        assert _is_no(_move(bob, copies, "INBOX"), "OVERQUOTA")
        assert _mailbox(alice, TEAM)[1] == after
        assert site.staged_left(env.other) == 0
        site.run(env.storage.directory.set_quota(OTHER, None))  # type: ignore[attr-defined]
        assert bob.select(SHARED_TEAM)[0] == "OK"
        logged = site.run(store.account_changes(env.account.id, 0, limit=10**6))
        typ, data = _move(bob, copies, "INBOX")
        assert typ == "OK", data
        # RFC 6851 section 3.3: the originals just go (EXPUNGE), in one
        # write; no \Deleted flag is set on them first for others to see.
        after_id = logged[-1].id if logged else 0
        kinds = {c.kind.value for c in site.run(store.account_changes(env.account.id, after_id))}
        assert kinds == {"expunge"}, kinds
        assert [body for _, body in _mailbox(alice, TEAM)[1]] == team
        assert [body for _, body in _mailbox(bob, "INBOX")[1]] == sources + sources
    finally:
        alice.logout()
        bob.logout()


async def test_copy_and_move_across_accounts_are_all_or_nothing(imap_env: ImapEnv) -> None:
    rng = random.Random()
    sources = _random_messages(rng, rng.randint(6, 14))
    team = _random_messages(rng, rng.randint(1, 4))
    await imap_env.storage.mail(imap_env.account).create_mailbox(imap_env.account.id, TEAM)  # type: ignore[attr-defined]
    for raw in team:
        await imap_env.deliver(raw, TEAM, flags=("\\Seen",))
    for raw in sources:
        flags = tuple(rng.sample(["\\Flagged", "\\Answered", "$Work"], rng.randint(0, 2)))
        await imap_env.deliver(raw, account=imap_env.other, flags=flags)
    site = _Site(imap_env, asyncio.get_running_loop())
    await asyncio.to_thread(_scenario, site, rng, sources, team)


async def test_big_copy_holds_one_message_at_a_time(imap_env: ImapEnv) -> None:
    """A COPY of many large messages into another account's mailbox holds
    about one of them in memory at a time: its peak is about that of a
    COPY of a few, not one more message's size for each message more."""
    rng = random.Random()
    size, few, many = 600_000, 3, 30
    mail = imap_env.storage.mail(imap_env.account)  # type: ignore[attr-defined]
    team = await mail.create_mailbox(imap_env.account.id, TEAM)
    await mail.set_acl(imap_env.account.id, team.id, imap_env.other.id, "lri")  # type: ignore[attr-defined]
    for i in range(few + many):
        body = "".join(rng.choice("abcdefgh ijkl\r\n") for _ in range(size // 2))
        await imap_env.deliver(message(f"big {i}", body + body), account=imap_env.other)

    def copy(sequence: str) -> tuple[str, list[Any]]:
        bob = _login(imap_env.port, imap_env.client_tls, OTHER)
        try:
            assert bob.select("INBOX")[0] == "OK"
            return bob.copy(sequence, SHARED_TEAM)
        finally:
            bob.logout()

    async def peak_of(sequence: str) -> int:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            typ, data = await asyncio.to_thread(copy, sequence)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert typ == "OK" and b"COPYUID" in data[0], data
        return peak

    small = await peak_of(f"1:{few}")
    large = await peak_of(f"{few + 1}:{few + many}")
    # Holding them all would add (many - few) * size (16 MB) of bytes alone.
    assert large < small + (many - few) * size / 4, (small, large)

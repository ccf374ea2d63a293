"""IMAP sessions of an account being moved to another shard (issue #19,
``storage/move.py``): they end with BYE [UNAVAILABLE] (RFC 3501 section
7.1.5, RFC 5530 section 3) so that the client reconnects to the account's
new shard, whether the mover's FENCE event reaches them or only the fence
itself does."""

from __future__ import annotations

import datetime as dt

import pytest

from storage.model import Change, ChangeKind
from storage.move import AccountMove
from tests.protocol.imap.conftest import ImapEnv, message

BYE = b"* BYE [UNAVAILABLE]"


async def _fence_event(env: ImapEnv) -> None:
    account_id = env.account.id  # type: ignore[attr-defined]
    await env.storage.events.publish(  # type: ignore[attr-defined]
        Change(0, account_id, ChangeKind.FENCE, None, None, None, dt.datetime.now(dt.UTC))
    )


async def _closed(c) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConnectionError):
        await c.line()


async def test_an_idle_session_ends_when_its_account_is_fenced(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    await c.send("i IDLE\r\n")
    assert (await c.line()).startswith(b"+ ")
    await _fence_event(imap_env)
    assert (await c.line()).startswith(BYE)
    await _closed(c)


async def test_the_next_command_after_the_fence_gets_unavailable(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    await _fence_event(imap_env)
    lines = await c.command("NOOP")
    assert lines[0].startswith(BYE)
    assert b"NO [UNAVAILABLE]" in lines[-1]
    await _closed(c)


async def test_a_session_that_missed_the_event_ends_at_the_fence(imap_env: ImapEnv) -> None:
    """The bus is best effort: the fence in the shard refuses the write, and
    the session ends on that error as on the event."""
    await imap_env.deliver(message("one"))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    store = imap_env.storage.stores["default"]  # type: ignore[attr-defined]
    mover = AccountMove(imap_env.account.id, store, store)  # type: ignore[attr-defined]
    await mover.set_fence(store, "out:elsewhere")
    lines = await c.command("STORE 1 +FLAGS (\\Seen)")
    assert any(line.startswith(BYE) for line in lines), lines
    assert b"NO [UNAVAILABLE]" in lines[-1]
    await _closed(c)

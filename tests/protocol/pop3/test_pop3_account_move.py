"""POP3 on an account fenced for a move to another shard (issue #19,
``storage/move.py``): the deletions of its UPDATE state are refused as a
temporary error (RFC 2449 section 8, RFC 3206 SYS/TEMP), and nothing the
client asked to delete is lost or half deleted: it sees it all again later."""

from __future__ import annotations

import asyncio
import base64
import poplib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher, profiles

from storage.backend import SqlStorage, open_storage_from_url
from storage.move import AccountMove, move_account
from tests.protocol.pop3.harness import (
    PASSWORD,
    USER,
    Pop3Client,
    deliver,
    make_settings,
    ports_of,
    running_pop3,
)


async def test_quit_on_a_fenced_account_is_sys_temp(
    tmp_path, pop3_storage, tls_context, filled, account
):
    settings = make_settings(tmp_path / "d2", auth={"allow_plaintext": True})
    store = pop3_storage.stores["default"]
    mover = AccountMove(account.id, store, store)
    async with running_pop3(settings, pop3_storage, tls_context) as service:
        client = await Pop3Client.connect(ports_of(service).plain)
        assert (await client.login()).startswith("+OK maildrop has 2 messages")
        await mover.set_fence(store, "out:east")
        assert (await client.command("DELE 1")).startswith("+OK")
        # RFC 1939 section 6: the deletion failed, so QUIT answers -ERR.
        assert (await client.command("QUIT")).startswith("-ERR [SYS/TEMP]")
        await mover.set_fence(store, None)
        client = await Pop3Client.connect(ports_of(service).plain)
        assert (await client.login()).startswith("+OK maildrop has 2 messages")
        await client.close()


@pytest.fixture
async def two_shards(tmp_path: Path) -> AsyncIterator[SqlStorage]:
    """Shards "default" (USER's) and "east", each a SQLite file; one
    in-process event bus, as one instance of imapd has."""
    storage = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        tmp_path / "blobs",
        {"east": f"sqlite+aiosqlite:///{tmp_path / 'east.sqlite'}"},
        password_hasher=PasswordHasher.from_parameters(profiles.CHEAPEST),
        events="inprocess",
    )
    try:
        await storage.directory.add_domain("example.org")
        await storage.directory.add_account(USER, PASSWORD, shard="default")
        yield storage
    finally:
        await storage.close()


def _messages(rng: random.Random) -> list[bytes]:
    return [
        b"From: carol@example.net\r\nTo: alice@example.org\r\nSubject: %d\r\n\r\n" % n
        + base64.encodebytes(rng.randbytes(rng.randint(1, 3000))).replace(b"\n", b"\r\n")
        for n in range(rng.randint(2, 5))
    ]


# RFC 1939 section 6: only QUIT in TRANSACTION enters UPDATE; every other end
# of the session deletes nothing. Each command is the first after the fence.
AFTER_FENCE = ["STAT", "LIST", "UIDL", "RETR 1", "TOP 1 0", "DELE 2", "RSET", "NOOP", "QUIT"]


@pytest.mark.parametrize("command", AFTER_FENCE)
async def test_a_pop3_session_open_during_a_move_ends_with_sys_temp(
    tmp_path: Path, two_shards: SqlStorage, tls_context, command: str
) -> None:
    rng = random.Random()
    account = await two_shards.directory.get_account(USER)
    sent = _messages(rng)
    for raw in sent:
        await deliver(two_shards, account, raw)
    settings = make_settings(tmp_path / "data", auth={"allow_plaintext": True})
    async with running_pop3(settings, two_shards, tls_context) as service:
        port = ports_of(service).plain
        client = await asyncio.to_thread(_logged_in, port)
        assert (await asyncio.to_thread(client.dele, 1)).startswith(b"+OK")
        moved = await move_account(two_shards, USER, "east")
        assert moved.shard == "east"
        # RFC 3206 section 4: SYS/TEMP, the client may try again later.
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\]"):
            await asyncio.to_thread(client._shortcmd, command)
        # The server closed the connection: no UPDATE state, nothing deleted.
        assert await asyncio.to_thread(client.sock.recv, 1) == b""
        client.close()
        again = await asyncio.to_thread(_logged_in, port)
        try:
            count, _ = await asyncio.to_thread(again.stat)
            assert count == len(sent)
            for n, raw in enumerate(sent, 1):
                _, lines, _ = await asyncio.to_thread(again.retr, n)
                assert b"\r\n".join(lines) + b"\r\n" == raw
        finally:
            await asyncio.to_thread(again.quit)


def _logged_in(port: int) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user(USER)
    client.pass_(PASSWORD)
    return client

"""POP3 on an account fenced for a move to another shard (issue #19,
``storage/move.py``): the deletions of its UPDATE state are refused as a
temporary error (RFC 2449 section 8, RFC 3206 SYS/TEMP), and nothing the
client asked to delete is lost or half deleted: it sees it all again later."""

from __future__ import annotations

from storage.move import AccountMove
from tests.protocol.pop3.harness import Pop3Client, make_settings, ports_of, running_pop3


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

"""POP3 session behaviour a user would notice beyond single replies: STLS
hygiene, the maildrop lock, the login snapshot, when deletions happen,
limits, timeouts and storage failures."""

from __future__ import annotations

import asyncio
import base64
import socket

from imapd.pop3.maildrop import Maildrop, lock_name
from imapd.pop3.server import start_pop3, stop_pop3
from storage.errors import ErrorKind, StorageError
from storage.model import DELETED, SEEN
from tests.protocol.pop3.harness import (
    MSG1,
    MSG2,
    OTHER_USER,
    PASSWORD,
    USER,
    Pop3Client,
    deliver,
    make_settings,
    ports_of,
    running_pop3,
    unstuff,
)


async def inbox_uids(storage, account) -> list[int]:
    mail = storage.mail(account)
    inbox = await mail.get_mailbox(account.id, "INBOX")
    return [e.uid for e in await mail.uids(account.id, inbox.id)]


# -- RFC 2595 section 4: STLS --


async def test_stls_discards_pipelined_plaintext(pop3, client_tls_context):
    """A command pipelined behind STLS in the same packet must not run, neither
    before the handshake nor after it (a man in the middle could inject it)."""
    client = await Pop3Client.connect(ports_of(pop3).plain)
    await client.send(b"STLS\r\nCAPA\r\nUSER " + USER.encode() + b"\r\n")
    assert await client.status() == "+OK Begin TLS negotiation"
    await client.writer.start_tls(client_tls_context, server_hostname="localhost")
    # Had CAPA or USER survived, their replies would come first.
    assert await client.command("NOOP") == "-ERR command not valid in this state"
    assert await client.command(f"PASS {PASSWORD}") == "-ERR USER first"
    capa = await client.command("CAPA")
    assert "STLS" not in capa.split("\n") and "USER" in capa.split("\n")
    assert (await client.login()).startswith("+OK maildrop has 2 messages")
    assert await client.command("STAT") == f"+OK 2 {len(MSG1) + len(MSG2)}"
    await client.close()


async def test_stls_twice_is_refused(pop3, client_tls_context):
    client = await Pop3Client.connect(ports_of(pop3).plain)
    assert await client.command("STLS") == "+OK Begin TLS negotiation"
    await client.writer.start_tls(client_tls_context, server_hostname="localhost")
    assert await client.command("STLS") == "-ERR TLS already active"
    await client.close()


async def test_failed_handshake_closes_connection(pop3):
    client = await Pop3Client.connect(ports_of(pop3).plain)
    assert await client.command("STLS") == "+OK Begin TLS negotiation"
    await client.send(b"this is not a TLS ClientHello\r\n" * 4)
    assert await client.closed()


async def test_plaintext_allowed_by_setting(tmp_path, pop3_storage, tls_context, filled):
    settings = make_settings(tmp_path / "d2", auth={"allow_plaintext": True})
    async with running_pop3(settings, pop3_storage, tls_context) as service:
        client = await Pop3Client.connect(ports_of(service).plain)
        capa = (await client.command("CAPA")).split("\n")
        assert {"USER", "SASL PLAIN", "STLS"} <= set(capa)
        assert (await client.login()).startswith("+OK maildrop has 2 messages")
        await client.close()


async def test_apop_enabled_without_secret(tmp_path, pop3_storage, tls_context, filled):
    """APOP on: the greeting carries a timestamp (RFC 1939 section 7), but no
    account has a plaintext-equivalent secret, so APOP fails as [AUTH]."""
    settings = make_settings(tmp_path / "d2", pop3={"apop": True})
    async with running_pop3(settings, pop3_storage, tls_context) as service:
        client = await Pop3Client.connect(ports_of(service).plain)
        assert client.greeting.startswith("+OK shardmail POP3 server ready <")
        assert client.greeting.endswith("@mail.test>")
        reply = await client.command(f"APOP {USER} c4c9334bac560ecc979e58001b3e22fb")
        assert reply.startswith("-ERR [AUTH] APOP is not available")
        assert await client.command("APOP onlyone") == "-ERR syntax: APOP name digest"
        await client.close()


# -- RFC 1939 section 8: the maildrop lock, snapshot, UPDATE --


async def test_second_session_gets_in_use(pop3, client_tls_context):
    port = ports_of(pop3).tls
    first = await Pop3Client.connect(port, client_tls_context)
    assert (await first.login()).startswith("+OK")
    second = await Pop3Client.connect(port, client_tls_context)
    assert await second.login() == "-ERR [IN-USE] maildrop already locked by another session"
    # Still in AUTHORIZATION: another account logs in on the same connection.
    assert (await second.login(OTHER_USER)).startswith("+OK maildrop has 0 messages")
    await second.close()
    assert (await first.command("QUIT")).startswith("+OK")
    await first.close()
    third = await Pop3Client.connect(port, client_tls_context)
    assert (await third.login()).startswith("+OK maildrop has 2 messages")
    await third.close()


async def test_dropped_connection_releases_lock_and_deletes_nothing(
    pop3, pop3_storage, account, filled, client_tls_context
):
    port = ports_of(pop3).tls
    client = await Pop3Client.connect(port, client_tls_context)
    await client.login()
    assert await client.command("DELE 1") == "+OK message 1 deleted"
    assert await client.command("DELE 2") == "+OK message 2 deleted"
    await client.close()  # no QUIT
    for _ in range(100):  # the server notices the drop and releases the lock
        again = await Pop3Client.connect(port, client_tls_context)
        reply = await again.login()
        if not reply.startswith("-ERR [IN-USE]"):
            break
        await again.close()
        await asyncio.sleep(0.05)
    assert reply.startswith("+OK maildrop has 2 messages")
    await again.close()
    assert await inbox_uids(pop3_storage, account) == filled


async def test_quit_commits_deletions_as_expunges(
    pop3, pop3_storage, account, filled, client_tls_context
):
    mail = pop3_storage.mail(account)
    inbox = await mail.get_mailbox(account.id, "INBOX")
    before = inbox.highestmodseq
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    await client.login()
    await client.command("RETR 2")
    await client.command("DELE 1")
    assert await client.command("QUIT") == (
        "+OK shardmail POP3 server signing off (1 deleted, 1 left)"
    )
    assert await client.closed()
    entries = await mail.uids(account.id, inbox.id)
    assert [e.uid for e in entries] == [filled[1]]
    assert SEEN in entries[0].flags and DELETED not in entries[0].flags
    changes = await mail.changes_since(account.id, inbox.id, before)
    assert changes.vanished == (filled[0],)  # what IMAP QRESYNC reports


async def test_quit_expunges_only_its_own_deletions(
    pop3, pop3_storage, account, filled, client_tls_context
):
    """A message an IMAP client flagged \\Deleted but did not expunge stays."""
    from storage.model import StoreMode, UidSet

    mail = pop3_storage.mail(account)
    inbox = await mail.get_mailbox(account.id, "INBOX")
    await mail.store_flags(account.id, inbox.id, UidSet.of([filled[1]]), StoreMode.ADD, [DELETED])
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    await client.login()
    await client.command("DELE 1")
    await client.command("QUIT")
    assert await inbox_uids(pop3_storage, account) == [filled[1]]


async def test_listing_is_a_snapshot_at_login(
    pop3, pop3_storage, account, filled, client_tls_context
):
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    await client.login()
    new_uid = await deliver(pop3_storage, account, b"Subject: late\r\n\r\nhello\r\n")
    assert await client.command("STAT") == f"+OK 2 {len(MSG1) + len(MSG2)}"
    assert await client.command("LIST 3") == "-ERR no such message"
    await client.command("QUIT")
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    await client.login()
    assert (await client.command("UIDL 3")).endswith(f".{new_uid}")
    await client.close()


async def test_uidl_stable_across_sessions(pop3, client_tls_context):
    port = ports_of(pop3).tls
    listings = []
    for _ in range(2):
        client = await Pop3Client.connect(port, client_tls_context)
        await client.login()
        listings.append(await client.command("UIDL"))
        await client.command("QUIT")
    assert listings[0] == listings[1]
    ids = [line.split()[1] for line in listings[0].split("\n")[1:]]
    assert len(set(ids)) == 2 and all(0x21 <= ord(c) <= 0x7E for i in ids for c in i)


async def test_lock_lease_is_renewed(pop3_storage, account, filled):
    """A session longer than the lease keeps the maildrop (renewed every third)."""
    drop = await Maildrop.open(pop3_storage, account, lock_seconds=2)
    mail = pop3_storage.mail(account)
    try:
        await asyncio.sleep(3.2)
        assert not await mail.acquire_lock(lock_name(account), "intruder", 2)
        assert not drop.lock_lost
    finally:
        await drop.close()
    assert await mail.acquire_lock(lock_name(account), "next", 2)


async def test_lost_lease_deletes_nothing(pop3_storage, account, filled):
    drop = await Maildrop.open(pop3_storage, account, lock_seconds=900)
    mail = pop3_storage.mail(account)
    await mail.release_lock(lock_name(account), drop.owner)
    assert await mail.acquire_lock(lock_name(account), "thief", 900)
    drop.delete(1)
    try:
        await drop.commit()
    except StorageError as exc:
        assert exc.kind is ErrorKind.IN_USE
    else:
        raise AssertionError("commit without the lease")
    finally:
        await drop.close()
    assert await inbox_uids(pop3_storage, account) == filled


# -- RETR streaming and byte-stuffing on the wire (RFC 1939 section 3) --


async def test_retr_big_message_streams_stuffed_crlf(
    pop3, pop3_storage, account, client_tls_context
):
    body = b"".join(
        (b"." if i % 7 == 0 else b"") + b"line %d " % i + b"x" * (i % 90) + b"\n"
        for i in range(60_000)
    )
    raw = b"Subject: big\nFrom: a@example.net\n\n" + body
    await deliver(pop3_storage, account, raw)
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    await client.login()
    assert await client.command("STAT") == f"+OK 3 {len(MSG1) + len(MSG2) + len(raw)}"
    await client.send("RETR 3")
    assert await client.status() == f"+OK {len(raw)} octets"
    wire = await client.body(timeout=30)
    assert b"\n." + b"line 7 " in wire.replace(b"\r\n..", b"\n.")  # stuffed once
    assert b"\r\n.line 7 " not in wire  # never unstuffed on the wire
    assert b"\n" not in wire.replace(b"\r\n", b"")  # no bare LF
    assert unstuff(wire) == raw.replace(b"\n", b"\r\n")
    await client.close()


async def test_pipelined_commands_answer_in_order(pop3, client_tls_context):
    """RFC 2449 section 6.6 PIPELINING: many commands in one write."""
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    await client.login()
    await client.send(b"NOOP\r\nSTAT\r\nRETR 1\r\nLIST 2\r\nDELE 1\r\nSTAT\r\nQUIT\r\n")
    assert await client.status() == "+OK"
    assert await client.status() == f"+OK 2 {len(MSG1) + len(MSG2)}"
    assert await client.status() == f"+OK {len(MSG1)} octets"
    assert unstuff(await client.body()) == MSG1
    assert await client.status() == f"+OK 2 {len(MSG2)}"
    assert await client.status() == "+OK message 1 deleted"
    assert await client.status() == f"+OK 1 {len(MSG2)}"
    assert (await client.status()).startswith("+OK shardmail POP3 server signing off")
    assert await client.closed()


# -- limits, timeouts, failures --


async def test_overlong_line_is_refused_and_session_continues(pop3, client_tls_context):
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    await client.send(b"USER " + b"x" * 5000 + b"\r\n")
    assert await client.status() == "-ERR line too long"
    await client.send(b"NOT UTF8 \xff\xfe\r\n")
    assert await client.status() == "-ERR command line is not UTF-8"
    assert (await client.login()).startswith("+OK maildrop has 2 messages")
    assert await client.command("NOOP") == "+OK"
    await client.close()


async def test_idle_timeout_autologout_deletes_nothing(
    pop3_settings, pop3_storage, account, filled, tls_context, client_tls_context
):
    async with running_pop3(pop3_settings, pop3_storage, tls_context, idle_timeout=0.5) as svc:
        client = await Pop3Client.connect(ports_of(svc).tls, client_tls_context)
        await client.login()
        assert await client.command("DELE 1") == "+OK message 1 deleted"
        assert await client.status(timeout=5) == "-ERR autologout; idle for too long"
        assert await client.closed()
    assert await inbox_uids(pop3_storage, account) == filled


async def test_too_many_auth_failures_close_the_connection(pop3, client_tls_context):
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    bad = base64.b64encode(f"\0{USER}\0nope".encode()).decode()
    for _ in range(4):
        assert await client.command(f"AUTH PLAIN {bad}") == "-ERR [AUTH] authentication failed"
    await client.send(f"AUTH PLAIN {bad}")
    assert await client.status() == "-ERR [AUTH] authentication failed"
    assert await client.status() == "-ERR too many authentication failures, closing"
    assert await client.closed()


async def test_too_many_bad_commands_close_the_connection(pop3):
    client = await Pop3Client.connect(ports_of(pop3).plain)
    await client.send(b"XYZZY\r\n" * 21)
    for _ in range(20):
        assert await client.status() == "-ERR unknown command"
    assert await client.status() == "-ERR too many bad commands, closing"
    assert await client.closed()


async def test_storage_failure_is_a_resp_code_not_a_traceback(
    pop3, pop3_storage, client_tls_context, monkeypatch
):
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    await client.login()

    def unavailable(key, chunk_size=65536):
        raise StorageError(ErrorKind.TEMPORARY, "blob store unavailable")

    monkeypatch.setattr(pop3_storage.blobs, "stream", unavailable)
    assert await client.command("RETR 1") == "-ERR [SYS/TEMP] blob store unavailable"
    assert await client.command("TOP 1 1") == "-ERR [SYS/TEMP] blob store unavailable"

    def broken(key, chunk_size=65536):
        raise RuntimeError("/secret/path exploded")

    monkeypatch.setattr(pop3_storage.blobs, "stream", broken)
    reply = await client.command("RETR 2")
    assert reply == "-ERR [SYS/TEMP] internal error, try again later"
    assert await client.closed()


async def test_login_storage_failure(pop3, pop3_storage, client_tls_context, monkeypatch):
    async def down(login, password, **options):
        raise StorageError(ErrorKind.TEMPORARY, "directory unavailable")

    monkeypatch.setattr(pop3_storage.directory, "authenticate", down)
    client = await Pop3Client.connect(ports_of(pop3).tls, client_tls_context)
    assert await client.login() == "-ERR [SYS/TEMP] directory unavailable"
    await client.close()


async def test_stop_pop3_ends_sessions_without_deleting(
    pop3_settings, pop3_storage, account, filled, tls_context, client_tls_context
):
    servers = await start_pop3(pop3_settings, pop3_storage, tls_context)
    port = servers[1].sockets[0].getsockname()[1]
    client = await Pop3Client.connect(port, client_tls_context)
    await client.login()
    await client.command("DELE 1")
    await stop_pop3(servers)
    assert await client.closed()
    assert await inbox_uids(pop3_storage, account) == filled
    mail = pop3_storage.mail(account)
    assert await mail.acquire_lock(lock_name(account), "after-stop", 5)


async def test_client_that_stops_reading_loses_the_maildrop(
    tmp_path, pop3_storage, account, tls_context
):
    """A RETR the client never reads must not hold the maildrop lease forever."""
    settings = make_settings(tmp_path / "d3", auth={"allow_plaintext": True})
    await deliver(pop3_storage, account, b"Subject: small\r\n\r\nhi\r\n")
    huge = b"Subject: huge\r\n\r\n" + (b"y" * 998 + b"\r\n") * 8000  # 8 MB
    await deliver(pop3_storage, account, huge)
    async with running_pop3(settings, pop3_storage, tls_context, idle_timeout=0.5) as svc:
        port = ports_of(svc).plain
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        stalled = Pop3Client(reader, writer)
        stalled.greeting = await stalled.status()
        assert (await stalled.login()).startswith("+OK maildrop has 2 messages")
        await stalled.send("RETR 2")  # and never read the reply
        for _ in range(100):
            other = await Pop3Client.connect(port)
            reply = await other.login()
            await other.close()
            if not reply.startswith("-ERR [IN-USE]"):
                break
            await asyncio.sleep(0.1)
        assert reply.startswith("+OK maildrop has 2 messages")
        stalled.writer.transport.abort()

"""IMAP session behaviour that a script table cannot show: TLS, timing,
several sessions on one mailbox, limits."""

from __future__ import annotations

import asyncio
import ssl
import time

from tests.protocol.imap.conftest import PASSWORD, USER, ImapClient, ImapEnv, message


async def _starttls(c: ImapClient, ctx: ssl.SSLContext) -> None:
    await c.writer.start_tls(ctx, server_hostname="127.0.0.1")


async def test_starttls_discards_pipelined_plaintext(imap_env: ImapEnv) -> None:
    """RFC 3501 section 6.2.1: a command sent in the same packet after
    STARTTLS must not run after the handshake (CVE-2011-0411 class)."""
    c = await imap_env.client()
    await c.send(f"a STARTTLS\r\nb LOGIN {USER} {PASSWORD}\r\n")
    assert await c.line() == b"a OK Begin TLS negotiation now"
    await _starttls(c, imap_env.client_tls)
    lines = await c.command("CAPABILITY", tag="c")
    assert not any(line.startswith(b"b ") for line in lines), lines
    assert b"STARTTLS" not in lines[0] and b"AUTH=PLAIN" in lines[0]
    # The pipelined LOGIN did not log us in.
    assert (await c.command("SELECT INBOX", tag="d")) == [b"d BAD Log in first"]
    assert (await c.command("STARTTLS", tag="e")) == [b"e BAD TLS is already active"]
    await c.close()


async def test_logindisabled_until_tls(imap_factory) -> None:  # type: ignore[no-untyped-def]
    env = await imap_factory(auth={"allow_plaintext": False})
    c = await env.client()
    caps = (await c.command("CAPABILITY"))[0]
    assert b"LOGINDISABLED" in caps and b"AUTH=PLAIN" not in caps and b"STARTTLS" in caps
    lines = await c.command(f"LOGIN {USER} {PASSWORD}", tag="x")
    assert lines[-1].startswith(b"x NO [PRIVACYREQUIRED]")
    assert (await c.command("STARTTLS", tag="s"))[-1].startswith(b"s OK")
    await _starttls(c, env.client_tls)
    caps = (await c.command("CAPABILITY"))[0]
    assert b"LOGINDISABLED" not in caps and b"AUTH=PLAIN" in caps
    assert (await c.command(f"LOGIN {USER} {PASSWORD}", tag="y"))[-1].startswith(b"y OK")
    await c.close()


async def test_implicit_tls_port(imap_env: ImapEnv) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", imap_env.tls_port, ssl=imap_env.client_tls, server_hostname="127.0.0.1")
    c = ImapClient(reader, writer)
    greeting = await c.line()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1") and b"STARTTLS" not in greeting
    await c.ok(f"LOGIN {USER} {PASSWORD}")
    await c.close()


async def test_idle_sees_new_mail_within_a_second(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    await c.send("i IDLE\r\n")
    assert (await c.line()).startswith(b"+ ")
    start = time.monotonic()
    await imap_env.deliver(message("while idling"))
    lines = [await c.line(timeout=1.0), await c.line(timeout=1.0)]
    assert lines == [b"* 1 EXISTS", b"* 1 RECENT"]
    assert time.monotonic() - start < 1.0
    await c.send("DONE\r\n")
    assert await c.line() == b"i OK IDLE terminated"
    await c.close()


async def test_idle_wrong_continuation(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    await c.send("i IDLE\r\n")
    assert (await c.line()).startswith(b"+ ")
    await c.send("STOP\r\n")
    assert await c.line() == b"i BAD Expected DONE"
    assert (await c.command("NOOP"))[-1].endswith(b"OK NOOP completed")
    await c.close()


async def test_updates_reach_other_sessions_at_allowed_moments(imap_env: ImapEnv) -> None:
    for i in range(3):
        await imap_env.deliver(message(f"m{i}"))
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    await a.ok("SELECT INBOX")
    await b.ok("SELECT INBOX")
    # Flag change by b: a hears it on NOOP.
    await b.ok("STORE 2 +FLAGS.SILENT (\\Flagged)")
    await asyncio.sleep(0.05)
    lines = await a.command("NOOP")
    assert b"* 2 FETCH (FLAGS (\\Flagged \\Recent))" in lines, lines
    # Expunge by b: never announced to a during FETCH (RFC 3501 section 7.4.1)...
    await b.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    await b.ok("EXPUNGE")
    await asyncio.sleep(0.05)
    lines = await a.command("FETCH 1:* UID")
    assert not any(b"EXPUNGE" in line for line in lines), lines
    assert b"* 2 FETCH (UID 2)" in lines and b"* 3 FETCH (UID 3)" in lines
    lines = await a.command("SEARCH ALL")
    assert not any(b"EXPUNGE" in line for line in lines)
    assert b"* SEARCH 2 3" in lines  # sequence numbers unchanged until told
    # ...but on NOOP it is.
    lines = await a.command("NOOP")
    assert b"* 1 EXPUNGE" in lines, lines
    lines = await a.command("SEARCH ALL")
    assert b"* SEARCH 1 2" in lines
    # New mail: EXISTS is allowed even after FETCH.
    await imap_env.deliver(message("new one"))
    await asyncio.sleep(0.05)
    lines = await a.command("FETCH 1 UID")
    assert b"* 3 EXISTS" in lines, lines
    await a.close()
    await b.close()


async def test_qresync_session_gets_vanished(imap_env: ImapEnv) -> None:
    for i in range(2):
        await imap_env.deliver(message(f"m{i}"))
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    await a.ok("ENABLE QRESYNC")
    await a.ok("SELECT INBOX")
    await b.ok("SELECT INBOX")
    await b.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    await b.ok("EXPUNGE")
    await asyncio.sleep(0.05)
    lines = await a.command("NOOP")
    assert b"* VANISHED 1" in lines, lines
    await a.close()
    await b.close()


async def test_failed_logins_slow_down_then_disconnect(imap_env: ImapEnv) -> None:
    c = await imap_env.client()
    times = []
    for i in range(4):
        t = time.monotonic()
        lines = await c.command(f"LOGIN {USER} wrong{i}")
        times.append(time.monotonic() - t)
        assert lines[-1].endswith(b"NO [AUTHENTICATIONFAILED] Authentication failed")
    assert times[3] > times[0] and times[3] >= 0.15  # 0.05, 0.1, 0.2 (capped)
    lines = await c.command(f"LOGIN {USER} wrong5")
    assert lines[0] == b"* BYE Too many failed logins"
    assert await c.reader.read() == b""
    await c.close()


async def test_autologout(imap_factory) -> None:  # type: ignore[no-untyped-def]
    env = await imap_factory(imap={"autologout_seconds": 1})
    c = await env.client(login=True)
    assert await c.line(timeout=3) == b"* BYE Autologout; idle for too long"
    assert await c.reader.read() == b""
    await c.close()


async def test_large_append_is_spooled_and_streamed(imap_env: ImapEnv) -> None:
    body = b"".join(b"line %06d of a long message\r\n" % i for i in range(25_000))
    raw = b"Subject: big\r\nFrom: a@b.c\r\n\r\n" + body
    assert len(raw) > 600_000
    c = await imap_env.client(login=True)
    await c.send(b"a APPEND INBOX {%d}\r\n" % len(raw))
    assert (await c.line()).startswith(b"+ ")
    await c.send(raw + b"\r\n")
    assert (await c.until("a"))[-1].startswith(b"a OK [APPENDUID ")
    await c.ok("SELECT INBOX")
    lines = await c.command("FETCH 1 (BODY.PEEK[] RFC822.SIZE)")
    assert lines[0] == b"* 1 FETCH (BODY[] {%d}\r\n" % len(raw) + raw + b" RFC822.SIZE %d)" % len(
        raw)
    lines = await c.command("FETCH 1 BODY.PEEK[TEXT]<300000.40>")
    assert lines[0] == b"* 1 FETCH (BODY[TEXT]<300000> {40}\r\n" + body[300000:300040] + b")"
    await c.close()


async def test_long_line_and_bad_literal_keep_connection(imap_factory) -> None:  # type: ignore
    env = await imap_factory(imap={"max_line_length": 1000})
    c = await env.client(login=True)
    await c.send(b"long NOOP " + b"x" * 3000 + b"\r\n")
    assert await c.line() == b"long BAD Command line too long"
    assert (await c.command("NOOP"))[-1].endswith(b"OK NOOP completed")
    await c.close()


async def test_pipelined_commands_answered_in_order(imap_env: ImapEnv) -> None:
    for i in range(5):
        await imap_env.deliver(message(f"m{i}"))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    batch = b"".join(b"p%d FETCH %d (UID)\r\n" % (i, i % 5 + 1) for i in range(200))
    await c.send(batch)
    for i in range(200):
        lines = await c.until(f"p{i}")
        assert lines == [b"* %d FETCH (UID %d)" % (i % 5 + 1, i % 5 + 1),
                         f"p{i} OK FETCH completed".encode()]
    await c.close()


async def test_client_disconnect_mid_literal_is_harmless(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    await c.send(b"a APPEND INBOX {500000+}\r\n" + b"x" * 1000)
    await c.close()
    await asyncio.sleep(0.1)
    d = await imap_env.client(login=True)
    lines = await d.command("STATUS INBOX (MESSAGES)")
    assert lines[0] == b'* STATUS "INBOX" (MESSAGES 0)'
    await d.close()


async def test_garbage_input_never_breaks_the_session(imap_env: ImapEnv) -> None:
    """Random bytes (no literal markers, so nothing waits for data) get BAD
    answers; the connection stays usable and the server never crashes."""
    import random

    rng = random.Random(3501)
    alphabet = bytes(b for b in range(256) if b not in (ord("{"), ord("\r"), ord("\n")))
    words = [b"FETCH", b"UID", b"SEARCH", b"(", b")", b"[", b"]", b"*", b"1:*", b'"',
             b"\\", b"BODY[", b"NOT", b"OR", b"LIST", b"%", b"STORE", b"+FLAGS", b"\x00"]
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    for i in range(150):
        if i % 2:
            junk = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        else:
            junk = b" ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        await c.send(b"g%d " % i + junk + b"\r\n")
        lines = await c.until(f"g{i}")
        assert lines[-1].split(b" ")[1] in (b"OK", b"NO", b"BAD"), lines
    assert (await c.command("NOOP"))[-1].endswith(b"OK NOOP completed")
    await c.close()


async def test_idle_times_out(imap_factory) -> None:  # type: ignore[no-untyped-def]
    env = await imap_factory(imap={"idle_timeout_seconds": 1})
    c = await env.client(login=True)
    await c.send("i IDLE\r\n")
    assert (await c.line()).startswith(b"+ ")
    assert await c.line(timeout=3) == b"* BYE IDLE timed out"
    assert await c.reader.read() == b""
    await c.close()


async def test_utf8_search_with_literal(imap_env: ImapEnv) -> None:
    await imap_env.deliver(message("=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?="))
    await imap_env.deliver(message("plain ascii"))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    needle = "Grüße".encode()
    await c.send(b"u SEARCH CHARSET UTF-8 SUBJECT {%d}\r\n" % len(needle))
    assert (await c.line()).startswith(b"+ ")
    await c.send(needle + b"\r\n")
    assert await c.until("u") == [b"* SEARCH 1", b"u OK SEARCH completed"]
    await c.close()


async def test_mailbox_names_in_modified_utf7(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    await c.ok("CREATE &ZeVnLIqe-/Entw&APw-rfe")
    store = imap_env.storage.mail(imap_env.account)  # type: ignore[attr-defined]
    names = {b.name for b in await store.list_mailboxes(imap_env.account.id)}  # type: ignore
    assert {"日本語", "日本語/Entwürfe"} <= names
    lines = await c.command('LIST "" "&ZeVnLIqe-*"')
    assert lines[:2] == [b'* LIST (\\HasChildren) "/" "&ZeVnLIqe-"',
                         b'* LIST (\\HasNoChildren) "/" "&ZeVnLIqe-/Entw&APw-rfe"']
    await c.close()


def test_wire_layer_imports_no_storage() -> None:
    import subprocess
    import sys

    code = ("import sys, imapd.imap.wire, imapd.imap.wire.encode; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('storage', 'asyncio')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_stop_imap_says_bye(imap_env: ImapEnv) -> None:
    from imapd.imap.server import stop_imap

    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    await stop_imap(imap_env.servers)
    assert await c.line() == b"* BYE Server shutting down"
    assert await c.reader.read() == b""
    await c.close()


async def test_no_big_literal_before_login(imap_env: ImapEnv) -> None:
    c = await imap_env.client()
    await c.send(b"a APPEND INBOX {100000}\r\n")
    assert await c.line() == b"a BAD Literal too large"
    assert (await c.command("NOOP"))[-1].endswith(b"OK NOOP completed")
    await c.close()


async def test_snapshot_search_agrees_with_storage(imap_env: ImapEnv) -> None:
    """Flag/UID/size/modseq searches are answered from the session snapshot;
    they must agree with the storage backend's own evaluation."""
    import random

    from imapd.imap.commands.message import search_criteria
    from imapd.imap.mailbox_view import MailboxView
    from imapd.imap.wire.commands import Search
    from imapd.imap.wire.parser import parse_line

    rng = random.Random(7162)
    flags = ["\\Seen", "\\Flagged", "\\Deleted", "$Work"]
    for i in range(30):
        chosen = tuple(f for f in flags if rng.random() < 0.4)
        await imap_env.deliver(message(f"m{i}", "x" * rng.randint(1, 400)), flags=chosen)
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    store = imap_env.storage.mail(imap_env.account)  # type: ignore[attr-defined]
    acct = imap_env.account.id  # type: ignore[attr-defined]
    box = await store.get_mailbox(acct, "INBOX")
    view = MailboxView.from_entries(box, True, await store.uids(acct, box.id), 0)
    queries = [
        "ALL", "SEEN", "UNSEEN FLAGGED", "OR DELETED KEYWORD $Work", "NOT (SEEN UNFLAGGED)",
        "LARGER 300", "SMALLER 250", "UID 3:7,20:*", "5:9 UNDELETED", "MODSEQ 5",
        "OR (LARGER 100 SMALLER 200) NOT UID 1:10", "UNKEYWORD $Work DELETED",
    ]
    for query in queries:
        lines = await c.command(f"UID SEARCH {query}")
        (line,) = [x for x in lines if x.startswith(b"* SEARCH")]
        got = [int(x) for x in line.split(b"(")[0].split()[2:]]
        cmd = parse_line(f"x UID SEARCH {query}".encode())
        assert isinstance(cmd, Search)
        expected = await store.search(acct, box.id, search_criteria(cmd.key, view))
        assert got == expected, query
    await c.close()


async def test_status_follows_changes_from_elsewhere(imap_env: ImapEnv) -> None:
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    status = 'STATUS INBOX (MESSAGES UNSEEN)'
    assert (await a.command(status))[0] == b'* STATUS "INBOX" (MESSAGES 0 UNSEEN 0)'
    await imap_env.deliver(message("one"))
    await imap_env.deliver(message("two"))
    await asyncio.sleep(0.05)
    assert (await a.command(status))[0] == b'* STATUS "INBOX" (MESSAGES 2 UNSEEN 2)'
    await b.ok("SELECT INBOX")
    await b.ok("STORE 1 +FLAGS (\\Seen)")
    await asyncio.sleep(0.05)
    assert (await a.command(status))[0] == b'* STATUS "INBOX" (MESSAGES 2 UNSEEN 1)'
    # Our own write is seen at once, even pipelined right behind it.
    await a.ok("SELECT INBOX")
    await a.send(b"w1 STORE 2 +FLAGS.SILENT (\\Seen)\r\nw2 " + status.encode() + b"\r\n")
    await a.until("w1")
    assert (await a.until("w2"))[0] == b'* STATUS "INBOX" (MESSAGES 2 UNSEEN 0)'
    await a.close()
    await b.close()


async def test_half_closed_client_still_gets_answers(imap_env: ImapEnv) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", imap_env.port)
    writer.write(f"a LOGIN {USER} {PASSWORD}\r\nb NOOP\r\nc LOGOUT\r\n".encode())
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    lines = data.split(b"\r\n")
    assert lines[1].startswith(b"a OK") and lines[2] == b"b OK NOOP completed"
    assert lines[3:5] == [b"* BYE Logging out", b"c OK LOGOUT completed"]
    writer.close()

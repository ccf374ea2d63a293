"""Real POP3 clients against the real server: Python's poplib, Debian's
fetchmail and mpop, over STLS (port 110 style) and implicit TLS (port 995
style), with a trustme certificate. Downloads land in files through an MDA
script; deletions are checked in the storage view IMAP reads."""

from __future__ import annotations

import asyncio
import os
import poplib
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.model import DELETED
from tests.protocol.pop3.harness import (
    MSG1,
    MSG2,
    PASSWORD,
    USER,
    deliver,
    make_settings,
    open_test_storage,
    ports_of,
    running_pop3,
)

FETCHMAIL = "/usr/bin/fetchmail"
MPOP = "/usr/bin/mpop"


@pytest.fixture(scope="module")
def pop3_tls(tls_ca) -> ssl.SSLContext:
    """Like the shared tls_context, plus a subject CN: fetchmail's
    sslcommonname check reads the CN, not the subjectAltName."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost", common_name="localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
async def env(tmp_path: Path, pop3_tls) -> AsyncIterator[dict]:
    store = await open_test_storage(tmp_path)
    await store.directory.add_domain("example.org")
    account = await store.directory.add_account(USER, PASSWORD)
    uids = [await deliver(store, account, MSG1), await deliver(store, account, MSG2)]
    settings = make_settings(tmp_path / "data")
    try:
        async with running_pop3(settings, store, pop3_tls) as service:
            yield {"storage": store, "account": account, "uids": uids, "ports": ports_of(service)}
    finally:
        await store.close()


async def inbox_state(storage, account) -> tuple[list[int], object]:
    mail = storage.mail(account)
    inbox = await mail.get_mailbox(account.id, "INBOX")
    return [e.uid for e in await mail.uids(account.id, inbox.id)], inbox


def write_mda(tmp_path: Path) -> tuple[Path, Path]:
    """An MDA that stores each message it is fed in its own file."""
    outdir = tmp_path / "delivered"
    outdir.mkdir()
    script = tmp_path / "mda.sh"
    script.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {outdir}/msg.XXXXXX)"\n')
    script.chmod(0o755)
    return script, outdir


def delivered(outdir: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in outdir.iterdir())


def assert_got_both(messages: list[bytes]) -> None:
    assert len(messages) == 2, messages
    joined = b"\n".join(messages).replace(b"\r\n", b"\n")
    # Byte-stuffing was undone by the client: the lone "." line and the dots survive.
    assert b"Subject: first\n" in joined and b"\n.starts with a dot\n.\nlast line\n" in joined
    assert b"Subject: second\n" in joined and b"\nbody 2\n..two dots" in joined


async def run_client(*argv: str, env: dict | None = None, timeout: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{text}"
    return text


# -- poplib --


def poplib_download(port: int, ctx: ssl.SSLContext, implicit: bool, delete: bool) -> list[bytes]:
    if implicit:
        pop = poplib.POP3_SSL("127.0.0.1", port, context=ctx, timeout=10)
    else:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        caps = pop.capa()
        assert "STLS" in caps and "USER" not in caps
        pop.stls(ctx)
    caps = pop.capa()
    assert "USER" in caps and "STLS" not in caps and caps["SASL"] == ["PLAIN"]
    pop.user(USER)
    pop.pass_(PASSWORD)
    count, _ = pop.stat()
    messages = []
    for number in range(1, count + 1):
        _, lines, _ = pop.retr(number)
        messages.append(b"\r\n".join(lines) + b"\r\n")
        if delete:
            pop.dele(number)
    pop.quit()
    return messages


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "implicit-tls"])
async def test_poplib_downloads_and_deletes(env, client_tls_context, implicit):
    port = env["ports"].tls if implicit else env["ports"].plain
    messages = await asyncio.to_thread(poplib_download, port, client_tls_context, implicit, True)
    assert messages[0] == MSG1
    assert messages[1] == MSG2.replace(b"\n", b"\r\n") + b"\r\n"
    uids, _ = await inbox_state(env["storage"], env["account"])
    assert uids == []


def poplib_delete_then_drop(port: int, ctx: ssl.SSLContext) -> None:
    pop = poplib.POP3_SSL("127.0.0.1", port, context=ctx, timeout=10)
    pop.user(USER)
    pop.pass_(PASSWORD)
    pop.dele(1)
    pop.dele(2)
    pop.sock.close()  # connection dropped: no QUIT


def poplib_stat(port: int, ctx: ssl.SSLContext) -> tuple[int, int]:
    pop = poplib.POP3_SSL("127.0.0.1", port, context=ctx, timeout=10)
    pop.user(USER)
    pop.pass_(PASSWORD)
    result = pop.stat()
    pop.quit()
    return result


async def test_dropped_connection_after_dele_deletes_nothing(env, client_tls_context):
    port = env["ports"].tls
    await asyncio.to_thread(poplib_delete_then_drop, port, client_tls_context)
    for _ in range(100):  # until the server has noticed the drop and released the lock
        try:
            result = await asyncio.to_thread(poplib_stat, port, client_tls_context)
            break
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0]
            await asyncio.sleep(0.05)
    assert result == (2, len(MSG1) + len(MSG2))
    uids, _ = await inbox_state(env["storage"], env["account"])
    assert uids == env["uids"]


async def test_quit_deletions_are_expunges_for_imap(env, tmp_path, tls_context, client_tls_context):
    storage, account = env["storage"], env["account"]
    _, inbox = await inbox_state(storage, account)
    await asyncio.to_thread(poplib_download, env["ports"].tls, client_tls_context, True, True)
    uids, after = await inbox_state(storage, account)
    assert uids == []
    changes = await storage.mail(account).changes_since(account.id, inbox.id, inbox.highestmodseq)
    assert sorted(changes.vanished) == env["uids"]  # what IMAP reports as expunged
    assert after.uidvalidity == inbox.uidvalidity
    # The IMAP server, when present, sees an empty INBOX too.
    await imap_sees_empty_inbox(storage, tmp_path, tls_context)


async def imap_sees_empty_inbox(storage, tmp_path: Path, tls: ssl.SSLContext) -> None:
    try:
        from imapd.imap.server import start_imap
    except ImportError:
        return  # the IMAP server is another helper's work in progress
    import imaplib

    settings = make_settings(tmp_path / "imap-check")
    settings.imap.listen = ["127.0.0.1:0"]
    settings.imap.tls_listen = []
    settings.auth.allow_plaintext = True
    servers = await start_imap(settings, storage, tls)
    try:
        port = servers[0].sockets[0].getsockname()[1]

        def check() -> bytes:
            imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
            imap.login(USER, PASSWORD)
            typ, data = imap.select("INBOX")
            imap.logout()
            assert typ == "OK"
            return data[0]

        assert await asyncio.to_thread(check) == b"0"
    finally:
        for server in servers:
            server.close()


# -- fetchmail --


def fetchmail_rc(tmp_path: Path, port: int, ca_file: Path, mda: Path, implicit: bool) -> Path:
    rc = tmp_path / "fetchmailrc"
    tls = "ssl" if implicit else "sslproto 'TLS1.2+'"  # sslproto without ssl: STLS required
    rc.write_text(
        "set no syslog\n"
        f"poll localhost via 127.0.0.1 proto pop3 service {port} auth password\n"
        f'  user "{USER}" there with password "{PASSWORD}" is "root" here\n'
        f'  {tls} sslcertck sslcertfile "{ca_file}" sslcommonname localhost\n'
        f'  fetchall nokeep mda "{mda}"\n'
    )
    rc.chmod(stat.S_IRUSR | stat.S_IWUSR)  # fetchmail insists
    return rc


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "implicit-tls"])
async def test_fetchmail_downloads_and_deletes(env, tmp_path, ca_file, implicit):
    mda, outdir = write_mda(tmp_path)
    port = env["ports"].tls if implicit else env["ports"].plain
    rc = fetchmail_rc(tmp_path, port, ca_file, mda, implicit)
    home = tmp_path / "fetchmailhome"
    home.mkdir(mode=0o700)
    log = await run_client(
        FETCHMAIL, "-v", "--nodetach", "-f", str(rc),
        env={"FETCHMAILHOME": str(home), "HOME": str(home)},
    )
    if not implicit:
        assert "STLS" in log
    assert_got_both(delivered(outdir))
    uids, _ = await inbox_state(env["storage"], env["account"])
    assert uids == []


# -- mpop --


def mpop_conf(tmp_path: Path, port: int, ca_file: Path, mda: Path, implicit: bool) -> Path:
    conf = tmp_path / "mpoprc"
    conf.write_text(
        "account test\n"
        "host 127.0.0.1\n"
        f"port {port}\n"
        f"user {USER}\n"
        f"password {PASSWORD}\n"
        "auth plain\n"
        "tls on\n"
        f"tls_starttls {'off' if implicit else 'on'}\n"
        f"tls_trust_file {ca_file}\n"
        "tls_host_override localhost\n"
        f"delivery mda {mda}\n"
        "keep off\n"
        f"uidls_file {tmp_path}/mpop-uidls\n"
    )
    conf.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return conf


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "implicit-tls"])
async def test_mpop_downloads_and_deletes(env, tmp_path, ca_file, implicit):
    mda, outdir = write_mda(tmp_path)
    port = env["ports"].tls if implicit else env["ports"].plain
    conf = mpop_conf(tmp_path, port, ca_file, mda, implicit)
    await run_client(MPOP, f"--file={conf}", "--debug", "test")
    assert_got_both(delivered(outdir))
    uids, _ = await inbox_state(env["storage"], env["account"])
    assert uids == []


async def test_mpop_keep_uses_stable_uidls(env, tmp_path, ca_file):
    """With keep on, a second run downloads nothing: the UIDLs are stable."""
    mda, outdir = write_mda(tmp_path)
    conf = mpop_conf(tmp_path, env["ports"].tls, ca_file, mda, True)
    conf.write_text(conf.read_text().replace("keep off", "keep on"))
    await run_client(MPOP, f"--file={conf}", "test")
    assert len(delivered(outdir)) == 2
    await deliver(env["storage"], env["account"], b"Subject: third\r\n\r\nnew\r\n")
    await run_client(MPOP, f"--file={conf}", "test")
    messages = delivered(outdir)
    assert len(messages) == 3 and sum(b"Subject: third" in m for m in messages) == 1
    storage, account = env["storage"], env["account"]
    _, inbox = await inbox_state(storage, account)
    entries = await storage.mail(account).uids(account.id, inbox.id)
    assert len(entries) == 3 and not any(DELETED in e.flags for e in entries)

"""A full two-way sync with Debian's mbsync (isync) over STARTTLS.

500 messages go down; then both sides change (new mail, flag changes,
deletions) and a second sync must leave the server and the Maildir with
exactly the same messages and flags: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import asyncio
import email
import os
from pathlib import Path

from storage.model import DELETED, FLAGGED, SEEN, StoreMode, UidSet
from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv

MBSYNC = "/usr/bin/mbsync"


def _msg(n: int, origin: str = "server") -> bytes:
    return (
        f"From: Sender {n} <s{n}@example.net>\r\n"
        f"To: {USER}\r\n"
        f"Subject: {origin} message {n}\r\n"
        f"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
        f"Message-ID: <{origin}-{n}@example.net>\r\n"
        f"\r\n"
        f"Body of {origin} message {n}.\r\n"
    ).encode()


def _config(tmp: Path, port: int, ca: Path) -> Path:
    rc = tmp / "mbsyncrc"
    (tmp / "mail").mkdir()
    rc.write_text(
        f"""IMAPAccount test
Host localhost
Port {port}
User {USER}
Pass {PASSWORD}
SSLType STARTTLS
CertificateFile {ca}
PipelineDepth 50

IMAPStore remote
Account test

MaildirStore local
Path {tmp}/mail/
Inbox {tmp}/mail/INBOX
SubFolders Verbatim

Channel test
Far :remote:
Near :local:
Patterns INBOX Lists
Create Both
Expunge Both
SyncState *
Sync All
"""
    )
    return rc


async def _mbsync(rc: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        MBSYNC, "-c", str(rc), "-a",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def _maildir(folder: Path) -> dict[str, tuple[Path, str]]:
    """Message-ID -> (file, maildir flags), asserting no duplicates."""
    out: dict[str, tuple[Path, str]] = {}
    for sub in ("cur", "new"):
        for path in (folder / sub).iterdir():
            msg = email.message_from_bytes(path.read_bytes())
            mid = str(msg["Message-ID"])
            assert mid not in out, f"duplicate {mid} in maildir"
            flags = path.name.split(":2,", 1)[1] if ":2," in path.name else ""
            out[mid] = (path, flags)
    return out


async def _server(env: ImapEnv, mailbox: str) -> dict[str, frozenset[str]]:
    """Message-ID -> flags on the server, asserting no duplicates."""
    store = env.storage.mail(env.account)  # type: ignore[attr-defined]
    box = await store.get_mailbox(env.account.id, mailbox)  # type: ignore[attr-defined]
    entries = await store.uids(env.account.id, box.id)  # type: ignore[attr-defined]
    out: dict[str, frozenset[str]] = {}
    if not entries:
        return out
    msgs = await store.fetch(env.account.id, box.id, UidSet.of(e.uid for e in entries))  # type: ignore
    for m in msgs:
        mid = m.parsed.message_id
        assert mid not in out, f"duplicate {mid} on server"
        out[mid] = m.entry.flags
    return out


async def test_mbsync_two_way_sync_of_500_messages(
    imap_env: ImapEnv, tmp_path: Path, ca_file: Path
) -> None:
    env = imap_env
    store = env.storage.mail(env.account)  # type: ignore[attr-defined]
    acct = env.account.id  # type: ignore[attr-defined]
    await store.create_mailbox(acct, "Lists")
    for n in range(500):
        await env.deliver(_msg(n), flags=(SEEN,) if n % 7 == 0 else ())
    for n in range(20):
        await env.deliver(_msg(1000 + n), mailbox="Lists")
    rc = _config(tmp_path, env.port, ca_file)

    await _mbsync(rc)
    inbox = tmp_path / "mail" / "INBOX"
    local = _maildir(inbox)
    assert len(local) == 500
    assert set(local) == set(await _server(env, "INBOX"))
    assert sum("S" in f for _, f in local.values()) == len(range(0, 500, 7))
    assert len(_maildir(tmp_path / "mail" / "Lists")) == 20

    # Server side: 20 new, flag 10, delete 10.
    box = await store.get_mailbox(acct, "INBOX")
    for n in range(20):
        await env.deliver(_msg(2000 + n))
    await store.store_flags(acct, box.id, UidSet.of(range(1, 11)), StoreMode.ADD, (FLAGGED,))
    await store.store_flags(acct, box.id, UidSet.of(range(11, 21)), StoreMode.ADD, (DELETED,))
    await store.expunge(acct, box.id)
    # Local side: 15 new, mark 10 seen, delete 10.
    for n in range(15):
        (inbox / "new" / f"1700000000.local{n}.host").write_bytes(_msg(3000 + n, "local"))
    ordered = sorted(local.items(), key=lambda kv: int(kv[0].split("-")[1].split("@")[0]))
    for _mid, (path, flags) in ordered[100:110]:
        base = path.name.split(":2,", 1)[0]
        new_flags = "".join(sorted(set(flags) | {"S"}))
        os.rename(path, inbox / "cur" / f"{base}:2,{new_flags}")
    for _mid, (path, _) in ordered[200:210]:
        path.unlink()

    await _mbsync(rc)
    local = _maildir(inbox)
    server = await _server(env, "INBOX")
    assert len(server) == 500 + 20 - 10 + 15 - 10
    assert set(local) == set(server)
    for mid, flags in server.items():
        maildir_flags = local[mid][1]
        assert (SEEN in flags) == ("S" in maildir_flags), mid
        assert (FLAGGED in flags) == ("F" in maildir_flags), mid
    for n in range(10):
        assert FLAGGED in server[f"<server-{n}@example.net>"]
    for mid, _ in ordered[100:110]:
        if mid in server:
            assert SEEN in server[mid]
    for mid, _ in ordered[200:210]:
        assert mid not in server
    for n in range(15):
        assert f"<local-{3000 + n}@example.net>" in server

    # A third run changes nothing.
    await _mbsync(rc)
    assert set(_maildir(inbox)) == set(await _server(env, "INBOX"))
    assert len(await _server(env, "INBOX")) == 515

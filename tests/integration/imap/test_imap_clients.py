"""Standard clients against the IMAP server: Python's imaplib (STARTTLS)
and imapclient (implicit TLS), with a trustme certificate."""

from __future__ import annotations

import asyncio
import email
import imaplib
import ssl

import imapclient

from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv, message


def _imaplib_session(port: int, ctx: ssl.SSLContext) -> dict[str, object]:
    out: dict[str, object] = {}
    m = imaplib.IMAP4("127.0.0.1", port)
    try:
        m.starttls(ssl_context=ctx)
        assert m.login(USER, PASSWORD)[0] == "OK"
        raw = message("via imaplib", "Body from imaplib\r\n")
        typ, data = m.append("INBOX", "(\\Flagged)", imaplib.Time2Internaldate(0), raw)
        assert typ == "OK", data
        out["append"] = data[0]
        typ, data = m.select("INBOX")
        out["exists"] = int(data[0])
        typ, data = m.search(None, "SUBJECT", '"via imaplib"')
        out["search"] = data[0]
        typ, data = m.fetch("1", "(RFC822 FLAGS)")
        out["fetch"] = data
        typ, data = m.store("1", "+FLAGS", "(\\Deleted)")
        out["store"] = data
        typ, data = m.copy("1", "Archive")
        out["copy"] = typ
        typ, data = m.expunge()
        out["expunge"] = data
        typ, data = m.status("Archive", "(MESSAGES)")
        out["status"] = data[0]
        typ, data = m.list()
        out["list"] = data
        m.close()
    finally:
        m.logout()
    return out


async def test_imaplib_over_starttls(imap_env: ImapEnv) -> None:
    result = await asyncio.to_thread(_imaplib_session, imap_env.port, imap_env.client_tls)
    assert b"APPENDUID" in result["append"]  # type: ignore[operator]
    assert result["exists"] == 1
    assert result["search"] == b"1"
    fetched = result["fetch"]
    assert isinstance(fetched, list)
    msg = email.message_from_bytes(fetched[0][1])
    assert msg["Subject"] == "via imaplib"
    assert b"\\Seen" in fetched[1] and b"\\Flagged" in fetched[1]
    assert result["copy"] == "OK"
    assert result["expunge"] == [b"1"]
    assert result["status"] == b'"Archive" (MESSAGES 1)'
    names = [line.decode() for line in result["list"]]  # type: ignore[union-attr]
    assert any(n.endswith('"INBOX"') for n in names)
    assert any("\\Sent" in n and n.endswith('"Sent"') for n in names)


def _imapclient_session(port: int, ctx: ssl.SSLContext) -> dict[str, object]:
    out: dict[str, object] = {}
    with imapclient.IMAPClient("127.0.0.1", port=port, ssl=True, ssl_context=ctx) as c:
        c.login(USER, PASSWORD)
        out["caps"] = c.capabilities()
        out["id"] = c.id_({"name": "pytest"})
        out["namespace"] = c.namespace()
        c.create_folder("Projekte/Entwürfe")
        out["folders"] = [f[2] for f in c.list_folders()]
        c.append("Projekte/Entwürfe", message("draft", "Draft body\r\n"), flags=[b"\\Draft"])
        info = c.select_folder("INBOX")
        out["select"] = info
        out["search"] = c.search(["UNSEEN"])
        out["fetch"] = c.fetch([1, 2], ["ENVELOPE", "BODYSTRUCTURE", "FLAGS", "BODY.PEEK[]",
                                      "INTERNALDATE", "RFC822.SIZE"])
        c.add_flags([1], [b"$Label1"])
        out["flags"] = c.get_flags([1])
        out["move"] = c.move([2], "Archive")
        out["after_move"] = c.search("ALL")
        out["condstore"] = c.fetch([1], ["FLAGS"], modifiers=["CHANGEDSINCE 1"])
        out["draft_status"] = c.folder_status("Projekte/Entwürfe", ["MESSAGES"])
        c.unselect_folder()
        c.logout()
    return out


async def test_imapclient_over_implicit_tls(imap_env: ImapEnv) -> None:
    await imap_env.deliver(message("one", "First\r\n"))
    await imap_env.deliver(
        message("two", "Second\r\n", Content_Type="text/plain; charset=utf-8"))
    r = await asyncio.to_thread(_imapclient_session, imap_env.tls_port, imap_env.client_tls)
    for cap in (b"IDLE", b"MOVE", b"UIDPLUS", b"CONDSTORE", b"QRESYNC", b"SPECIAL-USE"):
        assert cap in r["caps"]  # type: ignore[operator]
    ident = r["id"]
    assert isinstance(ident, tuple) and ident[0][:2] == (b"name", b"shardmail")
    assert "Projekte/Entwürfe" in r["folders"]  # type: ignore[operator]
    assert r["select"][b"EXISTS"] == 2  # type: ignore[index]
    assert r["search"] == [1, 2]
    fetched = r["fetch"]
    assert fetched[1][b"ENVELOPE"].subject == b"one"  # type: ignore[index]
    assert fetched[2][b"BODYSTRUCTURE"][0] == b"TEXT"  # type: ignore[index]
    assert fetched[1][b"BODY[]"].endswith(b"First\r\n")  # type: ignore[index]
    assert b"$Label1" in r["flags"][1]  # type: ignore[index]
    assert r["after_move"] == [1]
    assert b"MODSEQ" in r["condstore"][1]  # type: ignore[index]
    assert r["draft_status"][b"MESSAGES"] == 1  # type: ignore[index]


def _idle_until_exists(port: int, ctx: ssl.SSLContext, ready: asyncio.Event,
                       loop: asyncio.AbstractEventLoop) -> list[object]:
    with imapclient.IMAPClient("127.0.0.1", port=port, ssl=True, ssl_context=ctx) as c:
        c.login(USER, PASSWORD)
        c.select_folder("INBOX")
        c.idle()
        loop.call_soon_threadsafe(ready.set)
        responses = c.idle_check(timeout=5)
        c.idle_done()
        c.logout()
    return responses


async def test_imapclient_idle(imap_env: ImapEnv) -> None:
    ready = asyncio.Event()
    task = asyncio.ensure_future(asyncio.to_thread(
        _idle_until_exists, imap_env.tls_port, imap_env.client_tls, ready,
        asyncio.get_running_loop()))
    await asyncio.wait_for(ready.wait(), 10)
    await asyncio.sleep(0.2)
    await imap_env.deliver(message("ping"))
    responses = await asyncio.wait_for(task, 10)
    assert (1, b"EXISTS") in responses

"""imapclient (implicit TLS) against the IMAP extensions of issue #24:
what a real client sends and how it reads the answers."""

from __future__ import annotations

import asyncio
import datetime as dt
import imaplib
import random
import ssl

import imapclient

from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv, message


def _savedate_session(port: int, ctx: ssl.SSLContext) -> dict[str, object]:
    out: dict[str, object] = {}
    with imapclient.IMAPClient("127.0.0.1", port=port, ssl=True, ssl_context=ctx) as c:
        c.login(USER, PASSWORD)
        out["caps"] = c.capabilities()
        old = dt.datetime(2001, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        c.append("INBOX", message("imported", "Old mail\r\n"), msg_time=old)
        c.select_folder("INBOX")
        out["fetch"] = c.fetch([1, 2], ["INTERNALDATE", "SAVEDATE"])
        yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
        out["since"] = c.search(["SAVEDSINCE", yesterday])
        out["before"] = c.search(["SAVEDBEFORE", yesterday])
        out["internal_before"] = c.search(["BEFORE", dt.date(2002, 1, 1)])
        out["supported"] = c.search(["SAVEDATESUPPORTED"])
    return out


async def test_imapclient_savedate(imap_env: ImapEnv) -> None:
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    await imap_env.deliver(message("delivered"))
    result = await asyncio.to_thread(_savedate_session, imap_env.tls_port, imap_env.client_tls)
    assert b"SAVEDATE" in result["caps"]  # type: ignore[operator]
    fetched = result["fetch"]
    assert isinstance(fetched, dict) and sorted(fetched) == [1, 2]
    for data in fetched.values():
        saved = imapclient.response_parser.parse_to_datetime(data[b"SAVEDATE"])  # type: ignore[attr-defined]
        # The save date is now, whatever INTERNALDATE the client gave.
        assert start <= saved.astimezone(dt.UTC) <= dt.datetime.now(dt.UTC)
    assert fetched[2][b"INTERNALDATE"].year == 2001
    assert result["since"] == [1, 2] and result["before"] == []
    assert result["internal_before"] == [2] and result["supported"] == [1, 2]


def _preview_session(port: int, ctx: ssl.SSLContext) -> dict[str, object]:
    out: dict[str, object] = {}
    with imapclient.IMAPClient("127.0.0.1", port=port, ssl=True, ssl_context=ctx) as c:
        c.login(USER, PASSWORD)
        out["caps"] = c.capabilities()
        c.select_folder("INBOX", readonly=False)
        out["fetch"] = c.fetch([1, 2], ["PREVIEW", "FLAGS"])
        out["lazy"] = c.fetch([2], ["PREVIEW (LAZY)"])
    return out


async def test_imapclient_preview(imap_env: ImapEnv) -> None:
    await imap_env.deliver(message("ascii", "Plain\r\n  text here.\r\n"))
    await imap_env.deliver(
        message("utf8", "Grüße,\r\n\r\nwie geht's?\r\n", Content_Type="text/plain; charset=utf-8")
    )
    result = await asyncio.to_thread(_preview_session, imap_env.tls_port, imap_env.client_tls)
    assert b"PREVIEW" in result["caps"]  # type: ignore[operator]
    fetched = result["fetch"]
    assert isinstance(fetched, dict)
    assert fetched[1][b"PREVIEW"] == b"Plain text here."
    assert fetched[2][b"PREVIEW"].decode("utf-8") == "Grüße, wie geht's?"
    assert all(b"\\Seen" not in data[b"FLAGS"] for data in fetched.values())
    assert result["lazy"][2][b"PREVIEW"] == fetched[2][b"PREVIEW"]  # type: ignore[index]


def _metadata_session(port: int, ctx: ssl.SSLContext, comment: str) -> dict[str, object]:
    """imaplib has no METADATA methods: its extension hook (``xatom``)
    sends the commands as RFC 5464 writes them (its literals go at the end
    of a line only, where SETMETADATA needs a ")": quoted values here)."""
    out: dict[str, object] = {}
    m = imaplib.IMAP4("127.0.0.1", port)
    try:
        m.starttls(ssl_context=ctx)
        m.login(USER, PASSWORD)
        out["caps"] = m.capability()[1][0].split()
        out["set"] = m.xatom("SETMETADATA", "INBOX", f'(/private/comment "{comment}")')
        out["get"] = m.xatom("GETMETADATA", '"INBOX"', "/private/comment")
        out["untagged"] = m.untagged_responses.pop("METADATA", None)
        out["server_set"] = m.xatom("SETMETADATA", '""', '(/shared/a "1" /shared/a/b "2")')
        out["server_get"] = m.xatom("GETMETADATA", "(DEPTH infinity)", '""', "/shared")
        out["server_untagged"] = m.untagged_responses.pop("METADATA", None)
        try:
            m.xatom("GETMETADATA", "INBOX", "/nowhere")
        except imaplib.IMAP4.error as err:  # a BAD is this exception
            out["bad"] = str(err)
        out["after"] = m.noop()[0]
    finally:
        m.logout()
    return out


async def test_imaplib_metadata(imap_env: ImapEnv) -> None:
    rng = random.Random()
    comment = "".join(rng.choice("abcdefgh XYZ-_.") for _ in range(rng.randint(1, 60)))
    result = await asyncio.to_thread(_metadata_session, imap_env.port, imap_env.client_tls, comment)
    assert {b"METADATA", b"METADATA-SERVER"} <= set(result["caps"])  # type: ignore[arg-type]
    assert result["set"][0] == "OK" and result["get"][0] == "OK"  # type: ignore[index]
    assert result["untagged"] == [f'"INBOX" (/private/comment "{comment}")'.encode()]
    assert result["server_set"][0] == "OK"  # type: ignore[index]
    assert result["server_untagged"] == [b'"" (/shared/a "1" /shared/a/b "2")']
    assert "Invalid metadata entry name" in result["bad"]  # type: ignore[operator]
    assert result["after"] == "OK"


def _utf8_session(port: int, ctx: ssl.SSLContext, name: str) -> dict[str, object]:
    """imaplib's own UTF8=ACCEPT mode (``enable`` switches it to UTF-8
    commands). Its APPEND in that mode sends "UTF8 (" inside the literal
    (CPython's imaplib), so messages go in before enabling."""
    out: dict[str, object] = {}
    m = imaplib.IMAP4("127.0.0.1", port)
    try:
        m.starttls(ssl_context=ctx)
        m.login(USER, PASSWORD)
        out["enable"] = m.enable("UTF8=ACCEPT")
        out["create"] = m.create(f'"{name}"')
        out["list"] = m.list('""', f'"{name[:2]}*"')
        out["status"] = m.status(f'"{name}"', "(MESSAGES UIDNEXT)")
        out["select"] = m.select(f'"{name}"')
        out["copy_back"] = m.select("INBOX")
        out["copy"] = m.copy("1", f'"{name}"')
        out["status_after"] = m.status(f'"{name}"', "(MESSAGES)")
    finally:
        m.logout()
    return out


async def test_imaplib_utf8_accept(imap_env: ImapEnv) -> None:
    await imap_env.deliver(message("before"))
    rng = random.Random()
    name = "Привет " + "".join(rng.choice("éüß中日") for _ in range(rng.randint(1, 8)))
    result = await asyncio.to_thread(_utf8_session, imap_env.port, imap_env.client_tls, name)
    assert result["enable"] == ("OK", [b"ENABLE completed"])
    assert result["create"][0] == "OK"  # type: ignore[index]
    quoted = f'"{name}"'.encode()
    assert result["list"] == ("OK", [b'(\\HasNoChildren) "/" ' + quoted])
    assert result["status"] == ("OK", [quoted + b" (MESSAGES 0 UIDNEXT 1)"])
    assert result["select"] == ("OK", [b"0"])
    assert result["copy"][0] == "OK"  # type: ignore[index]
    assert result["status_after"] == ("OK", [quoted + b" (MESSAGES 1)"])

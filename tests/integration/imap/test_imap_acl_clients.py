"""A team folder shared with Python's imaplib, two users at once (RFC 4314
ACL, RFC 2342 NAMESPACE): alice grants bob "lr", then "lrswi", then
revokes; bob lists, selects, reads, stores flags and appends as the
rights allow and gets NO [NOPERM] where they do not."""

from __future__ import annotations

import asyncio
import imaplib
import random
import ssl

from tests.protocol.imap.conftest import OTHER, PASSWORD, USER, ImapEnv, message

TEAM = f'"Other Users/{USER}/Team"'


def _login(port: int, ctx: ssl.SSLContext, user: str) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", port)
    m.starttls(ssl_context=ctx)
    assert m.login(user, PASSWORD)[0] == "OK"
    return m


def _noperm(result: tuple[str, list[bytes]]) -> bool:
    typ, data = result
    return typ == "NO" and b"[NOPERM]" in data[0]


def _two_users(port: int, ctx: ssl.SSLContext) -> None:
    alice = _login(port, ctx, USER)
    bob = _login(port, ctx, OTHER)
    try:
        first = message("team plan", random.randbytes(random.randint(100, 4000)).hex() + "\r\n")
        assert alice.create("Team")[0] == "OK"
        assert alice.append("Team", "", imaplib.Time2Internaldate(0), first)[0] == "OK"
        # Not shared yet: bob neither sees it nor opens it.
        assert bob.list('""', '"Other Users/*"') == ("OK", [None])
        assert bob.select(TEAM)[0] == "NO"

        assert alice.setacl("Team", OTHER, "lr")[0] == "OK"
        typ, data = alice.getacl("Team")
        assert typ == "OK" and f"{OTHER} lr".encode() in data[0], data
        typ, data = bob.namespace()
        assert data == [b'(("" "/")) (("Other Users/" "/")) NIL'], data
        typ, data = bob.list('""', '"Other Users/*"')
        assert f'(\\HasNoChildren) "/" {TEAM}'.encode() in data, data
        typ, data = bob.myrights(TEAM)
        assert typ == "OK" and data[0].endswith(b" lr"), data
        typ, data = bob.select(TEAM)
        assert typ == "OK" and data == [b"1"], data
        typ, data = bob.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == first  # byte for byte
        assert _noperm(bob.store("1", "+FLAGS", "(\\Flagged)"))
        extra = message("from bob", random.randbytes(random.randint(100, 4000)).hex() + "\r\n")
        assert _noperm(bob.append(TEAM, "", imaplib.Time2Internaldate(0), extra))
        assert _noperm(bob.getacl(TEAM))

        assert alice.setacl("Team", OTHER, "lrswi")[0] == "OK"
        typ, data = bob.store("1", "+FLAGS", "(\\Seen \\Flagged)")
        assert typ == "OK" and b"\\Seen" in data[0] and b"\\Flagged" in data[0], data
        typ, data = bob.append(TEAM, "(\\Answered)", imaplib.Time2Internaldate(0), extra)
        assert typ == "OK" and b"APPENDUID" in data[0], data
        # Alice sees what bob did, bytes and flags as he sent them.
        assert alice.select("Team")[0] == "OK"
        typ, data = alice.fetch("1:2", "(FLAGS BODY.PEEK[])")
        assert typ == "OK"
        assert b"\\Flagged" in data[0][0] and b"\\Seen" in data[0][0]
        assert data[0][1] == first
        assert b"\\Answered" in data[2][0] and data[2][1] == extra
        # "e" was not granted: bob cannot expunge.
        assert bob.store("2", "+FLAGS", "(\\Deleted)")[0] == "NO"

        assert alice.deleteacl("Team", OTHER)[0] == "OK"
        assert bob.close()[0] == "OK"
        assert bob.select(TEAM)[0] == "NO"
        assert bob.list('""', '"Other Users/*"') == ("OK", [None])
    finally:
        alice.logout()
        bob.logout()


async def test_team_folder_with_imaplib(imap_env: ImapEnv) -> None:
    await asyncio.to_thread(_two_users, imap_env.port, imap_env.client_tls)

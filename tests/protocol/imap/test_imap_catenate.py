# ruff: noqa: E501, UP031  (protocol transcripts read best unwrapped)
"""CATENATE (RFC 4469): APPEND of a message assembled from TEXT literals and
URLs of stored messages (or their parts) in the same account.

A script table of client lines and the replies RFC 4469 requires (its
section 6 example, its section 5 errors, MULTIAPPEND all-or-none), byte-exact
assembly of random messages (sections and partial ranges crossing part
boundaries, binary octets, parts above the spool threshold), and imaplib
sending raw commands as a Python program would.
"""

from __future__ import annotations

import asyncio
import imaplib
import random
import re
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.protocol.imap.conftest import PASSWORD, USER, ImapClient, ImapEnv
from tests.protocol.imap.messages import MULTIPART, PLAIN
from tests.protocol.imap.test_imap_scripts import Script, play

UV = "<<uv>>"
STATUS_UV = (
    "u STATUS INBOX (UIDVALIDITY)",
    [r'\* STATUS "INBOX" \(UIDVALIDITY (?P<uv>\d+)\)', "u OK .*"],
)


def _url(section: str = "", uid: int = 1, box: str = "INBOX", uv: str = UV) -> str:
    out = f"/{box};UIDVALIDITY={uv}/;UID={uid}"
    return out + (f"/;SECTION={section}" if section else "")


def _between(raw: bytes, start: bytes, end: bytes) -> bytes:
    i = raw.index(start)
    return raw[i : raw.index(end, i + len(start))]


# MULTIPART's pieces as RFC 3501 section 6.4.5 names them.
_HEADER = MULTIPART[: MULTIPART.index(b"\r\n\r\n") + 4]
_PART1_MIME = b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
_PART1 = b"See the quarterly numbers."
_FORWARD_TEXT = b"\r\n--XY\r\nContent-Type: text/plain\r\n\r\nmy note\r\n--XY\r\n"
_EXAMPLE = (
    _HEADER + b"--XY\r\n" + _PART1_MIME + _PART1 + _FORWARD_TEXT + MULTIPART + b"\r\n--XY--\r\n"
)


def _text(data: bytes, plus: bool = True) -> bytes:
    return b"TEXT {%d%s}\r\n" % (len(data), b"+" if plus else b"") + data


def _exact_fetch(uid_seq: int, data: bytes) -> str:
    return "=* %d FETCH (BODY[] {%d}\r\n%s)" % (uid_seq, len(data), data.decode())


SCRIPTS: dict[str, Script] = {
    # RFC 4469 section 6: a forward of a stored message's header and first
    # part, with new text, the original attached whole.
    "rfc4469_example": Script(
        messages=[(MULTIPART, ())],
        steps=[
            STATUS_UV,
            (
                f'a APPEND INBOX (\\Seen $MDNSent) CATENATE (URL "{_url("HEADER")}" TEXT {{6}}',
                [r"\+ .*"],
            ),
            (
                f'--XY\r\n URL "{_url("1.MIME")}" URL "{_url("1")}" TEXT {{{len(_FORWARD_TEXT)}}}',
                [r"\+ .*"],
            ),
            (
                f'{_FORWARD_TEXT.decode()} URL "{_url()}" TEXT {{10+}}\r\n\r\n--XY--\r\n)',
                [r"a OK \[APPENDUID <<uv>> 2\] APPEND completed"],
            ),
            ("s SELECT INBOX", ["...", "s OK .*"]),
            (
                "f FETCH 2 (FLAGS BODY.PEEK[])",
                [
                    "=* 2 FETCH (FLAGS ($MDNSent \\Seen \\Recent) BODY[] {%d}\r\n%s)"
                    % (len(_EXAMPLE), _EXAMPLE.decode()),
                    "f OK .*",
                ],
            ),
        ],
    ),
    # RFC 4469 section 5: [BADURL url] for each way a URL fails to resolve,
    # [TOOBIG] for an assembled message over APPENDLIMIT; nothing stored.
    "errors": Script(
        messages=[(MULTIPART, ()), (PLAIN, ())],
        steps=[
            STATUS_UV,
            (
                'a APPEND INBOX CATENATE (TEXT {2+}\r\nhi URL "/INBOX;UIDVALIDITY=1/;UID=1")',
                ["=a NO [BADURL /INBOX;UIDVALIDITY=1/;UID=1] CATENATE URL does not resolve"],
            ),
            (
                f'b APPEND INBOX CATENATE (URL "{_url(uid=9)}")',
                [r"b NO \[BADURL /INBOX;UIDVALIDITY=\d+/;UID=9\] .*"],
            ),
            (
                'c APPEND INBOX CATENATE (URL "/Nowhere/;UID=1")',
                ["=c NO [BADURL /Nowhere/;UID=1] CATENATE URL does not resolve"],
            ),
            (
                f'd APPEND INBOX CATENATE (URL "{_url("3")}")',
                [r"d NO \[BADURL /INBOX;UIDVALIDITY=\d+/;UID=1/;SECTION=3\] .*"],
            ),
            (
                'e APPEND INBOX CATENATE (URL "imap://alice@localhost/INBOX/;UID=1")',
                [
                    "=e NO [BADURL imap://alice@localhost/INBOX/;UID=1] CATENATE URL does not resolve"
                ],
            ),
            (
                'f APPEND INBOX CATENATE (URL "/INBOX/;UID=1;URLAUTH=anonymous:internal:0123")',
                [r"f NO \[BADURL .*\] .*"],
            ),
            (
                "g APPEND INBOX CATENATE (URL ;UID=1)",
                ["=g NO [BADURL ;UID=1] CATENATE URL does not resolve"],
            ),  # nothing selected
            (
                b"h APPEND INBOX CATENATE (TEXT {600000+}\r\n"
                + b"x" * 600000
                + b" TEXT {600000+}\r\n"
                + b"y" * 600000
                + b")",
                ["=h NO [TOOBIG] Message too large"],
            ),
            (
                b"i APPEND INBOX CATENATE (TEXT {999000+}\r\n"
                + b"z" * 999000
                + b' URL "/INBOX/;UID=1" URL "/INBOX/;UID=1")',
                ["=i NO [TOOBIG] Message too large"],
            ),
            ("j APPEND INBOX CATENATE (TEXT {0+}\r\n)", [r"j NO \[CANNOT\] .*"]),
            ("k APPEND INBOX CATENATE ()", [r"k BAD .*"]),
            ("l APPEND INBOX CATENATE (FILE x)", [r"l BAD .*"]),
            ("m APPEND INBOX CATENATE ((TEXT {1+}\r\nx))", [r"m BAD .*"]),
            ("n APPEND INBOX CATENATE (URL x", [r"n BAD .*"]),
            (
                "o APPEND Nowhere CATENATE (TEXT {1+}\r\nx)",
                ["=o NO [TRYCREATE] Mailbox does not exist"],
            ),
            ("p STATUS INBOX (MESSAGES)", [r'\* STATUS "INBOX" \(MESSAGES 2\)', "p OK .*"]),
        ],
    ),
    # RFC 3502 with RFC 4469: one bad CATENATE fails the whole MULTIAPPEND.
    "multiappend_all_or_none": Script(
        messages=[(PLAIN, ())],
        steps=[
            STATUS_UV,
            (
                f'a APPEND INBOX {{5+}}\r\nhello CATENATE (TEXT {{3+}}\r\nhi! URL "{_url(uid=2)}") (\\Seen) CATENATE (TEXT {{1+}}\r\nx)',
                [r"a NO \[BADURL /INBOX;UIDVALIDITY=\d+/;UID=2\] .*"],
            ),
            (
                "b STATUS INBOX (MESSAGES UIDNEXT)",
                [r'\* STATUS "INBOX" \(MESSAGES 1 UIDNEXT 2\)', "b OK .*"],
            ),
            (
                f'c APPEND INBOX {{5+}}\r\nhello CATENATE (TEXT {{4+}}\r\nhi!\n URL "{_url("TEXT")}") (\\Seen) CATENATE (URL "{_url("HEADER.FIELDS%20(Subject)")}")',
                [r"c OK \[APPENDUID <<uv>> 2:4\] APPEND completed"],
            ),
            ("s SELECT INBOX", ["...", "s OK .*"]),
            (
                "f FETCH 2:4 BODY.PEEK[]",
                [
                    _exact_fetch(2, b"hello"),
                    _exact_fetch(3, b"hi!\nShall we meet at noon?\r\n"),
                    _exact_fetch(4, b"Subject: Lunch plans\r\n\r\n"),
                    "f OK .*",
                ],
            ),
        ],
    ),
    # RFC 5092 section 7.2: ";UID=" relative to the selected mailbox; a
    # percent-encoded section and a partial range (RFC 5092 section 3).
    "relative_and_partial": Script(
        messages=[(PLAIN, ())],
        steps=[
            ("s SELECT INBOX", ["...", "s OK .*"]),
            (
                'a APPEND INBOX CATENATE (URL ";UID=1/;SECTION=HEADER.FIELDS%20(To%20X-Mood)" URL ";uid=1/;partial=7.4")',
                ["...", r"a OK \[APPENDUID \d+ 2\] APPEND completed"],
            ),
            (
                "f FETCH 2 BODY.PEEK[]",
                [
                    _exact_fetch(
                        2, b"To: Alice <alice@example.org>\r\nX-Mood: hungry\r\n\r\n" + PLAIN[7:11]
                    ),
                    "f OK .*",
                ],
            ),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_catenate_script(imap_env: ImapEnv, name: str) -> None:
    await play(imap_env, SCRIPTS[name])


async def test_capability_lists_catenate(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    assert b" CATENATE " in (await c.ok("CAPABILITY"))[0]
    await c.close()


# ------------------------------------------------------ byte-exact, random


@dataclass
class _Part:
    mime: tuple[int, int]  # MIME header range in the message
    body: tuple[int, int]  # body range


def _random_message(rng: random.Random) -> tuple[bytes, list[_Part]]:
    """A multipart message of random parts (8-bit binary octets, base64 of
    random octets, text) and where each part's MIME header and body lie."""
    boundary = b"b-%d" % rng.getrandbits(64)
    out = bytearray(b"Subject: random %d\r\nMIME-Version: 1.0\r\n" % rng.getrandbits(32))
    out += b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n' % boundary
    parts: list[_Part] = []
    for _ in range(rng.randint(1, 5)):
        out += b"--" + boundary + b"\r\n"
        kind = rng.choice(["binary", "base64", "text"])
        size = rng.choice([rng.randint(0, 300), rng.randint(300, 40_000)])
        if kind == "binary":
            head = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            body = rng.randbytes(size).replace(b"\r\n--", b"\r\n..")  # no stray boundary line
        elif kind == "base64":
            head = b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            body = (
                __import__("base64")
                .encodebytes(rng.randbytes(size))
                .replace(b"\n", b"\r\n")
                .rstrip()
            )
        else:
            head = b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            body = "".join(rng.choices("aé€ \r\n", k=size)).encode().strip()
        mime = (len(out), len(out) + len(head))
        out += head
        parts.append(_Part(mime, (len(out), len(out) + len(body))))
        out += body + b"\r\n"
    out += b"--" + boundary + b"--\r\n"
    return bytes(out), parts


def _random_pieces(
    rng: random.Random, raw: bytes, parts: list[_Part], big: int
) -> tuple[bytes, list[bytes]]:
    """CATENATE parts (command text) and the octets they stand for."""
    cmd: list[bytes] = []
    want = bytearray()
    top_body = raw.index(b"\r\n\r\n") + 4
    for _ in range(rng.randint(1, 8)):
        choice = rng.randrange(7)
        if choice == 0:  # a TEXT literal of real random bytes, sometimes past the spool threshold
            data = rng.randbytes(rng.choice([rng.randint(1, 500), rng.randint(big, 2 * big)]))
            cmd.append(_text(data))
            want += data
            continue
        if choice == 1:
            n = rng.randrange(len(parts))
            url, data = f"{n + 1}", raw[slice(*parts[n].body)]
        elif choice == 2:
            n = rng.randrange(len(parts))
            url, data = f"{n + 1}.MIME", raw[slice(*parts[n].mime)]
        elif choice == 3:
            url, data = "HEADER", raw[:top_body]
        elif choice == 4:
            url, data = "TEXT", raw[top_body:]
        elif choice == 5:
            url, data = "", raw
        else:  # a partial range of the whole message: crosses part boundaries
            origin = rng.randrange(len(raw))
            octets = rng.randint(1, len(raw))
            url, data = f"/;PARTIAL={origin}.{octets}", raw[origin : origin + octets]
        full = "/INBOX/;UID=1" + (f"/;SECTION={url}" if url and not url.startswith("/") else url)
        cmd.append(b'URL "%s"' % full.encode())
        want += data
    return b" ".join(cmd), [bytes(want)]


async def _fetch(c: ImapClient, uid: int) -> bytes:
    lines = await c.command(f"UID FETCH {uid} BODY.PEEK[]")
    m = re.match(rb"\* \d+ FETCH \(UID \d+ BODY\[\] \{(\d+)\}\r\n", lines[0])
    assert m, lines[0][:200]
    return lines[0][m.end() : m.end() + int(m.group(1))]


async def test_assembled_messages_are_byte_exact(imap_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    threshold = 8 * 1024
    env = await imap_factory(imap={"spool_threshold": threshold, "max_literal_size": 4_000_000})
    rng = random.Random()
    raw, parts = _random_message(rng)
    await env.deliver(raw)
    c = await env.client(login=True)
    await c.ok("SELECT INBOX")
    assert await _fetch(c, 1) == raw
    wanted: list[bytes] = []
    command = b"a APPEND INBOX"
    for _ in range(rng.randint(1, 4)):  # a MULTIAPPEND of CATENATEs
        text, want = _random_pieces(rng, raw, parts, threshold)
        command += b" CATENATE (" + text + b")"
        wanted += want
    await c.send(command + b"\r\n")
    lines = await c.until("a")
    assert re.fullmatch(rb"a OK \[APPENDUID \d+ 2(:\d+)?\] APPEND completed", lines[-1]), lines[-1]
    for uid, want in enumerate(wanted, 2):
        assert await _fetch(c, uid) == want, uid
    await c.close()
    spool = tmp_path / "env0" / "data" / "spool"
    assert not (spool.exists() and list(spool.iterdir()))  # no spool file outlives the command


async def test_many_text_parts_and_urls(imap_env: ImapEnv) -> None:
    """Thousands of small parts in one CATENATE, in order."""
    rng = random.Random()
    await imap_env.deliver(PLAIN)
    pieces = [rng.randbytes(rng.randint(1, 40)) for _ in range(3000)]
    cmd = (
        b"a APPEND INBOX CATENATE ("
        + b" ".join(
            _text(p) if i % 10 else b'URL "/INBOX/;UID=1/;SECTION=TEXT"'
            for i, p in enumerate(pieces)
        )
        + b")\r\n"
    )
    want = b"".join(p if i % 10 else b"Shall we meet at noon?\r\n" for i, p in enumerate(pieces))
    c = await imap_env.client(login=True)
    await c.send(cmd)
    lines = await c.until("a", timeout=30)
    assert lines[-1].startswith(b"a OK [APPENDUID"), lines[-1]
    await c.ok("SELECT INBOX")
    assert await _fetch(c, 2) == want
    await c.close()


async def test_many_literals_below_the_threshold_spool_past_it(
    imap_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Each TEXT literal is below imap.spool_threshold, together they are
    many times it: the session holds at most the threshold in memory (the
    rest goes to spool files as it arrives), and the message is exact."""
    threshold = 64 * 1024
    env = await imap_factory(imap={"spool_threshold": threshold, "max_literal_size": 4_000_000})
    spool = tmp_path / "env0" / "data" / "spool"
    rng = random.Random()
    pieces = [rng.randbytes(rng.randint(threshold // 2, threshold)) for _ in range(40)]
    c = await env.client(login=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await c.send(b"a APPEND INBOX CATENATE (" + b" ".join(_text(p) for p in pieces))
        for _ in range(100):  # the session reads it all; the command is not complete
            if spool.exists() and len(list(spool.iterdir())) >= len(pieces) - 2:
                break
            await asyncio.sleep(0.1)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(list(spool.iterdir())) >= len(pieces) - 2
    assert grown < threshold + 512 * 1024, grown  # not the 2 MiB sent
    await c.send(b")\r\n")
    lines = await c.until("a")
    assert lines[-1].startswith(b"a OK [APPENDUID"), lines[-1]
    await c.ok("SELECT INBOX")
    assert await _fetch(c, 1) == b"".join(pieces)
    await c.close()
    assert list(spool.iterdir()) == []


# ------------------------------------------------------------- real client


def _imaplib_catenate(port: int, text: bytes) -> tuple[str, list, bytes]:
    """imaplib has no CATENATE: raw commands, as a Python program would send them."""
    with imaplib.IMAP4("127.0.0.1", port) as m:
        m.login(USER, PASSWORD)
        typ, caps = m.capability()
        assert b"CATENATE" in caps[0].split(), caps
        tag = m._new_tag()  # type: ignore[attr-defined]
        m.send(
            tag
            + b' APPEND INBOX CATENATE (URL "/INBOX/;UID=1/;SECTION=HEADER" TEXT {%d+}\r\n'
            % len(text)
            + text
            + b' URL "/INBOX/;UID=1/;SECTION=TEXT")\r\n'
        )
        m.tagged_commands[tag] = None  # type: ignore[attr-defined]
        typ, _ = m._command_complete("APPEND", tag)  # type: ignore[attr-defined]
        uid_reply = m.response("APPENDUID")
        m.select("INBOX", readonly=True)
        _, fetched = m.uid("FETCH", "2", "(BODY.PEEK[])")
        m.logout()
    return typ, uid_reply[1], fetched[0][1]  # type: ignore[index]


async def test_imaplib_catenate(imap_env: ImapEnv) -> None:
    rng = random.Random()
    await imap_env.deliver(PLAIN)
    text = (
        b"X-Note: "
        + rng.randbytes(rng.randint(10, 2000)).replace(b"\r", b"").replace(b"\n", b"")
        + b"\r\n"
    )
    typ, uid_reply, fetched = await asyncio.to_thread(_imaplib_catenate, imap_env.port, text)
    assert typ == "OK"
    assert uid_reply[0] and uid_reply[0].endswith(b" 2")
    head, _, body = PLAIN.partition(b"\r\n\r\n")
    assert fetched == head + b"\r\n\r\n" + text + body

"""BINARY (RFC 3516): FETCH BINARY[n], BINARY.PEEK, BINARY.SIZE and APPEND
of a literal8, against random attachments decoded by the standard library."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import quopri
import random
import re

from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv


def _size(rng: random.Random, low: int, high: int) -> int:
    n = rng.randint(low, high)
    return n + 1 if n % 3 == 0 else n  # never a multiple of 3: base64 padding is exercised


def _b64_lines(data: bytes, width: int) -> bytes:
    text = base64.b64encode(data)
    return b"".join(text[i : i + width] + b"\r\n" for i in range(0, len(text), width))


def _mixed(parts: list[tuple[str, bytes]]) -> bytes:
    """A multipart/mixed message whose parts are ``(encoding, encoded body)``."""
    out = [
        b"From: Carol <carol@example.net>\r\nTo: alice@example.org\r\nSubject: files\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=b="\r\n\r\n'
    ]
    for encoding, body in parts:
        out.append(
            b"--=b=\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n" + body + b"\r\n"
        )
    out.append(b"--=b=--\r\n")
    return b"".join(out)


def _literal(line: bytes, label: bytes) -> tuple[bytes, bytes]:
    """The marker ("{" or "~{") and data of the literal after ``label``."""
    m = re.search(re.escape(label) + rb" (~?\{)(\d+)\}\r\n", line)
    assert m, (label, line[:200])
    start = m.end()
    return m.group(1), line[start : start + int(m.group(2))]


async def test_binary_fetch_decodes_random_attachments(imap_env: ImapEnv) -> None:
    rng = random.Random()
    originals: list[bytes] = []
    parts: list[tuple[str, bytes]] = []
    for _ in range(rng.randint(3, 6)):
        data = rng.randbytes(_size(rng, 1, 40_000))
        kind = rng.choice(["base64", "quoted-printable", "8bit"])
        if kind == "base64":
            parts.append(("base64", _b64_lines(data, rng.choice([60, 76]))))
        elif kind == "quoted-printable":
            data = data.replace(b"\r", b"").replace(b"\n", b"")  # QP carries line breaks as text
            parts.append(("quoted-printable", quopri.encodestring(data).replace(b"\n", b"\r\n")))
        else:
            data = bytes(b for b in data if b not in b"\r\n\0") or b"x"
            parts.append(("8bit", data))
        originals.append(data)
    await imap_env.deliver(_mixed(parts))
    c = await imap_env.client(login=True)
    assert b" BINARY" in (await c.ok("CAPABILITY"))[0]
    await c.ok("SELECT INBOX")
    for n, data in enumerate(originals, 1):
        lines = await c.ok(f"FETCH 1 (BINARY.PEEK[{n}] BINARY.SIZE[{n}])")
        marker, got = _literal(lines[0], b"BINARY[%d]" % n)
        assert got == data
        # RFC 3516 section 4.2: a literal8 exactly when the content holds NUL.
        assert marker == (b"~{" if b"\0" in data else b"{")
        assert lines[0].endswith(b" BINARY.SIZE[%d] %d)" % (n, len(data)))
        origin = rng.randrange(len(data))
        octets = rng.randint(1, len(data))
        lines = await c.ok(f"FETCH 1 BINARY.PEEK[{n}]<{origin}.{octets}>")
        _, got = _literal(lines[0], b"BINARY[%d]<%d>" % (n, origin))
        assert got == data[origin : origin + octets]
    # PEEK and SIZE left \Seen alone; BINARY sets it (RFC 3516 section 4.2).
    assert b"\\Seen" not in (await c.ok("FETCH 1 FLAGS"))[0]
    lines = await c.ok("FETCH 1 BINARY[1]")
    assert b"\\Seen" in lines[0]
    await c.close()


async def test_binary_of_unknown_encoding_is_no_unknown_cte(imap_env: ImapEnv) -> None:
    await imap_env.deliver(_mixed([("base64", b"aGVsbG8=\r\n"), ("x-uuencode", b"begin 644\r\n")]))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    lines = await c.command("FETCH 1 BINARY.PEEK[2]")
    # RFC 3516 section 4.3: NO [UNKNOWN-CTE], and no FETCH data for it.
    assert re.fullmatch(rb"t\d+ NO \[UNKNOWN-CTE\] .*", lines[-1]), lines
    assert len(lines) == 1
    # Without PEEK: still NO, and \Seen is not set by the failed FETCH.
    lines = await c.command("FETCH 1 (FLAGS BINARY[2])")
    assert re.fullmatch(rb"t\d+ NO \[UNKNOWN-CTE\] .*", lines[-1]), lines
    assert b"\\Seen" not in (await c.ok("FETCH 1 FLAGS"))[0]
    lines = await c.ok("FETCH 1 (BINARY.PEEK[1] BINARY.PEEK[3] BODY.PEEK[2])")
    # A part the message lacks is empty, as BODY's (RFC 3501 section 6.4.5).
    expect = b"BINARY[1] {5}\r\nhello BINARY[3] {0}\r\n BODY[2] {11}\r\nbegin 644\r\n)"
    assert lines[0].endswith(expect), lines
    await c.ok("LOGOUT")
    await c.close()


async def test_append_literal8_is_stored_byte_exact(imap_env: ImapEnv) -> None:
    rng = random.Random()
    payload = rng.randbytes(_size(rng, 100, 5000)) + b"\0"
    raw = (
        b"From: a@example.net\r\nSubject: bin\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        + payload
    )
    c = await imap_env.client(login=True)
    # RFC 3516 section 4.4 with LITERAL+ (RFC 7888): "~{n+}".
    await c.send(b"a1 APPEND INBOX ~{%d+}\r\n" % len(raw) + raw + b"\r\n")
    lines = await c.until("a1")
    assert lines[-1].startswith(b"a1 OK"), lines
    await c.ok("SELECT INBOX")
    lines = await c.ok("FETCH 1 (BINARY.PEEK[] BINARY.PEEK[1] BINARY.SIZE[1] RFC822.SIZE)")
    marker, whole = _literal(lines[0], b"BINARY[]")
    assert marker == b"~{" and whole == raw
    _, body = _literal(lines[0], b"BINARY[1]")
    assert body == payload
    assert b"BINARY.SIZE[1] %d RFC822.SIZE %d)" % (len(payload), len(raw)) in lines[0]
    await c.close()


def _imaplib_fetch(port: int, part: int) -> tuple[bytes, bytes]:
    """What a Python program does: imaplib, raw FETCH BINARY.PEEK and BINARY.SIZE."""
    with imaplib.IMAP4("127.0.0.1", port) as m:
        m.login(USER, PASSWORD)
        _, caps = m.capability()  # imaplib keeps only the pre-login list
        assert b"BINARY" in caps[0].split()
        m.select("INBOX", readonly=True)
        typ, data = m.fetch("1", f"(BINARY.PEEK[{part}])")
        assert typ == "OK", data
        literal = data[0]
        assert isinstance(literal, tuple)
        typ, sized = m.fetch("1", f"(BINARY.SIZE[{part}])")
        assert typ == "OK", sized
        m.logout()
    return literal[1], sized[0]  # type: ignore[return-value]


async def test_imaplib_fetches_decoded_attachment(imap_env: ImapEnv) -> None:
    rng = random.Random()
    data = rng.randbytes(_size(rng, 1000, 100_000))
    await imap_env.deliver(_mixed([("8bit", b"hi"), ("base64", _b64_lines(data, 76))]))
    got, sized = await asyncio.to_thread(_imaplib_fetch, imap_env.port, 2)
    assert got == data
    assert sized == b"1 (BINARY.SIZE[2] %d)" % len(data)


async def test_binary_of_damaged_encodings_is_lenient(imap_env: ImapEnv) -> None:
    """Dovecot-like leniency: base64 skips characters outside its alphabet,
    QP keeps a stray "=" (RFC 2045 sections 6.8 and 6.7)."""
    rng = random.Random()
    data = rng.randbytes(_size(rng, 500, 5000))
    text = bytearray(base64.b64encode(data))
    for _ in range(rng.randint(1, 30)):  # junk outside the alphabet, anywhere
        text.insert(rng.randrange(len(text)), rng.choice(b"*!%\x00\x7f .;"))
    await imap_env.deliver(_mixed([("base64", bytes(text)), ("quoted-printable", b"a=ZZb=4")]))
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")
    lines = await c.ok("FETCH 1 (BINARY.PEEK[1] BINARY.PEEK[2])")
    _, got = _literal(lines[0], b"BINARY[1]")
    assert got == data
    _, got = _literal(lines[0], b"BINARY[2]")
    assert got == b"a=ZZb=4"
    await c.close()

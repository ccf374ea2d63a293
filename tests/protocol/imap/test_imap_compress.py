"""COMPRESS=DEFLATE (RFC 4978): imaplib with its socket wrapped in raw
DEFLATE (wbits -15) both ways, a scripted session, and a hostile client
whose few compressed octets inflate to far more than any limit."""

from __future__ import annotations

import asyncio
import imaplib
import random
import socket
import zlib

from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv, message

# imaplib knows no COMPRESS; its table says in which states a command may go.
imaplib.Commands.setdefault("COMPRESS", ("AUTH", "SELECTED"))


class DeflateIMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 that can switch to RFC 4978 compression."""

    _deflate: zlib._Compress | None = None
    _inflate: zlib._Decompress | None = None
    _plain = b""
    sent_compressed = 0
    received_compressed = 0

    def compress(self) -> tuple[str, list[bytes]]:
        typ, data = self._simple_command("COMPRESS", "DEFLATE")
        if typ == "OK":
            self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
            self._inflate = zlib.decompressobj(-15)
        return typ, data

    def send(self, data: bytes) -> None:
        if self._deflate is None:
            super().send(data)
            return
        out = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sent_compressed += len(out)
        self.sock.sendall(out)

    def _more(self) -> None:
        assert self._inflate is not None
        raw = self.file.read1(65536)
        if not raw:
            raise imaplib.IMAP4.abort("socket closed")
        self.received_compressed += len(raw)
        self._plain += self._inflate.decompress(raw)

    def read(self, size: int) -> bytes:
        if self._inflate is None:
            return super().read(size)
        while len(self._plain) < size:
            self._more()
        out, self._plain = self._plain[:size], self._plain[size:]
        return out

    def readline(self) -> bytes:
        if self._inflate is None:
            return super().readline()
        while b"\n" not in self._plain:
            self._more()
        nl = self._plain.index(b"\n") + 1
        out, self._plain = self._plain[:nl], self._plain[nl:]
        return out


def _compressed_session(port: int, bodies: list[bytes]) -> dict[str, object]:
    out: dict[str, object] = {}
    with DeflateIMAP4("127.0.0.1", port) as c:
        c.login(USER, PASSWORD)
        out["caps_before"] = c.capabilities
        out["compress"] = c.compress()
        out["caps_after"] = c.capability()[1][-1].split()
        out["again"] = c.compress()[0]
        for body in bodies:
            c.append("INBOX", "(\\Seen)", None, body)
        c.select("INBOX")
        _, data = c.fetch("1:*", "(BODY.PEEK[])")
        out["fetched"] = [part[1] for part in data if isinstance(part, tuple)]
        out["sent"] = c.sent_compressed
        out["received"] = c.received_compressed
        c.logout()
    return out


async def test_imaplib_session_compressed_both_ways(imap_env: ImapEnv) -> None:
    rng = random.Random()
    bodies = []
    for i in range(rng.randint(2, 5)):
        words = rng.choices(["lorem ", "ipsum ", "dolor\r\n"], k=rng.randint(10, 20000))
        noise = rng.randbytes(rng.randint(0, 300)).hex()
        bodies.append(message(f"c{i}", "".join(words) + "\r\n" + noise + "\r\n"))
    r = await asyncio.to_thread(_compressed_session, imap_env.port, bodies)
    assert r["compress"][0] == "OK"  # type: ignore[index]
    assert b"COMPRESS=DEFLATE" not in r["caps_after"]  # type: ignore[operator]
    assert r["again"] == "NO"
    assert r["fetched"] == bodies  # byte-exact through both directions
    total = sum(len(b) for b in bodies)
    # The repetitive bodies went up and came down compressed, not as is.
    assert r["sent"] < total and r["received"] < total  # type: ignore[operator]


async def test_compress_script(imap_env: ImapEnv) -> None:
    c = await imap_env.client()
    caps = (await c.ok("CAPABILITY"))[0]
    assert b"COMPRESS=DEFLATE" not in caps  # advertised once authenticated
    lines = await c.command("COMPRESS DEFLATE", "p")
    assert lines[-1].startswith(b"p BAD"), lines  # not authenticated
    await c.ok(f"LOGIN {USER} {PASSWORD}")
    assert b" COMPRESS=DEFLATE" in (await c.ok("CAPABILITY"))[0]
    for line, tag in (("COMPRESS LZMA", "u"), ("COMPRESS", "m"), ("COMPRESS DEFLATE x", "x")):
        lines = await c.command(line, tag)
        assert lines[-1].startswith(tag.encode() + b" BAD"), lines
    # A command pipelined right behind COMPRESS is already compressed (RFC 4978 section 3).
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    pipelined = deflate.compress(b"n1 NOOP\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH)
    await c.send(b"z COMPRESS DEFLATE\r\n" + pipelined)
    assert await c.line() == b"z OK DEFLATE active"
    inflate = zlib.decompressobj(-15)
    plain = b""
    while b"n1 " not in plain:
        plain += inflate.decompress(await asyncio.wait_for(c.reader.read(4096), 5))
    assert plain == b"n1 OK NOOP completed\r\n"
    await c.close()


def _raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.recv(4096)
    sock.sendall(f"a LOGIN {USER} {PASSWORD}\r\nb COMPRESS DEFLATE\r\n".encode())
    got = b""
    while b"b OK" not in got:
        got += sock.recv(4096)
    return sock


def _bomb(port: int, inflated: int) -> tuple[bytes, int]:
    """Sends one line that inflates to ``inflated`` octets of 'A', then a NOOP;
    returns what the server answered (inflated) and the compressed size sent."""
    sock = _raw_connect(port)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    sent = 0
    chunk = b"A" * (1 << 20)
    for _ in range(inflated // len(chunk)):
        out = deflate.compress(chunk)
        sent += len(out)
        sock.sendall(out)
    out = deflate.compress(b"\r\nc NOOP\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH)
    sent += len(out)
    sock.sendall(out)
    inflate = zlib.decompressobj(-15)
    plain = b""
    while b"c OK" not in plain:
        data = sock.recv(65536)
        if not data:
            break
        plain += inflate.decompress(data)
    sock.close()
    return plain, sent


async def test_compression_bomb_is_bounded(imap_env: ImapEnv, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A ~1000:1 input: the line limit applies to the inflated stream, the
    session answers BAD and then the next command, and the framer never holds
    more than a bounded part of the inflated line (every feed is measured)."""
    from imapd.imap import server
    from imapd.imap.wire.framing import Framer

    peak = [0]
    feed = Framer.feed

    def measured_feed(self: Framer, data: bytes) -> None:
        feed(self, data)
        peak[0] = max(peak[0], self.buffered)

    monkeypatch.setattr(Framer, "feed", measured_feed)
    rng = random.Random()
    inflated = rng.randint(64, 160) << 20
    plain, sent = await asyncio.to_thread(_bomb, imap_env.port, inflated)
    assert sent * 100 < inflated  # it was a bomb
    assert b"BAD" in plain and plain.endswith(b"c OK NOOP completed\r\n"), plain[-200:]
    assert 0 < peak[0] <= server.READ_BUFFER_HIGH + server.INFLATE_CHUNK


async def test_garbage_after_compress_ends_the_session(imap_env: ImapEnv, caplog) -> None:  # type: ignore[no-untyped-def]
    """Input that is not a DEFLATE stream cannot be read further: the
    session ends quietly (no traceback), other sessions are untouched."""
    c = await imap_env.client(login=True)
    assert (await c.command("COMPRESS DEFLATE", "z"))[-1] == b"z OK DEFLATE active"
    # 0xff: a block type of 3, which RFC 1951 section 3.2.3 reserves (an error).
    await c.send(b"\xff" * random.randint(1, 64))
    assert await asyncio.wait_for(c.reader.read(), 5) == b""  # closed by the server
    other = await imap_env.client(login=True)
    await other.ok("NOOP")
    await other.close()
    assert "Traceback" not in caplog.text and "failed" not in caplog.text

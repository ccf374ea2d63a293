"""A scripted asyncio SMTP server: the remote peer of outbound tests and the bench.

``SinkServer(host, port)`` speaks enough ESMTP (EHLO with configurable
extensions, optional STARTTLS, PIPELINING-safe line handling, MAIL, RCPT,
DATA, BDAT when "CHUNKING" is among the extensions, RSET, QUIT) and
records every accepted message in ``received``.
Replies can be scripted: ``data_replies`` is consumed one per transaction
("451 4.3.0 later" then the default "250 2.0.0 ok"), ``rcpt_reply(address)``
decides each RCPT, ``data_delay`` stalls before answering the final dot. ``stall_for`` maps
a recipient to ``"data"`` (never answer DATA) or ``"dot"`` (take the message
-- recorded, as a real MTA commits before replying -- but never answer the
final dot): the session then waits until the client goes away, so a test
can kill the client mid-delivery. ``stalls`` counts sessions stalled so;
``end_stalls()`` drops the connections of those stalled now (the client
sees the peer go away: its delivery is deferred).
``rset_reply`` answers RSET (a server refusing to go on: "421 ...", after
which it closes; "": no answer, a peer gone silent); ``reset_followers``
holds what had arrived behind each RSET when it was read. ``close()`` also ends
the sessions still open, as a server that stops does.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def dead_host(address: str, port: int):
    """A socket bound to ``address:port`` that never listens: connecting is
    refused (a dead MX), and no other process can take that address and port
    meanwhile. Close it when done."""
    import socket

    sock = socket.socket()
    sock.bind((address, port))
    return sock


@dataclass
class Received:
    mail_from: str
    rcpt_to: list[str]
    data: bytes
    mail_params: str
    tls: bool
    rcpt_params: dict[str, str] = field(default_factory=dict)  # by address, as sent


@dataclass
class SinkServer:
    host: str = "127.0.0.1"
    port: int = 0
    extensions: list[str] = field(
        default_factory=lambda: ["PIPELINING", "SIZE 10000000", "8BITMIME", "SMTPUTF8"]
    )
    tls: ssl.SSLContext | None = None
    greeting: str = "220 sink.test ESMTP"
    data_replies: list[str] = field(default_factory=list)
    rcpt_reply: Callable[[str], str] = lambda _address: "250 2.1.5 ok"
    data_delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # wall clock of each final dot
    stall_for: dict[str, str] = field(default_factory=dict)
    stalls: int = 0
    stalled: set[asyncio.StreamWriter] = field(default_factory=set)  # stalled now
    transactions: int = 0
    connections: int = 0
    active: int = 0  # sessions open now
    max_active: int = 0
    rset_reply: str = "250 2.0.0 ok"
    resets: int = 0  # RSET commands received
    # What had arrived behind each RSET line when it was read: the commands
    # a client pipelined with it (RFC 2920), b"" if it waited for the reply.
    reset_followers: list[bytes] = field(default_factory=list)
    bdat_chunks: int = 0  # BDAT commands received (RFC 3030: offer "CHUNKING")
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> SinkServer:
        self.server = await asyncio.start_server(
            self._session, self.host, self.port, reuse_address=True, limit=1 << 20
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2)
            except TimeoutError:
                pass

    def end_stalls(self) -> None:
        for writer in list(self.stalled):
            writer.close()

    async def __aenter__(self) -> SinkServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        self.writers.add(writer)
        self.max_active = max(self.max_active, self.active)
        is_tls = False

        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            await say(self.greeting)
            if not self.greeting.startswith("220"):
                return
            mail_from: str | None = None
            params = ""
            rcpts: list[str] = []
            rcpt_params: dict[str, str] = {}
            chunks: list[bytes] = []  # BDAT chunks of the transaction so far

            def take(data: bytes) -> str:
                """The end of a message's data: its reply, and it is recorded
                if that reply is positive."""
                self.transactions += 1
                self.received_at.append(time.time())
                reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 ok"
                if reply.startswith("2"):
                    self.received.append(
                        Received(
                            mail_from or "", list(rcpts), data, params, is_tls, dict(rcpt_params)
                        )
                    )
                return reply

            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                verb = line.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    exts = list(self.extensions)
                    if self.tls is not None and not is_tls:
                        exts.append("STARTTLS")
                    if verb == "HELO" or not exts:
                        await say("250 sink.test")
                    else:
                        lines = ["sink.test", *exts]
                        for item in lines[:-1]:
                            await say(f"250-{item}")
                        await say(f"250 {lines[-1]}")
                elif verb == "STARTTLS" and self.tls is not None and not is_tls:
                    await say("220 2.0.0 go ahead")
                    await writer.start_tls(self.tls)
                    is_tls = True
                    mail_from, rcpts = None, []
                elif verb == "MAIL":
                    address, _, params = line[10:].partition(">")
                    mail_from, rcpts, rcpt_params = address.lstrip("<"), [], {}
                    params = params.strip()
                    await say("250 2.1.0 ok")
                elif verb == "RCPT":
                    if mail_from is None:
                        await say("503 5.5.1 need MAIL")
                        continue
                    address, _, given = line[8:].strip().lstrip("<").partition(">")
                    reply = self.rcpt_reply(address)
                    if reply.startswith("2"):
                        rcpts.append(address)
                        rcpt_params[address] = given.strip()
                    await say(reply)
                elif verb == "DATA":
                    if not rcpts:
                        await say("554 5.5.1 no valid recipients")
                        continue
                    stall = {self.stall_for.get(r) for r in rcpts}
                    if "data" in stall:
                        self.stalls += 1
                        self.stalled.add(writer)
                        await reader.read()  # until the client goes away
                        return
                    await say("354 go ahead")
                    lines: list[bytes] = []
                    while True:
                        chunk = await reader.readline()
                        if not chunk:
                            return
                        if chunk == b".\r\n":
                            break
                        lines.append(chunk[1:] if chunk.startswith(b".") else chunk)
                    reply = take(b"".join(lines))
                    if "dot" in stall:
                        self.stalls += 1
                        self.stalled.add(writer)
                        await reader.read()
                        return
                    if self.data_delay:
                        await asyncio.sleep(self.data_delay)
                    await say(reply)
                    mail_from, rcpts = None, []
                elif verb == "BDAT":
                    # RFC 3030 section 2: the chunk is read whatever the reply.
                    size, _, last = line[5:].strip().partition(" ")
                    chunk = await reader.readexactly(int(size))
                    self.bdat_chunks += 1
                    if not rcpts:
                        await say("503 5.5.1 no valid recipients")
                        continue
                    chunks.append(chunk)
                    if last.strip().upper() != "LAST":
                        await say(f"250 2.0.0 {size} octets received")
                        continue
                    reply = take(b"".join(chunks))
                    chunks = []
                    mail_from, rcpts = None, []
                    await say(reply)
                elif verb == "RSET":
                    self.resets += 1
                    self.reset_followers.append(bytes(reader._buffer))  # type: ignore[attr-defined]
                    mail_from, rcpts, chunks = None, [], []
                    if not self.rset_reply:
                        await reader.read()  # silent until the client goes away
                        return
                    await say(self.rset_reply)
                    if self.rset_reply.startswith("421"):
                        return  # RFC 5321 section 3.8: 421, then close
                elif verb == "NOOP":
                    await say("250 2.0.0 ok")
                elif verb == "QUIT":
                    await say("221 2.0.0 bye")
                    return
                else:
                    await say("502 5.5.2 unknown command")
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            return
        finally:
            self.active -= 1
            self.writers.discard(writer)
            self.stalled.discard(writer)
            writer.close()

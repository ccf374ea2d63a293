"""IMAP listeners: plain with STARTTLS, and implicit TLS (RFC 8314).

Contract: :func:`start_imap` binds every address of ``settings.imap.listen``
(STARTTLS offered) and ``settings.imap.tls_listen`` (TLS from the first
byte) and returns the started servers; the caller closes them. Each
connection gets an :class:`ImapConnection` (transport, framing, flow
control) driving one :class:`~imapd.imap.session.Session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import weakref
import zlib
from typing import TYPE_CHECKING, cast

from imapd.imap.session import ServerContext, Session
from imapd.imap.waitflag import WaitFlag
from imapd.imap.wire.framing import FrameEvent, Framer
from runtime.listen import LeaseHolder, PeerLimit, serve
from runtime.metrics import CONNECTIONS, CONNECTIONS_TOTAL
from runtime.tlslayer import start_tls

if TYPE_CHECKING:
    from conf.settings import Settings
    from storage.api import Storage

# Stop reading from a client that pipelines more than this ahead of us.
READ_BUFFER_HIGH = 1024 * 1024
# Responses are gathered and sent in one write up to this size (fewer syscalls).
WRITE_COALESCE = 64 * 1024
# Sent instead of the greeting to a client over imap.max_connections_per_ip:
# RFC 3501 section 7.1.5 allows BYE as the greeting, RFC 5530 section 3
# names the UNAVAILABLE code.
TOO_MANY_CONNECTIONS = b"* BYE [UNAVAILABLE] too many connections from your address\r\n"
# COMPRESS=DEFLATE (RFC 4978): at most this many octets are inflated at a
# time; the rest of the compressed input waits (with reading paused) until
# the framer has taken what came before, so a small hostile input that
# inflates to gigabytes costs no more memory than plain input would.
INFLATE_CHUNK = 64 * 1024


class ImapConnection(LeaseHolder, asyncio.Protocol):
    """Bytes in -> framer -> session; session out -> transport, with
    back-pressure both ways. A lease holder: STARTTLS moves it under TLS."""

    def __init__(self, ctx: ServerContext, implicit_tls: bool) -> None:
        self.ctx = ctx
        self.is_tls = implicit_tls
        max_line = int(ctx.setting("imap", "max_line_length", 65536))  # type: ignore[arg-type]
        self.framer = Framer(max_line_length=max_line)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._readable = WaitFlag()  # not asyncio.Event: see waitflag (issue #24)
        self._writable = WaitFlag()
        self._writable.set()
        self._closed = False
        self._eof = False
        self._reading_paused = False
        self._task: asyncio.Task[None] | None = None
        self._out: list[bytes] = []
        self._out_size = 0
        self._deadline: float | None = None  # when the current wait for the client ends
        self._timer: asyncio.TimerHandle | None = None
        # RFC 4978: raw DEFLATE both ways once COMPRESS succeeded.
        self._inflate: zlib._Decompress | None = None
        self._deflate: zlib._Compress | None = None
        self._inflate_tail = b""  # compressed input not yet inflated

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ctx.connections.add(self)
        CONNECTIONS.inc(protocol="imap")
        CONNECTIONS_TOTAL.inc(protocol="imap")
        session = Session(self, self.ctx)
        self._task = asyncio.get_running_loop().create_task(session.run())

    def data_received(self, data: bytes) -> None:
        if self._inflate is not None:
            self._inflate_tail += data
            self._inflate_some()
        else:
            self.framer.feed(data)
        self._readable.set()
        over = self.framer.buffered > READ_BUFFER_HIGH or len(self._inflate_tail) > INFLATE_CHUNK
        if over and self.transport and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _inflate_some(self) -> None:
        """Inflates at most INFLATE_CHUNK octets of the pending compressed
        input into the framer; the framer's line and literal limits then
        apply to the inflated stream."""
        assert self._inflate is not None
        try:
            out = self._inflate.decompress(self._inflate_tail, INFLATE_CHUNK)
        except zlib.error:
            # Not a DEFLATE stream: nothing more from this client can be read.
            self._inflate_tail = b""
            self._eof = True
            return
        self._inflate_tail = self._inflate.unconsumed_tail
        self.framer.feed(out)

    def eof_received(self) -> bool | None:
        # The client half-closed: answer what it already sent, then close
        # (True keeps our side open; TLS transports ignore it).
        self._eof = True
        self._readable.set()
        return not self.is_tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.lease.release()
        if self in self.ctx.connections:
            CONNECTIONS.dec(protocol="imap")
        self.ctx.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True
        self._readable.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- what the session uses
    async def next_event(self, timeout: float | None) -> FrameEvent | None:
        """The next framing event; None once the client has gone.
        Raises TimeoutError after ``timeout`` seconds without one."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            ev = self.framer.next_event()
            if ev is not None:
                low = self.framer.buffered < READ_BUFFER_HIGH // 2
                if self._reading_paused and low and len(self._inflate_tail) <= INFLATE_CHUNK:
                    self._reading_paused = False
                    if self.transport is not None and not self._closed:
                        self.transport.resume_reading()
                return ev
            if self._inflate_tail and not self._closed:
                self._inflate_some()  # the framer took the last chunk: the next one
                await asyncio.sleep(0)  # a long inflation must not starve other sessions
                continue
            if self._closed or self._eof:
                return None
            self.flush()  # never wait for the client with our answer unsent
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            self._readable.clear()
            if deadline is not None:
                if loop.time() >= deadline:
                    raise TimeoutError
                self._arm_timer(loop, deadline)
            self._deadline = deadline
            await self._readable.wait()  # data, the client gone, or the timer

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        # One timer per connection, moved only when it would fire too late:
        # far cheaper than a timeout context per wait (the deadline moves
        # later with every command; an early firing re-arms itself).
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or self._deadline is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._readable.set()  # next_event sees the deadline passed
        else:
            self._arm_timer(loop, self._deadline)

    def write(self, data: bytes) -> None:
        """Queue response bytes; sent by :meth:`flush` (at the latest when the
        session drains or waits for the client)."""
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= WRITE_COALESCE:
            self.flush()

    def flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        if self._deflate is not None:
            # RFC 4978 section 4: flushed so the client can act on each batch.
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    @property
    def congested(self) -> bool:
        """Whether the transport buffer is over its high-water mark: callers
        writing a lot should :meth:`drain` before writing more."""
        return not self._writable.is_set() or self._closed

    async def drain(self) -> None:
        self.flush()
        if self._closed:
            raise ConnectionResetError("client went away")
        if not self._writable.is_set():
            await self._writable.wait()
            if self._closed:
                raise ConnectionResetError("client went away")

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """RFC 3501 section 6.2.1: anything the client sent after STARTTLS
        in plaintext is discarded, never run after the handshake."""
        self.framer.clear()
        self.flush()
        assert self.transport is not None
        new = await start_tls(self.transport, self, context)
        if new is None:
            raise ConnectionResetError("TLS handshake failed")
        # Not cleared again here: what arrived since is already ciphertext-borne.
        self.transport = new
        self.is_tls = True

    @property
    def compressing(self) -> bool:
        return self._deflate is not None

    def start_compress(self) -> None:
        """RFC 4978 section 3: everything written so far (the tagged OK)
        goes out uncompressed; after it both directions are raw DEFLATE
        (RFC 1951, no zlib header). Input already read after the COMPRESS
        command is compressed and is inflated now."""
        self.flush()
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        self._inflate_tail = self.framer.take_buffered()
        if self._inflate_tail:
            self._inflate_some()
            self._readable.set()

    def close(self) -> None:
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """Server going down: say BYE (RFC 3501 section 7.1.5) and close."""
        self.write(b"* BYE Server shutting down\r\n")
        self.close()
        if self._task is not None:
            self._task.cancel()


_CONTEXTS: weakref.WeakKeyDictionary[asyncio.AbstractServer, ServerContext] = (
    weakref.WeakKeyDictionary()
)


async def stop_imap(servers: list[asyncio.base_events.Server]) -> None:
    """Optional graceful stop: close the listeners and end every open
    session with ``* BYE``. (Closing the servers alone leaves sessions
    running until the event loop stops.)"""
    for server in servers:
        server.close()
        ctx = _CONTEXTS.get(server)
        if ctx is not None:
            for conn in list(ctx.connections):
                conn.shutdown()  # type: ignore[attr-defined]
    for server in servers:
        with contextlib.suppress(Exception):
            await server.wait_closed()


async def start_imap(
    settings: Settings, storage: Storage, tls: ssl.SSLContext | None
) -> list[asyncio.base_events.Server]:
    """Start IMAP listeners; returns the servers (caller closes them).

    ``settings.imap.listen``: plaintext with STARTTLS (port 143);
    ``settings.imap.tls_listen``: implicit TLS (port 993, RFC 8314).
    """
    ctx = ServerContext(settings=settings, storage=storage, tls=tls)
    limit = PeerLimit.of(settings.imap, settings.server.connect_rate_exempt)
    listeners = [("imap.listen", addr, None) for addr in settings.imap.listen]
    if tls is not None:
        listeners += [("imap.tls_listen", addr, tls) for addr in settings.imap.tls_listen]
    servers: list[asyncio.base_events.Server] = []
    try:
        for setting, addr, context in listeners:
            implicit = context is not None
            server = await serve(
                lambda implicit=implicit: ImapConnection(ctx, implicit),
                setting,
                addr,
                limit=limit,
                refusal=TOO_MANY_CONNECTIONS,
                label="imap",
                share_port=settings.server.share_ports,
                tls=context,
            )
            servers.append(server)
    except BaseException:
        for server in servers:
            server.close()
        raise
    for server in servers:
        _CONTEXTS[server] = ctx
    return servers  # type: ignore[return-value]

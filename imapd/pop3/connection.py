"""The byte stream under one POP3 session: an asyncio protocol of our own.

Why not ``asyncio.StreamReader``: RFC 2595 section 4 requires that
plaintext the client pipelined after STLS be thrown away before the TLS
handshake, and a StreamReader's buffer cannot be emptied through its public
API. Owning the buffer also gives a line reader that discards an overlong
line instead of buffering it without bound.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

from runtime.listen import LeaseHolder
from runtime.metrics import CONNECTIONS, CONNECTIONS_TOTAL
from runtime.tlslayer import start_tls

# Stop reading from the socket while this much unread input is buffered
# (pipelined commands, RFC 2449 section 6.6); resume below the low mark.
READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024
TLS_HANDSHAKE_TIMEOUT = 30.0


class LineTooLong(Exception):
    """A line exceeded the limit; it has been discarded up to its LF."""


class Connection(LeaseHolder, asyncio.Protocol):
    """Line input with a length limit, output with flow control, in-place STLS.

    ``on_connect(conn)`` runs once the transport exists; the session then
    drives the connection with :meth:`readline`, :meth:`write`,
    :meth:`drain`, :meth:`start_tls` and :meth:`close`. A lease holder
    (:mod:`runtime.listen`): STLS moves it under TLS.
    """

    def __init__(self, on_connect: Callable[[Connection], None]) -> None:
        self._on_connect = on_connect
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._skipping = False  # inside an overlong line, dropping input up to LF
        self._eof = False
        self._read_paused = False
        self._write_paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.closed = self._loop.create_future()

    # -- asyncio.Protocol callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        CONNECTIONS.inc(protocol="pop3")
        CONNECTIONS_TOTAL.inc(protocol="pop3")
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > READ_HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lease.release()
        CONNECTIONS.dec(protocol="pop3")
        self._eof = True
        self._wake_reader()
        self._write_paused = False
        self._wake_writers()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()

    # -- what the session uses --

    @property
    def is_tls(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("sslcontext") is not None

    @property
    def peer_ip(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else "unknown"

    async def readline(self, limit: int) -> bytes:
        """The next line including its LF. Raises :class:`LineTooLong` (the
        line is dropped) when it exceeds ``limit`` octets, EOFError at the
        end of the stream (a partial last line is dropped too: RFC 1939
        commands end with CRLF)."""
        while True:
            nl = self._buffer.find(b"\n")
            if nl >= 0:
                too_long = self._skipping or nl + 1 > limit
                line = bytes(self._buffer[: nl + 1]) if not too_long else b""
                del self._buffer[: nl + 1]
                self._skipping = False
                self._maybe_resume_reading()
                if too_long:
                    raise LineTooLong
                return line
            if len(self._buffer) > limit:
                self._skipping = True
                self._buffer.clear()
                self._maybe_resume_reading()
            if self._eof:
                raise EOFError
            self._data_waiter = self._loop.create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the peer is slower than us; raises ConnectionError when closed."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        if not self._write_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade in place (RFC 2595 section 4). Input buffered so far is
        plaintext that arrived before the handshake and is discarded."""
        assert self.transport is not None
        await self.drain()
        self._buffer.clear()
        self._skipping = False
        # start_tls (as loop.start_tls) pauses and resumes the raw transport
        # itself; runtime.tlslayer's keeps no read buffer per connection.
        self._read_paused = False
        self.transport = await start_tls(self.transport, self, context, TLS_HANDSHAKE_TIMEOUT)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals --

    def _maybe_resume_reading(self) -> None:
        if self._read_paused and len(self._buffer) < READ_LOW_WATER and self.transport:
            self._read_paused = False
            self.transport.resume_reading()

    def _wake_reader(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)

    def _wake_writers(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

"""Server-side TLS over an accepted connection, without a read buffer per
connection on the standard event loop (issue #24).

asyncio's TLS protocol (``asyncio.sslproto.SSLProtocol``, CPython 3.11 to
3.13) gives every connection its own zero-filled read buffer of
``max_size`` (256 KiB), resident for as long as the connection is open:
most of what an idle TLS client costs. The socket transport fills that
buffer and hands it to ``buffer_updated`` in one synchronous step, which
copies it into the connection's incoming BIO at once, so one buffer per
event loop serves every connection of that loop: :class:`LeanSSLProtocol`
reads through it. uvloop's protocol (Cython) allocates its buffer with
malloc, not zeroed, so only the pages a read touched are resident; it is
kept as it is (see :func:`server_protocol`).

Contract: :func:`server_protocol` returns the protocol that runs the
server side of TLS over a transport and calls ``app``'s
``connection_made`` once the handshake is done (``waiter`` gets its
outcome); :func:`start_tls` upgrades an open connection in place
(STARTTLS) and returns the new transport, as ``loop.start_tls`` does.
Either way the bytes the application sees are exactly what it would see
with the loop's own protocol.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from asyncio.sslproto import SSLProtocol
from typing import Any, cast

# One read buffer per event loop (never shared between threads: each runs its own loop).
_READ_BUFFERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary()
)


def _read_buffer(loop: asyncio.AbstractEventLoop) -> memoryview:
    view = _READ_BUFFERS.get(loop)
    if view is None:
        view = _READ_BUFFERS[loop] = memoryview(bytearray(SSLProtocol.max_size))
    return view


class LeanSSLProtocol(SSLProtocol):
    """asyncio's TLS protocol reading through its loop's one buffer.

    ``get_buffer`` hands the transport the loop's buffer; the inherited
    ``buffer_updated`` copies the bytes read into this connection's
    incoming BIO before anything else can run on the loop, so the buffer
    is free again when the next connection reads. The buffer of
    ``SSLProtocol.__init__`` is dropped at once (allocated, not kept)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> None:
        super().__init__(loop, *args, **kwargs)
        shared = _read_buffer(loop)
        if hasattr(self, "_ssl_buffer_view"):  # CPython 3.11-3.13 names; else stay as is
            self._ssl_buffer = shared.obj
            self._ssl_buffer_view = shared

    def get_buffer(self, n: int) -> memoryview:
        return cast(memoryview, self._ssl_buffer_view)


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def server_protocol(
    loop: asyncio.AbstractEventLoop,
    app: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    waiter: asyncio.Future[None],
    handshake_timeout: float | None,
) -> asyncio.BaseProtocol:
    """The server side of TLS over a new connection, calling ``app``'s
    ``connection_made`` once the handshake is done: the loop's own TLS
    protocol under uvloop (its transports recognise it), else
    :class:`LeanSSLProtocol`."""
    if _is_uvloop(loop):
        from uvloop.loop import SSLProtocol as UvSSLProtocol

        return cast(
            asyncio.BaseProtocol,
            UvSSLProtocol(
                loop,
                app,
                context,
                waiter,
                server_side=True,
                ssl_handshake_timeout=handshake_timeout,
            ),
        )
    return LeanSSLProtocol(
        loop, app, context, waiter, server_side=True, ssl_handshake_timeout=handshake_timeout
    )


async def start_tls(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    handshake_timeout: float | None = None,
) -> asyncio.Transport:
    """``loop.start_tls(transport, protocol, context, server_side=True)``:
    the server side of TLS over an open connection (STARTTLS, RFC 3501
    section 6.2.1; RFC 3207), returning the transport ``protocol`` now
    writes to. On the standard loop the same steps as its ``start_tls``,
    with :class:`LeanSSLProtocol`. Raises what the handshake raised (the
    connection is then closed)."""
    loop = asyncio.get_running_loop()
    if _is_uvloop(loop):
        new = await loop.start_tls(
            transport, protocol, context, server_side=True, ssl_handshake_timeout=handshake_timeout
        )
        if new is None:
            raise ConnectionResetError("TLS handshake failed")
        return cast(asyncio.Transport, new)
    stream = cast(asyncio.Transport, transport)
    waiter: asyncio.Future[None] = loop.create_future()
    tls = LeanSSLProtocol(
        loop,
        protocol,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=handshake_timeout,
        call_connection_made=False,
    )
    # As the loop's own start_tls: reading paused so that nothing arrives
    # before the TLS protocol has its transport.
    stream.pause_reading()
    stream.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, stream)
    resumed = loop.call_soon(stream.resume_reading)
    try:
        await waiter
    except BaseException:
        stream.close()
        made.cancel()
        resumed.cancel()
        raise
    return cast(asyncio.Transport, tls._app_transport)

"""Listening sockets for every daemon: binding, port sharing, per-IP limits.

Contract:

- :func:`open_listener` returns a bound, listening socket for one configured
  address, or raises :class:`ListenError` naming the setting and the
  address (``imap.listen: cannot listen on 0.0.0.0:143: address already in
  use``). A socket the supervisor opened before forking (:func:`inherit`) is
  taken over instead of binding again: a site's workers share one socket,
  and no unrelated process can join them. ``SO_REUSEPORT`` is set only
  when asked (``server.share_ports``, for separately started instances of
  one site); without it a second site on the same port fails loudly.
- :func:`serve` accepts connections on such a socket. Before the daemon's
  protocol exists, the connection takes a slot of its client IP in a
  :class:`PeerLimit`; over the limit the client gets the listener's refusal
  line and the connection is closed, so the daemon never sees it. The slot
  is returned when the connection ends: by a wrapper around the daemon's
  protocol, or, for a :class:`LeaseHolder` (a protocol that hands itself to
  TLS in place and so stops hearing through a wrapper), by the protocol's
  own ``connection_lost``.

Counts are per process: each worker limits its own share of the traffic
(a count of open connections dies with its process; the rate limits and
the login throttle, which outlive a connection, are shared through
:mod:`storage.shared` when Redis is configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import cast

from runtime.metrics import CONNECTIONS_REFUSED

log = logging.getLogger("shardmail")

BACKLOG = 1024

# Sockets bound by the supervisor before it forked, by (setting, address).
_inherited: dict[tuple[str, str], socket.socket] = {}


class ListenError(Exception):
    """A listener could not be opened; the message names the setting and
    the address and is safe to print."""


class Lease:
    """One connection's slot in a :class:`PeerLimit`; :meth:`release` may be
    called any number of times, the slot is returned once."""

    __slots__ = ("_limit", "ip")

    def __init__(self, limit: PeerLimit | None, ip: str) -> None:
        self._limit = limit
        self.ip = ip

    def release(self) -> None:
        limit, self._limit = self._limit, None
        if limit is not None:
            limit.release(self.ip)


NO_LEASE = Lease(None, "")


class PeerLimit:
    """Concurrent connections per client IP; ``limit == 0`` disables it.
    Addresses in ``exempt`` (networks, e.g. a site's reverse proxies, which
    carry many clients over their own connections) are never counted."""

    def __init__(self, limit: int, exempt: Iterable[str] = ()) -> None:
        self.limit = limit
        self._exempt = []
        for net in exempt:
            # As httpapi's X-Forwarded-For check does: a malformed entry trusts nobody.
            with contextlib.suppress(ValueError):
                self._exempt.append(ipaddress.ip_network(net, strict=False))
        self._open: dict[str, int] = {}

    def acquire(self, ip: str) -> Lease | None:
        """A lease for one more connection from ``ip``, or None when it
        already has ``limit`` open."""
        if not self.limit or self._is_exempt(ip):
            return Lease(None, ip)
        count = self._open.get(ip, 0)
        if count >= self.limit:
            return None
        self._open[ip] = count + 1
        return Lease(self, ip)

    def release(self, ip: str) -> None:
        count = self._open.get(ip, 0) - 1
        if count > 0:
            self._open[ip] = count
        else:
            self._open.pop(ip, None)

    def count(self, ip: str) -> int:
        return self._open.get(ip, 0)

    def _is_exempt(self, ip: str) -> bool:
        if not self._exempt:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self._exempt)


class LeaseHolder:
    """Mixin for a protocol that releases its own lease: the listener sets
    :attr:`lease`, the protocol calls ``self.lease.release()`` in
    ``connection_lost``. Needed when the protocol moves itself under TLS
    (``loop.start_tls``, aiosmtpd's STARTTLS), after which the transport no
    longer calls the listener's wrapper."""

    lease: Lease = NO_LEASE


# -- sockets ---------------------------------------------------------------


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _bind(address: str, share_port: bool) -> socket.socket:
    host, port = _split(address)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR only lets us rebind over TIME_WAIT; two live listeners
        # on one port need SO_REUSEPORT, which is set only on request.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_listener(setting: str, address: str, *, share_port: bool = False) -> socket.socket:
    """The listening socket for ``address`` (one value of ``setting``): the
    one inherited from the supervisor, else a new one. Raises ListenError."""
    sock = _inherited.pop((setting, address), None)
    if sock is not None:
        return sock
    try:
        return _bind(address, share_port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason += " (another server, or another shardmail with another data dir?)"
        raise ListenError(f"{setting}: cannot listen on {address}: {reason}") from None


def inherit(listeners: Iterable[tuple[str, str]], *, share_port: bool = False) -> None:
    """Bind every ``(setting, address)`` now, in the supervisor, for the
    workers it forks next: each worker's :func:`open_listener` takes these
    sockets instead of binding. Raises ListenError (nothing left bound)."""
    opened: dict[tuple[str, str], socket.socket] = {}
    try:
        for setting, address in listeners:
            if (setting, address) not in opened:
                opened[(setting, address)] = open_listener(setting, address, share_port=share_port)
    except BaseException:
        for sock in opened.values():
            sock.close()
        raise
    _inherited.update(opened)


def bound_port(server: asyncio.AbstractServer) -> int:
    """The port of a server's first socket (port 0 in the settings: ephemeral)."""
    return int(cast(asyncio.Server, server).sockets[0].getsockname()[1])


# -- accepting -------------------------------------------------------------


class _Released(asyncio.Protocol):
    """Forwards every callback to the daemon's protocol and returns the
    lease when the connection ends."""

    def __init__(self, inner: asyncio.Protocol, lease: Lease) -> None:
        self._inner = inner
        self._lease = lease

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._lease.release()


class _Gate(asyncio.Protocol):
    """The first protocol of every accepted connection: it takes the peer's
    lease, then hands the transport to the daemon's protocol, or writes the
    refusal and closes."""

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        lease = listener.limit.acquire(ip)
        if lease is None:
            CONNECTIONS_REFUSED.inc(protocol=listener.label)
            log.debug("%s: refused %s: too many connections", listener.setting, ip)
            cast(asyncio.WriteTransport, transport).write(listener.refusal)
            transport.close()
            return
        protocol = cast(asyncio.Protocol, listener.factory())
        if isinstance(protocol, LeaseHolder):
            protocol.lease = lease
        else:
            protocol = _Released(protocol, lease)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        pass  # a refused client's words: the transport is closing

    def eof_received(self) -> bool | None:
        return False


class _Listener:
    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        setting: str,
        limit: PeerLimit,
        refusal: bytes,
        label: str,
    ) -> None:
        self.factory = factory
        self.setting = setting
        self.limit = limit
        self.refusal = refusal
        self.label = label


async def serve(
    factory: Callable[[], asyncio.BaseProtocol],
    setting: str,
    address: str,
    *,
    limit: PeerLimit,
    refusal: bytes,
    label: str,
    share_port: bool = False,
    tls: ssl.SSLContext | None = None,
    tls_handshake_timeout: float | None = None,
) -> asyncio.Server:
    """Listen on ``address`` (a value of ``setting``; see :func:`open_listener`)
    and serve it as :func:`serve_socket` does. Raises ListenError."""
    sock = open_listener(setting, address, share_port=share_port)
    try:
        return await serve_socket(
            factory,
            sock,
            setting,
            limit=limit,
            refusal=refusal,
            label=label,
            tls=tls,
            tls_handshake_timeout=tls_handshake_timeout,
        )
    except BaseException:
        sock.close()
        raise


async def serve_socket(
    factory: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
    setting: str,
    *,
    limit: PeerLimit,
    refusal: bytes,
    label: str,
    tls: ssl.SSLContext | None = None,
    tls_handshake_timeout: float | None = None,
) -> asyncio.Server:
    """Serve each connection accepted on ``sock`` within ``limit`` with a
    protocol from ``factory``; over it, send ``refusal`` (after the TLS
    handshake on a TLS listener) and close. ``label`` names the protocol in
    the refused-connections metric. The returned server owns ``sock``."""
    listener = _Listener(factory, setting, limit, refusal, label)
    server = await asyncio.get_running_loop().create_server(
        lambda: _Gate(listener),
        sock=sock,
        ssl=tls,
        ssl_handshake_timeout=tls_handshake_timeout if tls else None,
        backlog=BACKLOG,
    )
    host, port = sock.getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("%s listening on %s (%s%s)", label, where, setting, ", TLS" if tls else "")
    return server

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
  protocol exists, and before any TLS handshake, the client IP spends a
  token of its :class:`ConnectRate`; without one the connection is closed
  at once (a plaintext listener sends its refusal line first), so a flood
  of new connections from one address costs no handshakes. Then the
  connection takes a slot of its client IP in a :class:`PeerLimit`; over
  the limit the client gets the listener's refusal line (after the TLS
  handshake on a TLS listener) and the connection is closed, so the daemon
  never sees it. The slot
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
import time
from collections.abc import Callable, Iterable
from typing import Protocol, cast

from runtime.metrics import CONNECTIONS_REFUSED
from runtime.tlslayer import server_protocol

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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(exempt: Iterable[str]) -> list[Network]:
    nets = []
    for net in exempt:
        # As httpapi's X-Forwarded-For check does: a malformed entry trusts nobody.
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(net, strict=False))
    return nets


def _within(nets: list[Network], ip: str) -> bool:
    if not nets:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in nets)


class ConnectRate:
    """New connections per client IP: a token bucket per address holding up
    to ``burst`` tokens, refilled at ``per_second``; each connection spends
    one. ``per_second == 0`` disables it; addresses in ``exempt`` (networks)
    are never limited.

    An address whose bucket has refilled is forgotten (a full bucket and no
    bucket are the same), by a sweep each time the table has doubled, so
    memory follows the addresses seen in the last ``burst / per_second``
    seconds and each connection costs O(1) amortized."""

    SWEEP_FLOOR = 1024  # entries before the first sweep

    def __init__(
        self,
        per_second: float,
        burst: int,
        exempt: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second = per_second
        self.burst = float(max(burst, 1))
        self._exempt = _networks(exempt)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # ip: (tokens, when)
        self._sweep_at = self.SWEEP_FLOOR

    def admit(self, ip: str) -> bool:
        """Spend one of ``ip``'s tokens: False when it has none left."""
        if self.per_second <= 0 or _within(self._exempt, ip):
            return True
        now = self._clock()
        tokens = self._tokens(ip, now)
        if tokens < 1.0:
            return False
        self._buckets[ip] = (tokens - 1.0, now)
        if len(self._buckets) >= self._sweep_at:
            self._sweep(now)
        return True

    def tracked(self) -> int:
        """Addresses currently remembered (for tests and metrics)."""
        return len(self._buckets)

    def _tokens(self, ip: str, now: float) -> float:
        held = self._buckets.get(ip)
        if held is None:
            return self.burst
        tokens, when = held
        return min(self.burst, tokens + (now - when) * self.per_second)

    def _sweep(self, now: float) -> None:
        self._buckets = {
            ip: held for ip, held in self._buckets.items() if self._tokens(ip, now) < self.burst
        }
        self._sweep_at = max(self.SWEEP_FLOOR, 2 * len(self._buckets))


class ListenerSettings(Protocol):
    """The per-IP settings every listening section (smtp, imap, pop3, http) has."""

    max_connections_per_ip: int
    connect_rate_per_ip: float
    connect_burst_per_ip: int


class PeerLimit:
    """Concurrent connections per client IP; ``limit == 0`` disables it.
    Addresses in ``exempt`` (networks, e.g. a site's reverse proxies, which
    carry many clients over their own connections) are never counted.
    ``rate``, if given, limits how fast an address may open connections
    (see :class:`ConnectRate`); the listener asks it first."""

    def __init__(
        self, limit: int, exempt: Iterable[str] = (), *, rate: ConnectRate | None = None
    ) -> None:
        self.limit = limit
        self.rate = rate
        self._exempt = _networks(exempt)
        self._open: dict[str, int] = {}

    @classmethod
    def of(
        cls,
        section: ListenerSettings,
        rate_exempt: Iterable[str] = (),
        exempt: Iterable[str] = (),
    ) -> PeerLimit:
        """The limits one protocol's settings section asks for, shared by all
        of its listeners: ``exempt`` is counted by neither limit,
        ``rate_exempt`` (``server.connect_rate_exempt``) by the rate only."""
        exempt = list(exempt)
        rate = ConnectRate(
            section.connect_rate_per_ip, section.connect_burst_per_ip, [*rate_exempt, *exempt]
        )
        return cls(section.max_connections_per_ip, exempt, rate=rate)

    def admit(self, ip: str) -> bool:
        """Whether ``ip`` may open a connection now (its connection rate)."""
        return self.rate is None or self.rate.admit(ip)

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
        return _within(self._exempt, ip)


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
    lease when the connection ends (or, under TLS, when the handshake
    fails: then the daemon's protocol never heard of the connection)."""

    def __init__(self, inner: asyncio.Protocol, lease: Lease) -> None:
        self._inner = inner
        self._lease = lease
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
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

    def handshake_done(self, waiter: asyncio.Future[None]) -> None:
        """The end of the TLS handshake, whatever it was."""
        failed = waiter.cancelled() or waiter.exception() is not None  # retrieved: not logged
        if failed or not self.made:
            self._lease.release()


class _Refusing(asyncio.Protocol):
    """A connection over its address's count, on a TLS listener: the refusal
    once TLS is up, so that the client can read it, then the end."""

    def __init__(self, refusal: bytes) -> None:
        self._refusal = refusal

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self._refusal)
        transport.close()

    @staticmethod
    def handshake_done(waiter: asyncio.Future[None]) -> None:
        if not waiter.cancelled():
            waiter.exception()  # retrieved: a failed handshake is not logged


# How long a refused plaintext connection is still read from (and what it
# sends dropped) after its refusal and our end of the stream.
REFUSAL_LINGER = 1.0


def _refuse(transport: asyncio.Transport, refusal: bytes) -> None:
    """Write ``refusal`` and end the connection without losing it: closing
    a socket with the client's unread bytes in it (an HTTP request, a
    pipelined command) sends a reset, which can discard the refusal before
    the client reads it. So our end is closed first (FIN) and the client's
    bytes are read and dropped until it closes, or for REFUSAL_LINGER."""
    transport.write(refusal)
    if not transport.can_write_eof():
        transport.close()
        return
    transport.write_eof()
    asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.close)


class _Gate(asyncio.Protocol):
    """The first protocol of every accepted connection, before any TLS: it
    spends a token of the peer's connection rate and takes its lease, then
    hands the transport to the daemon's protocol (through TLS on a TLS
    listener), or writes the refusal and closes."""

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        stream = cast(asyncio.Transport, transport)
        if not listener.limit.admit(ip):
            CONNECTIONS_REFUSED.inc(protocol=listener.label)
            log.debug("%s: refused %s: connecting too fast", listener.setting, ip)
            if listener.tls is None:
                _refuse(stream, listener.refusal)
            else:
                stream.close()  # no handshake, and nothing it could read
            return
        lease = listener.limit.acquire(ip)
        if lease is None:
            CONNECTIONS_REFUSED.inc(protocol=listener.label)
            log.debug("%s: refused %s: too many connections", listener.setting, ip)
        app: asyncio.Protocol
        if listener.tls is None:
            if lease is None:
                _refuse(stream, listener.refusal)
                return
            app = listener.protocol_for(lease)
        else:
            # Under TLS the wrapper is kept even for a LeaseHolder: its lease
            # must come back if the handshake fails, before the daemon's
            # protocol exists for the connection.
            protocol = cast(asyncio.Protocol, listener.factory())
            if isinstance(protocol, LeaseHolder) and lease is not None:
                protocol.lease = lease
            wrapped = _Refusing(listener.refusal) if lease is None else _Released(protocol, lease)
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            waiter.add_done_callback(wrapped.handshake_done)
            timeout = listener.tls_handshake_timeout
            app = cast(
                asyncio.Protocol, server_protocol(loop, wrapped, listener.tls, waiter, timeout)
            )
        # Called from within this transport's own connection_made: nothing
        # has been read yet, so the first bytes go to ``app``.
        stream.set_protocol(app)
        app.connection_made(stream)

    def data_received(self, data: bytes) -> None:
        pass  # a refused client's words: the transport is closing

    def eof_received(self) -> bool | None:
        return False


class _Listener:
    """What every connection accepted on one listening socket is served with."""

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        setting: str,
        limit: PeerLimit,
        refusal: bytes,
        label: str,
        tls: ssl.SSLContext | None = None,
        tls_handshake_timeout: float | None = None,
    ) -> None:
        self.factory = factory
        self.setting = setting
        self.limit = limit
        self.refusal = refusal
        self.label = label
        self.tls = tls
        self.tls_handshake_timeout = tls_handshake_timeout

    def protocol_for(self, lease: Lease) -> asyncio.Protocol:
        """The daemon's protocol for one admitted plaintext connection, set
        to return ``lease``."""
        protocol = cast(asyncio.Protocol, self.factory())
        if isinstance(protocol, LeaseHolder):
            protocol.lease = lease
            return protocol
        return _Released(protocol, lease)


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
    protocol from ``factory``; over its connection count, send ``refusal``
    (after the TLS handshake on a TLS listener) and close; over its
    connection rate, close before any handshake (a plaintext listener sends
    ``refusal`` first). ``label`` names the protocol in
    the refused-connections metric. The returned server owns ``sock``."""
    listener = _Listener(factory, setting, limit, refusal, label, tls, tls_handshake_timeout)
    # TLS is started by the gate, after the connection-rate check, not by
    # the event loop on accept: a refused connection costs no handshake.
    server = await asyncio.get_running_loop().create_server(
        lambda: _Gate(listener), sock=sock, backlog=BACKLOG
    )
    host, port = sock.getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("%s listening on %s (%s%s)", label, where, setting, ", TLS" if tls else "")
    return server

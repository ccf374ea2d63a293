"""The httpapi daemon's entry: :func:`start` returns a running :class:`HttpService`.

Listens on ``settings.http.listen`` in plain HTTP. TLS is expected to be
terminated by a reverse proxy in front (nginx, haproxy, Caddy), which also
serves HTTP/2; list its address in ``http.trusted_proxies`` so per-IP limits
and the login throttle see the real client. The ``tls`` context is accepted
for the common daemon signature and not used. Sockets are opened through
:mod:`runtime.listen` (a per-IP connection limit, ``http.max_connections_per_ip``,
and port sharing only between one site's instances); instances agree on
tokens through the directory's shared token key (:func:`site_token_key`).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl

from aiohttp import web

from conf.settings import Settings
from httpapi.app import ACCESS_LOG, SERVER_LOG, AccessLog, build_app
from httpapi.auth import SECRET_BYTES, SECRET_NAME, read_legacy_secret
from runtime.listen import PeerLimit, open_listener, serve_socket
from storage.api import Storage

# The settings this daemon listens on (runtime.daemon binds them for workers).
LISTEN_KEYS = ("http.listen",)

SHUTDOWN_TIMEOUT = 5.0  # seconds in-flight requests get to finish on close
# The whole answer to a client over http.max_connections_per_ip, sent before
# its request is read: 503 with Retry-After (RFC 9110 sections 15.6.4, 10.2.3).
_REFUSAL_BODY = b"too many connections from your address\n"
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


async def site_token_key(settings: Settings, storage: Storage) -> bytes:
    """The site's token key, shared by every instance through the directory
    (issue #19: instances on other hosts must accept each other's tokens).
    A key an older version kept in ``data_dir/http_secret`` is offered
    first, so its tokens stay valid; else a new random one. TEMPORARY if
    the directory cannot be reached."""
    legacy = await asyncio.to_thread(read_legacy_secret, settings.data_dir)
    offered = legacy or secrets.token_bytes(SECRET_BYTES)
    return await storage.directory.shared_secret(SECRET_NAME, offered)


class HttpService:
    """A running HTTP API. ``ports`` are the bound ports, in listen order
    (useful with port 0); ``close`` stops listening, closes WebSockets with
    1001 and waits briefly for in-flight requests."""

    def __init__(self, runner: web.AppRunner, sockets: list[socket.socket]) -> None:
        self.runner = runner
        self.sockets = sockets
        self.app = runner.app

    @property
    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for sock in self.sockets]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(sock.getsockname()[0], sock.getsockname()[1]) for sock in self.sockets]

    async def close(self) -> None:
        from delivery.checks_rspamd import close_clients

        await self.runner.cleanup()
        await close_clients()


class _LimitedSite(web.SockSite):
    """aiohttp's site over one of our listening sockets, accepting through
    :func:`runtime.listen.serve_socket` so the per-IP limit holds before
    aiohttp sees a connection."""

    __slots__ = ("_limit",)

    def __init__(self, runner: web.AppRunner, sock: socket.socket, limit: PeerLimit) -> None:
        super().__init__(runner, sock)
        self._limit = limit

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        assert self._runner.server is not None
        self._server = await serve_socket(
            self._runner.server,
            self._sock,
            "http.listen",
            limit=self._limit,
            refusal=TOO_MANY_CONNECTIONS,
            label="http",
        )


async def start(settings: Settings, storage: Storage, tls: ssl.SSLContext | None = None
                ) -> HttpService:
    """Start listening on every ``http.listen`` address; raises
    :class:`runtime.listen.ListenError` if one cannot be bound (after
    closing what was opened)."""
    secret = await site_token_key(settings, storage)
    app = build_app(settings, storage, secret)
    runner = web.AppRunner(
        app,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log=ACCESS_LOG,
        access_log_class=AccessLog,
        logger=SERVER_LOG,
    )
    await runner.setup()
    # Connections from a trusted proxy carry many clients: not counted.
    limit = PeerLimit.of(
        settings.http, settings.server.connect_rate_exempt, settings.http.trusted_proxies
    )
    sockets: list[socket.socket] = []
    try:
        for value in settings.http.listen:
            sock = open_listener("http.listen", value, share_port=settings.server.share_ports)
            sockets.append(sock)
            site = _LimitedSite(runner, sock, limit)
            await site.start()
    except BaseException:
        await runner.cleanup()
        for sock in sockets:
            sock.close()
        raise
    return HttpService(runner, sockets)

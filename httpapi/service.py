"""The httpapi daemon's entry: :func:`start` returns a running :class:`HttpService`.

Listens on ``settings.http.listen`` in plain HTTP. TLS is expected to be
terminated by a reverse proxy in front (nginx, haproxy, Caddy), which also
serves HTTP/2; list its address in ``http.trusted_proxies`` so per-IP limits
and the login throttle see the real client. The ``tls`` context is accepted
for the common daemon signature and not used. Sockets are opened with
``SO_REUSEPORT`` so several instances on one host share a port; they agree
on tokens through ``data_dir/http_secret``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from aiohttp import web

from conf.settings import Settings
from conf.tls import parse_listen
from httpapi.app import SERVER_LOG, build_app
from httpapi.auth import load_or_create_secret
from storage.api import Storage

log = logging.getLogger("httpapi")

SHUTDOWN_TIMEOUT = 5.0  # seconds in-flight requests get to finish on close


async def prepare(settings: Settings) -> None:
    """Create the token secret once, before workers that must share it start."""
    await asyncio.to_thread(load_or_create_secret, settings.data_dir)


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
        await self.runner.cleanup()


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start(settings: Settings, storage: Storage, tls: ssl.SSLContext | None = None
                ) -> HttpService:
    """Start listening on every ``http.listen`` address; raises OSError if a
    port cannot be bound (after closing what was opened)."""
    secret = await asyncio.to_thread(load_or_create_secret, settings.data_dir)
    app = build_app(settings, storage, secret)
    runner = web.AppRunner(
        app, shutdown_timeout=SHUTDOWN_TIMEOUT, access_log=None, logger=SERVER_LOG
    )
    await runner.setup()
    sockets: list[socket.socket] = []
    try:
        for value in settings.http.listen:
            host, port = parse_listen(value)
            sock = _listening_socket(host, port)
            sockets.append(sock)
            site = web.SockSite(runner, sock)
            await site.start()
            log.info("http listening on %s", site.name)
    except BaseException:
        await runner.cleanup()
        for sock in sockets:
            sock.close()
        raise
    return HttpService(runner, sockets)

"""POP3 listeners: plain + STLS (port 110) and implicit TLS (port 995, RFC 8314).

Entry contract for ``imapd/service.py``::

    servers = await start_pop3(settings, storage, tls)
    ...
    await stop_pop3(servers)   # stop listening, end every session

:func:`start_pop3` binds every ``settings.pop3.listen`` address (plaintext,
STLS offered) and every ``settings.pop3.tls_listen`` address (TLS from the
first byte) through :mod:`runtime.listen` (per-IP connection limit, port
sharing only between one site's instances), and returns the listening
``asyncio.Server`` objects; port 0 binds an ephemeral port, read it from
``server.sockets[0].getsockname()``.
:func:`stop_pop3` closes them and ends their sessions: a session ended
before QUIT deletes nothing and releases its maildrop lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from asyncio.base_events import Server

from conf.settings import Settings
from imapd.pop3.connection import TLS_HANDSHAKE_TIMEOUT, Connection
from imapd.pop3.session import Session, SessionContext
from runtime.listen import PeerLimit, serve
from storage.api import Storage

log = logging.getLogger("imapd.pop3")

# Sent instead of the greeting to a client over pop3.max_connections_per_ip:
# RFC 1939 section 4 lets the server refuse with -ERR; RFC 3206 section 4
# names the SYS/TEMP code (try again later; not the maildrop's IN-USE).
TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] too many connections from your address\r\n"


class Pop3Service:
    """The listeners of one ``start_pop3`` call and their live sessions."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        tls: ssl.SSLContext,
        idle_timeout: float | None = None,
    ) -> None:
        timeout = idle_timeout if idle_timeout is not None else settings.pop3.idle_timeout_seconds
        self._context = SessionContext(settings, storage, tls, timeout)
        self.settings = settings
        self.tls = tls
        self.servers: list[Server] = []
        self.limit = PeerLimit.of(settings.pop3, settings.server.connect_rate_exempt)
        self.sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            for address in self.settings.pop3.listen:
                await self._listen("pop3.listen", address, None)
            for address in self.settings.pop3.tls_listen:
                await self._listen("pop3.tls_listen", address, self.tls)
        except BaseException:
            await self.close()
            raise

    async def _listen(self, setting: str, address: str, tls: ssl.SSLContext | None) -> None:
        server = await serve(
            lambda: Connection(self._serve),
            setting,
            address,
            limit=self.limit,
            refusal=TOO_MANY_CONNECTIONS,
            label="pop3",
            share_port=self.settings.server.share_ports,
            tls=tls,
            tls_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        self.servers.append(server)

    def _serve(self, conn: Connection) -> None:
        task = asyncio.create_task(
            Session(self._context, conn).run(), name=f"pop3-{conn.peer_ip}"
        )
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)

    @property
    def ports(self) -> list[int]:
        """Bound ports, in the order of ``listen`` then ``tls_listen``."""
        return [s.sockets[0].getsockname()[1] for s in self.servers if s.sockets]

    async def close(self) -> None:
        """Stop listening, end sessions (no UPDATE: nothing is deleted)."""
        for server in self.servers:
            server.close()
        for task in list(self.sessions):
            task.cancel()
        if self.sessions:
            await asyncio.gather(*self.sessions, return_exceptions=True)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()


_services: weakref.WeakKeyDictionary[Server, Pop3Service] = weakref.WeakKeyDictionary()


async def start_pop3(
    settings: Settings,
    storage: Storage,
    tls: ssl.SSLContext,
    *,
    idle_timeout: float | None = None,
) -> list[Server]:
    """Start the POP3 listeners; see the module docstring. ``idle_timeout``
    overrides ``pop3.idle_timeout_seconds`` (whose settings floor is the RFC
    1939 ten minutes) for tests only."""
    service = await start_pop3_service(settings, storage, tls, idle_timeout=idle_timeout)
    return service.servers


async def start_pop3_service(
    settings: Settings,
    storage: Storage,
    tls: ssl.SSLContext,
    *,
    idle_timeout: float | None = None,
) -> Pop3Service:
    """Like :func:`start_pop3`, returning the service object (ports, close)."""
    service = Pop3Service(settings, storage, tls, idle_timeout)
    await service.start()
    for server in service.servers:
        _services[server] = service
    return service


async def stop_pop3(servers: list[Server]) -> None:
    """Close servers returned by :func:`start_pop3` and end their sessions."""
    seen: set[int] = set()
    for server in servers:
        service = _services.get(server)
        if service is None:
            server.close()
        elif id(service) not in seen:
            seen.add(id(service))
            await service.close()

"""The imapd daemon: IMAP4 (143 STARTTLS, 993 TLS) and POP3 (110 STLS, 995 TLS).

Contract: :func:`start` binds every configured listener or raises (nothing
left listening); :meth:`ImapdService.close` stops accepting and closes the
listeners.
"""

from __future__ import annotations

import asyncio
import ssl

from conf.settings import Settings
from storage.api import Storage


class ImapdService:
    def __init__(self, servers: list[asyncio.base_events.Server]) -> None:
        self.servers = servers

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for srv in self.servers for s in srv.sockets]

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            # Python 3.12+ waits for open connections here; bound it.
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except TimeoutError:
                pass


async def start(settings: Settings, storage: Storage, tls: ssl.SSLContext) -> ImapdService:
    from imapd.imap.server import start_imap
    from imapd.pop3.server import start_pop3

    servers = await start_imap(settings, storage, tls)
    try:
        servers += await start_pop3(settings, storage, tls)
    except BaseException:
        await ImapdService(servers).close()
        raise
    return ImapdService(servers)

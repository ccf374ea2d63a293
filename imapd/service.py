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

# The settings this daemon listens on (runtime.daemon binds them for workers).
LISTEN_KEYS = ("imap.listen", "imap.tls_listen", "pop3.listen", "pop3.tls_listen")


class ImapdService:
    def __init__(
        self,
        imap: list[asyncio.base_events.Server],
        pop3: list[asyncio.base_events.Server],
    ) -> None:
        self.imap = imap
        self.pop3 = pop3

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for srv in self.imap + self.pop3 for s in srv.sockets]

    async def close(self) -> None:
        """Stop listening and end every session; POP3 sessions delete nothing
        (RFC 1939 section 6: only QUIT enters the UPDATE state)."""
        from imapd.imap.server import stop_imap
        from imapd.pop3.server import stop_pop3

        await stop_imap(self.imap)
        await stop_pop3(self.pop3)
        from delivery.checks_rspamd import close_clients

        await close_clients()  # Junk learning's (delivery/learn.py)


async def start(settings: Settings, storage: Storage, tls: ssl.SSLContext) -> ImapdService:
    from imapd.imap.server import start_imap, stop_imap
    from imapd.pop3.server import start_pop3

    imap = await start_imap(settings, storage, tls)
    try:
        pop3 = await start_pop3(settings, storage, tls)
    except BaseException:
        await stop_imap(imap)
        raise
    return ImapdService(imap, pop3)

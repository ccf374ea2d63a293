"""The mtad daemon: SMTP listeners over one shared context.

Contract: :func:`start` binds every listener of ``settings.smtp`` (MX,
submission with STARTTLS, submissions with implicit TLS) and returns a
running :class:`Service`; ``service.ports`` tells which ports were bound
(port 0 in the settings means ephemeral). ``close()`` stops listening,
sends 421 to open sessions and closes them; mail already answered with 250
is durable, anything unanswered is the client's to retry.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from conf.settings import Settings
from mtad import replies as R
from mtad.dns import Resolver
from mtad.session import Mode, SmtpContext, SmtpSession
from runtime.listen import PeerLimit, serve
from storage.api import Storage
from storage.shared import shared_state
from storage.tasks import stop_task

log = logging.getLogger("mtad")


class _CommandChatter(logging.Filter):
    """aiosmtpd ("mail.log") logs every command line, connection, envelope
    address and connection end at INFO, and its mechanism table on every
    connection: detail for debugging, lowered here to DEBUG. Its warnings
    stay as they are; our own session log says what an operator needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger("mail.log").addFilter(_CommandChatter())
# The settings this daemon listens on (runtime.daemon binds them for workers).
LISTEN_KEYS = ("smtp.mx_listen", "smtp.submission_listen", "smtp.submissions_listen")


@dataclass
class Service:
    """A running mtad. ``servers`` maps each mode to its asyncio servers;
    ``on_close`` holds extra coroutines run by :meth:`close` (the outbound
    queue workers register theirs there)."""

    context: SmtpContext
    servers: dict[Mode, list[asyncio.Server]]
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def ports(self) -> dict[str, list[int]]:
        """Bound ports by listener name: ``{"mx": [..], "submission": [..],
        "submissions": [..]}``."""
        return {
            mode.value: [s.getsockname()[1] for srv in servers for s in srv.sockets]
            for mode, servers in self.servers.items()
        }

    def port(self, mode: Mode | str) -> int:
        """The first bound port of a listener (convenient in tests)."""
        return self.ports[Mode(mode).value][0]

    @property
    def resolver(self) -> Resolver:
        return self.context.resolver

    async def close(self) -> None:
        self.context.closing = True
        for servers in self.servers.values():
            for server in servers:
                server.close()
        for session in list(self.context.sessions):
            await session.close_with(R.SHUTTING_DOWN)
        for hook in self.on_close:
            try:
                await hook()
            except Exception:
                log.exception("error while stopping")
        from delivery.checks_rspamd import close_clients

        await close_clients()
        for servers in self.servers.values():
            for server in servers:
                try:
                    await asyncio.wait_for(server.wait_closed(), 5)
                except TimeoutError:
                    log.warning("listener did not close in time")


def _make_context(settings: Settings, storage: Storage, tls: ssl.SSLContext | None) -> SmtpContext:
    smtp = settings.smtp
    shared = shared_state(storage, settings.redis)  # counted by every instance with [redis]
    window = smtp.rate_window_seconds
    return SmtpContext(
        settings=settings,
        storage=storage,
        tls=tls,
        resolver=Resolver(settings.dns),
        rate_user=shared.rate_limit("smtp-user", smtp.rate_limit_per_user, window),
        rate_ip=shared.rate_limit("smtp-ip", smtp.rate_limit_per_ip, window),
    )


def _start_dmarc_reports(
    settings: Settings, storage: Storage, resolver: Resolver
) -> Callable[[], Awaitable[None]]:
    """Starts mtad/dmarcsend.py's daily loop; returns what stops it."""
    from mtad.dmarcsend import report_loop

    task = asyncio.create_task(report_loop(storage, settings, resolver))

    async def stop() -> None:
        await stop_task(task)  # a cancellation may be lost once

    return stop


async def start(settings: Settings, storage: Storage, tls: ssl.SSLContext | None) -> Service:
    """Bind the MX, submission and submissions listeners and start serving."""
    ctx = _make_context(settings, storage, tls)
    # One count per client IP across the three listeners.
    limit = PeerLimit.of(settings.smtp, settings.server.connect_rate_exempt)
    # RFC 5321 section 4.5.3.1: 421 when resources are short, before the greeting.
    refusal = str(R.TOO_MANY_CONNECTIONS).encode() + b"\r\n"
    listeners = {
        Mode.MX: settings.smtp.mx_listen,
        Mode.SUBMISSION: settings.smtp.submission_listen,
        Mode.SUBMISSIONS: settings.smtp.submissions_listen,
    }
    servers: dict[Mode, list[asyncio.Server]] = {mode: [] for mode in listeners}
    service = Service(ctx, servers)
    try:
        for mode, addresses in listeners.items():
            if mode is Mode.SUBMISSIONS and addresses and tls is None:
                raise ValueError("smtp.submissions_listen needs a TLS context")
            for address in addresses:
                server = await serve(
                    lambda mode=mode: SmtpSession(ctx, mode),
                    f"smtp.{mode.value}_listen",
                    address,
                    limit=limit,
                    refusal=refusal,
                    label="smtp" if mode is Mode.MX else "submission",
                    share_port=settings.server.share_ports,
                    tls=tls if mode is Mode.SUBMISSIONS else None,
                )
                servers[mode].append(server)
        # --- outbound queue workers (mtad.outbound; owned by the queue helper) ---
        if settings.queue.workers > 0:
            from mtad.outbound import start_workers

            runner = start_workers(settings, storage, ctx.resolver)
            service.queue_runner = runner  # type: ignore[attr-defined]
            service.on_close.append(runner.close)
            from mtad.outbound.tlsrpt import start_daily

            # RFC 8460 section 4.1: daily TLS-RPT reports (one instance at a time).
            service.on_close.append(start_daily(settings, storage, ctx.resolver))
        # --- end outbound queue workers ---
        if settings.queue.workers > 0 and settings.smtp.dmarc:
            # RFC 7489 section 7.2: our aggregate reports, daily (one instance sends).
            service.on_close.append(_start_dmarc_reports(settings, storage, ctx.resolver))
    except BaseException:
        await service.close()
        raise
    return service

"""Sending delivery status notifications: where a DSN goes, and the
"delivered" report of a local delivery.

Contract: :func:`send_notification` delivers a built DSN with a null
reverse-path (RFC 3461 section 6.1, RFC 5321 section 4.5.5) into a local
INBOX or through the outbound queue; :func:`send_delivered` builds and
sends the report RFC 3461 section 5.2.3 asks for when a recipient whose
NOTIFY has SUCCESS is delivered here. Storage trouble raises StorageError;
a refused delivery of the notice is logged and dropped (a notice is never
worth a retry loop of its own).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

from conf.settings import Settings
from delivery.dsnparams import envelope_id, original_recipient
from delivery.submit import Routing, SubmitError, deliver, resolve_recipient
from mtad.outbound.dsn import DELIVERED, RecipientStatus, build_dsn
from storage.sql.queue import DsnEnvelope, DsnRecipient

log = logging.getLogger("mtad.outbound")


async def send_notification(
    storage: object,
    to: str,
    message: bytes,
    settings: Settings | None = None,
    *,
    require_tls: bool = False,
) -> None:
    """Deliver a DSN to ``to`` with a null reverse-path: into the INBOX of a
    local account, through the outbound queue otherwise. A local address
    that does not exist drops it (logged); storage trouble raises. With
    ``settings``, an SRS address of ours (a forwarded message's sender,
    delivery/srs.py) goes to the address it encodes. ``require_tls``: the
    notice leaves with REQUIRETLS (RFC 8689 section 5)."""
    try:
        route = await resolve_recipient(storage, to, settings=settings)  # type: ignore[arg-type]
    except SubmitError:
        log.warning("bounce to <%s> dropped: no such local user", to)
        return
    routing = Routing.empty()
    routing.add(route, to)
    try:
        await deliver(
            storage,  # type: ignore[arg-type]
            mail_from="",
            routing=routing,
            message=message,
            dsn=DsnEnvelope(require_tls=True) if require_tls else None,
        )
    except SubmitError as exc:
        log.warning("bounce to <%s> not delivered: %s", to, exc)


async def send_delivered(
    storage: object,
    reporting_mta: str,
    to: str,
    envelope: DsnEnvelope,
    recipients: Sequence[tuple[str, DsnRecipient]],
    original: bytes,
    now: dt.datetime | None = None,
    settings: Settings | None = None,
) -> None:
    """A "delivered" DSN (RFC 3464 section 2.3.3, status 2.0.0) to ``to``
    for ``recipients`` (each RCPT address with its DSN parameters), with
    the Original-Envelope-Id and Original-Recipient fields, and
    ``original``'s header only."""
    now = now or dt.datetime.now(dt.UTC)
    statuses = [
        RecipientStatus(
            final_recipient=address,
            action=DELIVERED,
            status="2.0.0",
            diagnostic="250 2.0.0 delivered to mailbox",
            last_attempt=now,
            original_recipient=original_recipient(dsn),
        )
        for address, dsn in recipients
    ]
    report = build_dsn(
        reporting_mta=reporting_mta,
        to=to,
        original=original,
        arrival=now,
        recipients=statuses,
        now=now,
        envelope_id=envelope_id(envelope),
    )
    await send_notification(storage, to, report, settings)

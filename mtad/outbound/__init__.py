"""Outbound relay: queue workers, MX lookup, SMTP client, DSNs, DKIM signing.

``mtad.service.start`` starts a :class:`~mtad.outbound.worker.QueueRunner`
when ``settings.queue.workers > 0`` (:func:`start_workers`); the inbound path
feeds bounces back through :func:`~mtad.outbound.feedback.process_incoming_dsn`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conf.settings import Settings
    from mtad.dns import Resolver
    from mtad.outbound.worker import QueueRunner


def start_workers(settings: Settings, storage: object, resolver: Resolver) -> QueueRunner:
    """A started runner for this instance; the caller awaits its ``close()``."""
    from mtad.outbound.worker import QueueRunner

    runner = QueueRunner(settings, storage, resolver)
    runner.start()
    return runner


__all__ = ["start_workers"]

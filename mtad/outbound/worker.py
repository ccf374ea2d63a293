"""The outbound queue workers: lease due entries, deliver, record, bounce.

Contract of :class:`QueueRunner`:

* ``start()`` begins polling; ``close()`` stops leasing, lets deliveries in
  flight finish for a few seconds, then cancels the rest and releases their
  leases (another worker takes them at once).
* An entry is processed by one worker at a time (the storage lease). A
  worker that dies mid-delivery leaves the lease to expire; the entry is then
  delivered again: at least once, never lost.
* Each attempt tries only recipients still pending or deferred; the next
  attempt is ``retry_schedule_seconds[attempts - 1]`` after this one (the
  last step repeats), never later than the entry's expiry, at which time every
  recipient still deferred fails.
* A permanent failure (or expiry) sends an RFC 3464 bounce to the envelope
  sender (never for a null sender: RFC 5321 section 4.5.5); with
  ``delay_warning_seconds`` a delay warning goes out once. Local senders get
  it in their INBOX, remote ones through the queue with a null sender.
* RFC 3461: each recipient's NOTIFY decides which notices name it (none
  for NEVER; a failure only with FAILURE, a delay warning only with DELAY;
  without NOTIFY, failures and delay warnings as above). A next hop that
  offers DSN gets the RET, ENVID, NOTIFY and ORCPT parameters and reports
  success itself; one that does not makes us send a "relayed" notice to a
  recipient whose NOTIFY has SUCCESS (section 5.2.2). Every notice carries
  Original-Envelope-Id and Original-Recipient; a failure with RET=FULL
  returns the whole message, otherwise its header (section 4.3).
* ``per_domain_concurrency`` bounds the SMTP sessions to one domain in
  this process, whichever queue partitions their entries come from;
  ``workers`` bounds deliveries in flight. Sessions are kept open between
  deliveries for ``connection_cache_seconds`` (mtad/outbound/conncache.py)
  and closed, idle ones QUIT, by ``close()``. One runner leases from every partition
  (``storage.queue``): a partition that is down delays only its own mail.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from conf.settings import Settings
from delivery.address import PathSyntaxError, domain_of, parse_mailbox
from delivery.dsnparams import envelope_id, original_recipient, wants
from delivery.srs import is_srs_address
from mtad.dns import Resolver
from mtad.outbound.client import Reply
from mtad.outbound.conncache import ConnectionCache
from mtad.outbound.delivery import (
    Destination,
    DsnRequest,
    RecipientResult,
    TlsPolicy,
    deliver_domain,
    local_reply,
    requiretls_expired,
    tls_required_no,
)
from mtad.outbound.dsn import DELAYED, RELAYED, RecipientStatus, build_dsn
from mtad.outbound.dsn import FAILED as DSN_FAILED
from mtad.outbound.notices import send_notification
from mtad.outbound.signing import DkimSigner
from runtime.metrics import MESSAGES_BOUNCED, MESSAGES_DELIVERED
from storage.errors import ErrorKind, StorageError
from storage.sql.queue import DEFERRED, DELIVERED, FAILED, Outcome, QueuedMessage, QueueRef

log = logging.getLogger("mtad.outbound")

# How long close() waits for deliveries in flight before cancelling them.
CLOSE_GRACE_SECONDS = 5.0
# Purge completed entries at most this often.
PURGE_INTERVAL_SECONDS = 3600.0
# RFC 3463 section 3.5 X.4.7: delivery time expired.
EXPIRED_STATUS = "4.4.7"
# Enhanced codes of a remote 5yz that say the mailbox does not exist (RFC
# 3463 section 3.2 X.1.1-X.1.2, X.1.10 null MX): they count as hard bounces.
HARD_BOUNCE_CODES = ("5.1.1", "5.1.2", "5.1.10")


def retry_delay(schedule: list[int], attempts: int) -> float:
    """Seconds until the next attempt after ``attempts`` attempts (1-based);
    the last step repeats (RFC 5321 section 4.5.4.1 asks for at least 30
    minutes between retries in production; the schedule is configurable)."""
    if not schedule:
        return 300.0
    return float(schedule[min(max(attempts, 1), len(schedule)) - 1])


def _enhanced_of(text: str | None) -> str | None:
    """The RFC 3463 code in a stored reply ``"550 5.1.1 ..."``."""
    if not text:
        return None
    parts = text.split()
    if len(parts) >= 2 and parts[0].isdigit() and parts[1].count(".") == 2:
        return parts[1]
    if parts and parts[0].isdigit():
        return f"{parts[0][0]}.0.0"
    return None


@dataclass
class Stats:
    """Counters for tests, metrics and the bench."""

    attempts: int = 0
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    bounces: int = 0
    errors: int = 0
    by_domain: dict[str, int] = field(default_factory=dict)


class QueueRunner:
    """The workers of one mtad instance."""

    def __init__(
        self,
        settings: Settings,
        storage: object,
        resolver: Resolver,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.queue_settings = settings.queue
        self.storage = storage
        self.queue = storage.queue  # type: ignore[attr-defined]
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.clock = clock
        self.destination = Destination(
            resolver=resolver,
            settings=settings.queue,
            helo_name=settings.server.hostname,
            tls=TlsPolicy.from_settings(
                settings.queue, trust_ad=settings.dns.trust_ad, data_dir=settings.data_dir
            ),
            connections=ConnectionCache(settings.queue),
        )
        self.signer = DkimSigner(
            settings.queue.dkim_key_dir,
            settings.queue.dkim_selector,
            storage.directory,  # the site's keys, shared by every instance (issue #19)
        )
        self.stats = Stats()
        self._in_flight: dict[QueueRef, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self._last_purge = 0.0

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        listeners = getattr(self.queue, "listeners", None)
        if listeners is not None:
            listeners.append(self.wake)
        self._loop_task = asyncio.create_task(self._run(), name=f"queue-runner {self.owner}")

    def wake(self) -> None:
        """Look for due entries now (e.g. right after an enqueue)."""
        self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        listeners = getattr(self.queue, "listeners", None)
        if listeners is not None and self.wake in listeners:
            listeners.remove(self.wake)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        tasks = list(self._in_flight.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=CLOSE_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            for task in pending:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        await self.destination.connections.close()

    async def _run(self) -> None:
        interval = self.queue_settings.poll_interval_seconds
        while not self._closing:
            try:
                await self.run_once()
                await self._purge()
            except asyncio.CancelledError:
                raise
            except StorageError as exc:
                log.warning("queue runner: %s", exc)
            except Exception:
                log.exception("queue runner failed; continuing")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        """Lease as many due entries as there are free workers and start
        their deliveries. Returns how many were leased."""
        free = self.queue_settings.workers - len(self._in_flight)
        if free <= 0 or self._closing:
            return 0
        leased = await self.queue.lease_due(
            self.owner, free, self.queue_settings.lease_seconds, now=self.clock()
        )
        for entry in leased:
            task = asyncio.create_task(self._guarded(entry), name=f"deliver {entry.id}")
            self._in_flight[entry.id] = task
        return len(leased)

    async def drain(self, timeout: float = 30.0) -> None:
        """Run until nothing is due and nothing is in flight (tests, bench)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.run_once()
            if not self._in_flight:
                return
            await asyncio.wait(list(self._in_flight.values()), timeout=0.5)
        raise TimeoutError("queue did not drain")

    async def _purge(self) -> None:
        now = self.clock()
        if now - self._last_purge >= PURGE_INTERVAL_SECONDS:
            self._last_purge = now
            await self.queue.purge_done(self.queue_settings.done_retention_seconds, now=now)

    async def _heartbeat(self, queue_id: QueueRef) -> None:
        """Renews the lease while a delivery runs (a slow peer may take longer
        than one lease), so no other worker starts a duplicate meanwhile."""
        lease = self.queue_settings.lease_seconds
        while True:
            await asyncio.sleep(max(lease / 3, 0.2))
            try:
                renewed = await self.queue.renew_lease(
                    queue_id, self.owner, lease, now=self.clock()
                )
            except StorageError as exc:
                log.warning("queue entry %s: lease renewal failed: %s", queue_id, exc)
                continue
            if not renewed:
                log.warning("queue entry %s: lease lost to another worker", queue_id)
                return

    async def _guarded(self, entry: QueuedMessage) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(entry.id))
        try:
            await self.process(entry)
        except asyncio.CancelledError:
            await asyncio.shield(self._release(entry.id))
            raise
        except StorageError as exc:
            if exc.kind is ErrorKind.NOT_FOUND:
                log.info("queue entry %s was deleted during its delivery", entry.id)
            else:
                self.stats.errors += 1
                log.warning("queue entry %s: %s; lease left to expire", entry.id, exc)
        except Exception:
            self.stats.errors += 1
            log.exception("queue entry %s: delivery failed; lease left to expire", entry.id)
        finally:
            heartbeat.cancel()
            self._in_flight.pop(entry.id, None)
            if not self._closing:
                self._wake.set()

    async def _release(self, queue_id: QueueRef) -> None:
        try:
            await self.queue.release(queue_id, self.owner)
        except Exception:
            log.warning("could not release lease of %s", queue_id)

    # -- one entry -----------------------------------------------------------

    async def process(self, entry: QueuedMessage) -> None:
        """One delivery attempt of a leased entry, recorded before returning."""
        self.stats.attempts += 1
        now = self.clock()
        reason = self._invalid(entry)
        if reason is not None:
            log.warning("queue entry %s moved to the error queue: %s", entry.id, reason)
            await self.queue.move_to_errors(entry.id, reason)
            return
        try:
            raw = await self.storage.blobs.get(entry.blob_key)  # type: ignore[attr-defined]
        except (StorageError, FileNotFoundError) as exc:
            if isinstance(exc, StorageError) and exc.kind is ErrorKind.TEMPORARY:
                raise
            await self.queue.move_to_errors(entry.id, f"message content missing: {exc}")
            return
        targets = [r.address for r in entry.retryable]
        results: dict[str, RecipientResult] = {}
        if now >= self.expiry(entry):
            for r in entry.retryable:
                # Action failed with the transient X.4.7 status (RFC 3463 3.5),
                # or 5.7.30 when REQUIRETLS kept it back (RFC 8689 section 5).
                reply = requiretls_expired(r.last_reply) or local_reply(
                    451, EXPIRED_STATUS, f"delivery time expired; last error: {r.last_reply}"
                )
                results[r.address] = RecipientResult(FAILED, reply)
            targets = []
        suppressed = await self.queue.suppressed(targets)
        for address in [a for a in targets if a.lower() in suppressed]:
            results[address] = RecipientResult(
                FAILED,
                local_reply(550, "5.1.1", "recipient suppressed after repeated hard bounces"),
            )
            targets.remove(address)
        if targets:
            # Mail an alias forwards leaves with an SRS sender of ours
            # (delivery/srs.py): sealed with ARC too (RFC 8617), so the next
            # hop can see what our MX found (SPF, DKIM, DMARC) before the
            # forward changed the envelope.
            forwarded = is_srs_address(entry.sender)
            hostname = self.settings.server.hostname if forwarded else ""
            signed = await self.signer.sign(raw, entry.sender, arc_authserv_id=hostname)
            by_domain: dict[str, list[str]] = {}
            for address in targets:
                by_domain.setdefault(domain_of(address).lower(), []).append(address)

            dsn_of = {r.address: r.dsn for r in entry.recipients}
            tls_optional = tls_required_no(raw)  # RFC 8689 section 4.2.2

            async def one_domain(domain: str, rcpts: list[str]) -> dict[str, RecipientResult]:
                request = DsnRequest(entry.dsn, {a: dsn_of[a] for a in rcpts}, tls_optional)
                self.stats.by_domain[domain] = self.stats.by_domain.get(domain, 0) + 1
                return await deliver_domain(
                    self.destination, domain, entry.sender, rcpts, signed, request
                )

            for part in await asyncio.gather(*(one_domain(d, rs) for d, rs in by_domain.items())):
                results.update(part)
        await self._record(entry, raw, results)

    def expiry(self, entry: QueuedMessage) -> float:
        """When the entry gives up: its own expiry or ``max_lifetime_seconds``
        after it was queued, whichever comes first."""
        lifetime = entry.created.timestamp() + self.queue_settings.max_lifetime_seconds
        return min(entry.expires.timestamp(), lifetime)

    def _invalid(self, entry: QueuedMessage) -> str | None:
        """Why the entry cannot be delivered at all, or None."""
        try:
            if entry.sender:
                parse_mailbox(entry.sender)
            for r in entry.recipients:
                parse_mailbox(r.address)
        except PathSyntaxError as exc:
            return f"invalid address: {exc}"
        if not entry.recipients:
            return "no recipients"
        return None

    async def _record(
        self, entry: QueuedMessage, raw: bytes, results: dict[str, RecipientResult]
    ) -> None:
        now = self.clock()
        failed = {a: r for a, r in results.items() if r.status == FAILED}
        deferred = {a: r for a, r in results.items() if r.status == DEFERRED}
        delivered = sum(1 for r in results.values() if r.status == DELIVERED)
        self.stats.delivered += delivered
        MESSAGES_DELIVERED.inc(delivered, destination="remote")
        MESSAGES_BOUNCED.inc(len(failed))
        self.stats.deferred += len(deferred)
        self.stats.failed += len(failed)
        for address, result in results.items():
            log.info(
                "queue entry %s: to=<%s> %s: %s", entry.id, address, result.status, result.text
            )
        dsn_of = {r.address: r.dsn for r in entry.recipients}
        if failed:
            # Bounce first: a crash before the record below retries the
            # recipients and bounces again (duplicate), never loses the bounce.
            notify = {a: r for a, r in failed.items() if wants(dsn_of[a], "FAILURE", default=True)}
            await self._bounce(entry, raw, notify, DSN_FAILED)
            for address, result in failed.items():
                if result.reply.enhanced in HARD_BOUNCE_CODES and result.remote_mta:
                    await self.queue.record_bounce(
                        address,
                        True,
                        result.reply.enhanced,
                        str(result.reply),
                        suppress_after=self.queue_settings.suppress_after_hard_bounces,
                        now=now,
                    )
        # RFC 3461 section 5.2.2: handed to a next hop that takes no DSN
        # parameters; one that did reports success itself (section 5.2.1).
        relayed = {
            a: r
            for a, r in results.items()
            if r.status == DELIVERED
            and not r.dsn_passed
            and wants(dsn_of[a], "SUCCESS", default=False)
        }
        await self._bounce(entry, raw, relayed, RELAYED)
        next_attempt = None
        if deferred:
            delay = retry_delay(self.queue_settings.retry_schedule_seconds, entry.attempts)
            next_attempt = min(now + delay, self.expiry(entry))
        outcomes = {a: Outcome(r.status, r.text) for a, r in results.items()}
        await self.queue.record_attempt(entry.id, self.owner, outcomes, next_attempt, now=now)
        warn_after = self.queue_settings.delay_warning_seconds
        if (
            deferred
            and warn_after > 0
            and not entry.warned
            and now - entry.created.timestamp() >= warn_after
        ):
            notify = {a: r for a, r in deferred.items() if wants(dsn_of[a], "DELAY", default=True)}
            await self._bounce(entry, raw, notify, DELAYED, next_attempt)
            await self.queue.mark_warned(entry.id)

    async def _bounce(
        self,
        entry: QueuedMessage,
        raw: bytes,
        results: dict[str, RecipientResult],
        action: str,
        next_attempt: float | None = None,
    ) -> None:
        """Send a DSN about ``results`` to the envelope sender (if any and
        if ``results`` is not empty)."""
        if not entry.sender or not results:
            return  # RFC 5321 section 4.5.5: never bounce a bounce
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        dsn_of = {r.address: r.dsn for r in entry.recipients}
        statuses = [
            RecipientStatus(
                final_recipient=address,
                action=action,
                status=result.reply.enhanced,
                diagnostic=str(result.reply),
                remote_mta=result.remote_mta,
                last_attempt=now,
                will_retry_until=(
                    dt.datetime.fromtimestamp(self.expiry(entry), dt.UTC)
                    if action == DELAYED
                    else None
                ),
                original_recipient=original_recipient(dsn_of[address]),
            )
            for address, result in results.items()
        ]
        dsn = build_dsn(
            reporting_mta=self.settings.server.hostname,
            to=entry.sender,
            original=raw,
            arrival=entry.created,
            recipients=statuses,
            now=now,
            envelope_id=envelope_id(entry.dsn),
            # RFC 3461 section 4.3; RFC 8689 section 5: the content of a
            # REQUIRETLS message is not returned.
            full=action == DSN_FAILED and entry.dsn.ret == "FULL" and not entry.dsn.require_tls,
        )
        # RFC 8689 section 5: a notice about a REQUIRETLS message goes with REQUIRETLS.
        await send_notification(
            self.storage, entry.sender, dsn, self.settings, require_tls=entry.dsn.require_tls
        )
        self.stats.bounces += 1


def reply_from_text(text: str | None) -> Reply:
    """A stored reply text back as a :class:`Reply` (for reports)."""
    if text and text[:3].isdigit():
        return Reply(int(text[:3]), (text[4:],))
    return Reply(451, (text or "",))

"""The outbound queue over every mail shard: one partition per shard.

Issue #19: no single database carries the whole queue, and the workers of
every instance lease from every partition. :class:`PartitionedQueue` has the
interface of one partition (``storage.sql.queue.OutboundQueue``) and
dispatches. Contract, beyond each partition's own:

* ``enqueue`` places a message round robin over the partitions, trying the
  next one when a partition is unavailable: a message is durable in exactly
  one partition when it returns its :class:`QueueRef`. A ``closed``
  partition (a shard of weight 0, being retired) takes new entries only
  when no open one can, so that it empties. Not the sender's
  shard: a bulk sender would load one shard with the traffic of many, mail
  relayed for no account (forwards, bounces of MX mail) has no shard, and
  the enqueue would need a directory lookup and fail with that one shard.
* ``lease_due`` splits the free slots evenly over the partitions, starting
  at the next one each call, and gives what a partition leaves unused to the
  others: a backlog in one never starves another. A partition that fails is
  skipped (logged once until it answers again) and asked again next poll.
* Calls naming an entry go to its partition (a bare number means the
  default partition); calls over the whole queue (``list``, ``retry_now``
  of all) raise TEMPORARY if a partition is unavailable, after the others
  have done their part. ``list_by_partition`` and ``stats`` report each
  partition's answer or error for the admin.
* Sending-limit flags (delivery/limits.py): an account is flagged in its
  home partition (as suppressions), with its entries there held in the
  same transaction and those elsewhere held beside it. ``is_flagged``
  reads every partition that answers (a shard added since may have
  rehomed the address) and is TEMPORARY if the home one does not, and
  found nothing elsewhere; ``release_account`` releases and clears in
  every partition, each in one transaction.
* Suppressions: a bounce is counted in the address's home partition
  (rendezvous hashing, so adding a shard rehomes few addresses); lookups
  read every partition that answers, so nothing counted is forgotten.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import TypeVar

from storage import errors
from storage.errors import BlobsBeingDeleted, ErrorKind, StorageError
from storage.sql.queue import (
    DEFAULT_EXPIRY,
    DEFAULT_PARTITION,
    DsnEnvelope,
    DsnRecipient,
    OutboundQueue,
    Outcome,
    PartitionStats,
    QueuedMessage,
    QueueRef,
    Suppression,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def fair_shares(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as integers allow, the
    larger shares first (``fair_shares(10, 3) == [4, 3, 3]``)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class PartitionedQueue:
    """The outbound queue: one :class:`OutboundQueue` per mail shard."""

    def __init__(
        self, partitions: Mapping[str, OutboundQueue], *, closed: Iterable[str] = ()
    ) -> None:
        if not partitions:
            raise errors.invalid("the outbound queue needs at least one partition")
        self.partitions = dict(partitions)
        self._order = sorted(self.partitions)
        self._closed = set(closed) & set(self.partitions)
        # Enqueues and leases turn separately: a worker woken by each enqueue
        # leases before the next one, which must still go to the next partition.
        self._next_enqueue = itertools.count()
        self._next_lease = itertools.count()
        self._down: set[str] = set()
        # Called after each enqueue commits, in any partition (workers wake).
        self.listeners: list[Callable[[], None]] = []
        for part in self.partitions.values():
            part.listeners = self.listeners

    # -- partitions and their health ----------------------------------------

    def _rotation(self, turn: itertools.count) -> list[str]:
        """Every partition, starting one further than ``turn``'s last call."""
        start = next(turn) % len(self._order)
        return self._order[start:] + self._order[:start]

    def _failed(self, name: str, exc: StorageError) -> None:
        if name not in self._down:
            self._down.add(name)
            log.warning("outbound queue partition %s unavailable: %s", name, exc)

    def _answered(self, name: str) -> None:
        if name in self._down:
            self._down.discard(name)
            log.warning("outbound queue partition %s available again", name)

    async def _ask(self, name: str, call: Awaitable[T]) -> T | StorageError:
        """``call`` on partition ``name``; its StorageError returned, not raised.
        Only a lease or an enqueue that went through marks a partition up
        again: other calls may answer without asking the database."""
        try:
            return await call
        except StorageError as exc:
            if exc.kind is ErrorKind.TEMPORARY:
                self._failed(name, exc)
            return exc

    async def _each(
        self, op: Callable[[OutboundQueue], Awaitable[T]]
    ) -> dict[str, T | StorageError]:
        """``op`` on every partition at once: each one's result or error."""
        names = self._order
        if len(names) == 1:  # one shard (the embedded default): no task to gather
            return {names[0]: await self._ask(names[0], op(self.partitions[names[0]]))}
        answers = await asyncio.gather(*(self._ask(n, op(self.partitions[n])) for n in names))
        return dict(zip(names, answers, strict=True))

    async def _all(self, op: Callable[[OutboundQueue], Awaitable[T]]) -> list[T]:
        """``op`` on every partition; the first error is raised after every
        partition has answered (the others have done their part)."""
        answers = await self._each(op)
        for name, answer in answers.items():
            if isinstance(answer, StorageError):
                raise StorageError(answer.kind, f"queue partition {name}: {answer}")
        return list(answers.values())  # type: ignore[arg-type]

    def _of(self, queue_id: QueueRef | int) -> OutboundQueue:
        ref = queue_id if isinstance(queue_id, QueueRef) else QueueRef(DEFAULT_PARTITION, queue_id)
        try:
            return self.partitions[ref.partition]
        except KeyError:
            raise errors.not_found(f"no such queue entry: {ref}") from None

    # -- the inbound side ----------------------------------------------------

    async def enqueue(
        self,
        sender: str,
        recipients: Iterable[str],
        blob_key: str,
        *,
        expires_in: dt.timedelta = DEFAULT_EXPIRY,
        now: float | None = None,
        held_for: str | None = None,
        blob_keys: tuple[Collection[str] | None, Mapping[str, int]] | None = None,
        dsn: DsnEnvelope | None = None,
        recipient_dsn: Mapping[str, DsnRecipient] | None = None,
    ) -> QueueRef:
        """Queues ``blob_key`` in one partition, the next in turn that is up;
        durable when it returns. INVALID with no recipients; TEMPORARY only
        when every partition failed. ``blob_keys``: as
        ``OutboundQueue.enqueue``'s; ``BlobsBeingDeleted`` is raised at once
        (every partition would say the same). ``dsn``, ``recipient_dsn``: the
        RFC 3461 parameters, as ``OutboundQueue.enqueue`` stores them."""
        rcpts = list(recipients)
        extra = {k: v for k, v in (("dsn", dsn), ("recipient_dsn", recipient_dsn)) if v}
        last: StorageError | None = None
        turn = self._rotation(self._next_enqueue)
        for name in [n for n in turn if n not in self._closed] + sorted(self._closed):
            part = self.partitions[name]
            answer = await self._ask(
                name,
                part.enqueue(sender, rcpts, blob_key, expires_in=expires_in, now=now)
                if held_for is None and blob_keys is None and not extra
                else part.enqueue(
                    sender,
                    rcpts,
                    blob_key,
                    expires_in=expires_in,
                    now=now,
                    held_for=held_for,
                    blob_keys=blob_keys,
                    **extra,
                ),
            )
            if not isinstance(answer, StorageError):
                self._answered(name)
                return answer
            if answer.kind is not ErrorKind.TEMPORARY or isinstance(answer, BlobsBeingDeleted):
                raise answer
            last = answer
        assert last is not None
        raise last

    # -- the workers' side ------------------------------------------------------

    async def lease_due(
        self, owner: str, limit: int, lease_seconds: float, *, now: float | None = None
    ) -> list[QueuedMessage]:
        """Up to ``limit`` due entries from every partition, leased to
        ``owner`` (see the module docstring for fairness and failures)."""
        if limit <= 0:
            return []
        order = self._rotation(self._next_lease)
        shares = fair_shares(limit, len(order))

        async def lease(name: str, count: int) -> list[QueuedMessage]:
            part = self.partitions[name]
            answer = await self._ask(name, part.lease_due(owner, count, lease_seconds, now=now))
            if isinstance(answer, StorageError):
                if answer.kind is not ErrorKind.TEMPORARY:
                    log.warning("outbound queue partition %s: %s", name, answer)
                return []
            self._answered(name)
            return answer

        asked = [(n, s) for n, s in zip(order, shares, strict=True) if s > 0]
        batches = await asyncio.gather(*(lease(n, s) for n, s in asked))
        leased = [m for batch in batches for m in batch]
        # What a partition left unused goes to those that may have more.
        more = [n for (n, s), b in zip(asked, batches, strict=True) if len(b) == s]
        more += [n for n, s in zip(order, shares, strict=True) if s == 0]
        for name in more:
            if len(leased) >= limit:
                break
            leased += await lease(name, limit - len(leased))
        return leased

    async def renew_lease(
        self,
        queue_id: QueueRef | int,
        owner: str,
        lease_seconds: float,
        *,
        now: float | None = None,
    ) -> bool:
        return await self._of(queue_id).renew_lease(queue_id, owner, lease_seconds, now=now)

    async def record_attempt(
        self,
        queue_id: QueueRef | int,
        owner: str,
        outcomes: Mapping[str, Outcome],
        next_attempt: float | None,
        *,
        now: float | None = None,
    ) -> QueuedMessage:
        part = self._of(queue_id)
        return await part.record_attempt(queue_id, owner, outcomes, next_attempt, now=now)

    async def release(self, queue_id: QueueRef | int, owner: str) -> None:
        await self._of(queue_id).release(queue_id, owner)

    async def mark_warned(self, queue_id: QueueRef | int) -> None:
        await self._of(queue_id).mark_warned(queue_id)

    async def move_to_errors(self, queue_id: QueueRef | int, reason: str) -> None:
        await self._of(queue_id).move_to_errors(queue_id, reason)

    async def purge_done(self, older_than: float, *, now: float | None = None) -> int:
        """Purges every partition that answers; the count of entries removed."""
        answers = await self._each(lambda p: p.purge_done(older_than, now=now))
        return sum(a for a in answers.values() if not isinstance(a, StorageError))

    # -- admin operations ------------------------------------------------------

    async def get(self, queue_id: QueueRef | int) -> QueuedMessage:
        return await self._of(queue_id).get(queue_id)

    async def hold(self, queue_id: QueueRef | int) -> None:
        await self._of(queue_id).hold(queue_id)

    async def release_hold(self, queue_id: QueueRef | int) -> None:
        await self._of(queue_id).release_hold(queue_id)

    async def hold_sender(self, sender: str, reason: str) -> int:
        """Holds every queued entry from ``sender`` in every partition that
        answers (delivery/limits.py); how many. A partition that is down
        is skipped (and logged): the account's flag still holds its new mail."""
        answers = await self._each(lambda p: p.hold_sender(sender, reason))
        return sum(a for a in answers.values() if not isinstance(a, StorageError))

    async def flag(self, address: str, reason: str, *, now: float | None = None) -> int:
        """Flags ``address`` as held for a sending limit in its home partition
        and holds its queued entries everywhere, with ``reason``; how many.
        Raises the home partition's error (the flag is not set) after the
        others have held theirs; another partition down is skipped."""
        home = self._home(address)
        answers = await self._each(
            lambda p: (
                p.flag(address, reason, now=now) if p is home else p.hold_sender(address, reason)
            )
        )
        if isinstance(failed := answers[self._home_name(address)], StorageError):
            raise failed
        return sum(a for a in answers.values() if not isinstance(a, StorageError))

    async def is_flagged(self, address: str) -> bool:
        """Whether ``address`` is flagged in any partition that answers;
        TEMPORARY if none is and its home partition did not answer."""
        answers = await self._each(lambda p: p.is_flagged(address))
        if any(a is True for a in answers.values()):
            return True
        if isinstance(failed := answers[self._home_name(address)], StorageError):
            raise failed
        return False

    async def release_account(
        self, address: str, reason_prefix: str
    ) -> dict[str, tuple[int, bool] | StorageError]:
        """``OutboundQueue.release_flagged`` in every partition: each one's
        (entries released, flag cleared there) or its error."""
        return await self._each(lambda p: p.release_flagged(address, reason_prefix))

    async def delete(self, queue_id: QueueRef | int) -> None:
        await self._of(queue_id).delete(queue_id)

    async def retry_now(
        self, queue_id: QueueRef | int | None = None, *, now: float | None = None
    ) -> int:
        """One entry due now, or (None) every queued and error entry of
        every partition; how many changed."""
        if queue_id is not None:
            return await self._of(queue_id).retry_now(queue_id, now=now)
        return sum(await self._all(lambda p: p.retry_now(now=now)))

    async def list(self, *, include_done: bool = True) -> list[QueuedMessage]:
        """Every partition's entries, oldest first; TEMPORARY if one is down."""
        batches = await self._all(lambda p: p.list(include_done=include_done))
        return sorted((m for b in batches for m in b), key=lambda m: (m.created, m.id))

    async def list_by_partition(
        self, *, include_done: bool = True
    ) -> dict[str, list[QueuedMessage] | StorageError]:
        """Each partition's entries, or the error it answered with."""
        return await self._each(lambda p: p.list(include_done=include_done))

    async def stats(self, *, now: float | None = None) -> dict[str, PartitionStats | StorageError]:
        """Each partition's entries counted by state, or its error."""
        return await self._each(lambda p: p.stats(now=now))

    async def referenced_blobs(self) -> set[str]:
        """Blob keys every partition refers to; TEMPORARY if one is down
        (garbage collection must not guess)."""
        return set().union(*await self._all(lambda p: p.referenced_blobs()))

    # -- bounces and suppression ----------------------------------------------

    def _home_name(self, address: str) -> str:
        """The name of ``address``'s home partition (rendezvous hashing)."""
        key = address.lower().encode()
        return max(self._order, key=lambda n: hashlib.sha256(n.encode() + b"\0" + key).digest())

    def _home(self, address: str) -> OutboundQueue:
        """The partition counting ``address``'s bounces and holding its flag."""
        return self.partitions[self._home_name(address)]

    async def record_bounce(
        self,
        address: str,
        hard: bool,
        status: str | None,
        diagnostic: str | None,
        *,
        suppress_after: int,
        now: float | None = None,
    ) -> Suppression:
        """Counts a bounce of ``address`` (suppressed after ``suppress_after``
        hard ones; 0 never) and marks the most recent finished recipient row
        of that address, in whichever partition it is, hard or soft."""
        counted = await self._home(address).count_bounce(
            address, hard, status, diagnostic, suppress_after=suppress_after, now=now
        )
        answers = await self._each(lambda p: p.last_finished(address))
        found = [(a, n) for n, a in answers.items() if isinstance(a, tuple)]
        if found:
            (_updated, row), name = max(found)
            await self.partitions[name].set_feedback(row, hard)
        return counted

    async def has_sent_to(self, address: str) -> bool:
        """True if any partition that answers has a delivered or failed
        recipient row of ``address`` (case-blind): we sent it mail lately."""
        answers = await self._each(lambda p: p.last_finished(address))
        return any(isinstance(a, tuple) for a in answers.values())

    async def suppressed(self, addresses: Iterable[str]) -> set[str]:
        """The lower-cased addresses suppressed in any partition that answers
        (a partition down costs at most an extra delivery attempt)."""
        wanted = list(addresses)
        answers = await self._each(lambda p: p.suppressed(wanted))
        return set().union(*(a for a in answers.values() if not isinstance(a, StorageError)))

    async def list_suppressions(self) -> list[Suppression]:
        """Every partition's suppression list, by address."""
        rows = [s for batch in await self._all(lambda p: p.list_suppressions()) for s in batch]
        return sorted(rows, key=lambda s: (s.address, s.updated))

    async def unsuppress(self, address: str) -> None:
        """Forgets the address's bounces everywhere. NOT_FOUND if none had any."""
        answers = await self._each(lambda p: p.unsuppress(address))
        failed = [a for a in answers.values() if isinstance(a, StorageError)]
        if len(failed) == len(answers):
            temporary = [a for a in failed if a.kind is ErrorKind.TEMPORARY]
            raise temporary[0] if temporary else failed[0]
        for error in failed:
            if error.kind is not ErrorKind.NOT_FOUND:
                raise error

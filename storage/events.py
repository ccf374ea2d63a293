"""The in-process event bus: committed changes to IDLE, POP3 and WebSocket
sessions of this process (the embedded default; PostgreSQL NOTIFY or Redis
carry changes across instances).

Delivery is best effort and at most once: each subscription has a bounded
queue and, when a slow consumer lets it fill, the oldest change is dropped.
A consumer that must not miss anything resyncs from
``MailStore.account_changes`` after the last change id it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from storage.model import Change, ChangeKind

log = logging.getLogger(__name__)

SUBSCRIPTION_QUEUE_SIZE = 1024


class InProcessSubscription:
    """An async iterator of one account's changes; ``close`` ends it."""

    def __init__(self, bus: InProcessEventBus, account_id: int, maxsize: int) -> None:
        self.account_id = account_id
        self._bus = bus
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue(maxsize)
        self.closed = False
        self.dropped = 0  # changes lost to overflow; the consumer should resync

    def _offer(self, change: Change | None) -> None:
        while True:
            try:
                self._queue.put_nowait(change)
                return
            except asyncio.QueueFull:
                # Drop-oldest: the newest change tells the consumer most.
                self._queue.get_nowait()
                self.dropped += 1

    async def get(self, timeout: float | None = None) -> Change | None:
        """The next change, or None on timeout or once closed."""
        if self.closed and self._queue.empty():
            return None
        try:
            change = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if change is None:  # the close sentinel
            return None
        return change

    def __aiter__(self) -> AsyncIterator[Change]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Change]:
        while True:
            change = await self.get()
            if change is None:
                return
            yield change

    def close(self) -> None:
        """Ends the subscription; a pending ``get`` returns None."""
        if self.closed:
            return
        self.closed = True
        self._bus._remove(self)
        self._offer(None)


class InProcessEventBus:
    """Fans each published change out to the account's subscriptions."""

    def __init__(self, queue_size: int = SUBSCRIPTION_QUEUE_SIZE) -> None:
        self._queue_size = queue_size
        self._subs: dict[int, set[InProcessSubscription]] = {}

    async def publish(self, change: Change) -> None:
        """Never blocks on a slow subscriber."""
        self.deliver(change)

    def deliver(self, change: Change) -> None:
        """Hands ``change`` to this process's subscribers (synchronous)."""
        for sub in tuple(self._subs.get(change.account_id, ())):
            sub._offer(change)

    def subscribe(self, account_id: int) -> InProcessSubscription:
        sub = InProcessSubscription(self, account_id, self._queue_size)
        self._subs.setdefault(account_id, set()).add(sub)
        return sub

    def subscriber_count(self, account_id: int) -> int:
        return len(self._subs.get(account_id, ()))

    def _remove(self, sub: InProcessSubscription) -> None:
        subs = self._subs.get(sub.account_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.account_id]

    async def close(self) -> None:
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close()


# --- PostgreSQL LISTEN/NOTIFY: the same changes on every instance ------------

NOTIFY_CHANNEL = "shardmail_changes"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; bigger changes
# travel without their ``data`` (subscribers resync from the change log).
MAX_NOTIFY_PAYLOAD = 7900
RECONNECT_DELAY = 1.0


def change_to_json(change: Change) -> str:
    body: dict[str, Any] = {
        "id": change.id,
        "account_id": change.account_id,
        "kind": change.kind.value,
        "mailbox_id": change.mailbox_id,
        "uid": change.uid,
        "modseq": change.modseq,
        "at": change.at.timestamp(),
        "data": change.data,
    }
    text = json.dumps(body, separators=(",", ":"))
    if len(text.encode()) > MAX_NOTIFY_PAYLOAD:
        body["data"] = {"truncated": True}
        text = json.dumps(body, separators=(",", ":"))
    return text


def change_from_json(text: str) -> Change:
    d = json.loads(text)
    return Change(
        id=d["id"],
        account_id=d["account_id"],
        kind=ChangeKind(d["kind"]),
        mailbox_id=d["mailbox_id"],
        uid=d["uid"],
        modseq=d["modseq"],
        at=dt.datetime.fromtimestamp(d["at"], dt.UTC),
        data=d["data"],
    )


class PgNotifyEventBus:
    """Carries changes between instances sharing a PostgreSQL database.

    ``publish`` sends ``NOTIFY``; every instance (this one included) LISTENs
    and hands what arrives to its local subscribers, so each change reaches
    each subscriber once. Best effort like every bus: if PostgreSQL is
    unreachable the change goes to local subscribers only and remote ones
    catch up from the change log.
    """

    def __init__(self, dsn: str, queue_size: int = SUBSCRIPTION_QUEUE_SIZE) -> None:
        self._dsn = dsn
        self._local = InProcessEventBus(queue_size)
        self._listener: Any = None
        self._publisher: Any = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._reconnect: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connects the listener; raises if PostgreSQL cannot be reached."""
        await self._listen()

    async def _listen(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_lost)
        self._listener = conn

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            change = change_from_json(payload)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed change notification")
            return
        self._local.deliver(change)

    def _on_lost(self, _conn: Any) -> None:
        if not self._closed and (self._reconnect is None or self._reconnect.done()):
            self._reconnect = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        while not self._closed:
            await asyncio.sleep(RECONNECT_DELAY)
            try:
                await self._listen()
                return
            except (OSError, Exception) as exc:  # asyncpg raises many kinds
                log.warning("event listener reconnect failed: %s", exc)

    async def publish(self, change: Change) -> None:
        payload = change_to_json(change)
        try:
            async with self._lock:
                if self._publisher is None or self._publisher.is_closed():
                    import asyncpg

                    self._publisher = await asyncpg.connect(self._dsn)
                await self._publisher.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
        except Exception as exc:  # never fail the write that already committed
            log.warning("change notification failed, delivering locally: %s", exc)
            self._local.deliver(change)
            return
        if self._listener is None or self._listener.is_closed():
            self._local.deliver(change)  # our own listener is down: local delivery

    def subscribe(self, account_id: int) -> InProcessSubscription:
        return self._local.subscribe(account_id)

    def subscriber_count(self, account_id: int) -> int:
        return self._local.subscriber_count(account_id)

    async def close(self) -> None:
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        for conn in (self._listener, self._publisher):
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await conn.close()
        await self._local.close()

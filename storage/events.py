"""Event buses: committed changes to IDLE, POP3 and WebSocket sessions.

The in-process bus reaches the sessions of this process (the embedded
default); the local socket bus carries changes between the processes of one
host sharing a SQLite database; PostgreSQL NOTIFY (or Redis) carries them
across instances.

Delivery is best effort and at most once: each subscription has a bounded
queue and, when a slow consumer lets it fill, the oldest change is dropped.
A consumer that must not miss anything resyncs from
``MailStore.account_changes`` after the last change id it saw.

Every bus also carries route changes (an account now on another shard, see
``SqlDirectory.set_shard``) to every instance, subscribed or not: each one
calls its route watchers, which drop the cached route.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import errno
import json
import logging
import math
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from storage.model import Change, ChangeKind
from storage.tasks import stop_task

log = logging.getLogger(__name__)

SUBSCRIPTION_QUEUE_SIZE = 1024

# ``watcher(account_id, shard)``: the account is on ``shard`` now;
# ``watcher(None, None)``: route changes may have been missed (the bus
# reconnected), every cached route is suspect.
RouteWatcher = Callable[[int | None, str | None], None]


def route_payload(account_id: int, shard: str) -> str:
    """``"<account id> <shard>"``: shard names hold no space (conf/settings.py)."""
    return f"{account_id} {shard}"


def parse_route(payload: str) -> tuple[int, str] | None:
    """The inverse of :func:`route_payload`; None (logged) if malformed."""
    account, _, shard = payload.partition(" ")
    try:
        if shard and " " not in shard:
            return int(account), shard
    except ValueError:
        pass
    log.warning("ignoring a malformed route notification")
    return None


class InProcessSubscription:
    """An async iterator of one account's changes; ``close`` ends it.

    One consumer at a time. Held by every logged-in IMAP session for as
    long as it is open (issue #24), so an idle one costs little: the
    pending changes' deque exists only while changes wait, and a future
    only while the consumer waits (``asyncio.Queue`` kept four deques,
    about 3 KB, per subscription)."""

    def __init__(self, bus: InProcessEventBus, account_id: int, maxsize: int) -> None:
        self.account_id = account_id
        self._bus = bus
        self._maxsize = maxsize  # 0: unbounded
        self._pending: collections.deque[Change | None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.dropped = 0  # changes lost to overflow; the consumer should resync

    def _offer(self, change: Change | None) -> None:
        pending = self._pending
        if pending is None:
            pending = self._pending = collections.deque()
        if self._maxsize and len(pending) >= self._maxsize:
            # Drop-oldest: the newest change tells the consumer most.
            pending.popleft()
            self.dropped += 1
        pending.append(change)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pending_changes(self) -> tuple[Change | None, ...]:
        """The changes waiting to be taken, oldest first (a copy)."""
        return tuple(self._pending or ())

    def _take(self) -> Change | None:
        pending = self._pending
        assert pending
        change = pending.popleft()
        if not pending:
            self._pending = None
        return change

    async def get(self, timeout: float | None = None) -> Change | None:
        """The next change, or None on timeout or once closed."""
        if not self._pending:  # else the usual case under load: no waiting
            if self.closed:
                return None
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                return None
            finally:
                self._waiter = None
            if not self._pending:
                return None
        return self._take()  # None: the close sentinel

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
        self._route_watchers: list[RouteWatcher] = []

    def watch_routes(self, watcher: RouteWatcher) -> None:
        """Calls ``watcher`` for every route change this bus carries (see
        :data:`RouteWatcher`), synchronously in the event loop."""
        self._route_watchers.append(watcher)

    async def publish_route(self, account_id: int, shard: str) -> None:
        """Tells every instance that the account is on ``shard`` now."""
        self.deliver_route(account_id, shard)

    def deliver_route(self, account_id: int | None, shard: str | None) -> None:
        """Hands a route change to this process's watchers."""
        for watcher in tuple(self._route_watchers):
            watcher(account_id, shard)

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
ROUTE_CHANNEL = "shardmail_routes"  # route_payload() of each account moved
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; bigger changes
# travel without their ``data`` (subscribers resync from the change log).
MAX_NOTIFY_PAYLOAD = 7900
RECONNECT_DELAY = 1.0
CLOSE_TIMEOUT = 5.0  # seconds a closing connection waits for the server
# Every bus's listener session carries this application_name: a bus NOTIFYs
# changes only while another instance's listener is connected to the
# database (pg_stat_activity), asked at most every PEER_CHECK_SECONDS. A
# listener that connects says so on PEER_CHANNEL, so the others send again
# at once rather than up to PEER_CHECK_SECONDS later.
LISTENER_NAME = "shardmail-events"
PEER_CHANNEL = "shardmail_peers"
PEER_CHECK_SECONDS = 1.0
_PEERS_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = $1 AND pid <> $2)"
)


# One encoder for every change: json.dumps with non-default separators
# builds a new JSONEncoder on each call, a third of the cost of a small one.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def compact_json(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))``, without its per-call setup."""
    return _COMPACT.encode(value)


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
    text = _COMPACT.encode(body)
    if len(text.encode()) > MAX_NOTIFY_PAYLOAD:
        body["data"] = {"truncated": True}
        text = _COMPACT.encode(body)
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


def asyncpg_connect_args(url: str) -> dict[str, Any]:
    """The ``asyncpg.connect`` arguments for ``url`` (libpq or SQLAlchemy
    form), read as SQLAlchemy's asyncpg dialect reads an engine's URL: a
    multi-host URL (``?host=h1:p1&host=h2:p2``, as a shard with replicas
    has) gives every host, in order. (asyncpg's own DSN parser keeps only
    the last ``host`` parameter: the listener would reconnect to one host
    and never find a promoted replica.)"""
    from sqlalchemy import make_url
    from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

    _, kwargs = PGDialect_asyncpg().create_connect_args(make_url(url))
    for key in _SQLALCHEMY_ONLY:
        kwargs.pop(key, None)
    return kwargs


# Query parameters of an engine URL that the dialect takes, not asyncpg.
_SQLALCHEMY_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func")


class _LocalFanOut:
    """What every cross-instance bus shares: this instance's sessions
    subscribe to, and route watchers register with, an in-process bus
    (``self._local``) that the bus feeds with what arrives from elsewhere."""

    _local: InProcessEventBus

    def subscribe(self, account_id: int) -> InProcessSubscription:
        return self._local.subscribe(account_id)

    def subscriber_count(self, account_id: int) -> int:
        return self._local.subscriber_count(account_id)

    def watch_routes(self, watcher: RouteWatcher) -> None:
        self._local.watch_routes(watcher)


class PgNotifyEventBus(_LocalFanOut):
    """Carries changes between instances sharing a PostgreSQL database.

    ``publish`` hands the change to this instance's subscribers at once
    and queues it for the others: one ``NOTIFY`` carries every change
    published meanwhile (a group commit's, one per line), sent by one task
    in publish order, so a commit costs one round trip here and one wakeup
    on each listener, and no caller waits for it. Every instance LISTENs
    and hands what arrives to its local subscribers, skipping what its own
    publisher sent, so each change reaches each subscriber once. While no
    other instance listens (see LISTENER_NAME) no change is sent: a lone
    mtad or imapd pays no NOTIFY per commit. Best effort like every bus:
    if PostgreSQL is unreachable remote subscribers catch up from the
    change log (an IMAP session polls it, ``FORCED_POLL_INTERVAL``).
    """

    def __init__(self, dsn: str, queue_size: int = SUBSCRIPTION_QUEUE_SIZE) -> None:
        self._connect_args = asyncpg_connect_args(dsn)
        self._local = InProcessEventBus(queue_size)
        self._listener: Any = None
        self._publisher: Any = None
        self._publisher_pid: int | None = None  # its server process: our own NOTIFYs
        self._outbox: collections.deque[str] = collections.deque()  # JSON, not yet sent
        self._sender: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._reconnect: asyncio.Task[None] | None = None
        self._peers = True  # whether another instance listens, as last asked
        self._peers_until = 0.0  # the loop's time until which that answer holds

    async def start(self) -> None:
        """Connects the listener; raises if PostgreSQL cannot be reached."""
        await self._listen()

    async def _connect(self, **settings: str) -> Any:
        """A new connection: each listed host in turn (a failover's new
        primary is found through the same host list as the engine's);
        ``settings``: server settings of its session, beside the URL's."""
        from storage.sql.db import connect_each_host

        args = dict(self._connect_args)
        if settings:
            args["server_settings"] = {**args.get("server_settings", {}), **settings}
        return await connect_each_host(**args)

    async def _listen(self) -> None:
        # Its one NOTIFY (the hello) need not wait for a WAL flush either.
        conn = await self._connect(application_name=LISTENER_NAME, synchronous_commit="off")
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        await conn.add_listener(ROUTE_CHANNEL, self._on_route)
        await conn.add_listener(PEER_CHANNEL, self._on_peer)
        conn.add_termination_listener(self._on_lost)
        self._listener = conn
        await conn.execute(f"NOTIFY {PEER_CHANNEL}")

    def _on_peer(self, conn: Any, pid: int, _channel: str, _payload: str) -> None:
        """Another instance's listener connected: send to it from now on."""
        if pid != conn.get_server_pid():
            self._peers = True
            self._peers_until = asyncio.get_running_loop().time() + PEER_CHECK_SECONDS

    async def _peers_listening(self) -> bool:
        """Whether another instance's listener is connected (pg_stat_activity),
        asked at most every PEER_CHECK_SECONDS; True when it cannot tell."""
        now = asyncio.get_running_loop().time()
        if now < self._peers_until:
            return self._peers
        listener = self._listener
        mine = 0 if listener is None or listener.is_closed() else listener.get_server_pid()
        try:
            async with self._lock:
                publisher = await self._publisher_conn()
                self._peers = bool(await publisher.fetchval(_PEERS_SQL, LISTENER_NAME, mine))
        except Exception as exc:  # asyncpg raises many kinds
            log.warning("cannot tell whether other instances listen: %s", exc)
            return True
        self._peers_until = now + PEER_CHECK_SECONDS
        return self._peers

    def _on_route(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        route = parse_route(payload)
        if route is not None:
            self._local.deliver_route(*route)

    def _on_notify(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid == self._publisher_pid:
            return  # delivered here when published
        for line in payload.split("\n"):
            try:
                change = change_from_json(line)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed change notification")
                continue
            self._local.deliver(change)

    def _on_lost(self, _conn: Any) -> None:
        if not self._closed and (self._reconnect is None or self._reconnect.done()):
            self._reconnect = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        while not self._closed:
            await asyncio.sleep(RECONNECT_DELAY)
            try:
                await self._listen()
                # Route changes sent while we were away are lost: forget all.
                self._local.deliver_route(None, None)
                return
            except (OSError, Exception) as exc:  # asyncpg raises many kinds
                log.warning("event listener reconnect failed: %s", exc)

    async def publish(self, change: Change) -> None:
        self._local.deliver(change)
        self._outbox.append(change_to_json(change))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_outbox())

    async def _send_outbox(self) -> None:
        """NOTIFYs until the outbox is empty: each takes every change queued
        meanwhile, one per line, up to the payload limit (JSON of a change
        holds no raw newline)."""
        while self._outbox:
            if not await self._peers_listening():
                self._outbox.clear()  # this instance's subscribers have them
                return
            batch: list[str] = []
            size = 0
            while self._outbox and (
                not batch or size + len(self._outbox[0].encode()) < MAX_NOTIFY_PAYLOAD
            ):
                line = self._outbox.popleft()
                batch.append(line)
                size += len(line.encode()) + 1
            await self._notify(NOTIFY_CHANNEL, "\n".join(batch))

    async def publish_route(self, account_id: int, shard: str) -> None:
        if not await self._notify(ROUTE_CHANNEL, route_payload(account_id, shard)):
            self._local.deliver_route(account_id, shard)

    async def _notify(self, channel: str, payload: str) -> bool:
        """NOTIFY; False if our own listener will not hear it (the caller
        then delivers locally). Never raises: the write has committed."""
        try:
            async with self._lock:
                publisher = await self._publisher_conn()
                await publisher.execute("SELECT pg_notify($1, $2)", channel, payload)
        except Exception as exc:  # never fail the write that already committed
            log.warning("notification on %s failed, delivering locally: %s", channel, exc)
            return False
        # Our own listener is down: local delivery.
        return self._listener is not None and not self._listener.is_closed()

    async def _publisher_conn(self) -> Any:
        """The connection NOTIFYs go out on (under ``self._lock``)."""
        if self._publisher is None or self._publisher.is_closed():
            # NOTIFY gives its transaction an id, so its COMMIT would wait for
            # a WAL flush (an fsync per commit of ours) that nothing needs:
            # the notification goes out at the commit either way, and is best
            # effort (subscribers catch up from the change log, which
            # committed durably before).
            self._publisher = await self._connect(synchronous_commit="off")
            self._publisher_pid = self._publisher.get_server_pid()
        return self._publisher

    async def close(self) -> None:
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._sender is not None:
            # What was published before close still reaches the others.
            await asyncio.wait([self._sender], timeout=5)
            self._sender.cancel()
        for conn in (self._listener, self._publisher):
            if conn is not None and not conn.is_closed():
                # A graceful close waits for the server's answer; one that
                # does not answer must not hold a daemon's shutdown forever.
                try:
                    await conn.close(timeout=CLOSE_TIMEOUT)
                except Exception:
                    conn.terminate()
        await self._local.close()


# --- Unix datagram sockets: the same changes in every process on one host ---

# How long a listing of the peers' sockets is trusted: a process started
# since is reached at most this late (its IDLE sessions poll meanwhile).
PEER_LIST_TTL = 1.0
# The receive buffer: change_to_json stays under MAX_NOTIFY_PAYLOAD, so a
# longer datagram (cut short here, then malformed) came from elsewhere.
MAX_DATAGRAM = 65536
# Datagrams read per wakeup, so a flood cannot starve the sessions' tasks.
MAX_DRAIN = 256
# sun_path holds 108 bytes on Linux (unix(7)); longer paths go through
# /proc/self/fd/N of the open directory instead.
MAX_SUN_PATH = 107
SOCKET_SUFFIX = ".sock"
# The empty datagram a bus sends when it starts: its peers list the
# directory again, so they reach it from their next publish on.
HELLO = b""
# A route change's datagram: this prefix, then route_payload().
ROUTE_DATAGRAM = b"route "


class LocalSocketEventBus(_LocalFanOut):
    """Carries changes between the processes of one host sharing a SQLite
    database (mtad, imapd and httpapi run as separate systemd units).

    Every bus binds one Unix datagram socket in ``directory`` (created mode
    0700: every process must run as the same user). ``publish`` hands the
    change to this process's subscribers directly, then sends it as one
    datagram to every other socket there; what arrives goes to the local
    subscribers. Each subscriber of each process sees a change at most once.
    The directory is listed at most every PEER_LIST_TTL; a bus that starts
    announces itself with an empty datagram so its peers list again at once.

    Best effort, like every bus: ``publish`` never blocks and never raises;
    a datagram is dropped when a peer's receive queue is full (a slow or
    stuck process) or the payload is too big, and a socket file whose
    process died is unlinked. One host only. A consumer that must not miss
    anything resyncs from ``MailStore.account_changes``.

    Call ``start`` (in the event loop that will use the bus) before
    ``publish``; until then, or if the socket cannot be made (logged),
    changes reach local subscribers only: push across processes is not
    worth refusing to serve mail over.
    """

    def __init__(self, directory: Path | str, queue_size: int = SUBSCRIPTION_QUEUE_SIZE) -> None:
        self.directory = Path(directory)
        self._local = InProcessEventBus(queue_size)
        self._sock: socket.socket | None = None
        self._dir_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.name = f"{os.getpid()}-{secrets.token_hex(8)}{SOCKET_SUFFIX}"
        self._peers: list[str] = []  # socket file names of the other buses
        self._addresses: dict[str, str] = {}  # socket file name -> sendto address
        self._peers_listed = -math.inf  # loop time of the last listing
        self._closed = False

    @property
    def path(self) -> Path:
        """This bus's own socket file."""
        return self.directory / self.name

    async def start(self) -> None:
        """Creates the directory, binds the socket and starts reading.
        Never raises: without a socket the bus stays local (a warning)."""
        if self._sock is not None or self._closed:
            return
        try:
            sock, dir_fd = await asyncio.to_thread(self._bind)
        except OSError as exc:
            log.warning(
                "no event socket in %s, push stays in this process: %s", self.directory, exc
            )
            return
        self._sock, self._dir_fd = sock, dir_fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._list_peers()
        self._send_to_peers(HELLO, "hello")

    def _bind(self) -> tuple[socket.socket, int]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Python sockets are close-on-exec (PEP 446): a spawned helper holds no peer.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(self._address(self.name, dir_fd))
        except BaseException:
            sock.close()
            os.close(dir_fd)
            raise
        return sock, dir_fd

    def _address(self, name: str, dir_fd: int | None = None) -> str:
        address = self._addresses.get(name) if dir_fd is None else None
        if address is None:
            path = str(self.directory / name)
            if len(os.fsencode(path)) <= MAX_SUN_PATH:
                address = path
            else:
                address = f"/proc/self/fd/{self._dir_fd if dir_fd is None else dir_fd}/{name}"
            if dir_fd is None:
                self._addresses[name] = address
        return address

    def _list_peers(self) -> None:
        # A small local directory, listed at most once per PEER_LIST_TTL:
        # microseconds inline, where a thread hop would delay every push.
        assert self._loop is not None
        self._peers_listed = self._loop.time()
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            log.warning("cannot list event sockets in %s: %s", self.directory, exc)
            self._peers = []
            return
        self._peers = [n for n in names if n.endswith(SOCKET_SUFFIX) and n != self.name]
        self._addresses = {n: a for n, a in self._addresses.items() if n in self._peers}

    async def publish(self, change: Change) -> None:
        """Local subscribers first, then one datagram per peer; never blocks."""
        self._local.deliver(change)
        if not self._have_peers():
            return  # no other process on this host: nothing to encode
        # The account id first, so a receiver where nobody follows that
        # account drops the datagram without decoding it.
        payload = b"%d %s" % (change.account_id, change_to_json(change).encode())
        if len(payload) > MAX_DATAGRAM:
            log.warning("change %s too big for a datagram (%d bytes)", change.id, len(payload))
            return
        self._send_to_peers(payload, f"change {change.id}")

    async def publish_route(self, account_id: int, shard: str) -> None:
        """This process's watchers, then one datagram per peer; never blocks."""
        self._local.deliver_route(account_id, shard)
        if self._have_peers():
            payload = ROUTE_DATAGRAM + route_payload(account_id, shard).encode()
            self._send_to_peers(payload, f"route of account {account_id}")

    def _have_peers(self) -> bool:
        """Whether any other process may hear us (the peer list refreshed)."""
        if self._sock is None or self._loop is None:
            return False
        self._on_readable()  # a pending hello from a new peer: include it now
        if self._loop.time() - self._peers_listed >= PEER_LIST_TTL:
            self._list_peers()
        return bool(self._peers)

    def _send_to_peers(self, payload: bytes, what: str) -> None:
        sock = self._sock
        assert sock is not None
        stale: list[str] = []
        for name in self._peers:
            try:
                sock.sendto(payload, self._address(name))
            except (BlockingIOError, InterruptedError):
                pass  # the peer's queue is full: it resyncs from the change log
            except (ConnectionRefusedError, FileNotFoundError):
                stale.append(name)  # its process died without unlinking
            except OSError as exc:  # ENOBUFS, EMSGSIZE, EACCES: drop this one
                if exc.errno == errno.ENOBUFS:
                    continue
                log.warning("%s not sent to %s: %s", what, name, exc)
        for name in stale:
            self._unlink_stale(name)

    def _unlink_stale(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / name)
            log.info("removed the stale event socket %s", name)
        self._peers_listed = -math.inf  # list again on the next publish

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(MAX_DRAIN):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("event socket receive failed: %s", exc)
                return
            if data == HELLO:
                self._peers_listed = -math.inf  # a new peer: list on the next publish
                continue
            if data.startswith(ROUTE_DATAGRAM):
                route = parse_route(data[len(ROUTE_DATAGRAM) :].decode(errors="replace"))
                if route is not None:
                    self._local.deliver_route(*route)
                continue
            account, _, body = data.partition(b" ")
            try:
                if not self._local.subscriber_count(int(account)):
                    continue  # nobody here follows that account: not worth decoding
                change = change_from_json(body.decode())
            except Exception:  # anything a stray sender wrote: never the reader's end
                log.warning("ignoring a malformed change datagram")
                continue
            self._local.deliver(change)

    async def close(self) -> None:
        """Stops receiving, removes this bus's socket file and ends every
        local subscription. Idempotent."""
        if self._closed:
            return
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
        await self._local.close()


# --- Redis pub/sub: the same changes on every instance, without PostgreSQL ---

REDIS_CHANGES = "shardmail:changes"
REDIS_ROUTES = "shardmail:routes"
# Messages waiting for the sender; when Redis is slower than the commits,
# the oldest are dropped (their subscribers elsewhere resync).
REDIS_OUTBOX_LIMIT = 10_000
# An idle subscription PINGs Redis this often; with no answer for twice as
# long the connection is taken for dead (a host gone without a TCP reset
# would otherwise hold the reader forever) and made again.
REDIS_PING_INTERVAL = 15.0


class RedisEventBus(_LocalFanOut):
    """Carries changes and route changes between instances through Redis
    pub/sub (``[storage] events = "redis"``): an alternative to NOTIFY, and
    the way across instances for a site whose directory is not PostgreSQL.

    ``publish`` hands the change to this instance's subscribers at once
    and queues it; one sender task PUBLISHes what is queued, in order, in
    one pipelined round trip, so no commit waits for Redis. Every
    instance's reader hands what arrives to its own subscribers, skipping
    what it sent itself (each message starts with the sending bus's
    token), so each subscriber sees a change once. A
    message is ``<token> <account id> <change JSON>`` (a route change:
    ``<token> <route_payload>``), the account first so an instance where
    nobody follows that account drops it undecoded.

    Best effort like every bus, and it never raises: while Redis is
    unreachable changes reach this instance's subscribers only (the others
    resync from the change log); the reader reconnects every
    RECONNECT_DELAY, and then tells the route watchers that routes may have
    been missed (``watcher(None, None)``). Pub/sub keeps nothing: what was
    published while a reader was away is not replayed.
    """

    def __init__(
        self,
        url: str,
        queue_size: int = SUBSCRIPTION_QUEUE_SIZE,
        timeout: float = 0.5,
        ping_interval: float = REDIS_PING_INTERVAL,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._local = InProcessEventBus(queue_size)
        self._token = secrets.token_hex(8)
        self._publisher: Any = None
        self._listener: Any = None  # the client the pubsub connections come from
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._publish_again_at = -math.inf  # after a failed PUBLISH: not before then
        self._outbox: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=REDIS_OUTBOX_LIMIT
        )
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    def _client(self, read_timeout: float | None) -> Any:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return Redis.from_url(
            self._url,
            socket_timeout=read_timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),  # no waiting: this bus retries on its own terms
            decode_responses=True,
        )

    async def start(self) -> None:
        """Subscribes (so that changes published once this returns arrive)
        and starts the reader. Never raises: Redis unreachable is logged
        and the reader keeps trying."""
        if self._reader is not None or self._closed:
            return
        self._publisher = self._client(self._timeout)
        # Blocking reads without a timeout: an idle channel is not an outage.
        self._listener = self._client(None)
        try:
            await self._subscribe()
        except Exception as exc:  # redis raises its own errors and OSError
            log.warning("event bus: Redis unreachable, changes stay here for now: %s", exc)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _subscribe(self) -> None:
        pubsub = self._listener.pubsub(ignore_subscribe_messages=True)
        try:
            # Bounded: a server that accepts and never answers is unreachable too.
            await asyncio.wait_for(pubsub.subscribe(REDIS_CHANGES, REDIS_ROUTES), self._timeout)
        except BaseException:
            await pubsub.aclose()
            raise
        self._pubsub = pubsub

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()  # when Redis last said anything on this subscription
        while not self._closed:
            if self._pubsub is None:
                try:
                    await self._subscribe()
                except Exception as exc:
                    log.debug("event bus: Redis still unreachable: %s", exc)
                    await asyncio.sleep(RECONNECT_DELAY)
                    continue
                heard = loop.time()
                log.info("event bus: Redis reachable again")
                self._local.deliver_route(None, None)  # route changes may have been missed
            try:
                message = await self._pubsub.get_message(timeout=self._ping_interval)
                if message is not None:
                    heard = loop.time()
                elif loop.time() - heard >= 1.5 * self._ping_interval:
                    raise ConnectionError("Redis did not answer PING")
                else:  # idle: the PONG (or its absence) says whether Redis is there
                    await asyncio.wait_for(self._pubsub.ping(), self._timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event bus: lost Redis, reconnecting: %s", exc)
                pubsub, self._pubsub = self._pubsub, None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            if message is not None and message.get("type") == "message":
                self._on_message(message["channel"], message["data"])

    def _on_message(self, channel: str, data: str) -> None:
        token, _, rest = data.partition(" ")
        if token == self._token:
            return  # delivered here when published
        if channel == REDIS_ROUTES:
            route = parse_route(rest)
            if route is not None:
                self._local.deliver_route(*route)
            return
        account, _, body = rest.partition(" ")
        try:
            if not self._local.subscriber_count(int(account)):
                return  # nobody here follows that account: not worth decoding
            change = change_from_json(body)
        except Exception:  # anything a stray publisher wrote: never the reader's end
            log.warning("ignoring a malformed change message")
            return
        self._local.deliver(change)

    async def publish(self, change: Change) -> None:
        """This instance's subscribers first, then one PUBLISH; never raises."""
        self._local.deliver(change)
        await self._publish(REDIS_CHANGES, f"{change.account_id} {change_to_json(change)}")

    async def publish_route(self, account_id: int, shard: str) -> None:
        self._local.deliver_route(account_id, shard)
        await self._publish(REDIS_ROUTES, route_payload(account_id, shard))

    async def _publish(self, channel: str, payload: str) -> None:
        loop = asyncio.get_running_loop()
        if self._publisher is None or self._closed or loop.time() < self._publish_again_at:
            return  # Redis failed a moment ago: no connect attempt per commit
        self._outbox.append((channel, f"{self._token} {payload}"))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_outbox())

    async def _send_outbox(self) -> None:
        """PUBLISHes until the outbox is empty, everything queued meanwhile
        in one pipeline. A failure drops what is queued (best effort) and
        pauses publishing for RECONNECT_DELAY."""
        loop = asyncio.get_running_loop()
        while self._outbox:
            batch = list(self._outbox)
            self._outbox.clear()
            try:
                async with self._publisher.pipeline(transaction=False) as pipe:
                    for channel, message in batch:
                        pipe.publish(channel, message)
                    await pipe.execute()
            except Exception as exc:  # never the committed write's problem
                if self._publish_again_at == -math.inf:
                    log.warning("event bus: PUBLISH failed, changes stay here for now: %s", exc)
                self._publish_again_at = loop.time() + RECONNECT_DELAY
                self._outbox.clear()
                return
            self._publish_again_at = -math.inf

    async def close(self) -> None:
        """Stops reading, closes the connections, ends every local subscription."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            await stop_task(self._reader)
        if self._sender is not None:
            # What was published before close still reaches the others, if Redis answers.
            await asyncio.wait([self._sender], timeout=self._timeout + 0.5)
            self._sender.cancel()
        for conn in (self._pubsub, self._listener, self._publisher):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.aclose()
        await self._local.close()


EventBusImpl = InProcessEventBus | PgNotifyEventBus | LocalSocketEventBus | RedisEventBus
"""Every bus this module provides (each satisfies ``storage.api.EventBus``)."""

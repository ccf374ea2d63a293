"""Outbound SMTP sessions kept open between deliveries, and the per-domain
connection limit (as Postfix's scache and destination concurrency limit).

Contract of :class:`ConnectionCache`:

* A session is cached under a :class:`SessionKey`: the recipient domain, the
  MX host name, its address and port, and the :class:`TlsIdentity` the
  session was set up under. ``take`` returns only a session whose key is
  *equal* to the one asked for, so a session made under a weaker TLS
  policy (opportunistic, unverified, no TLSA match, MTA-STS testing) never
  carries mail that needs a stricter one (MTA-STS enforce, DANE, REQUIRETLS),
  nor one verified for another name or TLSA record set (:func:`may_reuse`).
* ``slot(domain)`` bounds the sessions *in use* for one domain
  (``queue.per_domain_concurrency``); with the idle ones counted too
  (``opening`` closes an idle session of the domain when a new one would
  exceed the limit), a domain never has more sessions open than the limit.
* An idle session is closed (QUIT) after ``connection_cache_seconds``, after
  ``connection_max_messages`` messages, or when ``connection_cache_size``
  idle sessions are already kept (the oldest goes). A session that gave a
  421 or broke is never cached.
* The caller checks a taken session with RSET (RFC 5321 section 4.1.1.5)
  before the next transaction; one that fails that check was not a delivery
  attempt: the caller drops it and opens a new one.
* ``idle_keys(domain)`` lists the keys of a domain's idle sessions, so a
  delivery may look for one before its MX and address lookups (as Postfix
  searches its cache by destination name first); it still takes a session
  only by its exact key, once the domain's policy gave that key.
* ``close()`` QUITs every idle session; nothing is cached afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from conf.settings import QueueSettings
from mtad.outbound.client import SmtpClient
from mtad.outbound.dane import Tlsa
from mtad.outbound.tlspolicy import HostTls

log = logging.getLogger("mtad.outbound")


@dataclass(frozen=True)
class TlsIdentity:
    """What a session's TLS was set up to guarantee: the policy level, MTA-STS
    testing mode, the TLSA records matched (DANE) and the policy reported
    for TLS-RPT (RFC 8460 section 4.4). The MX name it was verified for is
    in :class:`SessionKey`. ``HostTls.source`` (a label) is left out."""

    level: str
    report_only: bool
    records: tuple[Tlsa, ...]
    policy_type: str
    policy_string: tuple[str, ...]
    mx_host: tuple[str, ...]

    @classmethod
    def of(cls, tls: HostTls) -> TlsIdentity:
        return cls(
            tls.level,
            tls.report_only,
            tls.records,
            tls.policy_type,
            tls.policy_string,
            tls.mx_host,
        )


@dataclass(frozen=True)
class SessionKey:
    """Where a session goes and under which TLS guarantee."""

    domain: str  # the recipient domain: its policy, its TLS-RPT session count
    host: str  # the MX host name: SNI and the name PKIX or DANE-TA verified
    address: str
    port: int
    tls: TlsIdentity


def may_reuse(cached: SessionKey, wanted: SessionKey) -> bool:
    """A session set up as ``cached`` may carry a delivery that needs
    ``wanted``: only the same destination under the same TLS guarantee."""
    return cached == wanted


@dataclass(eq=False)
class CachedSession:
    """One SMTP session and what it has carried."""

    key: SessionKey
    client: SmtpClient
    messages: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class ConnectionCache:
    """Idle sessions by key, and the per-domain session count."""

    def __init__(self, settings: QueueSettings | None) -> None:
        # Read at each use: the settings may change under a running queue.
        self.settings = settings
        self._idle: OrderedDict[CachedSession, None] = OrderedDict()  # oldest first
        self._by_key: dict[SessionKey, list[CachedSession]] = {}
        self._timers: dict[CachedSession, asyncio.TimerHandle] = {}
        self._open: dict[str, int] = {}  # by domain: sessions in use and idle
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._quitting: set[asyncio.Task[None]] = set()
        self._closed = False
        self.opened = 0  # sessions opened (for tests and the bench)
        self.reused = 0  # deliveries on a cached session

    @classmethod
    def disabled(cls) -> ConnectionCache:
        """No caching and no per-domain limit: one session per delivery."""
        return cls(None)

    @property
    def idle_seconds(self) -> float:
        return self.settings.connection_cache_seconds if self.settings else 0.0

    @property
    def max_messages(self) -> int:
        return self.settings.connection_max_messages if self.settings else 1

    @property
    def max_idle(self) -> int:
        return self.settings.connection_cache_size if self.settings else 0

    @property
    def per_domain(self) -> int | None:
        return self.settings.per_domain_concurrency if self.settings else None

    @property
    def idle(self) -> int:
        return len(self._idle)

    def open_sessions(self, domain: str) -> int:
        return self._open.get(domain, 0)

    def slot(self, domain: str) -> asyncio.Semaphore:
        """Held while a delivery uses a session to ``domain``."""
        slot = self._slots.get(domain)
        if slot is None:
            slot = asyncio.Semaphore(self.per_domain or 1_000_000)
            self._slots[domain] = slot
        return slot

    def idle_keys(self, domain: str) -> list[SessionKey]:
        """The keys of the idle sessions to ``domain``, the most recently
        used first, each once (what a delivery may look up before its DNS
        lookups, as Postfix searches its cache by destination name)."""
        keys = [s.key for s in reversed(self._idle) if s.key.domain == domain]
        return list(dict.fromkeys(keys))

    def take(self, key: SessionKey) -> CachedSession | None:
        """The most recently used idle session for ``key`` (unchecked: the
        caller sends RSET), or None."""
        # Listed by key: dict equality is may_reuse's rule.
        found = self._by_key.get(key)
        while found:
            session = found.pop()
            self._unlist(session)
            if session.client.reader.at_eof() or session.client.writer.is_closing():
                self._quit(session)  # the peer closed it while idle
                continue
            self.reused += 1
            return session
        return None

    def opening(self, domain: str) -> None:
        """A new session to ``domain`` is about to be opened: counted, and an
        idle session of the domain closed if the limit would be passed."""
        if self.per_domain is not None and self._open.get(domain, 0) >= self.per_domain:
            for session in self._idle:
                if session.key.domain == domain:
                    self._unlist(session)
                    self._quit(session)
                    break
        self._open[domain] = self._open.get(domain, 0) + 1
        self.opened += 1

    def failed_to_open(self, domain: str) -> None:
        """The session ``opening`` counted never came to be."""
        self._forget(domain)

    async def release(self, session: CachedSession, reusable: bool = True) -> None:
        """The delivery on ``session`` is over: cached if ``reusable`` and
        within the limits, else QUIT (awaited, as without a cache)."""
        if (
            not reusable
            or self._closed
            or self.idle_seconds <= 0
            or session.messages >= self.max_messages
            or self.max_idle <= 0
            or session.client.writer.is_closing()
        ):
            self._forget(session.key.domain)
            await session.client.quit()
            return
        while len(self._idle) >= self.max_idle:
            oldest = next(iter(self._idle))
            self._unlist(oldest)
            self._quit(oldest)
        session.idle_since = time.monotonic()
        self._idle[session] = None
        self._by_key.setdefault(session.key, []).append(session)
        loop = asyncio.get_running_loop()
        self._timers[session] = loop.call_later(self.idle_seconds, self._expire, session)

    def drop(self, session: CachedSession) -> None:
        """The session broke (or failed its check): closed at once, uncounted."""
        session.client.abort()
        self._forget(session.key.domain)

    async def close(self) -> None:
        """QUIT every idle session and wait (bounded by the client's QUIT)."""
        self._closed = True
        for session in list(self._idle):
            self._unlist(session)
            self._quit(session)
        if self._quitting:
            await asyncio.gather(*self._quitting, return_exceptions=True)

    # -- internals -----------------------------------------------------------

    def _expire(self, session: CachedSession) -> None:
        self._timers.pop(session, None)
        if session in self._idle:
            self._unlist(session)
            self._quit(session)

    def _unlist(self, session: CachedSession) -> None:
        self._idle.pop(session, None)
        timer = self._timers.pop(session, None)
        if timer is not None:
            timer.cancel()
        listed = self._by_key.get(session.key)
        if listed is not None:
            if session in listed:
                listed.remove(session)
            if not listed:
                del self._by_key[session.key]

    def _quit(self, session: CachedSession) -> None:
        """QUIT in the background (RFC 5321 section 4.1.1.10); uncounted now."""
        self._forget(session.key.domain)
        task = asyncio.get_running_loop().create_task(session.client.quit())
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    def _forget(self, domain: str) -> None:
        left = self._open.get(domain, 0) - 1
        if left > 0:
            self._open[domain] = left
        else:
            self._open.pop(domain, None)

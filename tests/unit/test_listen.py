"""runtime.listen: every daemon's listener holds a client IP to its
per-protocol connection limit, refusing the next one with that protocol's
own temporary-failure line, and frees the slot when a connection ends
(after STARTTLS too)."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from conf.settings import Settings
from runtime.listen import ConnectRate, PeerLimit

LIMIT = 3


def test_peer_limit_counts_per_ip_and_releases_once() -> None:
    limit = PeerLimit(2)
    first, second = limit.acquire("192.0.2.1"), limit.acquire("192.0.2.1")
    assert first is not None and second is not None
    assert limit.acquire("192.0.2.1") is None
    assert limit.acquire("192.0.2.2") is not None  # another address has its own count
    first.release()
    first.release()  # a second release of one lease frees nothing more
    assert limit.count("192.0.2.1") == 1
    assert limit.acquire("192.0.2.1") is not None
    assert limit.acquire("192.0.2.1") is None


def test_peer_limit_zero_disables_and_exempt_networks_are_not_counted() -> None:
    unlimited = PeerLimit(0)
    assert all(unlimited.acquire("192.0.2.1") for _ in range(1000))
    proxied = PeerLimit(1, ["10.0.0.0/8", "not an address"])
    assert all(proxied.acquire("10.1.2.3") for _ in range(100))
    assert proxied.acquire("192.0.2.1") is not None
    assert proxied.acquire("192.0.2.1") is None


@dataclass
class Listener:
    """How to reach one protocol's listener and what it says."""

    name: str
    setting: str  # the max_connections_per_ip section
    greeting: bytes
    refusal: bytes
    request: bytes = b""  # what a client sends before it reads a reply


async def _start_mtad(settings: Settings, storage: object, tls: ssl.SSLContext) -> tuple:
    import mtad.service

    service = await mtad.service.start(settings, storage, tls)  # type: ignore[arg-type]
    return service, service.port("mx")


async def _start_imap(settings: Settings, storage: object, tls: ssl.SSLContext) -> tuple:
    import imapd.service

    service = await imapd.service.start(settings, storage, tls)  # type: ignore[arg-type]
    return service, service.imap[0].sockets[0].getsockname()[1]


async def _start_pop3(settings: Settings, storage: object, tls: ssl.SSLContext) -> tuple:
    import imapd.service

    service = await imapd.service.start(settings, storage, tls)  # type: ignore[arg-type]
    return service, service.pop3[0].sockets[0].getsockname()[1]


async def _start_http(settings: Settings, storage: object, tls: ssl.SSLContext) -> tuple:
    import httpapi.service

    service = await httpapi.service.start(settings, storage, tls)  # type: ignore[arg-type]
    return service, service.ports[0]


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
CASES: dict[str, tuple[Listener, Callable[..., Awaitable[tuple]]]] = {
    "smtp": (
        Listener("smtp", "smtp", b"220 ", b"421 4.7.0 Too many connections from your address"),
        _start_mtad,
    ),
    "imap": (
        Listener(
            "imap", "imap", b"* OK",
            b"* BYE [UNAVAILABLE] too many connections from your address",
        ),
        _start_imap,
    ),
    "pop3": (
        Listener(
            "pop3", "pop3", b"+OK", b"-ERR [SYS/TEMP] too many connections from your address"
        ),
        _start_pop3,
    ),
    "http": (
        Listener("http", "http", b"HTTP/1.1 200", b"HTTP/1.1 503", HEALTH),
        _start_http,
    ),
}


async def first_line(port: int, request: bytes) -> tuple[bytes, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if request:
        writer.write(request)
    line = await asyncio.wait_for(reader.readline(), 10)
    return line, writer


@pytest.fixture
async def served(
    request: pytest.FixtureRequest, settings: Settings, storage: object, tls_context: ssl.SSLContext
) -> AsyncIterator[tuple[Listener, int]]:
    listener, start = CASES[request.param]
    getattr(settings, listener.setting).max_connections_per_ip = LIMIT
    service, port = await start(settings, storage, tls_context)
    try:
        yield listener, port
    finally:
        await service.close()


@pytest.mark.parametrize("served", sorted(CASES), indirect=True)
async def test_over_the_limit_a_client_is_refused_until_one_closes(
    served: tuple[Listener, int],
) -> None:
    listener, port = served
    open_ones = []
    try:
        for _ in range(LIMIT):
            line, writer = await first_line(port, listener.request)
            assert line.startswith(listener.greeting), line
            open_ones.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if listener.request:
            writer.write(listener.request)
        refused = await asyncio.wait_for(reader.read(), 10)  # then the server closes
        writer.close()
        assert refused.startswith(listener.refusal), refused
        # One connection ends: its slot is free again.
        gone = open_ones.pop()
        gone.close()
        await gone.wait_closed()
        for _ in range(50):
            await asyncio.sleep(0.02)
            line, writer = await first_line(port, listener.request)
            if line.startswith(listener.greeting):
                open_ones.append(writer)
                break
            writer.close()
        else:
            pytest.fail("the closed connection's slot was never freed")
    finally:
        for writer in open_ones:
            writer.close()


async def test_a_session_after_starttls_frees_its_slot(
    settings: Settings, storage: object, tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
) -> None:
    """IMAP STARTTLS hands the connection to TLS in place; its end must
    still return the slot (RFC 3501 section 6.2.1)."""
    import imapd.service

    settings.imap.max_connections_per_ip = 1
    service = await imapd.service.start(settings, storage, tls_context)  # type: ignore[arg-type]
    port = service.imap[0].sockets[0].getsockname()[1]
    try:
        for _ in range(3):  # more sessions than the limit, one after another
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await reader.readline()).startswith(b"* OK")
            writer.write(b"a STARTTLS\r\n")
            assert (await reader.readline()).startswith(b"a OK")
            await writer.start_tls(client_tls_context, server_hostname="127.0.0.1")
            writer.write(b"b LOGOUT\r\n")
            assert (await reader.readline()).startswith(b"* BYE")
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await asyncio.sleep(0.05)
    finally:
        await service.close()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_connect_rate_is_a_token_bucket_per_address() -> None:
    clock = Clock()
    burst, per_second = random.randint(2, 30), random.choice([0.5, 2.0, 10.0])
    rate = ConnectRate(per_second, burst, clock=clock)
    assert all(rate.admit("192.0.2.1") for _ in range(burst))
    assert not rate.admit("192.0.2.1")  # the burst is spent
    assert rate.admit("192.0.2.2")  # another address has its own bucket
    clock.now += 1 / per_second  # one token back
    assert rate.admit("192.0.2.1")
    assert not rate.admit("192.0.2.1")
    clock.now += 3600  # refilled to the burst, never past it
    assert sum(rate.admit("192.0.2.1") for _ in range(burst + 5)) == burst


def test_connect_rate_off_and_exempt_networks_are_never_refused() -> None:
    assert all(ConnectRate(0, 1).admit("192.0.2.1") for _ in range(1000))
    rate = ConnectRate(1, 1, ["127.0.0.0/8", "::1/128"])
    assert all(rate.admit("127.0.0.5") for _ in range(1000))
    assert all(rate.admit("::1") for _ in range(1000))
    assert rate.admit("192.0.2.1") and not rate.admit("192.0.2.1")


def test_connect_rate_forgets_refilled_addresses() -> None:
    """One connection each from many addresses, 1 ms apart: each bucket is
    full again 1 / rate = 0.1 s later, and the table keeps only the
    addresses still short of a token, not every address ever seen."""
    clock = Clock()
    rate = ConnectRate(10, 20, clock=clock)
    seen = random.randint(10, 20) * ConnectRate.SWEEP_FLOOR
    for n in range(seen):
        rate.admit(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        clock.now += 0.001
    assert 0 < rate.tracked() <= ConnectRate.SWEEP_FLOOR < seen
    clock.now += 1  # every one refilled: the next sweep drops them all
    for n in range(ConnectRate.SWEEP_FLOOR):
        rate.admit(f"172.16.{n >> 8 & 255}.{n & 255}")
    assert rate.tracked() <= ConnectRate.SWEEP_FLOOR

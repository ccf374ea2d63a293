"""MTA-STS policy fetch (RFC 8461 section 3.3) and cache (section 5.1)
against a real HTTPS server on 127.0.0.1, honest and hostile."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from pathlib import Path

import pytest

from mtad.dns import DnsTemporaryError
from mtad.outbound.mtasts import PolicyError, StsCache, fetch_policy
from tests.integration.outbound.policyserver import PolicyServer, policy_response

HOSTS = ("mta-sts.a.test", "mta-sts.b.test")
POLICY = "version: STSv1\nmode: enforce\nmx: mx.a.test\nmax_age: 3600\n"


class Names:
    """Resolves every mta-sts host to 127.0.0.1; TXT records as set."""

    def __init__(self) -> None:
        self.txt_records: dict[str, list[str]] = {}
        self.broken_txt = False

    async def addresses(self, host: str) -> list[str]:
        return ["127.0.0.1"]

    async def txt(self, name: str) -> list[str]:
        if self.broken_txt:
            raise DnsTemporaryError(name)
        return list(self.txt_records.get(name, []))


@pytest.fixture(scope="module")
def server_context(tls_ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert(*HOSTS).configure_cert(ctx)
    return ctx


async def fetch(server: PolicyServer, client_ctx: ssl.SSLContext, domain: str = "a.test", **kw):
    return await fetch_policy(Names(), domain, client_ctx, port=server.port, **kw)


async def test_fetches_and_parses(server_context, client_tls_context) -> None:
    async with PolicyServer(server_context, {HOSTS[0]: policy_response(POLICY)}) as server:
        policy = await fetch(server, client_tls_context)
    assert (policy.mode, policy.mx, policy.max_age) == ("enforce", ("mx.a.test",), 3600)
    assert server.requests == [HOSTS[0]]


@pytest.mark.parametrize(
    ("response", "why"),
    [
        (
            b"HTTP/1.1 301 Moved\r\nLocation: https://evil.test/\r\nContent-Length: 0\r\n\r\n",
            "redirect",
        ),
        (policy_response(POLICY, "text/html"), "Content-Type"),
        (policy_response(POLICY, "application/octet-stream"), "Content-Type"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "HTTP 404"),
        (b"SSH-2.0-OpenSSH\r\n", "not an HTTP response"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10000000\r\n\r\n",
            "over 64 KiB",
        ),
        (policy_response("version: STSv1\nmode: sometimes\nmax_age: 1\n"), "mode"),
    ],
)
async def test_refused_responses(server_context, client_tls_context, response, why) -> None:
    async with PolicyServer(server_context, {HOSTS[0]: response}) as server:
        with pytest.raises(PolicyError, match=why):
            await fetch(server, client_tls_context)


async def endless(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    chunk = os.urandom(16384)
    for _ in range(100_000):  # 1.6 GB if nobody stopped reading
        writer.write(chunk)
        await writer.drain()


async def endless_chunked(writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"mx: a.example.com\n" * 500
    for _ in range(100_000):
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()


async def drip(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nversion: STSv1\n")
    for _ in range(600):
        await asyncio.sleep(0.1)
        writer.write(b"x")
        await writer.drain()


@pytest.mark.parametrize("hostile", [endless, endless_chunked])
async def test_endless_bodies_stop_at_64k(server_context, client_tls_context, hostile) -> None:
    async with PolicyServer(server_context, {HOSTS[0]: hostile}) as server:
        started = time.monotonic()
        with pytest.raises(PolicyError, match="over 64 KiB"):
            await fetch(server, client_tls_context)
    assert time.monotonic() - started < 3


async def test_a_slow_server_times_out(server_context, client_tls_context) -> None:
    async with PolicyServer(server_context, {HOSTS[0]: drip}) as server:
        started = time.monotonic()
        with pytest.raises(PolicyError, match="no policy within"):
            await fetch(server, client_tls_context, timeout=1.0)
    assert time.monotonic() - started < 3


async def test_certificate_must_name_the_policy_host(
    tls_ca, server_context, client_tls_context
) -> None:
    wrong = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("www.a.test").configure_cert(wrong)
    async with PolicyServer(wrong, {HOSTS[0]: policy_response(POLICY)}) as server:
        with pytest.raises(PolicyError, match="cannot connect"):
            await fetch(server, client_tls_context)
    untrusted = ssl.create_default_context()  # the system store: not our CA
    async with PolicyServer(server_context, {HOSTS[0]: policy_response(POLICY)}) as server:
        with pytest.raises(PolicyError, match="cannot connect"):
            await fetch(server, untrusted)


async def test_cache_refreshes_on_a_new_id_and_survives_restarts(
    server_context, client_tls_context, tmp_path: Path
) -> None:
    names = Names()
    routes = {HOSTS[0]: policy_response(POLICY)}
    clock = [1000.0]
    async with PolicyServer(server_context, routes) as server:

        def cache() -> StsCache:
            return StsCache(client_tls_context, tmp_path, port=server.port, clock=lambda: clock[0])

        first = cache()
        assert await first.policy(names, "a.test") is None  # no TXT record: no policy
        names.txt_records["_mta-sts.a.test"] = ["v=STSv1; id=one"]
        policy = await first.policy(names, "a.test")
        assert policy is not None and policy.policy_id == "one" and policy.mx == ("mx.a.test",)
        assert await first.policy(names, "a.test") == policy
        assert len(server.requests) == 1  # same id: no new fetch
        saved = json.loads((tmp_path / "a.test.json").read_text())
        assert saved["policy_id"] == "one" and saved["mode"] == "enforce"

        # Section 5.1: a new id means a new policy.
        routes[HOSTS[0]] = policy_response(POLICY.replace("enforce", "testing"))
        names.txt_records["_mta-sts.a.test"] = ["v=STSv1; id=two"]
        assert (await first.policy(names, "a.test")).mode == "testing"
        assert len(server.requests) == 2

        # A restart (a new cache on the same directory) knows the policy
        # without fetching; with the TXT lookup failing, or the record gone, too.
        names.broken_txt = True
        assert (await cache().policy(names, "a.test")).policy_id == "two"
        names.broken_txt = False
        del names.txt_records["_mta-sts.a.test"]
        assert (await cache().policy(names, "a.test")).policy_id == "two"
        assert len(server.requests) == 2

        # A failed fetch keeps the cached policy until max_age runs out.
        routes[HOSTS[0]] = b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
        names.txt_records["_mta-sts.a.test"] = ["v=STSv1; id=three"]
        kept = await first.policy(names, "a.test")
        assert kept is not None and kept.policy_id == "two"
        assert "HTTP 500" in first.last_error["a.test"]
        # ... and does not try again at once (each try may hold a delivery).
        assert (await first.policy(names, "a.test")).policy_id == "two"
        assert len(server.requests) == 3
        routes[HOSTS[0]] = policy_response(POLICY)
        clock[0] += 301
        assert (await first.policy(names, "a.test")).policy_id == "three"
        assert len(server.requests) == 4
        # Expired and no new policy to be had: none.
        routes[HOSTS[0]] = b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
        names.txt_records["_mta-sts.a.test"] = ["v=STSv1; id=four"]
        clock[0] += 3600
        assert await first.policy(names, "a.test") is None


async def test_a_domain_without_a_policy_on_disk_is_not_looked_up_there_each_time(
    server_context, client_tls_context, tmp_path: Path
) -> None:
    """Issue #23: most destinations publish no MTA-STS; each delivery to
    one asked the disk cache (a thread hop). Absent is now remembered for
    DISK_RECHECK_SECONDS; a policy another process stored then is seen, and
    holds with the TXT record gone (section 5.1)."""
    from mtad.outbound.mtasts import DISK_RECHECK_SECONDS

    names = Names()
    routes = {HOSTS[1]: policy_response(POLICY.replace("mx.a.test", "mx.b.test"))}
    clock = [5000.0]
    async with PolicyServer(server_context, routes) as server:
        here = StsCache(client_tls_context, tmp_path, port=server.port, clock=lambda: clock[0])
        reads: list[Path] = []
        read = here._read

        def counted(path: Path):
            reads.append(path)
            return read(path)

        here._read = counted  # type: ignore[method-assign]
        deliveries = int.from_bytes(os.urandom(1)) % 20 + 2
        for _ in range(deliveries):
            assert await here.policy(names, "b.test") is None
        assert reads == [tmp_path / "b.test.json"]  # once, not once per delivery

        # Another process of the site fetches and stores b.test's policy...
        names.txt_records["_mta-sts.b.test"] = ["v=STSv1; id=b1"]
        other = StsCache(client_tls_context, tmp_path, port=server.port, clock=lambda: clock[0])
        assert (await other.policy(names, "b.test")).policy_id == "b1"
        # ... then the record is removed (or stripped by an attacker): this
        # process reads the stored policy once its absence is due a recheck.
        del names.txt_records["_mta-sts.b.test"]
        clock[0] += DISK_RECHECK_SECONDS
        kept = await here.policy(names, "b.test")
        assert kept is not None and kept.policy_id == "b1" and kept.mx == ("mx.b.test",)
        assert len(reads) == 2 and len(server.requests) == 1
        # A clock set back does not make an absence last longer.
        clock[0] -= 3600
        assert await here.policy(names, "c.test") is None
        clock[0] -= 3600
        assert await here.policy(names, "c.test") is None
        assert reads[2:] == [tmp_path / "c.test.json"] * 2

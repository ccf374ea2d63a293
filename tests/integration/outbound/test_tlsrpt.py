"""TLS-RPT (RFC 8460) reports, sent for real: the world of
test_requiretls.py (dnsmasq with ``_smtp._tls`` TXT records naming alice's
mailbox and an HTTPS endpoint, MTA-STS policies, real receiving mtads).

The sender relays one message to a domain whose MTA-STS policy its MX
meets (a success) and one to a domain whose MX certificate fails the
policy (a certificate-host-mismatch failure); ``mailctl tlsrpt send --now``
then mails the reports to alice's INBOX and POSTs them to the HTTPS server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import email
import email.policy
import gzip
import json
import os
import re
import ssl
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trustme
from aiohttp import web

from mailctl.cli import build_parser
from tests.integration.outbound.conftest import ALICE, eventually
from tests.integration.outbound.test_relay import inbox
from tests.integration.outbound.test_requiretls import (  # noqa: F401 (fixtures)
    RCPT_HDR,
    World,
    _after_attempts,
    entry_with,
    lifetime,
    message,
    port,
    report_port,
    rt_dns,
    submit,
    world,
)
from tests.integration.outbound.test_tls_security import reports, server_context


class ReportServer:
    """An HTTPS endpoint taking RFC 8460 section 5.4 POSTs; keeps each one."""

    def __init__(self, ctx: ssl.SSLContext, listen_port: int) -> None:
        self.ctx, self.port = ctx, listen_port
        self.posts: list[tuple[str, str, bytes]] = []  # (path, content type, body)

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append((request.path, request.content_type, await request.read()))
        return web.Response(status=201)

    async def __aenter__(self) -> ReportServer:
        app = web.Application()
        app.router.add_post("/tlsrpt", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def endpoint(tls_ca: trustme.CA, report_port: int) -> AsyncIterator[ReportServer]:  # noqa: F811
    async with ReportServer(server_context(tls_ca.issue_cert("reports.test")), report_port) as s:
        yield s


def mailctl(*argv: str) -> argparse.Namespace:
    """``argv`` parsed by mailctl's own parser (the command as registered)."""
    return build_parser().parse_args(argv)


def check_report(body: dict, domain: str) -> dict:
    """The RFC 8460 section 4 fields, and the one policy of ``domain``."""
    assert body["organization-name"] == "mail.test"
    assert body["contact-info"] == "postmaster@mail.test"
    assert body["report-id"]
    start = dt.datetime.strptime(body["date-range"]["start-datetime"], "%Y-%m-%dT%H:%M:%SZ")
    end = dt.datetime.strptime(body["date-range"]["end-datetime"], "%Y-%m-%dT%H:%M:%SZ")
    assert start.time() == dt.time() and start <= end
    [policy] = [p for p in body["policies"] if p["policy"]["policy-type"] == "sts"]
    assert policy["policy"]["policy-domain"] == domain
    assert policy["policy"]["mx-host"] == [f"mx.{domain}"]
    assert "mode: enforce" in policy["policy"]["policy-string"]
    assert f"mx: mx.{domain}" in policy["policy"]["policy-string"]
    return policy


async def test_reports_by_mail_and_https(
    world: World,  # noqa: F811
    endpoint: ReportServer,
    client_tls_context,
    capsys,
) -> None:
    ctx = client_tls_context
    good, bad = os.urandom(8).hex(), os.urandom(8).hex()
    await submit(world.sender, ctx, "user@secure.test", message(RCPT_HDR, good), [])
    await submit(world.sender, ctx, "user@stsbad.test", message(RCPT_HDR, bad), [])

    def logged() -> bool:
        found = reports(world.sender)
        ok = [r for r in found if r["policy_domain"] == "secure.test"]
        failed = [r for r in found if r["policy_domain"] == "stsbad.test"]
        return bool(ok and failed)

    await eventually(logged, timeout=30)
    successes = sum(
        1
        for r in reports(world.sender)
        if r["policy_domain"] == "secure.test" and r["result_type"] == "success"
    )
    failures = sum(1 for r in reports(world.sender) if r["policy_domain"] == "stsbad.test")
    assert successes >= 1 and failures >= 1

    args = mailctl("tlsrpt", "send", "--now")
    code = await asyncio.to_thread(args.func, args, world.sender.settings)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"stsbad.test: sent to mailto:{ALICE}" in out, out
    assert "secure.test: sent to https://reports.test:" in out, out

    # Section 5.3: by mail, multipart/report; report-type="tlsrpt".
    async def mailed():
        found = [m for m in await inbox(world.sender, ALICE) if b"TLS-Report-Domain" in m]
        return found if len(found) == 2 else None

    by_domain = {}
    for raw in await eventually(mailed, timeout=30):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        assert msg["TLS-Report-Submitter"] == "mail.test"
        domain = str(msg["TLS-Report-Domain"])
        assert f"Report Domain: {domain}" in str(msg["Subject"])
        [part] = [p for p in msg.iter_attachments()]
        assert part.get_content_type() == "application/tlsrpt+gzip"
        # Section 5.1: submitter!policy-domain!begin!end.json.gz
        assert re.fullmatch(
            rf"mail\.test!{re.escape(domain)}!\d+!\d+\.json\.gz", part.get_filename()
        )
        by_domain[domain] = json.loads(gzip.decompress(part.get_content()))
    assert set(by_domain) == {"secure.test", "stsbad.test"}

    good_policy = check_report(by_domain["secure.test"], "secure.test")
    assert good_policy["summary"]["total-successful-session-count"] == successes
    assert good_policy["summary"]["total-failure-session-count"] == 0
    bad_policy = check_report(by_domain["stsbad.test"], "stsbad.test")
    assert bad_policy["summary"]["total-failure-session-count"] >= 1
    assert bad_policy["summary"]["total-successful-session-count"] == 0
    [detail] = bad_policy["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "mx.stsbad.test"
    assert detail["failed-session-count"] == bad_policy["summary"]["total-failure-session-count"]

    # Section 5.4: the same reports POSTed as application/tlsrpt+gzip.
    assert len(endpoint.posts) == 2
    posted = {}
    for path, content_type, body in endpoint.posts:
        assert path == "/tlsrpt" and content_type == "application/tlsrpt+gzip"
        report = json.loads(gzip.decompress(body))
        posted[report["policies"][0]["policy"]["policy-domain"]] = report
    assert posted["stsbad.test"]["report-id"] == by_domain["stsbad.test"]["report-id"]
    check_report(posted["secure.test"], "secure.test")


async def test_daily_run_reports_each_finished_day_once(
    world: World,  # noqa: F811
    endpoint: ReportServer,
    client_tls_context,
) -> None:
    """The daily task: a finished day is reported once, under the lease."""
    from mtad.outbound.tlsrpt import run_daily

    await submit(world.sender, client_tls_context, "user@secure.test", message(RCPT_HDR, "d"), [])
    await eventually(partial(_has_success, world), timeout=30)
    settings = world.sender.settings
    verified = ssl.create_default_context(cafile=settings.queue.tls_ca_file)
    today = dt.datetime.now(dt.UTC)
    storage, resolver = world.sender.storage, world.sender.service.resolver
    assert await run_daily(storage, settings, resolver, verified, now=today) == []  # not over
    tomorrow = today + dt.timedelta(days=1)
    assert await run_daily(storage, settings, resolver, verified, now=tomorrow) == [today.date()]
    assert len(endpoint.posts) == 1  # secure.test only: nothing failed for another domain
    assert await run_daily(storage, settings, resolver, verified, now=tomorrow) == []
    assert len(endpoint.posts) == 1


async def _has_success(world: World) -> bool:  # noqa: F811
    return any(r["result_type"] == "success" for r in reports(world.sender))


class RuaAt:
    """The node's resolver, but ``_smtp._tls.<domain>`` names ``rua`` (the
    world's records name alice's mailbox, which is local)."""

    def __init__(self, resolver, domain: str, rua: str) -> None:
        self.resolver, self.name, self.rua = resolver, f"_smtp._tls.{domain}", rua

    async def txt(self, name: str) -> list[str]:
        if name == self.name:
            return [f"v=TLSRPTv1; rua={self.rua}"]
        return await self.resolver.txt(name)


async def test_report_mail_goes_despite_the_policy_it_reports(
    world: World,  # noqa: F811
    client_tls_context,
) -> None:
    """RFC 8460 section 3: "sending MTAs MUST deliver reports despite any
    TLS-related failures and SHOULD NOT include this SMTP session in the
    next report", and section 5.3: "MUST NOT honor MTA-STS or DANE TLSA
    failures". A report mailed to stsbad.test, whose enforce-mode MTA-STS
    policy its MX certificate fails, arrives there byte for byte, and the
    day's TLS-RPT log gains no line for it; ordinary mail to the same
    mailbox is still held back by that policy (4.7.5) and logged."""
    from mtad.outbound.tlsrpt import Report, send_reports

    rcpt = "user@stsbad.test"
    token = os.urandom(8).hex()
    body = {"organization-name": "mail.test", "report-id": token, "policies": []}
    report = Report("stsbad.test", body, f"mail.test!stsbad.test!{token}.json.gz")
    logged = [r for r in reports(world.sender) if r["policy_domain"] == "stsbad.test"]
    resolver = RuaAt(world.sender.service.resolver, "stsbad.test", f"mailto:{rcpt}")
    sent = await send_reports(world.sender.storage, world.sender.settings, resolver, [report])
    assert sent.delivered == [("stsbad.test", f"mailto:{rcpt}")] and sent.failed == []

    async def arrived():
        return [m for m in await inbox(world.wrong, rcpt) if b"TLS-Report-Domain" in m]

    [raw] = await eventually(arrived, timeout=30)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    [part] = list(msg.iter_attachments())
    assert json.loads(gzip.decompress(part.get_content())) == body
    assert [r for r in reports(world.sender) if r["policy_domain"] == "stsbad.test"] == logged

    plain = os.urandom(8).hex()
    await submit(world.sender, client_tls_context, rcpt, message(rcpt, plain), [])
    entry = await eventually(partial(entry_with, world.sender, plain))
    [state] = await eventually(partial(_after_attempts, world.sender, entry.id, 2), timeout=30)
    assert state.status == "deferred" and "4.7.5" in (state.last_reply or ""), state
    assert len([r for r in reports(world.sender) if r["policy_domain"] == "stsbad.test"]) > len(
        logged
    )

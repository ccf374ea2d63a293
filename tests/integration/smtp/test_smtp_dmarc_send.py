"""Our own DMARC aggregate reports (RFC 7489 section 7.2): mail received on
the MX is tallied per tuple for the domains whose record has ``rua=``;
``mailctl dmarc send --now`` builds the gzipped appendix C report of each
and delivers it (here to a local account) when the section 7.1 check
passes. The report read back holds what the MX received."""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import smtplib
import time
from collections.abc import Iterator

import pytest

from mtad.dmarcagg import parse_report
from mtad.dmarcsend import DAY, seconds_to_next_run
from storage.sql.dmarcreports import DmarcReports
from tests.dnsserver import DnsServer, dns_server
from tests.integration.test_mailctl import mailctl, ok
from tests.protocol.smtp.support import ALICE, BOB, mailbox_messages, standard_zone

RUA = "dmarc@example.net"


@pytest.fixture(scope="module")
def dns(dkim_key) -> Iterator[DnsServer]:
    zone = standard_zone(dkim_key)
    zone.txt("rep.example", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("_dmarc.rep.example", f"v=DMARC1; p=quarantine; rua=mailto:{RUA}!10m")
    zone.txt("rep.example._report._dmarc.example.net", "v=DMARC1")  # section 7.1
    zone.txt("unvouched.example", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("_dmarc.unvouched.example", f"v=DMARC1; p=none; rua=mailto:{RUA}")
    with dns_server(zone) as server:
        yield server


def send(port: int, mail_from: str, header_from: str, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for i in range(n):
            raw = (
                f"From: {header_from}\r\nTo: {ALICE}\r\nSubject: m{i}\r\n"
                f"Message-ID: <{random.getrandbits(64)}@x>\r\n\r\nbody {i}\r\n"
            ).encode()
            client.sendmail(mail_from, [ALICE], raw)


def site_dns(settings) -> list[str]:
    return [
        "-o",
        f"dns.nameservers={settings.dns.nameservers!r}".replace("'", '"'),
        "-o",
        f"dns.port={settings.dns.port}",
        "-o",
        f"server.hostname={settings.server.hostname}",
    ]


async def test_reports_are_tallied_sent_and_read_back(mta, populated, settings) -> None:
    port = mta.port("mx")
    passing, failing = random.randint(1, 4), random.randint(1, 4)
    unvouched, no_rua = random.randint(1, 3), random.randint(1, 3)
    await asyncio.to_thread(send, port, "b@rep.example", "a@rep.example", passing)
    await asyncio.to_thread(send, port, "b@spf-fail.example", "a@rep.example", failing)
    await asyncio.to_thread(send, port, "b@unvouched.example", "u@unvouched.example", unvouched)
    await asyncio.to_thread(send, port, "b@spf-pass.example", "p@spf-pass.example", no_rua)

    store = DmarcReports(populated.directory.db)
    today = int(time.time()) // DAY
    tallied = await store.tallied(today + 1)
    assert {t.policy_domain for t in tallied} == {"rep.example", "unvouched.example"}
    assert sum(t.count for t in tallied) == passing + failing + unvouched  # rows, not messages
    assert len(tallied) == 3

    await populated.directory.add_alias(RUA, BOB)
    before = len(await mailbox_messages(populated, BOB))
    out = ok(
        await asyncio.to_thread(
            mailctl, settings.data_dir, "dmarc", *site_dns(settings), "send", "--now"
        )
    )
    [line] = out.splitlines()  # unvouched.example: rua not authorised (section 7.1)
    domain, report_id, recipients = line.split("\t")
    assert (domain, recipients) == ("rep.example", RUA)
    assert await store.tallied(today + 1) == []  # reported rows are forgotten

    [raw] = (await mailbox_messages(populated, BOB))[before:]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    hostname = settings.server.hostname
    assert msg["Subject"] == (
        f"Report Domain: rep.example Submitter: {hostname} Report-ID: <{report_id}>"
    )
    [part] = [p for p in msg.iter_attachments()]
    begin, end = today * DAY, (today + 1) * DAY - 1
    assert part.get_filename() == f"{hostname}!rep.example!{begin}!{end}.xml.gz"
    assert part.get_content_type() == "application/gzip"
    report = parse_report(part.get_payload(decode=True))
    assert (report.org_name, report.report_id, report.domain) == (
        hostname,
        report_id,
        "rep.example",
    )
    assert (report.date_begin, report.date_end) == (begin, end)
    assert "p=quarantine" in report.policy
    got = {(r.source_ip, r.disposition, r.dkim, r.spf, r.header_from): r.count for r in report.rows}
    assert got == {
        ("127.0.0.1", "none", "fail", "pass", "rep.example"): passing,
        ("127.0.0.1", "quarantine", "fail", "fail", "rep.example"): failing,
    }
    assert {r.auth for r in report.rows} == {
        "spf=rep.example:pass",
        "spf=spf-fail.example:fail",
    }

    again = ok(
        await asyncio.to_thread(
            mailctl, settings.data_dir, "dmarc", *site_dns(settings), "send", "--now"
        )
    )
    assert again == ""  # nothing left to report


def test_the_daily_run_is_after_utc_midnight() -> None:
    midnight = 1_700_006_400  # a UTC midnight
    assert midnight % DAY == 0
    assert seconds_to_next_run(midnight) == 600
    assert seconds_to_next_run(midnight + 600) == DAY
    assert seconds_to_next_run(midnight + 3600) == DAY - 3000


async def test_the_daily_loop_reports_past_days_and_only_one_instance_sends(
    populated, settings, monkeypatch
) -> None:
    from mtad import dmarcsend
    from mtad.dns import Resolver
    from storage.sql.dmarcreports import Tally

    store = DmarcReports(populated.directory.db)
    seen = Tally(
        policy_domain="rep.example",
        header_from="rep.example",
        source_ip="192.0.2.7",
        disposition="none",
        dkim="pass",
        spf="fail",
        dkim_auth="rep.example:pass",
        spf_auth="other.example:fail:mailfrom",
        policy="p=quarantine; sp=quarantine; pct=100; adkim=r; aspf=r",
        rua=RUA,
    )
    yesterday = time.time() - DAY
    count = random.randint(1, 5)
    for _ in range(count):
        await store.count(seen, now=yesterday)
    await store.count(seen)  # today's: not reported by the daily run
    await populated.directory.add_alias(RUA, BOB)

    # Another instance holds the lease: nothing is sent, nothing forgotten.
    other = populated.stores["default"]
    assert await other.acquire_lock(dmarcsend.LEASE_NAME, "other-host:1", 60)
    resolver = Resolver(settings.dns)
    today = int(time.time()) // DAY
    assert await dmarcsend.send_reports(populated, settings, resolver, until_day=today) is None
    busy = await asyncio.to_thread(
        mailctl, settings.data_dir, "dmarc", *site_dns(settings), "send", "--now"
    )
    assert busy.returncode == 1 and "another instance" in busy.stderr
    await other.release_lock(dmarcsend.LEASE_NAME, "other-host:1")

    runs = iter([0.0])
    monkeypatch.setattr(dmarcsend, "seconds_to_next_run", lambda now: next(runs, 3600.0))
    loop = asyncio.create_task(dmarcsend.report_loop(populated, settings, resolver))
    try:
        # The run mails the report, then forgets the days it reported: wait
        # for both (cancelled between them, the loop would leave the tallies).
        for _ in range(200):
            if await mailbox_messages(populated, BOB) and len(await store.tallied(today)) == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
    [raw] = await mailbox_messages(populated, BOB)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    [part] = list(msg.iter_attachments())
    report = parse_report(part.get_payload(decode=True))
    assert report.date_begin == (today - 1) * DAY
    assert [(r.source_ip, r.count, r.auth) for r in report.rows] == [
        ("192.0.2.7", count, "dkim=rep.example:pass spf=other.example:fail")
    ]
    assert [t.count for t in await store.tallied(today + 1)] == [1]  # today's kept

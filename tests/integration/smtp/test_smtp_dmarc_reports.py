"""DMARC aggregate reports (RFC 7489 section 7.2) sent to a local recipient
on the MX port are delivered like any mail, and stored (gzip, zip or plain
XML attachments, detected by content) for ``mailctl dmarc reports`` and
``mailctl dmarc show``; XXE, entity bombs and zip/gzip bombs are refused
quickly and store nothing."""

from __future__ import annotations

import asyncio
import gzip
import io
import random
import secrets
import smtplib
import time
import zipfile
from email.message import EmailMessage

from storage.sql.dmarcreports import DmarcReports
from tests.integration.test_mailctl import mailctl, ok
from tests.protocol.smtp.support import ALICE, mailbox_messages


def random_rows(n: int) -> list[dict]:
    return [
        {
            "source_ip": f"192.0.2.{random.randint(1, 254)}",
            "count": random.randint(1, 5000),
            "disposition": random.choice(["none", "quarantine", "reject"]),
            "dkim": random.choice(["pass", "fail"]),
            "spf": random.choice(["pass", "fail"]),
            "header_from": random.choice(["example.net", "sub.example.net"]),
            "auth_dkim": random.choice(["pass", "fail", "neutral"]),
            "auth_spf": random.choice(["pass", "softfail", "none"]),
        }
        for _ in range(n)
    ]


def report_xml(org: str, report_id: str, rows: list[dict], begin: int, end: int) -> bytes:
    """An appendix C document, as a reporter writes it."""
    records = "".join(
        f"<record><row><source_ip>{r['source_ip']}</source_ip><count>{r['count']}</count>"
        f"<policy_evaluated><disposition>{r['disposition']}</disposition>"
        f"<dkim>{r['dkim']}</dkim><spf>{r['spf']}</spf></policy_evaluated></row>"
        f"<identifiers><header_from>{r['header_from']}</header_from></identifiers>"
        f"<auth_results><dkim><domain>{r['header_from']}</domain>"
        f"<result>{r['auth_dkim']}</result></dkim><spf><domain>{r['header_from']}</domain>"
        f"<result>{r['auth_spf']}</result></spf></auth_results></record>"
        for r in rows
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<feedback><version>1.0</version>'
        f"<report_metadata><org_name>{org}</org_name><email>noreply@{org}</email>"
        f"<report_id>{report_id}</report_id><date_range><begin>{begin}</begin>"
        f"<end>{end}</end></date_range></report_metadata>"
        "<policy_published><domain>example.net</domain><adkim>r</adkim><aspf>r</aspf>"
        f"<p>quarantine</p><sp>none</sp><pct>100</pct></policy_published>{records}</feedback>"
    ).encode()


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buf.getvalue()


def report_mail(org: str, report_id: str, attachment: bytes, filename: str, ctype: str) -> bytes:
    """Section 7.2.1.1: the report as an attachment of a short message."""
    msg = EmailMessage()
    msg["From"] = f"noreply@{org}"
    msg["To"] = ALICE
    msg["Subject"] = f"Report Domain: example.net Submitter: {org} Report-ID: {report_id}"
    msg.set_content("A DMARC aggregate report.")
    maintype, subtype = ctype.split("/")
    msg.add_attachment(attachment, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def send(port: int, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.sendmail("noreply@reporter.example", [ALICE], raw)


async def test_gzip_zip_and_xml_reports_are_stored_and_shown(mta, populated, settings) -> None:
    begin = int(time.time()) - 86400
    sent = {}
    for kind in ("gzip", "zip", "xml"):
        org = f"{kind}-reporter.example"
        report_id = secrets.token_hex(8)
        rows = random_rows(random.randint(1, 40))
        xml = report_xml(org, report_id, rows, begin, begin + 86399)
        name = f"{org}!example.net!{begin}!{begin + 86399}.xml"
        if kind == "gzip":
            attachment, filename, ctype = gzip.compress(xml), name + ".gz", "application/gzip"
        elif kind == "zip":
            attachment, filename, ctype = zipped(name, xml), name[:-4] + ".zip", "application/zip"
        else:
            attachment, filename, ctype = xml, name, "text/xml"
        await asyncio.to_thread(
            send, mta.port("mx"), report_mail(org, report_id, attachment, filename, ctype)
        )
        sent[report_id] = (org, rows)
    assert len(await mailbox_messages(populated, ALICE)) == 3  # delivered as well
    store = DmarcReports(populated.directory.db)
    listed = await store.list("example.net")
    assert {r.report_id for r in listed} == set(sent)
    for stored in listed:
        org, rows = sent[stored.report_id]
        assert stored.org_name == org and stored.date_begin == begin
        assert stored.messages == sum(r["count"] for r in rows)
        got = await store.rows(stored)
        assert [
            (g.source_ip, g.count, g.disposition, g.dkim, g.spf, g.header_from) for g in got
        ] == [
            (r["source_ip"], r["count"], r["disposition"], r["dkim"], r["spf"], r["header_from"])
            for r in rows
        ]
        assert got[0].auth == (
            f"dkim={rows[0]['header_from']}:{rows[0]['auth_dkim']} "
            f"spf={rows[0]['header_from']}:{rows[0]['auth_spf']}"
        )
    # The same report again is not stored twice.
    report_id, (org, rows) = next(iter(sent.items()))
    xml = report_xml(org, report_id, rows, begin, begin + 86399)
    again = report_mail(org, report_id, gzip.compress(xml), "r.xml.gz", "application/gzip")
    await asyncio.to_thread(send, mta.port("mx"), again)
    assert len(await store.list()) == 3

    data = settings.data_dir
    listing = await asyncio.to_thread(mailctl, data, "dmarc", "reports", "--domain", "example.net")
    assert sorted(line.split("\t")[1] for line in ok(listing).splitlines()) == sorted(sent)
    other = await asyncio.to_thread(mailctl, data, "dmarc", "reports", "--domain", "other.example")
    assert ok(other) == ""
    shown = ok(await asyncio.to_thread(mailctl, data, "dmarc", "show", report_id))
    assert f"Reporter: {org}" in shown and "Policy: p=quarantine; sp=none; pct=100" in shown
    lines = shown.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("source_ip"))) + 1 :]
    assert [line.split("\t")[:2] for line in table] == [
        [r["source_ip"], str(r["count"])] for r in rows
    ]
    missing = await asyncio.to_thread(mailctl, data, "dmarc", "show", "no-such-report")
    assert missing.returncode == 1 and "no report" in missing.stderr


XXE = (
    b'<?xml version="1.0"?><!DOCTYPE feedback [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b"<feedback><report_metadata><org_name>&x;</org_name><report_id>xxe</report_id>"
    b"</report_metadata><policy_published><domain>example.net</domain></policy_published>"
    b"</feedback>"
)
LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]><feedback><report_metadata><org_name>&lol9;</org_name><report_id>bomb</report_id>"
    b"</report_metadata><policy_published><domain>example.net</domain></policy_published>"
    b"</feedback>"
)


def bomb_xml() -> bytes:
    """A valid report header followed by 40 MB of padding: 40 KB compressed."""
    head = report_xml("bomb.example", "zipbomb", random_rows(1), 0, 1)
    return head[:-11] + b" " * (40 * 1024 * 1024) + head[-11:]


async def test_hostile_reports_are_refused_quickly(mta, populated) -> None:
    big = bomb_xml()
    hostile = [
        (XXE, "xxe.xml", "text/xml"),
        (gzip.compress(LAUGHS), "laughs.xml.gz", "application/gzip"),
        (gzip.compress(big), "bomb.xml.gz", "application/gzip"),
        (zipped("bomb.xml", big), "bomb.zip", "application/zip"),
        (
            gzip.compress(report_xml("t.example", "trunc", random_rows(3), 0, 1))[:-30],
            "trunc.xml.gz",
            "application/gzip",
        ),
        (b"<notfeedback/>", "other.xml", "text/xml"),
        (b"<feedback><unclosed>", "broken.xml", "text/xml"),
    ]
    for attachment, filename, ctype in hostile:
        raw = report_mail("evil.example", filename, attachment, filename, ctype)
        started = time.monotonic()
        await asyncio.to_thread(send, mta.port("mx"), raw)
        assert time.monotonic() - started < 5, filename
    assert len(await mailbox_messages(populated, ALICE)) == len(hostile)
    assert await DmarcReports(populated.directory.db).list() == []


async def test_reports_are_parsed_in_the_content_pool_under_its_time_limit(mta, populated) -> None:
    """A big report is pure-Python XML work: it runs in the content pool's
    worker processes (not a thread of the daemon, which would hold its GIL),
    and past the pool's time limit it is dropped, the message still
    delivered."""
    from storage import contentpool

    begin = int(time.time()) - 86400
    rows = random_rows(random.randint(2000, 4000))
    try:
        for limit, stored_count in ((0.001, 0), (30.0, 1)):
            contentpool.configure(1, time_limit=limit, startup_allowance=0 if limit < 1 else 30)
            report_id = secrets.token_hex(8)
            xml = report_xml("pool.example", report_id, rows, begin, begin + 86399)
            name = f"pool.example!example.net!{begin}!{begin + 86399}.xml.gz"
            raw = report_mail(
                "pool.example", report_id, gzip.compress(xml), name, "application/gzip"
            )
            await asyncio.to_thread(send, mta.port("mx"), raw)
            stored = await DmarcReports(populated.directory.db).list("example.net")
            assert len([r for r in stored if r.report_id == report_id]) == stored_count
    finally:
        contentpool.configure(0)
    assert len(await mailbox_messages(populated, ALICE)) == 2  # both delivered

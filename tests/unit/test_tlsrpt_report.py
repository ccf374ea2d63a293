"""TLS-RPT pieces that need no network: the ``_smtp._tls`` record (RFC 8460
section 3), the aggregate report (section 4) and the REQUIRETLS expiry
reply (RFC 8689 section 5)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import random

from mtad.outbound.delivery import requiretls_expired
from mtad.outbound.tlsrpt import build_reports, day_range, parse_record


def test_record_parsing() -> None:
    uris = parse_record(["v=TLSRPTv1; rua=mailto:a@example.org,https://r.example.org/x"])
    assert uris == ["mailto:a@example.org", "https://r.example.org/x"]
    # Section 3: two records are as none; other TXT records are ignored.
    assert parse_record(["v=TLSRPTv1; rua=mailto:a@x", "v=TLSRPTv1; rua=mailto:b@x"]) == []
    assert parse_record(["v=spf1 -all", "v=TLSRPTv1;rua=mailto:a@x"]) == ["mailto:a@x"]
    assert parse_record(["v=TLSRPTv1; rua=ftp://x/"]) == []
    assert parse_record([]) == []


def _line(domain: str, result: str, host: str = "mx.d.test") -> dict:
    return {
        "policy_domain": domain,
        "policy_type": "sts",
        "policy_string": ["version: STSv1", "mode: enforce", f"mx: {host}", "max_age: 60"],
        "mx_host": [host],
        "receiving_mx_hostname": host,
        "result_type": result,
        "detail": "why",
    }


def test_report_counts_per_policy() -> None:
    rng = random.Random(8460)
    ok, mismatch, expired = rng.randint(1, 50), rng.randint(1, 50), rng.randint(1, 50)
    lines = (
        [_line("d.test", "success")] * ok
        + [_line("d.test", "certificate-host-mismatch")] * mismatch
        + [_line("d.test", "certificate-expired")] * expired
        + [_line("e.test", "success", "mx.e.test")]
    )
    rng.shuffle(lines)
    start, end = day_range(dt.date(2026, 12, 6))
    reports = build_reports(lines, start, end, submitter="mail.test", contact="pm@mail.test")
    assert [r.domain for r in reports] == ["d.test", "e.test"]
    body = json.loads(gzip.decompress(reports[0].gzipped()))
    assert body["date-range"] == {
        "start-datetime": "2026-12-06T00:00:00Z",
        "end-datetime": "2026-12-06T23:59:59Z",
    }
    assert body["organization-name"] == "mail.test" and body["contact-info"] == "pm@mail.test"
    [policy] = body["policies"]
    assert policy["policy"]["policy-domain"] == "d.test"
    assert policy["summary"] == {
        "total-successful-session-count": ok,
        "total-failure-session-count": mismatch + expired,
    }
    counts = {d["result-type"]: d["failed-session-count"] for d in policy["failure-details"]}
    assert counts == {"certificate-host-mismatch": mismatch, "certificate-expired": expired}
    stamp = f"{int(start.timestamp())}!{int(end.timestamp())}"
    assert reports[0].filename == f"mail.test!d.test!{stamp}.json.gz"  # section 5.1
    assert reports[0].body["report-id"] != reports[1].body["report-id"]


def test_requiretls_expiry_reply() -> None:
    reply = requiretls_expired("451 4.7.30 REQUIRETLS: mx.x.test: TLS failed")
    assert reply is not None and reply.code == 550 and reply.enhanced == "5.7.30"
    assert requiretls_expired("451 4.4.1 connection refused") is None
    assert requiretls_expired(None) is None

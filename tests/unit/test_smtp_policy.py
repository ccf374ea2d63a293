"""DMARC evaluation (RFC 7489); the rate limits are in tests/contract/test_shared_state.py."""

from __future__ import annotations

import pytest

from mtad import dmarc


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("mail.example.com", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("shop.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("com", "com"),
        ("Mail.Example.COM.", "example.com"),
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert dmarc.organizational_domain(domain) == org


@pytest.mark.parametrize(
    ("identifier", "from_domain", "mode", "expected"),
    [
        ("example.com", "example.com", "s", True),
        ("mail.example.com", "example.com", "s", False),
        ("mail.example.com", "example.com", "r", True),
        ("example.org", "example.com", "r", False),
        ("a.example.co.uk", "b.example.co.uk", "r", True),
        ("x.co.uk", "y.co.uk", "r", False),
        ("", "example.com", "r", False),
    ],
)
def test_alignment(identifier: str, from_domain: str, mode: str, expected: bool) -> None:
    assert dmarc.aligned(identifier, from_domain, mode) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1; p=reject", dmarc.DmarcRecord("reject", "reject")),
        ("v=DMARC1; p=none; sp=quarantine; adkim=s; aspf=s; pct=50",
         dmarc.DmarcRecord("none", "quarantine", "s", "s", 50)),
        ("v=DMARC1;p=Quarantine;pct=abc", dmarc.DmarcRecord("quarantine", "quarantine")),
        ("v=DMARC1; p=bogus", None),
        ("v=DMARC1", None),
        ("v=spf1 -all", None),
        ("p=reject; v=DMARC1", None),
    ],
)
def test_parse_record(text: str, expected: dmarc.DmarcRecord | None) -> None:
    assert dmarc.parse_record(text) == expected


STRICT = dmarc.DmarcRecord("reject", "none", adkim="s", aspf="s")
RELAXED = dmarc.DmarcRecord("reject", "quarantine")


@pytest.mark.parametrize(
    ("record", "at_org", "from_domain", "spf", "spf_domain", "dkim", "result", "disposition"),
    [
        (RELAXED, False, "example.com", "pass", "bounce.example.com", [], "pass", "none"),
        (STRICT, False, "example.com", "pass", "bounce.example.com", [], "fail", "reject"),
        (STRICT, False, "example.com", "fail", "example.com", ["example.com"], "pass", "none"),
        (RELAXED, False, "example.com", "softfail", "example.com", [], "fail", "reject"),
        (RELAXED, False, "example.com", "none", "", ["other.example"], "fail", "reject"),
        # A subdomain covered by the organisational record gets sp=.
        (RELAXED, True, "news.example.com", "fail", "", [], "fail", "quarantine"),
    ],
)
def test_decide(record, at_org, from_domain, spf, spf_domain, dkim, result, disposition) -> None:
    outcome = dmarc.decide(record, at_org, from_domain, spf, spf_domain, dkim, sample=0)
    assert (outcome.result, outcome.disposition) == (result, disposition)


def test_pct_sampling_downgrades_policy() -> None:
    record = dmarc.DmarcRecord("reject", "reject", pct=30)
    inside = dmarc.decide(record, False, "example.com", "fail", "", [], sample=10)
    outside = dmarc.decide(record, False, "example.com", "fail", "", [], sample=90)
    assert inside.disposition == "reject"
    assert outside.disposition == "quarantine"  # RFC 7489 section 6.6.4

"""DANE TLSA matching (RFC 7672 section 3.1, RFC 6698 section 2.1) on real
certificates made by a test CA."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from types import SimpleNamespace

import pytest
import trustme

from mtad.outbound.dane import (
    DANE_EE,
    DANE_TA,
    DaneMismatch,
    Tlsa,
    record_for,
    tlsa_for,
    verify_chain,
)


def ders(leaf: trustme.LeafCert) -> list[bytes]:
    return [ssl.PEM_cert_to_DER_cert(p.bytes().decode()) for p in leaf.cert_chain_pems]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_whatever_its_name(ca, selector: int, mtype: int) -> None:
    chain = ders(ca.issue_cert("some-other-name.test"))
    record = record_for(chain[0], DANE_EE, selector, mtype)
    assert record.usable
    # Section 3.1.1: DANE-EE ignores the names (and dates) of the certificate.
    assert verify_chain((record,), chain, "mx.example.test") is None
    other = ders(ca.issue_cert("some-other-name.test"))  # another key
    assert verify_chain((record,), other, "mx.example.test") is not None


def test_dane_ee_mismatch_and_unusable_records(ca) -> None:
    chain = ders(ca.issue_cert("mx.example.test"))
    wrong = Tlsa(DANE_EE, 1, 1, os.urandom(32))
    # RFC 8460 section 4.3.2.1: none of the RRset's records is valid for
    # what the host presents: tlsa-invalid; no certificate at all fits no
    # category (sections 4.3.1, 4.3.3).
    assert verify_chain((wrong,), chain, "mx.example.test") == DaneMismatch(
        "tlsa-invalid", "no TLSA record matches the certificate chain"
    )
    missing = verify_chain((record_for(chain[0]),), [], "mx.example.test")
    assert missing is not None and missing.result_type == "validation-failure"
    good = record_for(chain[0])
    # Section 3.1.3: PKIX-TA(0) and PKIX-EE(1) are not usable for SMTP.
    for usage in (0, 1):
        assert not Tlsa(usage, good.selector, good.mtype, good.data).usable
    assert not Tlsa(DANE_EE, 2, 1, good.data).usable  # selector
    assert not Tlsa(DANE_EE, 1, 3, good.data).usable  # matching type
    assert not Tlsa(DANE_EE, 1, 1, good.data[:20]).usable  # SHA-256 is 32 octets
    assert not Tlsa(DANE_EE, 1, 2, good.data).usable  # SHA-512 is 64


def test_dane_ta_needs_the_anchor_in_the_chain_and_the_mx_name(ca) -> None:
    intermediate = ca.create_child_ca()
    chain = ders(intermediate.issue_cert("mx.example.test"))
    assert len(chain) == 2
    anchor = record_for(chain[1], DANE_TA, 0, 1)
    assert verify_chain((anchor,), chain, "mx.example.test") is None
    # Section 3.2.2: under DANE-TA the certificate must name the MX host
    # (RFC 8460 section 4.3.1: certificate-host-mismatch).
    named = verify_chain((anchor,), chain, "mx.other.test")
    assert named is not None and "does not name" in named.text
    assert named.result_type == "certificate-host-mismatch"
    # A TA record for a certificate not in the chain matches nothing.
    stranger = ders(ca.create_child_ca().issue_cert("mx.example.test"))
    unmatched = verify_chain((anchor,), stranger, "mx.example.test")
    assert unmatched is not None and unmatched.result_type == "tlsa-invalid"
    # A DANE-TA record of the leaf itself is not an anchor.
    leaf_ta = verify_chain((record_for(chain[0], DANE_TA),), chain, "mx.example.test")
    assert leaf_ta is not None and leaf_ta.result_type == "tlsa-invalid"


def test_dane_ta_anchor_that_signed_nothing_is_not_trusted(ca) -> None:
    """The TA record matches a certificate of the chain that did not issue
    the one below it: the chain does not hold up to the anchor (RFC 7672
    section 3.1.2), certificate-not-trusted (RFC 8460 section 4.3.1)."""
    leaf = ders(ca.create_child_ca().issue_cert("mx.example.test"))[0]
    other = ders(ca.create_child_ca().issue_cert("mx.example.test"))[1]
    broken = verify_chain((record_for(other, DANE_TA, 1, 1),), [leaf, other], "mx.example.test")
    assert broken is not None and broken.result_type == "certificate-not-trusted", broken


class Secure:
    def __init__(self, records: list[object], secure: bool) -> None:
        self.answer = (records, secure)
        self.asked: list[tuple[str, str]] = []

    async def secure(self, name: str, rdtype: str):
        self.asked.append((name, rdtype))
        return self.answer


def rdata(usage: int, selector: int, mtype: int, data: bytes) -> SimpleNamespace:
    return SimpleNamespace(usage=usage, selector=selector, mtype=mtype, cert=data)


async def test_tlsa_lookup_needs_validation() -> None:
    data = os.urandom(32)
    resolver = Secure([rdata(3, 1, 1, data)], secure=False)
    found = await tlsa_for(resolver, "mx.example.test")
    assert resolver.asked == [("_25._tcp.mx.example.test", "TLSA")]  # RFC 7672 section 2.2.3
    assert not found.secure and found.records == ()
    found = await tlsa_for(Secure([rdata(3, 1, 1, data), rdata(1, 1, 1, data)], True), "mx.t")
    assert found.secure and found.records == (Tlsa(3, 1, 1, data),)
    found = await tlsa_for(Secure([rdata(0, 0, 1, data)], True), "mx.t")
    assert found.secure and found.records == () and found.unusable


def test_expiry_matters_under_dane_ta_only(ca) -> None:
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    expired = ders(ca.issue_cert("mx.example.test", not_before=past, not_after=past))
    # Section 3.1.1: DANE-EE ignores the certificate's dates.
    assert verify_chain((record_for(expired[0]),), expired, "mx.example.test") is None
    intermediate = ca.create_child_ca()
    chain = ders(intermediate.issue_cert("mx.example.test", not_before=past, not_after=past))
    anchor = record_for(chain[1], DANE_TA, 1, 2)
    expired_ta = verify_chain((anchor,), chain, "mx.example.test")
    assert expired_ta is not None and "expired" in expired_ta.text
    assert expired_ta.result_type == "certificate-expired"  # RFC 8460 section 4.3.1

"""DANE for SMTP (RFC 7672): TLSA records of an MX host and matching them.

Contract:

* :func:`tlsa_for` looks up ``_25._tcp.<host>`` (RFC 7672 section 2.2.3)
  and returns a :class:`DaneLookup`: ``secure`` only when the answer was
  DNSSEC-validated (the AD bit of a trusted validating resolver, see
  ``Resolver.secure``); ``records`` the usable ones (section 3.1: usage
  DANE-TA(2) or DANE-EE(3), selector 0 or 1, matching 0, 1 or 2);
  ``unusable`` whether records existed but none was usable. A failed
  lookup raises ``DnsTemporaryError``: the host must not be used then
  (section 2.2: no fallback to cleartext).
* :func:`verify_chain` says whether a presented certificate chain (leaf
  first, DER) satisfies the records for ``host``: DANE-EE matches the leaf
  whatever its names and dates (section 3.1.1); DANE-TA matches a
  certificate of the chain that must then issue, by a valid chain, a leaf
  naming ``host`` (section 3.1.2, 3.2.2). If not, a :class:`DaneMismatch`
  says why and which RFC 8460 result type reports it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DANE_TA = 2
DANE_EE = 3


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 section 2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 section 3.1: only DANE-TA(2) and DANE-EE(3), with the
        selectors and matching types RFC 6698 defines."""
        return (
            self.usage in (DANE_TA, DANE_EE)
            and self.selector in (0, 1)
            and self.mtype in (0, 1, 2)
            and (self.mtype != 1 or len(self.data) == 32)
            and (self.mtype != 2 or len(self.data) == 64)
        )


@dataclass(frozen=True)
class DaneLookup:
    secure: bool
    records: tuple[Tlsa, ...] = ()
    unusable: bool = False  # TLSA records present, none usable (section 3.1)


class _Secure(Protocol):
    async def secure(self, name: str, rdtype: str) -> tuple[list[Any], bool]: ...


async def tlsa_for(resolver: _Secure, host: str, port: int = 25) -> DaneLookup:
    """The validated TLSA records of ``host`` (RFC 7672 section 2.2.3)."""
    found, secure = await resolver.secure(f"_{port}._tcp.{host}", "TLSA")
    if not secure:
        return DaneLookup(False)
    records = [Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in found]
    usable = tuple(r for r in records if r.usable)
    return DaneLookup(True, usable, unusable=bool(records) and not usable)


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der  # the full certificate
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def matches(record: Tlsa, der: bytes) -> bool:
    """``record`` matches the certificate ``der`` (RFC 6698 section 2.1.2,
    2.1.3: selector 0 full certificate, 1 SubjectPublicKeyInfo; matching 0
    exact, 1 SHA-256, 2 SHA-512)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        data = _selected(cert, der, record.selector)
    except ValueError:
        return False
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def record_for(der: bytes, usage: int = DANE_EE, selector: int = 1, mtype: int = 1) -> Tlsa:
    """The TLSA record that matches certificate ``der`` (for operators and tests)."""
    cert = x509.load_der_x509_certificate(der)
    data = _selected(cert, der, selector)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return Tlsa(usage, selector, mtype, data)


# RFC 8460 result types (IANA "STARTTLS Validation Result Types"). Section
# 4.3.2.1, tlsa-invalid: "a validation error in the TLSA record associated
# with a DANE policy. None of the records in the RRset were found to be
# valid": no record of the (validated) RRset matches what the host presents.
TLSA_INVALID = "tlsa-invalid"
# Section 4.3.1: the certificate breaks the DANE policy's constraints (the
# MX host name, under DANE-TA), has expired, or its chain up to the TLSA
# trust anchor does not hold.
HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
# Sections 4.3.1 and 4.3.3: a negotiation failure no category above fits.
VALIDATION_FAILURE = "validation-failure"


@dataclass(frozen=True)
class DaneMismatch:
    """Why a presented chain does not satisfy the TLSA records: ``text``
    for replies and logs, ``result_type`` the RFC 8460 result type that
    reports the failed session."""

    result_type: str
    text: str

    def __str__(self) -> str:
        return self.text


def verify_chain(records: tuple[Tlsa, ...], chain: list[bytes], host: str) -> DaneMismatch | None:
    """None if ``chain`` (leaf first, DER) satisfies ``records`` for
    ``host``, else why not."""
    if not chain:
        return DaneMismatch(VALIDATION_FAILURE, "no certificate presented")
    leaf = chain[0]
    if any(r.usage == DANE_EE and matches(r, leaf) for r in records):
        return None  # section 3.1.1: names and expiry are not checked
    for record in (r for r in records if r.usage == DANE_TA):
        for index, der in enumerate(chain[1:], 1):
            if matches(record, der):
                return _issued_by(chain, index, host)
    return DaneMismatch(TLSA_INVALID, "no TLSA record matches the certificate chain")


def _issued_by(chain: list[bytes], anchor: int, host: str) -> DaneMismatch | None:
    """Section 3.1.2: each certificate from the leaf up to the trust anchor
    ``chain[anchor]`` is signed by the next one, which is a CA; the leaf and
    the intermediates are within their dates; the leaf names ``host``
    (section 3.2.2). No other PKIX policy: SMTP certificates are not held
    to the web's rules."""
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain[: anchor + 1]]
        now = dt.datetime.now(dt.UTC)
        for cert, issuer in itertools.pairwise(certs):
            try:
                constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints)
            except x509.ExtensionNotFound:
                constraints = None
            if constraints is None or not constraints.value.ca:
                text = f"DANE-TA: {issuer.subject.rfc4514_string()} is not a CA"
                return DaneMismatch(NOT_TRUSTED, text)
            cert.verify_directly_issued_by(issuer)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                text = f"DANE-TA: {cert.subject.rfc4514_string()} is expired or not yet valid"
                return DaneMismatch(EXPIRED, text)
    except (ValueError, TypeError, InvalidSignature) as exc:
        return DaneMismatch(NOT_TRUSTED, f"DANE-TA chain not valid: {exc or type(exc).__name__}")
    if not any(_name_matches(name, host) for name in _dns_names(certs[0])):
        return DaneMismatch(HOST_MISMATCH, f"DANE-TA: the certificate does not name {host}")
    return None


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [str(c.value) for c in common]
    return san.value.get_values_for_type(x509.DNSName)


def _name_matches(name: str, host: str) -> bool:
    """RFC 6125 section 6.4.3: a ``*`` only as the whole leftmost label."""
    name, host = name.rstrip(".").lower(), host.rstrip(".").lower()
    if name.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == name[2:]
    return name == host

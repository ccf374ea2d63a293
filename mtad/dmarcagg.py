"""DMARC aggregate reports (RFC 7489 section 7.2, appendix C), parsed purely.

:func:`find_reports` finds the report attachments of a message (a
``.xml``, ``.xml.gz``/``.gz`` or ``.zip`` part, or the whole body, section
7.2.1.1) and :func:`parse_report` reads one into an :class:`AggregateReport`.

Hostile input, bounded: decompression stops at :data:`MAX_XML_BYTES` of
output (gzip read in steps, zip by its members' real output, not their
declared sizes), at most :data:`MAX_RECORDS` rows are kept, and a document
with a DTD (``<!DOCTYPE``/``<!ENTITY``) is refused before parsing: no
report needs one, and that is what XXE and entity-expansion bombs ride on.
The expat parser never fetches external entities. No I/O here.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import io
import re
import zipfile
import zlib
from dataclasses import dataclass
from email.message import Message
from xml.etree import ElementTree

MAX_XML_BYTES = 10 * 1024 * 1024  # decompressed size of one report
MAX_RECORDS = 100_000  # rows kept of one report
MAX_ATTACHMENTS = 4  # report parts looked at in one message

_DTD = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY)", re.IGNORECASE)


class ReportError(ValueError):
    """Not a usable aggregate report (too big, a DTD, malformed, no <feedback>)."""


@dataclass(frozen=True)
class ReportRow:
    """One ``<record>`` (appendix C RecordType)."""

    source_ip: str
    count: int
    disposition: str
    dkim: str  # policy_evaluated: pass or fail (aligned)
    spf: str
    header_from: str
    auth: str  # auth_results, e.g. "dkim=example.com:pass spf=example.com:fail"


@dataclass(frozen=True)
class AggregateReport:
    org_name: str
    email: str | None
    report_id: str
    date_begin: int
    date_end: int
    domain: str
    policy: str  # policy_published as "p=none; sp=none; pct=100; adkim=r; aspf=r"
    rows: tuple[ReportRow, ...]


def _inflate_gzip(data: bytes) -> bytes:
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            while chunk := f.read(65536):
                out += chunk
                if len(out) > MAX_XML_BYTES:
                    raise ReportError("report larger than 10 MB decompressed")
    except (OSError, EOFError, zlib.error) as exc:
        raise ReportError(f"bad gzip data: {exc}") from None
    return bytes(out)


def _inflate_zip(data: bytes) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:  # section 7.2.1.1: one report per archive
                raise ReportError("a report archive holds one file")
            out = bytearray()
            with archive.open(members[0]) as f:
                while chunk := f.read(65536):
                    out += chunk
                    if len(out) > MAX_XML_BYTES:
                        raise ReportError("report larger than 10 MB decompressed")
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError) as exc:
        raise ReportError(f"bad zip data: {exc}") from None
    return bytes(out)


def decompress(data: bytes) -> bytes:
    """The XML document in ``data`` (gzip, zip or plain, by magic number)."""
    if data[:2] == b"\x1f\x8b":
        return _inflate_gzip(data)
    if data[:4] == b"PK\x03\x04":
        return _inflate_zip(data)
    if len(data) > MAX_XML_BYTES:
        raise ReportError("report larger than 10 MB")
    return data


def find_reports(raw: bytes) -> list[bytes]:
    """The report attachments of a message, still compressed (at most
    :data:`MAX_ATTACHMENTS`): parts named or typed as XML, gzip or zip."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:
        return []
    found: list[bytes] = []
    for part in msg.walk():
        if part.is_multipart() or not _is_report_part(part):
            continue
        try:
            payload = part.get_payload(decode=True)
        except Exception:
            continue
        if isinstance(payload, bytes) and payload:
            found.append(payload)
            if len(found) >= MAX_ATTACHMENTS:
                break
    return found


def _is_report_part(part: Message) -> bool:
    ctype = part.get_content_type()
    name = (part.get_filename() or "").lower()
    return ctype in (
        "application/gzip",
        "application/x-gzip",
        "application/zip",
        "application/x-zip-compressed",
        "application/xml",
        "text/xml",
    ) or name.endswith((".xml", ".xml.gz", ".gz", ".zip"))


def _text(node: ElementTree.Element | None, path: str, default: str = "") -> str:
    if node is None:
        return default
    found = node.find(path)
    return (found.text or "").strip() if found is not None and found.text else default


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ReportError(f"not a number: {text[:40]!r}") from None


def parse_report(data: bytes) -> AggregateReport:
    """The report in one attachment (compressed or not); ReportError if it
    is not an appendix C ``<feedback>`` document or breaks the bounds."""
    xml = decompress(data)
    if _DTD.search(xml) or b"\x00" in xml:  # no DTD; UTF-16 would hide one from the scan
        raise ReportError("a report with a DTD is refused")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise ReportError(f"malformed XML: {exc}") from None
    if root.tag != "feedback":
        raise ReportError("the root element is not <feedback>")
    meta = root.find("report_metadata")
    published = root.find("policy_published")
    report_id = _text(meta, "report_id")
    org_name = _text(meta, "org_name")
    domain = _text(published, "domain").lower().rstrip(".")
    if not report_id or not org_name or not domain:
        raise ReportError("report_metadata or policy_published incomplete")
    policy = "; ".join(
        f"{tag}={_text(published, tag)}"
        for tag in ("p", "sp", "pct", "adkim", "aspf", "fo")
        if _text(published, tag)
    )
    rows: list[ReportRow] = []
    for record in root.iterfind("record"):
        if len(rows) >= MAX_RECORDS:
            break
        row = record.find("row")
        evaluated = row.find("policy_evaluated") if row is not None else None
        auth = " ".join(
            f"{kind}={_text(result, 'domain')}:{_text(result, 'result')}"
            for kind in ("dkim", "spf")
            for result in record.iterfind(f"auth_results/{kind}")
        )
        rows.append(
            ReportRow(
                source_ip=_text(row, "source_ip")[:45],
                count=_int(_text(row, "count", "0")),
                disposition=_text(evaluated, "disposition", "none")[:16],
                dkim=_text(evaluated, "dkim", "fail")[:16],
                spf=_text(evaluated, "spf", "fail")[:16],
                header_from=_text(record, "identifiers/header_from").lower()[:255],
                auth=auth,
            )
        )
    return AggregateReport(
        org_name=org_name[:255],
        email=_text(meta, "email") or None,
        report_id=report_id[:255],
        date_begin=_int(_text(meta, "date_range/begin", "0")),
        date_end=_int(_text(meta, "date_range/end", "0")),
        domain=domain[:255],
        policy=policy,
        rows=tuple(rows),
    )


def reports_in(raw: bytes) -> tuple[list[AggregateReport], list[str]]:
    """Every aggregate report of a message, and why each other candidate
    attachment was refused."""
    reports: list[AggregateReport] = []
    refused: list[str] = []
    for data in find_reports(raw):
        try:
            reports.append(parse_report(data))
        except ReportError as exc:
            refused.append(str(exc))
    return reports, refused


_CANDIDATE = re.compile(
    rb"content-type:\s*(?:application/(?:x-)?(?:gzip|zip|x-zip-compressed|xml)|text/xml)"
    rb"|name\s*=\s*\"?[^\"\r\n]{0,200}\.(?:xml|gz|zip)\"?",
    re.IGNORECASE,
)


def may_hold_report(raw: bytes) -> bool:
    """The cheap test (one regex pass) before :func:`reports_in`: a part
    typed or named as XML, gzip or zip somewhere in the message."""
    return _CANDIDATE.search(raw) is not None

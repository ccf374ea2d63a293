"""ARF complaint reports (RFC 5965), parsed purely.

:func:`parse_arf` reads a ``multipart/report; report-type=feedback-report``
message (RFC 5965 section 2) into an :class:`ArfReport`: the
``message/feedback-report`` part's fields (section 3.1, 3.2) and the
header of the embedded original (``message/rfc822`` or
``text/rfc822-headers``, section 2 item d). :func:`looks_like_arf` is the
cheap test on the header alone, so that the full parse runs only for
candidates. No I/O here; the work is bounded by the caller's size cap
(the parse is linear in the message size).
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import quopri
import re
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses

# RFC 5965 section 7.3 (and RFC 6650 section 3): complaint types that mean
# "the recipient did not want this mail".
COMPLAINT_TYPES = frozenset({"abuse", "fraud"})

_REPORT_TYPE = re.compile(rb"report-type\s*=\s*\"?feedback-report\"?", re.IGNORECASE)
_DKIM_D = re.compile(r"(?:^|;)\s*d\s*=\s*([A-Za-z0-9.-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class ArfReport:
    """One feedback report: its type, the complained-about recipients
    (lower-cased), and what the original says about its sender."""

    feedback_type: str
    recipients: tuple[str, ...]
    original_from_domain: str | None
    original_dkim_domains: tuple[str, ...]
    original_message_id: str | None
    user_agent: str | None


def looks_like_arf(header: bytes) -> bool:
    """True if the top-level header is a multipart/report with
    ``report-type=feedback-report`` (RFC 5965 section 2 item a)."""
    lowered = header.lower()
    return b"multipart/report" in lowered and _REPORT_TYPE.search(header) is not None


def _addresses(values: list[str]) -> list[str]:
    return [a.lower() for _, a in getaddresses(values) if "@" in a]


# Bounds: the report's parts looked at, and the header bytes parsed of each
# (the feedback fields, the original's header). Only headers are parsed:
# the original's body and any MIME structure in it are never walked.
MAX_PARTS = 8
MAX_HEADER_BYTES = 256 * 1024

_PARSER = email.parser.BytesParser(policy=email.policy.compat32)


def _headers(raw: bytes) -> Message:
    """The header fields at the start of ``raw`` (at most
    :data:`MAX_HEADER_BYTES`), body ignored."""
    end = re.search(rb"\r?\n\r?\n", raw[:MAX_HEADER_BYTES])
    return _PARSER.parsebytes(raw[: end.end() if end else MAX_HEADER_BYTES], headersonly=True)


def _parts(body: bytes, boundary: str) -> list[bytes]:
    """The body parts of a multipart body (RFC 2046 section 5.1.1), by one
    split on the delimiter: linear, and nothing nested is looked into."""
    delimiter = b"\n--" + boundary.encode("ascii", "replace")
    chunks = (b"\n" + body).split(delimiter)[1 : MAX_PARTS + 1]
    parts: list[bytes] = []
    for chunk in chunks:
        if chunk.startswith(b"--"):  # the close delimiter
            break
        _line, _, rest = chunk.partition(b"\n")
        parts.append(rest[:-1] if rest.endswith(b"\r") else rest)
    return parts


def _decoded(head: Message, body: bytes) -> bytes:
    """``body`` undone of its Content-Transfer-Encoding (RFC 2045 section 6)."""
    encoding = (head.get("Content-Transfer-Encoding") or "").strip().lower()
    if encoding == "base64":
        return binascii.a2b_base64(re.sub(rb"[^A-Za-z0-9+/=]", b"", body[: MAX_HEADER_BYTES * 2]))
    if encoding == "quoted-printable":
        return quopri.decodestring(body[: MAX_HEADER_BYTES * 2])
    return body


def parse_arf(raw: bytes) -> ArfReport | None:
    """The report in ``raw``, or None if it is not an RFC 5965 report (no
    ``message/feedback-report`` part, or no ``Feedback-Type``)."""
    try:
        return _parse(raw)
    except Exception:  # malformed in a way the email package rejects
        return None


def _parse(raw: bytes) -> ArfReport | None:
    msg = _headers(raw)
    if msg.get_content_type() != "multipart/report":
        return None
    if (msg.get_param("report-type") or "").lower() != "feedback-report":
        return None
    boundary = msg.get_boundary()
    if not boundary:
        return None
    fields: Message | None = None
    original: Message | None = None
    start = re.search(rb"\r?\n\r?\n", raw)
    for part in _parts(raw[start.end() if start else len(raw) :], boundary):
        head = _headers(part)
        ctype = head.get_content_type()
        if ctype not in ("message/feedback-report", "message/rfc822", "text/rfc822-headers"):
            continue
        split = re.search(rb"\r?\n\r?\n", part)
        content = _decoded(head, part[split.end() :] if split else b"")
        if ctype == "message/feedback-report" and fields is None:
            fields = _headers(content.lstrip(b"\r\n"))
        elif ctype != "message/feedback-report" and original is None:
            original = _headers(content)
    if fields is None:
        return None
    feedback_type = (fields.get("Feedback-Type") or "").strip().lower()
    if not feedback_type:  # section 3.1: required
        return None
    # Section 3.2: Original-Rcpt-To (optional, repeatable) names the
    # recipients; failing that, the original's To (often redacted).
    recipients = _addresses([str(v) for v in fields.get_all("Original-Rcpt-To") or []])
    if not recipients and original is not None:
        recipients = _addresses([str(v) for v in original.get_all("To") or []])
    from_domain = None
    dkim_domains: list[str] = []
    message_id = None
    if original is not None:
        senders = _addresses([str(v) for v in original.get_all("From") or []])
        if len(senders) == 1:
            from_domain = senders[0].rpartition("@")[2]
        for sig in original.get_all("DKIM-Signature") or []:
            found = _DKIM_D.search(re.sub(r"\s+", " ", str(sig)))
            if found:
                dkim_domains.append(found.group(1).lower().rstrip("."))
        message_id = (original.get("Message-ID") or "").strip() or None
    return ArfReport(
        feedback_type=feedback_type,
        recipients=tuple(dict.fromkeys(recipients)),
        original_from_domain=from_domain,
        original_dkim_domains=tuple(dkim_domains),
        original_message_id=message_id,
        user_agent=(fields.get("User-Agent") or "").strip() or None,
    )

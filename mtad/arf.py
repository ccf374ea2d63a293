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

import email
import email.policy
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


def _feedback_fields(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list):  # the parser took it as a message
        first = payload[0] if payload else None
        return first if isinstance(first, Message) else None
    text = payload if isinstance(payload, str) else ""
    return email.message_from_string(text.lstrip("\r\n"), policy=email.policy.compat32)


def _original_header(part: Message) -> Message | None:
    if part.get_content_type() == "message/rfc822":
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
        return None
    text = part.get_payload(decode=True) or b""
    return email.message_from_bytes(text, policy=email.policy.compat32)


def parse_arf(raw: bytes) -> ArfReport | None:
    """The report in ``raw``, or None if it is not an RFC 5965 report (no
    ``message/feedback-report`` part, or no ``Feedback-Type``)."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:
        return None
    if msg.get_content_type() != "multipart/report":
        return None
    if (msg.get_param("report-type") or "").lower() != "feedback-report":
        return None
    fields: Message | None = None
    original: Message | None = None
    parts = msg.get_payload()
    if not isinstance(parts, list):
        return None
    for part in parts:  # section 2: the report's parts, in order, not nested
        if not isinstance(part, Message):
            continue
        ctype = part.get_content_type()
        if ctype == "message/feedback-report" and fields is None:
            fields = _feedback_fields(part)
        elif ctype in ("message/rfc822", "text/rfc822-headers") and original is None:
            original = _original_header(part)
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

"""The built-in anti-spam engine's header sanity rules: a small fixed set
of checks on a message's header, structure and authentication results,
each adding a score when it matches (see :data:`RULES`).

The rules read what the parser (storage/mime.py, linear in the message)
already made of the message, plus one pass over the header fields
(delivery/headers.py ``iter_fields``, linear) and a bounded look at the
first text parts' octets: every rule is linear in the header and bounded in
the body, whatever a sender puts there (tests/unit/test_spam_rules.py
times them on adversarial headers).

The SPF, DKIM and DMARC results are the MX's own (mtad/checks.py computes
them for every MX message before delivery), handed in as
:class:`AuthVerdicts` so this package stays below mtad.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from delivery.headers import header_block_end, iter_fields
from storage.model import BodyPart, ParsedMessage
from storage.text import part_octets

# A Date this far ahead of our clock is no clock error (RFC 5322 section
# 3.6.1: the date the message was complete; RFC 5321 4.4 trace is ours).
FUTURE_SLACK = dt.timedelta(hours=24)
CAPS_MIN_LETTERS = 12  # a shorter subject in capitals ("RE: FYI") says little
TEXT_PARTS_READ = 8  # text parts whose octets the charset rule reads
OCTETS_READ = 64 * 1024  # of each


@dataclass(frozen=True)
class Rule:
    """One rule: its symbol (as in X-Spam-Symbols), score, and what it says."""

    name: str
    score: float
    says: str


# Scores are small: rules alone junk only a message that breaks several,
# the Bayes classifier and the DNS lists do the rest (delivery/spamengine.py).
RULES = {
    rule.name: rule
    for rule in (
        # RFC 5322 section 3.6: exactly one Date (orig-date) and one From.
        Rule("MISSING_DATE", 1.0, "no Date field (RFC 5322 3.6)"),
        Rule("INVALID_DATE", 1.5, "Date is no RFC 5322 3.3 date-time"),
        Rule("DATE_IN_FUTURE", 2.0, "Date more than a day ahead of our clock"),
        # RFC 5322 section 3.6.4: every message SHOULD have a Message-ID.
        Rule("MISSING_MID", 1.0, "no Message-ID field (RFC 5322 3.6.4)"),
        Rule("MISSING_FROM", 2.5, "no From field (RFC 5322 3.6)"),
        Rule("FROM_UNPARSEABLE", 2.0, "From holds no addr-spec (RFC 5322 3.4)"),
        Rule("SUBJ_ALL_CAPS", 1.0, "Subject in capitals only"),
        Rule("MIME_HTML_ONLY", 1.0, "HTML text without a plain-text alternative"),
        # RFC 2046 section 4.1.2: charset defaults to US-ASCII, 7-bit.
        Rule("CHARSET_MISMATCH", 1.0, "text octets its declared charset cannot hold"),
        # Our own SPF (RFC 7208 8.4, 8.5), DKIM (RFC 6376 6.3), DMARC (RFC 7489 6.6).
        Rule("SPF_FAIL", 1.5, "SPF fail for the envelope sender"),
        Rule("SPF_SOFTFAIL", 0.5, "SPF softfail for the envelope sender"),
        Rule("DKIM_FAIL", 1.0, "a DKIM signature failed and none passed"),
        Rule("DMARC_FAIL", 2.0, "DMARC fail for the From domain"),
    )
}


@dataclass(frozen=True)
class AuthVerdicts:
    """The MX's SPF, DKIM and DMARC results (RFC 8601 result words): None
    or empty where the check was off or not run (submission)."""

    spf: str | None = None
    dkim: tuple[str, ...] = ()
    dmarc: str | None = None


def _walk(part: BodyPart) -> Iterator[BodyPart]:
    # Iterative: a deep (hostile) nesting must not hit the recursion limit.
    stack = [part]
    while stack:
        here = stack.pop()
        yield here
        stack.extend(reversed(here.children))
        if here.message_body is not None:
            stack.append(here.message_body)


def _html_only(root: BodyPart) -> bool:
    kinds = {p.subtype for p in _walk(root) if p.type == "text"}
    return "html" in kinds and "plain" not in kinds


def _charset_mismatch(raw: bytes, root: BodyPart) -> bool:
    """A text part declared (or defaulted) US-ASCII carrying 8-bit octets,
    or declared UTF-8 and not UTF-8; only the first parts, first octets."""
    read = 0
    for part in _walk(root):
        if part.type != "text":
            continue
        if read == TEXT_PARTS_READ:
            return False
        read += 1
        charset = dict(part.params).get("charset", "us-ascii").strip("\"' ").lower()
        octets = part_octets(raw, part)[:OCTETS_READ]
        if charset in ("us-ascii", "ascii") and not octets.isascii():
            return True
        if charset in ("utf-8", "utf8"):
            try:
                octets.decode("utf-8")
            except UnicodeDecodeError as exc:
                # A sequence cut by the read cap is not the sender's fault.
                if exc.start < len(octets) - 3:
                    return True
    return False


def _all_caps(subject: str) -> bool:
    letters = [ch for ch in subject if ch.isalpha()]
    return len(letters) >= CAPS_MIN_LETTERS and all(ch.isupper() for ch in letters)


def matches(
    raw: bytes, parsed: ParsedMessage, auth: AuthVerdicts, now: dt.datetime | None = None
) -> list[Rule]:
    """The rules ``raw`` (the message or its first octets, as parsed into
    ``parsed``) matches, in :data:`RULES` order."""
    names = {name for name, _, _, _ in iter_fields(raw[: header_block_end(raw)])}
    hits: list[str] = []
    if "date" not in names:
        hits.append("MISSING_DATE")
    elif parsed.sent_date is None:
        hits.append("INVALID_DATE")
    elif parsed.sent_date > (now or dt.datetime.now(dt.UTC)) + FUTURE_SLACK:
        hits.append("DATE_IN_FUTURE")
    if "message-id" not in names:
        hits.append("MISSING_MID")
    if "from" not in names:
        hits.append("MISSING_FROM")
    elif not any(a.mailbox and a.host for a in parsed.envelope.from_):
        hits.append("FROM_UNPARSEABLE")
    if _all_caps(parsed.subject):
        hits.append("SUBJ_ALL_CAPS")
    if _html_only(parsed.body):
        hits.append("MIME_HTML_ONLY")
    if _charset_mismatch(raw, parsed.body):
        hits.append("CHARSET_MISMATCH")
    if auth.spf == "fail":
        hits.append("SPF_FAIL")
    elif auth.spf == "softfail":
        hits.append("SPF_SOFTFAIL")
    if "fail" in auth.dkim and "pass" not in auth.dkim:
        hits.append("DKIM_FAIL")
    if auth.dmarc == "fail":
        hits.append("DMARC_FAIL")
    return [RULES[name] for name in hits]


__all__ = ["RULES", "AuthVerdicts", "Rule", "matches"]

"""Trace and authentication header fields, on raw message bytes.

Messages stay bytes end to end (never re-serialised): we only prepend
fields (Received, Return-Path, Authentication-Results) and drop forged
Authentication-Results fields that claim our authserv-id (RFC 8601
section 5). Field text is built here and folded to stay well under the
998-octet line limit (RFC 5322 section 2.1.1).
"""

from __future__ import annotations

import email.utils
import itertools
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_\[\]:]")


def header_block_end(raw: bytes) -> int:
    """Offset where the body starts (after the blank line), or len(raw)."""
    idx = raw.find(b"\r\n\r\n")
    if raw.startswith(b"\r\n"):
        return 2
    return len(raw) if idx < 0 else idx + 4


def iter_fields(raw: bytes) -> Iterator[tuple[str, bytes, int, int]]:
    """(lower-case name, unfolded value, start, end) for each header field."""
    end_of_header = header_block_end(raw)
    pos = 0
    while pos < end_of_header:
        nxt = raw.find(b"\r\n", pos)
        if nxt == pos:  # the blank line ending the header
            break
        end = len(raw) if nxt < 0 else nxt + 2
        while end < end_of_header and raw[end : end + 1] in (b" ", b"\t"):
            more = raw.find(b"\r\n", end)
            end = len(raw) if more < 0 else more + 2
        field = raw[pos:end]
        match = _FIELD_NAME.match(field)
        if match:
            name = match[1].decode("ascii").lower()
            value = field[match.end() :].replace(b"\r\n", b"").strip()
            yield name, value, pos, end
        pos = end


def remove_fields(raw: bytes, drop: callable) -> bytes:  # type: ignore[valid-type]
    """``raw`` without the header fields for which ``drop(name, value)`` is true."""
    cuts = [(s, e) for name, value, s, e in iter_fields(raw) if drop(name, value)]
    if not cuts:
        return raw
    out, last = [], 0
    for s, e in cuts:
        out.append(raw[last:s])
        last = e
    out.append(raw[last:])
    return b"".join(out)


def strip_forged_results(raw: bytes, authserv_id: str) -> bytes:
    """RFC 8601 section 5: remove Authentication-Results fields that carry
    our own authserv-id before adding ours, so a sender cannot forge them."""
    ours = authserv_id.lower().encode()

    def drop(name: str, value: bytes) -> bool:
        if name != "authentication-results":
            return False
        served_by = value.split(b";", 1)[0].strip().split()[:1]
        return bool(served_by) and served_by[0].lower() == ours

    return remove_fields(raw, drop)


def from_addresses(raw: bytes) -> list[str]:
    """Every address in every From field (RFC 5322 section 3.6.2), as written;
    ``""`` for one that does not parse."""
    values = [
        value.decode("utf-8", "replace") for name, value, _, _ in iter_fields(raw) if name == "from"
    ]
    return [addr for _, addr in email.utils.getaddresses(values)] if values else []


def from_domains(raw: bytes) -> list[str]:
    """Domains of every address in every From field (RFC 7489 section 6.6.1)."""
    return [
        addr.rpartition("@")[2].lower().rstrip(".") if "@" in addr else ""
        for addr in from_addresses(raw)
    ]


def fold(name: str, parts: Sequence[str]) -> bytes:
    """``Name: part1`` with each further part on its own continuation line."""
    text = f"{name}: " + "\r\n\t".join(p for p in parts if p)
    return text.encode("utf-8") + b"\r\n"


class _QueueIds:
    """A random 16-bit prefix drawn once per process and a counter from a
    random 48-bit start: unique in practice across instances, without a
    getrandom() call per message. A forked child draws its own."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = f"{secrets.randbits(16):04X}"
        self.counter = itertools.count(secrets.randbits(48))

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFF:012X}"


_QUEUE_IDS = _QueueIds()


def new_queue_id() -> str:
    """16 hex digits naming one accepted message in logs and its Received field."""
    return _QUEUE_IDS.next()


def received_field(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    tls: str | None = None,
    recipient: str | None = None,
    when: float | None = None,
) -> bytes:
    """RFC 5321 section 4.4 Received: ``from`` (with the TCP-info address
    literal), ``by``, ``with`` (RFC 3848 / RFC 6531 protocol type), ``id``,
    ``for`` only for a single recipient (not to reveal Bcc lists), date."""
    helo = _SAFE_HELO.sub("?", helo)[:255] or "unknown"
    literal = f"[IPv6:{client_ip}]" if ":" in client_ip else f"[{client_ip}]"
    # RFC 5322 section 3.3: UTC is "+0000"; "-0000" would mean "zone unknown".
    stamp = datetime.fromtimestamp(int(when if when is not None else time.time()), UTC)
    date = email.utils.format_datetime(stamp)
    parts = [f"from {helo} ({literal})", f"by {hostname} (shardmail) with {protocol} id {queue_id}"]
    if tls:
        parts.append(f"({tls})")
    if recipient:
        parts.append(f"for <{recipient}>")
    parts[-1] += ";"
    parts.append(date)
    return fold("Received", parts)


def protocol_name(*, esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """RFC 3848 (ESMTP, ESMTPS, ESMTPA, ESMTPSA) and RFC 6531 section 3.7.3
    (UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA) ``with`` keywords."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if utf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


def return_path_field(mail_from: str) -> bytes:
    """RFC 5321 section 4.4: added by the final delivery, ``<>`` for bounces."""
    return f"Return-Path: <{mail_from}>\r\n".encode()

"""What IMAP SORT and THREAD compare of each message (RFC 5256), read for a
whole mailbox in one call without building every message's parsed form.

:meth:`storage.api.MailStore.sort_rows` returns one :class:`SortRow` per
entry. The rebuild of a full ParsedMessage (body structure included) cost
about 80 us a message, 8 s for a SORT of 100,000; picking the few fields
out of the same stored JSON (:func:`sort_row`) costs a fraction of that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from storage.imapstruct import JSON_VERSION
from storage.model import Address

# Positions in the stored envelope list (storage.imapstruct._env_out,
# RFC 3501 section 7.4.2 order).
_ENV_FROM, _ENV_TO, _ENV_CC = 2, 5, 6


@dataclass(frozen=True, slots=True)
class SortRow:
    """One entry's sort and thread inputs."""

    uid: int
    internal_date: float  # epoch seconds
    size: int
    sent_date: float | None  # epoch seconds; None: no usable Date header
    subject: str  # RFC 2047-decoded
    from_: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]


def _addresses(rows: list[list[str | None]]) -> tuple[Address, ...]:
    return tuple(Address(r[0], r[1], r[2], r[3]) for r in rows)


def sort_row(
    uid: int, internal_micros: int, size: int, sent_date: float | None, parsed_json: str
) -> SortRow:
    """A SortRow from an entry's columns and its message's stored parsed
    form (storage.imapstruct.parsed_to_json). ValueError on an unknown
    version of that form, as parsed_from_json."""
    doc = json.loads(parsed_json)
    if doc.get("v") != JSON_VERSION:
        raise ValueError(f"unknown parsed-message JSON version {doc.get('v')!r}")
    env = doc["env"]
    return SortRow(
        uid=uid,
        internal_date=internal_micros / 1_000_000,
        size=size,
        sent_date=sent_date,
        subject=doc["subj"],
        from_=_addresses(env[_ENV_FROM]),
        to=_addresses(env[_ENV_TO]),
        cc=_addresses(env[_ENV_CC]),
        message_id=doc["mid"],
        in_reply_to=doc["irt"],
        references=tuple(doc["refs"]),
    )

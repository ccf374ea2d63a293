"""The search box language of ``GET /v1/search?q=``, translated to storage Criteria.

Grammar (terms are ANDed; ``-`` before a term negates it; values may be
double-quoted to hold spaces)::

    subject:VALUE  from:VALUE  to:VALUE  cc:VALUE  body:VALUE
    has:attachment  is:unread  is:read  is:flagged  is:unflagged
    before:YYYY-MM-DD  after:YYYY-MM-DD (internal date, by calendar day)
    anything else: free text, matched against the subject, From, To, Cc and body

Header and text matches are case-insensitive substrings, as RFC 3501
section 6.4.4 SEARCH defines them. ``has:attachment`` is not expressible as
Criteria; it comes back as a post-filter on the parsed message.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from storage.model import FLAGGED, SEEN
from storage.search import All, And, Criteria, Date, Flag, Header, Not, Text

MAX_QUERY_LENGTH = 1000
MAX_TERMS = 20
_TOKEN = re.compile(r'\s*(-?)(?:([A-Za-z]+):)?(?:"((?:[^"\\]|\\.)*)"|(\S+))')


class QueryError(ValueError):
    """The query cannot be understood; the message is safe to show."""


@dataclass(frozen=True)
class SearchQuery:
    criteria: Criteria
    has_attachment: bool | None  # None: no constraint


def _date(value: str, key: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise QueryError(f"{key}: expects a date as YYYY-MM-DD") from None


def parse_query(text: str) -> SearchQuery:
    """Parse the search language (see module doc). Raises QueryError."""
    if len(text) > MAX_QUERY_LENGTH:
        raise QueryError(f"query longer than {MAX_QUERY_LENGTH} characters")
    terms: list[Criteria] = []
    has_attachment: bool | None = None
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise QueryError("unbalanced quotes in query")
        pos = match.end()
        negate, key, quoted, bare = match.groups()
        if quoted is None and bare.startswith('"'):
            raise QueryError("unbalanced quotes in query")
        if key is None and bare and bare.endswith(":") and bare[:-1].lower() in _KEYS:
            raise QueryError(f"{bare[:-1].lower()}: needs a value")
        value = quoted.replace('\\"', '"').replace("\\\\", "\\") if quoted is not None else bare
        if key is not None and key.lower() not in _KEYS:
            # "re:lunch" or a URL is free text, not an unknown operator.
            value, key = f"{key}:{value}", None
        term: Criteria
        if key is None:
            if not value:
                continue
            # What the reader sees, not trace fields (Received, DKIM...): the
            # index holds these columns, so the search stays indexed.
            term = Text("content", value)
        else:
            key = key.lower()
            if not value:
                raise QueryError(f"{key}: needs a value")
            if key in ("subject", "from", "to", "cc"):
                term = Header(key, value)
            elif key == "body":
                term = Text("body", value)
            elif key == "has":
                if value.lower() not in ("attachment", "attachments"):
                    raise QueryError("has: only supports has:attachment")
                has_attachment = not negate
                continue
            elif key == "is":
                term = _IS.get(value.lower())  # type: ignore[assignment]
                if term is None:
                    raise QueryError("is: supports unread, read, flagged, unflagged")
            elif key == "before":
                term = Date("internal", "before", _date(value, key))
            else:  # after / since
                term = Date("internal", "since", _date(value, key) + dt.timedelta(
                    days=1 if key == "after" else 0))
        terms.append(Not(term) if negate else term)
        if len(terms) > MAX_TERMS:
            raise QueryError(f"at most {MAX_TERMS} terms")
    criteria: Criteria
    if not terms:
        criteria = All()
    elif len(terms) == 1:
        criteria = terms[0]
    else:
        criteria = And(tuple(terms))
    return SearchQuery(criteria, has_attachment)


_KEYS = frozenset({"subject", "from", "to", "cc", "body", "has", "is", "before", "after", "since"})
_IS: dict[str, Criteria] = {
    "unread": Flag(SEEN, False),
    "read": Flag(SEEN, True),
    "flagged": Flag(FLAGGED, True),
    "unflagged": Flag(FLAGGED, False),
}

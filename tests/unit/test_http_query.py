"""The search box language translates to storage Criteria."""

from __future__ import annotations

import datetime as dt

import pytest

from httpapi.query import QueryError, parse_query
from storage.model import FLAGGED, SEEN
from storage.search import All, And, Date, Flag, Header, Not, Text


@pytest.mark.parametrize(
    ("query", "criteria"),
    [
        ("", All()),
        ("subject:report", Header("subject", "report")),
        ("from:alice to:bob", And((Header("from", "alice"), Header("to", "bob")))),
        ("body:invoice", Text("body", "invoice")),
        ("hello", Text("content", "hello")),
        ('subject:"quarterly report"', Header("subject", "quarterly report")),
        ("is:unread", Flag(SEEN, False)),
        ("is:flagged -is:read", And((Flag(FLAGGED, True), Not(Flag(SEEN, True))))),
        ("-from:spam", Not(Header("from", "spam"))),
        ("re:lunch", Text("content", "re:lunch")),
        ("before:2024-03-01", Date("internal", "before", dt.date(2024, 3, 1))),
        ("after:2024-03-01", Date("internal", "since", dt.date(2024, 3, 2))),
    ],
)
def test_parse_query(query: str, criteria: object) -> None:
    assert parse_query(query).criteria == criteria


def test_has_attachment_is_a_post_filter() -> None:
    parsed = parse_query("has:attachment from:dana")
    assert parsed.has_attachment is True
    assert parsed.criteria == Header("from", "dana")
    assert parse_query("-has:attachment").has_attachment is False
    assert parse_query("x").has_attachment is None


@pytest.mark.parametrize(
    "query", ['subject:"unterminated', "is:sleepy", "has:pets", "before:monday", "from:",
              "x " * 30, "a" * 1001],
)
def test_bad_queries(query: str) -> None:
    with pytest.raises(QueryError):
        parse_query(query)

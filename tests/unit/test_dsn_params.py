"""RFC 3461 DSN parameters: xtext, the syntax of RET, ENVID, NOTIFY and ORCPT
(sections 4.1-4.4), what NOTIFY asks for, and linear time on hostile input."""

from __future__ import annotations

import random

import pytest

from delivery.dsnparams import (
    DsnParamError,
    envelope_id,
    mail_dsn,
    original_recipient,
    rcpt_dsn,
    wants,
    xtext_decode,
    xtext_encode,
)
from storage.sql.queue import DsnEnvelope, DsnRecipient
from tests.linearity import assert_linear


def test_xtext_round_trip_of_random_printable_text() -> None:
    rng = random.Random()
    for _ in range(200):
        text = "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(0, 60)))
        encoded = xtext_encode(text)
        assert "=" not in encoded and " " not in encoded
        assert xtext_decode(encoded) == text


@pytest.mark.parametrize(
    ("xtext", "text"),
    [("QQ314159", "QQ314159"), ("a+2Bb", "a+b"), ("x+3Dy", "x=y"), ("+20", " "), ("", "")],
)
def test_xtext_decode(xtext: str, text: str) -> None:
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize("bad", ["a+b", "+2b", "+G0", "a=b", "a b", "+", "+2", "\u00e9"])
def test_xtext_refused(bad: str) -> None:
    """RFC 3461 section 4: "+" only as +XX with upper-case hex, no "=", no
    space, nothing outside "!".."~"."""
    with pytest.raises(DsnParamError):
        xtext_decode(bad)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, DsnEnvelope()),
        ({"RET": "hdrs"}, DsnEnvelope("HDRS", None)),
        ({"RET": "FULL", "ENVID": "QQ314159"}, DsnEnvelope("FULL", "QQ314159")),
        ({"ENVID": "x" * 100}, DsnEnvelope(None, "x" * 100)),
    ],
)
def test_mail_parameters(params: dict, expected: DsnEnvelope) -> None:
    given = dict(params)
    assert mail_dsn(given) == expected
    assert given == {}  # taken out: what is left is unknown to the caller


@pytest.mark.parametrize(
    "params",
    [
        {"RET": None},
        {"RET": "BODY"},
        {"ENVID": None},
        {"ENVID": ""},
        {"ENVID": "x" * 101},  # section 4.4: at most 100 characters
        {"ENVID": "a+ZZ"},
        {"ENVID": "+0D+0A"},  # decodes to CR LF: not printable
    ],
)
def test_mail_parameters_refused(params: dict) -> None:
    with pytest.raises(DsnParamError):
        mail_dsn(dict(params))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, DsnRecipient()),
        ({"NOTIFY": "never"}, DsnRecipient("NEVER", None)),
        ({"NOTIFY": "delay,SUCCESS"}, DsnRecipient("SUCCESS,DELAY", None)),
        ({"NOTIFY": "FAILURE,DELAY,SUCCESS"}, DsnRecipient("SUCCESS,FAILURE,DELAY", None)),
        ({"ORCPT": "rfc822;Bob@Foo.COM"}, DsnRecipient(None, "rfc822;Bob@Foo.COM")),
        ({"ORCPT": "rfc822;a+2Bb@c"}, DsnRecipient(None, "rfc822;a+2Bb@c")),
        ({"ORCPT": "x-local;" + "a" * 492}, DsnRecipient(None, "x-local;" + "a" * 492)),
    ],
)
def test_rcpt_parameters(params: dict, expected: DsnRecipient) -> None:
    given = dict(params)
    assert rcpt_dsn(given) == expected
    assert given == {}


@pytest.mark.parametrize(
    "params",
    [
        {"NOTIFY": None},
        {"NOTIFY": ""},
        {"NOTIFY": "NEVER,FAILURE"},  # section 4.1: NEVER stands alone
        {"NOTIFY": "FAILURE,FAILURE"},
        {"NOTIFY": "FAILURE,"},
        {"NOTIFY": "SOMETIMES"},
        {"ORCPT": None},
        {"ORCPT": "a@b"},  # no addr-type
        {"ORCPT": ";a@b"},
        {"ORCPT": "rfc822;"},
        {"ORCPT": "rfc822;a+zzb"},
        {"ORCPT": "rfc 822;a@b"},
        {"ORCPT": "x-local;" + "a" * 493},  # section 4.2: at most 500 characters
    ],
)
def test_rcpt_parameters_refused(params: dict) -> None:
    with pytest.raises(DsnParamError):
        rcpt_dsn(dict(params))


def test_what_notify_asks_for() -> None:
    never, failure = DsnRecipient("NEVER"), DsnRecipient("FAILURE")
    both, none = DsnRecipient("SUCCESS,FAILURE"), DsnRecipient()
    assert [wants(d, "FAILURE", default=True) for d in (never, failure, both, none)] == [
        False,
        True,
        True,
        True,
    ]
    assert [wants(d, "SUCCESS", default=False) for d in (never, failure, both, none)] == [
        False,
        False,
        True,
        False,
    ]
    assert not wants(failure, "DELAY", default=True) and wants(none, "DELAY", default=True)


def test_report_fields_are_decoded() -> None:
    assert envelope_id(DsnEnvelope("HDRS", "QQ+2B314159")) == "QQ+314159"
    assert (
        original_recipient(DsnRecipient(None, "rfc822;a+2Bb@c.example")) == "rfc822;a+b@c.example"
    )
    assert envelope_id(DsnEnvelope()) is None and original_recipient(DsnRecipient()) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "+" * n,  # every "+" a failed hexchar
        lambda n: "+4" * n,
        lambda n: "+41" * n + "+",
        lambda n: "a" * n + "=",
    ],
    ids=["plus", "plus-digit", "hexchars-then-bare-plus", "long-then-equals"],
)
def test_xtext_is_linear_on_hostile_input(make) -> None:
    def work(n: int) -> None:
        text = make(n)
        for _ in range(5):
            try:
                xtext_decode(text)
            except DsnParamError:
                pass

    assert_linear(work, 20_000)


def test_notify_is_linear_on_hostile_input() -> None:
    def work(n: int) -> None:
        for _ in range(5):
            with pytest.raises(DsnParamError):
                rcpt_dsn({"NOTIFY": "SUCCESS," * n + "X"})

    assert_linear(work, 20_000)

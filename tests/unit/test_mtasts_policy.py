"""MTA-STS (RFC 8461): TXT records, policy files and MX patterns, pure."""

from __future__ import annotations

import random
import string
import time

import pytest

from mtad.outbound.mtasts import (
    MAX_POLICY_OCTETS,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
    txt_id,
)

GOOD = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 86400\n"


def test_rfc_example_policy() -> None:
    # RFC 8461 section 3.2's example, with CRLF line ends.
    text = (
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
        "mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n"
    )
    policy = parse_policy(text)
    assert policy.mode == "enforce"
    assert policy.mx == ("mail.example.com", "*.example.net", "backupmx.example.com")
    assert policy.max_age == 604800


def test_lf_whitespace_unknown_fields_and_first_instance_wins() -> None:
    text = (
        "version:STSv1\nmode :  testing \nfoo_bar: whatever it is\n"
        "mode: enforce\nmx: A.Example.COM.\nmax_age: 0"
    )
    policy = parse_policy(text.encode())
    # Section 3.2: unknown fields ignored; a repeated field: the first instance.
    assert (policy.mode, policy.mx, policy.max_age) == ("testing", ("a.example.com",), 0)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 100\n").mx == ()


@pytest.mark.parametrize(
    "text",
    [
        GOOD.replace("STSv1", "STSv2"),
        GOOD.replace("version: STSv1\n", ""),
        GOOD.replace("enforce", "enforcing"),
        GOOD.replace("86400", "31557601"),  # over the section 3.2 limit
        GOOD.replace("86400", "-1"),
        GOOD.replace("86400", "12345678901"),  # 1*10DIGIT
        GOOD.replace("max_age: 86400\n", ""),
        "version: STSv1\nmode: enforce\nmax_age: 10\n",  # no mx
        GOOD.replace("mail.example.com", "*.*.example.com"),
        GOOD.replace("mail.example.com", "mail*.example.com"),
        GOOD.replace("mail.example.com", "mail example.com"),
        GOOD.replace("mail.example.com", "localhost"),  # not a domain with a dot
        GOOD + "this line has no colon\n",
        GOOD + "\n",  # an empty line is not a field
        GOOD.replace("mode", "mo de"),
        "<html><body>Not Found</body></html>",
        "",
        GOOD.replace("enforce", "enforce\x00"),
    ],
)
def test_malformed_policies_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_not_utf8_is_refused() -> None:
    with pytest.raises(PolicyError):
        parse_policy(GOOD.encode() + b"x: \xff\xfe\n")


@pytest.mark.parametrize("size", [MAX_POLICY_OCTETS + 1, 50 * 1024 * 1024])
def test_huge_policies_are_refused_quickly(size: int) -> None:
    rng = random.Random(size)
    line = "mx: " + "".join(rng.choices(string.ascii_lowercase, k=40)) + ".example.com\n"
    text = (GOOD + line * (size // len(line) + 1))[:size]
    started = time.monotonic()
    with pytest.raises(PolicyError, match="over"):
        parse_policy(text)
    assert time.monotonic() - started < 0.5


def test_many_short_lines_within_the_limit_parse_in_linear_time() -> None:
    lines = [f"mx: m{i}.example.com" for i in range(3000)]
    text = GOOD + "\n".join(lines)
    assert len(text) < MAX_POLICY_OCTETS
    started = time.monotonic()
    assert len(parse_policy(text).mx) == 3002
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        # RFC 8461 section 4.1 examples.
        ("mail.example.com", "mail.example.com", True),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard is one label, not zero
        ("*.example.com", "foo.mx1.example.com", False),  # nor two
        ("mail.example.com", "MAIL.Example.Com.", True),  # case and the final dot
        ("*.EXAMPLE.com", "a.example.COM", True),
        ("mail.example.com", "mail.example.com.evil.test", False),
        ("*.example.com", "mx1.example.com.evil", False),
        ("*.example.com", ".example.com", False),
        ("mail.example.com", "xmail.example.com", False),
    ],
)
def test_mx_matching(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


def test_txt_record() -> None:
    assert txt_id("v=STSv1; id=20160831085700Z;") == "20160831085700Z"
    assert txt_id("v=STSv1;id=abc") == "abc"
    assert txt_id("v=STSv1; ext=foo; id=A1 ;") == "A1"
    for bad in (
        "v=STSv1;",  # no id
        "v=STSv1; id=",
        "v=STSv1; id=a-b",  # id is ALPHA / DIGIT
        "v=STSv1; id=" + "a" * 33,  # at most 32
        "id=abc; v=STSv1",  # v first
        "v=STSv1; id=abc; broken",
        "v=STSv10; id=abc",
    ):
        with pytest.raises(PolicyError):
            txt_id(bad)


def test_txt_records_discovery() -> None:
    # Section 3.1: records not starting with v=STSv1 are discarded; not
    # exactly one left: no policy.
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=one"]) == "one"
    assert parse_txt(["v=STSv1; id=one", "v=STSv1; id=two"]) is None
    assert parse_txt([]) is None
    assert parse_txt(["v=STSv1; id=bad-id"]) is None

"""LIST / LSUB mailbox patterns (RFC 3501 section 6.3.8, RFC 5258 section 3):
what matches, and that matching costs time linear in the input whatever the
client sends (a regex built from "*" runs backtracked for minutes)."""

from __future__ import annotations

import random

import pytest

from imapd.imap.commands.mailbox import MailboxPattern
from tests.linearity import best_time

# (reference, pattern, mailbox name, matches?)
CASES = [
    # RFC 3501 6.3.8: "*" matches zero or more characters at this position.
    ("", "*", "INBOX", True),
    ("", "*", "a/b/c", True),
    ("", "a*", "a", True),
    ("", "a*", "ab/c/d", True),
    ("", "*/c", "a/b/c", True),
    ("", "*c", "a/b/d", False),
    # "%" is like "*" but does not match a hierarchy delimiter.
    ("", "%", "a", True),
    ("", "%", "a/b", False),
    ("", "a%", "a", True),
    ("", "a%", "abc/d", False),
    ("", "a/%", "a/b", True),
    ("", "a/%", "a/b/c", False),
    ("", "%/%", "a/b", True),
    ("", "%/%", "a/b/c", False),
    ("", "%/c", "a/b/c", False),
    ("", "%/*", "a/b/c", True),
    ("", "*/%", "a/b/c", True),
    ("", "%b%", "abc", True),
    ("", "%b%", "a/bc", False),
    ("", "a%c%e", "abcde", True),
    ("", "a%c%e", "abc/de", False),
    # Runs of wildcards mean what the widest of them means.
    ("", "%%", "a/b", False),
    ("", "%*", "a/b", True),
    ("", "*%", "a/b", True),
    ("", "**/**", "a/b", True),
    # Everything else is literal, including characters special to regexes.
    ("", "a.b", "axb", False),
    ("", "a.b", "a.b", True),
    ("", "a+", "aa", False),
    ("", "(x)[y]", "(x)[y]", True),
    ("", "a\\b", "a\\b", True),
    ("", "^a$", "^a$", True),
    ("", "ab", "abc", False),
    ("", "abc", "ab", False),
    ("", "Work", "work", False),
    ("", "Entw*", "Entwürfe", True),
    ("", "日*", "日本語", True),
    # The reference is prefixed; one delimiter where both supply it (6.3.8).
    ("a/", "b", "a/b", True),
    ("a/", "/b", "a/b", True),
    ("a", "/b", "a/b", True),
    ("a/", "%", "a/b", True),
    ("a/", "%", "a/b/c", False),
    ("a/", "*", "a/b/c", True),
    # INBOX is case-insensitive (RFC 3501 section 5.1).
    ("", "inbox", "INBOX", True),
    ("", "InBoX*", "INBOX", True),
    ("", "INBOX/%", "INBOX/x", True),
    ("", "inboX", "Inbox2", False),
]


@pytest.mark.parametrize(("reference", "pattern", "name", "expected"), CASES)
def test_pattern_table(reference: str, pattern: str, name: str, expected: bool) -> None:
    assert MailboxPattern(reference, pattern).matches(name) is expected


def _mailboxes(rng: random.Random, count: int) -> list[str]:
    alphabet = "abcxyz/%*.&-"
    return [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))).strip("/") or "x"
        for _ in range(count)
    ]


def _brute(pattern: str, name: str) -> bool:
    """A slow obviously-right reference: dynamic programming over prefixes."""
    n = len(name)
    can = [True] + [False] * n  # can[j]: pattern so far matches name[:j]
    for p in pattern:
        if p == "*":
            for j in range(1, n + 1):
                can[j] = can[j] or can[j - 1]
        elif p == "%":
            for j in range(1, n + 1):
                can[j] = can[j] or (can[j - 1] and name[j - 1] != "/")
        else:
            can = [False] + [can[j - 1] and name[j - 1] == p for j in range(1, n + 1)]
    return can[n]


def test_agrees_with_a_reference_matcher() -> None:
    rng = random.Random()
    names = _mailboxes(rng, 300)
    for _ in range(300):
        pattern = "".join(rng.choice("ab/%*") for _ in range(rng.randint(0, 12)))
        name = rng.choice([*names, "a", "ab", "a/b", "ba/ab", "aab/bba"])
        assert MailboxPattern("", pattern).matches(name) is _brute(pattern, name), (
            pattern,
            name,
        )


def _time_list(pattern: str, names: list[str]) -> float:
    """Best of three: CPU seconds to build the matcher and try every name
    (tests/linearity.py ``best_time``: CPU time, so other test workers on
    the machine do not count)."""

    def work() -> None:
        matcher = MailboxPattern("", pattern)
        for name in names:
            matcher.matches(name)

    return best_time(work)


def test_sixty_stars_finish_at_once() -> None:
    # The command: LIST "" "****...(60)x" against names without "x".
    names = _mailboxes(random.Random(), 500)
    names = [n.replace("x", "y") for n in names]
    assert _time_list("*" * 60 + "x", names) < 0.5


@pytest.mark.parametrize("unit", ["*", "%", "*a", "%a/", "a*b%", "*%"])
def test_work_grows_linearly_with_the_pattern(unit: str) -> None:
    rng = random.Random()
    names = [*_mailboxes(rng, 400), "a" * 1000, "a/" * 500]
    n = 10_000 // len(unit)
    small = unit * (n // 4) + "x"
    large = unit * n + "x"  # 10,000 characters and more
    t_small, t_large = _time_list(small, names), _time_list(large, names)
    assert t_large < 0.5
    # Four times the pattern: well under eight times the work (quadratic is 16x).
    assert t_large < 8 * t_small + 0.01


def test_long_names_cost_linear_time() -> None:
    pattern = "%a%a%a%a%a%a%a%a%b"
    short, long_ = ["a" * 250] * 20, ["a" * 1000] * 20
    t_short, t_long = _time_list(pattern, short), _time_list(pattern, long_)
    assert t_long < 8 * t_short + 0.01

"""The built-in anti-spam engine's parts without a server: each header rule
on messages that break it and on ones that do not (RFC 5322 3.6, 3.6.1,
3.6.4; RFC 2046 4.1.2), our own SPF/DKIM/DMARC results as rules, the
rules' and tokenizer's time on adversarial headers (linear: n and 8n) and
on a 25 MB message (bounded by the read cap), the classifier's vote
(none untrained, the right side trained) and the settings that refuse to
do nothing."""

from __future__ import annotations

import datetime as dt
import random
import time

import pytest

from conf.settings import ConfigError, load_settings
from delivery import bayes, spamengine
from delivery.spamrules import RULES, AuthVerdicts, matches
from storage.mime import parse_message
from storage.model import SpamCounts
from tests.unit.test_content_linear import assert_linear

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
GOOD_HEAD = (
    "From: Ann <ann@example.org>\r\nTo: bob@example.net\r\nSubject: Lunch on Friday\r\n"
    "Date: Sun, 06 Dec 2026 09:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
)
PLAIN = "Content-Type: text/plain; charset=utf-8\r\n\r\nSee you there, caf\u00e9?\r\n"


NO_AUTH = AuthVerdicts()


def rule_names(raw: bytes, auth: AuthVerdicts = NO_AUTH) -> list[str]:
    return [r.name for r in matches(raw, parse_message(raw), auth, NOW)]


def with_field(name: str, value: str | None, body: str = PLAIN) -> bytes:
    """GOOD_HEAD with field ``name`` replaced by ``value`` (None: dropped)."""
    lines = [ln for ln in GOOD_HEAD.split("\r\n") if ln and not ln.startswith(f"{name}:")]
    if value is not None:
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n" + body).encode()


def test_a_well_formed_message_matches_no_rule() -> None:
    assert rule_names((GOOD_HEAD + PLAIN).encode()) == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (with_field("Date", None), ["MISSING_DATE"]),
        (with_field("Date", "yesterday, around noon"), ["INVALID_DATE"]),
        (with_field("Date", "Fri, 01 Jan 2027 09:00:00 +0000"), ["DATE_IN_FUTURE"]),
        (with_field("Date", "Mon, 07 Dec 2026 09:00:00 +0000"), []),  # within a day: clocks
        (with_field("Message-ID", None), ["MISSING_MID"]),
        (with_field("From", None), ["MISSING_FROM"]),
        (with_field("From", "undisclosed sender"), ["FROM_UNPARSEABLE"]),
        (with_field("Subject", "FINAL NOTICE: ACT NOW!!!"), ["SUBJ_ALL_CAPS"]),
        (with_field("Subject", "RE: FYI OK"), []),  # too few letters to say anything
        (
            with_field("Subject", "x", "Content-Type: text/html\r\n\r\n<p>hi</p>\r\n"),
            ["MIME_HTML_ONLY"],
        ),
        (
            with_field(
                "Subject",
                "x",
                'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
                "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
                "Content-Type: text/html\r\n\r\n<p>hi</p>\r\n--b--\r\n",
            ),
            [],
        ),
        (
            with_field("Subject", "x", "Content-Type: text/plain\r\n\r\ncaf\u00e9\r\n"),
            ["CHARSET_MISMATCH"],
        ),  # 8-bit octets, no charset: US-ASCII (RFC 2046 4.1.2)
        (with_field("Subject", "x").replace("café".encode(), b"caf\xe9"), ["CHARSET_MISMATCH"]),
        (
            with_field(
                "Subject",
                "x",
                "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n",
            ),
            [],
        ),
    ],
    ids=[
        "no-date",
        "bad-date",
        "future-date",
        "date-tomorrow",
        "no-mid",
        "no-from",
        "from-no-address",
        "caps",
        "short-caps",
        "html-only",
        "alternative",
        "8bit-undeclared",
        "bad-utf8",
        "qp-utf8",
    ],
)
def test_each_rule(raw: bytes, expected: list[str]) -> None:
    assert rule_names(raw) == expected


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        (AuthVerdicts("fail", ("fail",), "fail"), ["SPF_FAIL", "DKIM_FAIL", "DMARC_FAIL"]),
        (AuthVerdicts("softfail", ("fail", "pass"), "pass"), ["SPF_SOFTFAIL"]),
        (AuthVerdicts("pass", ("pass",), "pass"), []),
        (AuthVerdicts("none", (), "none"), []),
    ],
)
def test_our_own_authentication_results(auth: AuthVerdicts, expected: list[str]) -> None:
    assert rule_names((GOOD_HEAD + PLAIN).encode(), auth) == expected


def _hostile_headers(n: int) -> dict[str, bytes]:
    letters = "".join(random.choices("ABCDEFGHIJ ", k=n))
    return {
        "long-subject": f"Subject: {letters}\r\n\r\nx\r\n".encode(),
        "many-fields": b"X-A: b\r\n" * (n // 8) + b"\r\nx\r\n",
        "folded-from": b"From: a@b.example" + b",\r\n c@d.example" * (n // 16) + b"\r\n\r\nx\r\n",
        "date-spaces": b"Date: Sun," + b" " * n + b"06 Dec 2026\r\n\r\nx\r\n",
        "no-colon": b"X" * n + b"\r\n\r\nx\r\n",
        "encoded-words": b"Subject: " + b"=?utf-8?q?caf=C3=A9?= " * (n // 22) + b"\r\n\r\nx\r\n",
        "text-parts": b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\nContent-Type: text/plain\r\n\r\n\xe9\r\n" * (n // 40)
        + b"--b--\r\n",
    }


@pytest.mark.parametrize("shape", sorted(_hostile_headers(10)))
def test_rules_are_linear_in_the_header(shape: str) -> None:
    def work(raw: object) -> object:
        assert isinstance(raw, bytes)
        return matches(raw, parse_message(raw), AuthVerdicts(), NOW)

    assert_linear(work, lambda n: _hostile_headers(n)[shape])


def test_tokenizing_is_linear_up_to_the_cap() -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta".split()

    def build(n: int) -> object:
        text = " ".join(random.choices(words, k=n // 6))[:n]
        return parse_message((GOOD_HEAD + "\r\n" + text).encode())

    assert_linear(lambda parsed: bayes.tokens(parsed), lambda n: build(n // 10))  # type: ignore[arg-type]


def test_a_25_mb_message_costs_what_its_first_octets_cost() -> None:
    rng = random.Random()
    vocabulary = [f"w{i}" for i in range(20_000)]
    body = " ".join(rng.choices(vocabulary, k=4_000_000)).encode()[: 25 * 1024 * 1024]
    raw = (GOOD_HEAD + PLAIN).encode() + body
    start = time.process_time()  # CPU: another process's load is not ours
    found = spamengine.scan_octets(raw, AuthVerdicts())
    elapsed = time.process_time() - start
    assert len(found.tokens) <= bayes.TOKENS_MAX
    assert elapsed < 0.5, f"{elapsed:.2f}s for 25 MB"
    small = spamengine.scan_octets(raw[: spamengine.READ_MAX], AuthVerdicts())
    assert small == found  # nothing past the cap was read


def _trained(rng: random.Random) -> tuple[SpamCounts, list[int], list[int]]:
    spam_words = [bayes.token_id(f"spam{i}") for i in range(50)]
    ham_words = [bayes.token_id(f"ham{i}") for i in range(50)]
    shared = [bayes.token_id(f"the{i}") for i in range(50)]
    counts = {t: (rng.randrange(20, 40), rng.randrange(0, 4)) for t in spam_words}
    counts |= {t: (rng.randrange(0, 4), rng.randrange(20, 40)) for t in ham_words}
    counts |= {t: (30, 30) for t in shared}
    return SpamCounts(60, 60, counts), spam_words + shared[:20], ham_words + shared[:20]


def test_the_classifier_votes_only_once_trained() -> None:
    counts, spammy, hammy = _trained(random.Random())
    spam_p = bayes.spam_probability(counts, spammy, 50)
    ham_p = bayes.spam_probability(counts, hammy, 50)
    assert spam_p is not None and spam_p > 0.99
    assert ham_p is not None and ham_p < 0.01
    assert bayes.spam_probability(counts, spammy, 61) is None  # not enough learned yet
    untrained = SpamCounts(0, 0, {})
    assert bayes.spam_probability(untrained, spammy, 1) is None
    # Tokens it never saw, or seen as often in both: no vote either.
    assert bayes.spam_probability(counts, [bayes.token_id("new")], 50) is None
    assert spamengine.bayes_symbol(spam_p)[0] == "BAYES_SPAM"
    assert spamengine.bayes_symbol(ham_p) == ("BAYES_HAM", -8.0)


def test_rule_scores_alone_need_several_rules_to_junk() -> None:
    # No one rule reaches the default threshold: a single oddity never junks.
    assert max(r.score for r in RULES.values()) < 6.0


RSPAMD = 'antispam.rspamd_url="http://127.0.0.1:11333"'


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["antispam.builtin=false", RSPAMD], "already replaces the built-in engine"),
        (["antispam.builtin=false", "antispam.spam_threshold=5.0"], "spam_threshold: the built"),
        ([RSPAMD, "antispam.bayes_min_learned=5"], "bayes_min_learned: the built"),
        (["antispam.spam_threshold=0"], "spam_threshold"),
        (["antispam.bayes_min_learned=0"], "bayes_min_learned"),
    ],
)
def test_settings_that_would_do_nothing_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides=overrides)
    assert "antispam" in str(err.value) and message in str(err.value), str(err.value)


def test_engine_on_by_default_and_off_beside_rspamd() -> None:
    assert load_settings(overrides=[]).antispam.builtin_on
    assert not load_settings(overrides=[RSPAMD]).antispam.builtin_on
    assert not load_settings(overrides=["antispam.builtin=false"]).antispam.builtin_on
    # The defaults written out beside rspamd are no tuning: accepted.
    assert load_settings(overrides=[RSPAMD, "antispam.spam_threshold=6.0"])


async def test_an_untrained_account_is_not_asked_again_until_it_learns(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.backend import open_storage_from_url
    from storage.sql.mailstore import SqlMailStore

    asked = []
    counts_of = SqlMailStore.spam_counts

    async def counting(self, account_id, tokens):  # type: ignore[no-untyped-def]
        asked.append(account_id)
        return await counts_of(self, account_id, tokens)

    monkeypatch.setattr(SqlMailStore, "spam_counts", counting)
    storage = await open_storage_from_url(f"sqlite+aiosqlite:///{tmp_path}/s.db", tmp_path)
    try:
        await storage.directory.add_domain("example.org")
        account = await storage.directory.add_account("a@example.org", "pw")
        settings = load_settings(overrides=[])
        found = spamengine.scan_octets((GOOD_HEAD + PLAIN).encode(), NO_AUTH)
        for _ in range(3):
            filed = await spamengine.file_for(storage, settings, account, found)
            assert b"BAYES" not in filed.fields and filed.mailbox == "INBOX"
        assert asked == [account.id]  # asked once, then remembered
        assert spamengine.known_untrained(storage, account.id)
        minimum = settings.antispam.bayes_min_learned
        for i in range(2 * minimum):  # half spam holding the message's words
            words = found.tokens if i % 2 else (bayes.token_id(f"other{i}"),)
            await storage.mail(account).learn_spam(account.id, f"{i:064x}", words, i % 2 == 1)
        spamengine.forget_untrained(storage, account.id)  # as delivery/learn.py does
        filed = await spamengine.file_for(storage, settings, account, found)
        assert asked == [account.id, account.id]
        assert b"BAYES_SPAM" in filed.fields and filed.mailbox == "Junk"
    finally:
        await storage.close()

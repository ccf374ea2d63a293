"""The built-in anti-spam engine's per-account Bayes classifier: words in,
a spam probability out, from the counts the account learned (moving mail
into Junk teaches spam, out of it ham: delivery/learn.py; the counts live
in the account's shard: storage/sql/spamtokens.py).

Tokens (:func:`tokens`): the words of the subject (marked as such) and of
the body text the search index reads (storage/text.py: the inline
text/plain parts, else the HTML as text), the hosts of the links in it,
the From domain. At most :data:`TEXT_MAX` characters are read and
:data:`TOKENS_MAX` distinct tokens kept, whatever the message's size, so
tokenizing costs the same bounded time for a 25 MB message as for a 100 kB
one. Words are lower-cased and hashed to 63 bits (:func:`token_ids`).

Combining (:func:`spam_probability`): each token's spam probability is
Gary Robinson's f(w), the ratio of its spam and ham frequencies shrunk
towards 0.5 by how rarely it was seen (strength :data:`STRENGTH`): the
smoothing. The :data:`DISCRIMINATORS` tokens furthest from 0.5 (ignoring
those within :data:`MIN_DEVIATION`) are combined naive-Bayes style, as Paul
Graham's plan did: the product of their odds, summed as log odds (bounded
by :data:`LOG_ODDS_MAX`), read as a probability. Robinson's Fisher
(chi-squared) combining was tried first: it ranked the test corpus as well
but kept clear spam near 0.6-0.8, too timid to decide Junk alone (see the
commit). Before the account has learned ``min_learned`` spam and as many
ham messages the classifier says nothing (None): an untrained account gets
no vote, so turning the engine on changes no one's mail.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable

from storage.model import ParsedMessage, SpamCounts

TEXT_MAX = 100_000  # characters of subject and body text read
TOKENS_MAX = 1000  # distinct tokens a message gives (storage takes up to 5000)
STRENGTH = 0.45  # Robinson's s: how much an unseen token leans to 0.5
MIN_DEVIATION = 0.1  # tokens this close to 0.5 do not vote
DISCRIMINATORS = 150  # the strongest tokens that vote
LOG_ODDS_MAX = 50.0  # beyond it the probability is 0 or 1 to the float anyway

_WORD = re.compile(r"[^\W_]{3,24}")
_LINK_HOST = re.compile(r"https?://([A-Za-z0-9.-]{1,100})", re.ASCII)


def token_ids(words: Iterable[str]) -> list[int]:
    """Each word's 63-bit hash, never 0 (storage's row of totals): the CRC-32
    of the word and that of the word reversed, side by side. No secret and
    no defence is asked of it (a collision merely merges two words' counts,
    and anyone can hash a dictionary); BLAKE2 cost 2.5 times as much, about
    1 microsecond a word."""
    octets = [word.encode() for word in words]
    return [((zlib.crc32(b) << 31) ^ zlib.crc32(b[::-1])) or 1 for b in octets]


def token_id(word: str) -> int:
    """One word's :func:`token_ids` hash."""
    return token_ids([word])[0]


def token_words(parsed: ParsedMessage) -> list[str]:
    """The distinct tokens of ``parsed`` as text, in order of appearance,
    at most :data:`TOKENS_MAX` (see the module docstring)."""
    seen: dict[str, None] = {}

    def add(items: Iterable[str]) -> None:
        for item in items:
            if len(seen) >= TOKENS_MAX:
                return
            seen.setdefault(item, None)

    subject = parsed.subject[:TEXT_MAX]
    add("s:" + w for w in _WORD.findall(subject.lower()))
    sender = next((a.host for a in parsed.envelope.from_ if a.host), None)
    if sender:
        add(["from:" + sender.lower()[:100]])
    body = parsed.body_text[: max(0, TEXT_MAX - len(subject))]
    add("url:" + host.lower() for host in _LINK_HOST.findall(body))
    add(_WORD.findall(body.lower()))
    return list(seen)


def tokens(parsed: ParsedMessage) -> list[int]:
    """:func:`token_words` hashed (:func:`token_id`): what storage counts."""
    return token_ids(token_words(parsed))


def token_probability(spam: int, ham: int, spam_messages: int, ham_messages: int) -> float:
    """Robinson's f(w): the token's spam probability shrunk towards 0.5 by
    how few messages held it."""
    spam_ratio = spam / spam_messages
    ham_ratio = ham / ham_messages
    p = spam_ratio / (spam_ratio + ham_ratio) if spam_ratio + ham_ratio else 0.5
    seen = spam + ham
    return (STRENGTH * 0.5 + seen * p) / (STRENGTH + seen)


def spam_probability(
    counts: SpamCounts, message_tokens: Iterable[int], min_learned: int
) -> float | None:
    """The combined indicator in [0, 1] (1: spam) for ``message_tokens``
    under ``counts``; None while either class has fewer than
    ``min_learned`` messages learned, or when no token voted."""
    if min(counts.spam_messages, counts.ham_messages) < max(min_learned, 1):
        return None
    probabilities = []
    for token in set(message_tokens):
        spam, ham = counts.tokens.get(token, (0, 0))
        if spam + ham == 0:
            continue
        f = token_probability(spam, ham, counts.spam_messages, counts.ham_messages)
        if abs(f - 0.5) >= MIN_DEVIATION:
            probabilities.append(f)
    if not probabilities:
        return None
    probabilities.sort(key=lambda f: -abs(f - 0.5))
    log_odds = sum(math.log(f / (1.0 - f)) for f in probabilities[:DISCRIMINATORS])
    log_odds = max(-LOG_ODDS_MAX, min(LOG_ODDS_MAX, log_odds))
    return 1.0 / (1.0 + math.exp(-log_odds))


__all__ = [
    "DISCRIMINATORS",
    "TEXT_MAX",
    "TOKENS_MAX",
    "spam_probability",
    "token_id",
    "token_ids",
    "token_probability",
    "token_words",
    "tokens",
]

"""A labelled corpus of realistic-looking ham and spam for the anti-spam
engine's tests, generated from a seed (no downloaded corpus).

Both classes are well-formed mail (Date, Message-ID, From, MIME) drawn from
one shared vocabulary of everyday words, plus each class's own topics, plus
a share of the other class's words: a ham about an order or an account
and a spam about a meeting or an invoice both occur, so no single word
tells them apart (:func:`best_single_token_accuracy` measures it). Some
spam is HTML only or has a subject in capitals, as some ham has an HTML
alternative: the header rules see some but not all of it.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

SHARED = (
    "the and you your for with this that have from are will our please about "
    "today time information update new account order offer free click here "
    "thanks thank regards best week month year team service support help "
    "email message link contact details access price available online now "
    "just know need want make sure day next last first good great info"
).split()

HAM = (
    "meeting agenda review draft schedule lunch weekend kids dinner patch "
    "deploy release quarterly budget attached notes minutes slides project "
    "deadline feedback proposal report colleague conference flight hotel "
    "itinerary birthday party family photos garden recipe school teacher "
    "homework soccer practice dentist appointment library book club hiking "
    "branch merge tests build server migration database invoice receipt "
    "landlord rent plumber insurance renewal doctor vacation cabin"
).split()

SPAM = (
    "winner claim prize lottery bitcoin crypto investment guaranteed profit "
    "returns pills pharmacy discount cheap viagra verify suspended unusual "
    "activity login confirm password urgent immediately limited exclusive "
    "deal unsubscribe congratulations selected million dollars inheritance "
    "beneficiary transfer wire bank loan approved credit score debt relief "
    "casino bonus jackpot spins singles dating lonely hot watches replica "
    "luxury miracle weight loss diet supplement earn cash home opportunity"
).split()

HAM_SENDERS = ("colleague.example", "family.example", "school.example", "vendor.example")
SPAM_SENDERS = ("promo.example", "offers.example", "secure-login.example", "winners.example")


@dataclass(frozen=True)
class Sample:
    raw: bytes
    spam: bool
    message_id: str


def _words(rng: random.Random, own: list[str], other: list[str], n: int) -> list[str]:
    """``n`` words: about half shared, a third the class's own, the rest the
    other class's (the overlap)."""
    out = []
    for _ in range(n):
        roll = rng.random()
        pool = SHARED if roll < 0.5 else own if roll < 0.85 else other
        out.append(rng.choice(pool))
    return out


def _sentences(rng: random.Random, words: list[str]) -> str:
    lines, line = [], []
    for word in words:
        line.append(word)
        if len(line) >= rng.randrange(6, 14):
            lines.append(" ".join(line).capitalize() + ".")
            line = []
    if line:
        lines.append(" ".join(line).capitalize() + ".")
    return "\r\n".join(lines)


def sample(rng: random.Random, spam: bool, to: str, index: int) -> Sample:
    """One message of the class ``spam``, addressed to ``to``."""
    own, other = (SPAM, HAM) if spam else (HAM, SPAM)
    senders = SPAM_SENDERS if spam else HAM_SENDERS
    # Senders cross over too: a vendor sends a promotion, a friend a link.
    domain = rng.choice(senders if rng.random() < 0.8 else HAM_SENDERS + SPAM_SENDERS)
    subject = " ".join(_words(rng, own, other, rng.randrange(3, 8)))
    if spam and rng.random() < 0.3:
        subject = subject.upper()
    body = _sentences(rng, _words(rng, own, other, rng.randrange(25, 120)))
    when = dt.datetime(2026, 12, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=rng.randrange(7200))
    message_id = f"<{index}.{rng.getrandbits(48):x}@{domain}>"
    subject = subject if subject.isupper() else subject.capitalize()
    head = (
        f"From: {rng.choice(['Sam', 'Alex', 'Jo', 'Kim'])} <{rng.choice(['info', 'sam', 'news'])}"
        f"@{domain}>\r\nTo: {to}\r\nSubject: {subject}"
        f"\r\nDate: {when.strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
    )
    html = "<html><body><p>" + body.replace("\r\n", "</p><p>") + "</p></body></html>"
    kind = rng.random()
    if spam and kind < 0.3:  # HTML only
        mime = f"Content-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"
    elif kind < 0.5:  # plain with an HTML alternative
        mime = (
            'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
            f"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
            f"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b1--\r\n"
        )
    else:
        mime = f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    return Sample((head + mime).encode(), spam, message_id)


def corpus(seed: int, per_class: int, to: str) -> list[Sample]:
    """``per_class`` ham and as many spam, shuffled, from ``seed``."""
    rng = random.Random(seed)
    samples = [sample(rng, i % 2 == 1, to, i) for i in range(2 * per_class)]
    rng.shuffle(samples)
    return samples


def best_single_token_accuracy(samples: list[Sample]) -> float:
    """The accuracy of the best one-word rule ("spam iff the word is in
    it", or its negation) over ``samples``: how separable one token makes
    the corpus."""
    from delivery.bayes import token_words
    from storage.mime import parse_message

    presence: dict[str, list[int]] = {}
    spam_total = sum(s.spam for s in samples)
    for s in samples:
        for word in token_words(parse_message(s.raw)):
            counts = presence.setdefault(word, [0, 0])
            counts[0 if s.spam else 1] += 1
    best = 0.0
    for in_spam, in_ham in presence.values():
        # Spam iff present: right for the spam holding it and the ham not.
        right = in_spam + (len(samples) - spam_total - in_ham)
        best = max(best, right / len(samples), 1 - right / len(samples))
    return best


__all__ = ["Sample", "best_single_token_accuracy", "corpus", "sample"]

"""The built-in anti-spam engine: what scores MX mail when rspamd is not
configured (``[antispam] builtin``, on by default then).

For each message on the MX, once its SPF, DKIM and DMARC results are known
(mtad/checks.py) and before it is stored:

1. :func:`scan` reads at most :data:`READ_MAX` octets of it (a spooled
   message's file too), parses them (storage/mime.py) and matches the header
   rules (delivery/spamrules.py) and cuts its Bayes tokens
   (delivery/bayes.py), all in one worker thread: bounded work, whatever
   the message's size, off the event loop.
2. :func:`file_for`, per recipient account: one query for the account's
   counts of those tokens, its classifier's vote (none until it has learned
   enough; an account seen so is not asked again for a while, and when
   every recipient is such, the message is not tokenized), and the sum of
   the rules, the check stage's symbols (a DNS allow list's,
   delivery/checks_dnsbl.py) and the vote. At or above the
   account's threshold (:func:`threshold_for`) the message goes to its Junk.
   Every copy carries the same ``X-Spam-Score``, ``X-Spam-Status`` and
   ``X-Spam-Symbols`` fields as rspamd's (delivery/checks_rspamd.py
   ``spam_fields``), with the account's own score.

The engine never refuses mail (that stays the DNS lists' and rspamd's):
its worst verdict is Junk. Learning (delivery/learn.py) feeds the
classifier through :func:`message_tokens`, which reads a message the same
way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from conf.settings import Settings
from delivery import bayes
from delivery.checks_rspamd import spam_fields
from delivery.spamrules import AuthVerdicts, Rule, matches
from delivery.spool import Message
from storage.api import Storage
from storage.errors import StorageError
from storage.mime import parse_message
from storage.model import Account

log = logging.getLogger("delivery.spamengine")

# Octets of a message the engine reads: the header and the first of the
# body, where its text is. Bounds the parse and the tokenizer's work.
READ_MAX = 256 * 1024
# The classifier's score at full certainty: it alone passes the default
# threshold (6) from a probability of 0.875 on, and takes as much off.
BAYES_WEIGHT = 8.0


@dataclass(frozen=True)
class Scan:
    """What the engine read of one message, the same for every recipient."""

    rules: tuple[Rule, ...]
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Filing:
    """Where one account's copy goes, and the ``X-Spam-*`` fields it carries;
    ``spam``: its score reached the threshold (not only bound for Junk by
    the check stage or DMARC)."""

    mailbox: str
    fields: bytes
    score: float
    spam: bool = False


def _head_of(message: Message) -> bytes:
    # In a worker thread: a spooled message's file is read only up to the cap.
    if isinstance(message, bytes):
        return message[:READ_MAX]
    head = message.prefix[:READ_MAX]
    if len(head) < READ_MAX:
        with message.path.open("rb") as fh:
            fh.seek(message.offset)
            head += fh.read(READ_MAX - len(head))
    return head


def scan_octets(
    raw: bytes, auth: AuthVerdicts, now: dt.datetime | None = None, *, tokens: bool = True
) -> Scan:
    """The rules and (with ``tokens``) the tokens of ``raw`` (at most
    READ_MAX octets of it read). Pure and synchronous: run it in a thread."""
    head = raw[:READ_MAX]
    parsed = parse_message(head)
    found = tuple(bayes.tokens(parsed)) if tokens else ()
    return Scan(tuple(matches(head, parsed, auth, now)), found)


async def scan(message: Message, auth: AuthVerdicts, *, tokens: bool = True) -> Scan:
    """:func:`scan_octets` of ``message`` (in memory or spooled), in a thread."""

    def work() -> Scan:
        return scan_octets(_head_of(message), auth, tokens=tokens)

    return await asyncio.to_thread(work)


# Accounts whose classifier cannot vote yet (too little learned), by store:
# until the memory ends their mail is neither tokenized nor looked up, which
# is most of the engine's cost while accounts are untrained. A learn in this
# process ends it at once (forget_untrained); one on another instance is
# seen once it ends.
UNTRAINED_SECONDS = 30.0
UNTRAINED_MAX = 100_000  # accounts remembered per store
_UNTRAINED: weakref.WeakKeyDictionary[Storage, dict[int, float]] = weakref.WeakKeyDictionary()


def known_untrained(storage: Storage, account_id: int) -> bool:
    """Whether ``account_id``'s classifier was seen unable to vote lately."""
    until = _UNTRAINED.get(storage, {}).get(account_id)
    return until is not None and until > time.monotonic()


def _remember_untrained(storage: Storage, account_id: int) -> None:
    known = _UNTRAINED.setdefault(storage, {})
    known.pop(account_id, None)
    known[account_id] = time.monotonic() + UNTRAINED_SECONDS
    if len(known) > UNTRAINED_MAX:
        del known[next(iter(known))]  # the longest remembered


def forget_untrained(storage: Storage, account_id: int) -> None:
    """Called after ``account_id`` learned: its next message is looked up."""
    _UNTRAINED.get(storage, {}).pop(account_id, None)


async def message_tokens(raw: bytes) -> list[int]:
    """The Bayes tokens of a stored message, read as :func:`scan` reads one."""
    found = await asyncio.to_thread(scan_octets, raw, AuthVerdicts())
    return list(found.tokens)


async def _vote(
    storage: Storage, settings: Settings, account: Account, found: Scan
) -> float | None:
    """The account's classifier's probability for ``found``, None if it
    cannot vote (remembered: :func:`known_untrained`)."""
    if known_untrained(storage, account.id):
        return None
    counts = await storage.mail(account).spam_counts(account.id, found.tokens)
    minimum = settings.antispam.bayes_min_learned
    if min(counts.spam_messages, counts.ham_messages) < minimum:
        _remember_untrained(storage, account.id)
        return None
    return bayes.spam_probability(counts, found.tokens, minimum)


def threshold_for(settings: Settings, account: Account) -> float:
    """The score at or above which ``account``'s copy goes to Junk: the
    site's ``[antispam] spam_threshold`` (the seam for a per-account one)."""
    return settings.antispam.spam_threshold


def bayes_symbol(probability: float) -> tuple[str, float]:
    """The classifier's vote as a symbol: BAYES_SPAM above 0.5, else
    BAYES_HAM, scored linearly from -BAYES_WEIGHT to +BAYES_WEIGHT."""
    score = round(BAYES_WEIGHT * (2.0 * probability - 1.0), 2)
    return ("BAYES_SPAM" if probability > 0.5 else "BAYES_HAM", score)


async def file_for(
    storage: Storage,
    settings: Settings,
    account: Account,
    found: Scan,
    symbols: Sequence[tuple[str, float]] = (),
    junk: bool = False,
) -> Filing:
    """Where ``account``'s copy of the scanned message goes (module
    docstring). ``symbols``: the check stage's; ``junk``: already bound for
    Junk (the check stage or DMARC said so), whatever the score. The
    account's shard unreachable: no Bayes vote (logged), the rest stands."""
    voted = [(rule.name, rule.score) for rule in found.rules] + list(symbols)
    try:
        probability = await _vote(storage, settings, account, found)
    except StorageError as exc:
        log.warning("no Bayes vote for %s: %s", account.address, exc)
    else:
        if probability is not None:
            voted.append(bayes_symbol(probability))
    score = round(sum(value for _, value in voted), 2)
    threshold = threshold_for(settings, account)
    spam = score >= threshold
    action = "add header" if spam else "no action"
    fields = spam_fields(spam, score, threshold, action, voted)
    return Filing("Junk" if spam or junk else "INBOX", fields, score, spam)


__all__ = [
    "BAYES_WEIGHT",
    "READ_MAX",
    "Filing",
    "Scan",
    "bayes_symbol",
    "file_for",
    "forget_untrained",
    "known_untrained",
    "message_tokens",
    "scan",
    "scan_octets",
    "threshold_for",
]

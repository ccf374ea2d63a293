"""Each account's own anti-spam choices on the MX (issue #22): sender allow
and block lists, and a Junk threshold.

Entries (:func:`parse_entry`), one of:

* ``user@example.com``: that address. The domain is compared without case
  in its IDNA A-label form; the local part is compared without case too
  (RFC 5321 section 2.4 leaves that to the receiving host, and nearly
  every mail system treats ``Bob@`` and ``bob@`` alike).
* ``example.com``: every address at exactly that domain.
* ``*.example.com``: every address at a subdomain of example.com, at any
  depth, but not example.com itself (list both for both). A leading dot
  (``.example.com``) is refused with a hint: one convention, not two.

A sender is each of the envelope sender (MAIL FROM, RFC 5321 section
4.1.1.2; none for a bounce) and every address of the header From field
(RFC 5322 section 3.6.2, up to :data:`MAX_FROM`). For each, the most
specific matching entry decides (an address before its domain, a domain
before a wildcard, a longer wildcard before a shorter), so
``boss@example.com`` allowed and ``example.com`` blocked lets the boss
through. The message is blocked if any sender is, else allowed if any is:
a sender blocked under one identity stays blocked under another.

Effect, per recipient account (:func:`filing`), on MX mail only (mail our
own users submit is not filed by its local recipients' lists):

* blocked: filed in that recipient's Junk, whatever the spam filter said;
  the other recipients of the same message are not affected. A single
  recipient is filed the same way rather than refused at RCPT or DATA: a
  refusal would tell a sender it is blocked and make the sending host
  bounce to a possibly forged address (backscatter), and an entry broader
  than meant (a whole domain) loses nothing: the mail waits in Junk.
* allowed: never filed in Junk by spam scoring (rspamd's "add header" and
  "rewrite subject", or a score past the account's threshold). It does
  not undo a refusal (a virus, rspamd's reject, a DNS block list: those
  answer the whole transaction for every recipient, and a forged allowed
  address must not carry them through), nor a DMARC quarantine (RFC 7489
  section 6.3: the From domain failed authentication, so the very
  address the allow list trusts is not shown to be genuine).
* threshold: with a spam score (rspamd's), the message goes to Junk when
  the score is at or above the account's threshold and stays in INBOX
  below it, whatever rspamd's own action between "no action" and "add
  header" was. Without a score (rspamd off or unreachable under
  ``on_error = "accept"``) the threshold does nothing.

Whenever an account's policy decided, its copy carries one field saying
why (:func:`policy_field`), above the spam filter's ``X-Spam-*`` fields::

    X-Spam-Policy: Junk, reason=USER_BLOCK entry=*.example.com
    X-Spam-Policy: INBOX, reason=USER_ALLOW entry=alice@example.org
    X-Spam-Policy: Junk, reason=USER_THRESHOLD score=4.20 threshold=3.00
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from delivery.address import PathSyntaxError, parse_mailbox
from delivery.checks import Action, Verdict, printable
from storage.api import Storage
from storage.model import Account, SpamPolicy

ALLOW, BLOCK = "allow", "block"
INBOX, JUNK = "INBOX", "Junk"
MAX_FROM = 20  # header From addresses looked at (RFC 5322 3.6.2 allows a list)
WILDCARD = "*."
ENTRY_SHOWN = 200  # characters of an entry in the X-Spam-Policy field


class EntryError(ValueError):
    """Not a sender list entry; ``str(err)`` says why, safe to show."""


def parse_entry(text: str) -> str:
    """``text`` as a stored entry (module docstring): ``local@domain`` with
    both lower-cased and the domain in A-label form, ``domain``, or
    ``*.domain``. EntryError for anything else."""
    if not isinstance(text, str):
        raise EntryError("an entry is a string")
    entry = text.strip()
    if not entry:
        raise EntryError("an entry is an address or a domain")
    if entry.startswith("."):
        raise EntryError(f"write *{entry} for the subdomains of {entry[1:]}")
    try:
        if "@" in entry:
            if entry.startswith(("@", "*@")):
                domain = entry.partition("@")[2]
                raise EntryError(f"write {domain} for every address at that domain")
            local, _, domain = parse_mailbox(entry).rpartition("@")
            if domain.startswith("["):
                raise EntryError("an address literal is not a sender domain")
            return f"{local.lower()}@{domain}"
        wild = entry.startswith(WILDCARD)
        domain = parse_mailbox(f"x@{entry.removeprefix(WILDCARD)}").rpartition("@")[2]
    except PathSyntaxError as exc:
        raise EntryError(f"not an address or a domain: {exc}") from None
    if domain.startswith("[") or "*" in domain:
        raise EntryError("a domain is names and dots (*. only in front)")
    return WILDCARD + domain if wild else domain


def candidates(address: str) -> list[str]:
    """The entries that could decide ``address`` (a parsed mailbox), most
    specific first; empty for one that is not an address."""
    try:
        local, _, domain = parse_mailbox(address).rpartition("@")
    except PathSyntaxError:
        return []
    if domain.startswith("["):
        return [f"{local.lower()}@{domain}"]
    labels = domain.split(".")
    wild = [WILDCARD + ".".join(labels[i:]) for i in range(1, len(labels))]
    return [f"{local.lower()}@{domain}", domain, *wild]


def senders(mail_from: str, from_header: Iterable[str]) -> list[list[str]]:
    """The candidate entries of each sender: the envelope's (none for the
    null sender) and the first :data:`MAX_FROM` header From addresses."""
    found = [candidates(mail_from)] if mail_from else []
    for index, address in enumerate(from_header):
        if index >= MAX_FROM:
            break
        found.append(candidates(address))
    return [c for c in found if c]


@dataclass(frozen=True)
class Listing:
    """What an account's lists say of a message's senders: ``ALLOW``,
    ``BLOCK`` or None, and the entry that decided."""

    verdict: str | None = None
    entry: str = ""


def listing(policy: SpamPolicy, sender_candidates: Sequence[Sequence[str]]) -> Listing:
    """The lists' word on the senders (module docstring: the most specific
    entry decides each sender; any block wins, then any allow)."""
    allow, block = set(policy.allow), set(policy.block)
    decided: list[Listing] = []
    for entries in sender_candidates:
        for entry in entries:
            if entry in block:
                decided.append(Listing(BLOCK, entry))
                break
            if entry in allow:
                decided.append(Listing(ALLOW, entry))
                break
    for wanted in (BLOCK, ALLOW):
        for found in decided:
            if found.verdict == wanted:
                return found
    return Listing()


@dataclass(frozen=True)
class Filing:
    """Where one account's copy goes and the header field saying why
    (``b""`` when its policy played no part)."""

    mailbox: str = INBOX
    field: bytes = b""


def policy_field(mailbox: str, reason: str, detail: str) -> bytes:
    """``X-Spam-Policy: <mailbox>, reason=<REASON> <detail>`` (printable
    ASCII: an entry of another script shows as ``?``; RFC 5322 2.1.1 length)."""
    text = printable(f"{mailbox}, reason={reason} {detail}", 900)
    return f"X-Spam-Policy: {text}\r\n".encode("ascii")


def filing(verdict: Verdict, policy: SpamPolicy, found: Listing, dmarc_junk: bool) -> Filing:
    """Where a message goes for one account (module docstring), given the
    check stage's combined ``verdict`` (ACCEPT or QUARANTINE: refusals never
    get here), the account's ``policy``, what its lists say (``found``)
    and whether DMARC asked for quarantine."""
    parts = verdict.parts or (verdict,)
    spam_junk = any(p.action is Action.QUARANTINE and p.score is not None for p in parts)
    other_junk = dmarc_junk or any(p.action is Action.QUARANTINE and p.score is None for p in parts)
    entry = f"entry={found.entry[:ENTRY_SHOWN]}"
    if found.verdict == BLOCK:
        return Filing(JUNK, policy_field(JUNK, "USER_BLOCK", entry))
    if found.verdict == ALLOW:
        if other_junk:
            reason = "DMARC" if dmarc_junk else "CONTENT"
            return Filing(JUNK, policy_field(JUNK, reason, f"allowed {entry}"))
        return Filing(INBOX, policy_field(INBOX, "USER_ALLOW", entry))
    threshold, score = policy.junk_threshold, verdict.score
    if threshold is not None and score is not None and not other_junk:
        box = JUNK if score >= threshold else INBOX
        detail = f"score={score:.2f} threshold={threshold:.2f}"
        return Filing(box, policy_field(box, "USER_THRESHOLD", detail))
    return Filing(JUNK if spam_junk or other_junk else INBOX)


def with_engine(verdict: Verdict, spam: bool, score: float) -> Verdict:
    """``verdict`` (the check stage's) for one account that the built-in
    engine scored ``score``, ``spam`` if that reached the site's threshold:
    the engine's word joins its parts as rspamd's would, a QUARANTINE with
    a score, so that :func:`filing` treats either engine alike."""
    engine = Verdict(Action.QUARANTINE if spam else Action.ACCEPT, check="builtin", score=score)
    return Verdict(
        verdict.action,
        verdict.reply,
        verdict.headers,
        verdict.check,
        score,
        (*(verdict.parts or (verdict,)), engine),
        verdict.symbols,
    )


async def account_filings(
    storage: Storage,
    accounts: Iterable[Account],
    verdict: Verdict,
    find_senders: Callable[[], Sequence[Sequence[str]]],
    dmarc_junk: bool,
    per_account: Mapping[int, Verdict] | None = None,
) -> dict[int, Filing]:
    """:func:`filing` for each account, by account id: one read of each
    account's lists and threshold (concurrently); ``find_senders()``
    (:func:`senders`: parsing the header From) runs only when some account
    has list entries, which most do not. ``per_account``: an account's own
    verdict instead of ``verdict`` (:func:`with_engine`). A storage failure
    propagates (TEMPORARY: the MX answers 451 and nothing is stored)."""
    accounts = list(accounts)
    if len(accounts) == 1:  # the common case: no task to gather
        policies = [await storage.mail(accounts[0]).spam_policy(accounts[0].id)]
    else:
        policies = list(
            await asyncio.gather(*(storage.mail(a).spam_policy(a.id) for a in accounts))
        )
    listed = any(p.allow or p.block for p in policies)
    found = find_senders() if listed else ()
    return {
        account.id: filing(
            (per_account or {}).get(account.id, verdict), policy, listing(policy, found), dmarc_junk
        )
        for account, policy in zip(accounts, policies, strict=True)
    }


async def junk_threshold(storage: Storage, account: Account) -> float | None:
    """The spam score from which ``account`` wants its mail in Junk (None:
    the spam engine's own decision). For any engine that scores: rspamd's
    check here, the built-in one alike."""
    return (await storage.mail(account).spam_policy(account.id, ())).junk_threshold


__all__ = [
    "ALLOW",
    "BLOCK",
    "EntryError",
    "Filing",
    "Listing",
    "account_filings",
    "candidates",
    "filing",
    "junk_threshold",
    "listing",
    "parse_entry",
    "policy_field",
    "senders",
    "with_engine",
]

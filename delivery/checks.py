"""The check stage of the pipeline (checks -> route -> deliver).

Every entry point that takes a message in (the MX, SMTP submission, the
HTTP API's send) passes it through :meth:`CheckStage.run` once, after the
message is complete and before anything is stored or queued, and acts on
the one combined :class:`Verdict`.

Contract of a check (anything with a ``name`` and an async ``check``
method, :class:`Check`), so that anti-virus (clamd, :mod:`delivery.checks_clamd`),
rspamd (:mod:`delivery.checks_rspamd`) and the built-in engine's DNS lists
(:mod:`delivery.checks_dnsbl`) plug in the same way:

* ``check(subject)`` reads the message from :class:`Subject` (bytes or a
  spool file: stream it, do not copy it whole) and returns a
  :class:`Verdict`. It never blocks the event loop (network I/O is
  asyncio, file reads go to a thread) and it bounds its own time.
* It decides its own failure policy (clamd's ``on_error``) and says so in
  the verdict; an exception escaping a check is a bug, logged and answered
  as a temporary failure, never a pass.
* A REJECT or TEMPFAIL verdict carries the SMTP reply (code, RFC 3463
  enhanced code, text safe to show the client); the HTTP API maps the
  action to a status (422 refused, 503 try later).

The checks of a message run concurrently; their verdicts are combined once
(:func:`combine`): the most severe action wins (ACCEPT < QUARANTINE <
TEMPFAIL < REJECT; the first check listed wins a tie) and header fields
of every check accumulate, in check order.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from conf.settings import Settings
from delivery.spool import Message

if TYPE_CHECKING:
    from delivery.checks_dnsbl import ZoneResolver

log = logging.getLogger("delivery.checks")


class Flow(enum.Enum):
    """Which entry point the message came in by."""

    MX = "mx"
    SUBMISSION = "submission"
    HTTP = "http"


class Action(enum.IntEnum):
    """What to do with the message, by severity (the highest wins)."""

    ACCEPT = 0
    QUARANTINE = 1  # deliver to the recipients' Junk
    TEMPFAIL = 2  # 4xx: try again later
    REJECT = 3  # 5xx: refused for good


@dataclass(frozen=True)
class Verdict:
    """One check's answer. ``reply`` is (code, enhanced code, text) for
    REJECT and TEMPFAIL; ``headers`` are complete header fields (each
    ending in CRLF) to prepend to the message; ``check`` names who said so.

    ``score``: a spam score the action rests on (rspamd's, or for one
    account the built-in engine's), if any: a QUARANTINE with a score is
    spam filing, which a recipient's own policy may redo
    (delivery/acctpolicy.py); one without is not. ``parts``: in a combined
    verdict, the verdicts it was combined from. ``symbols`` are (name,
    score) the built-in engine adds to its sum (delivery/spamengine.py),
    such as a DNS allow list's."""

    action: Action = Action.ACCEPT
    reply: tuple[int, str, str] | None = None
    headers: bytes = b""
    check: str = ""
    score: float | None = None
    parts: tuple[Verdict, ...] = ()
    symbols: tuple[tuple[str, float], ...] = ()

    @property
    def text(self) -> str:
        """The reason shown to the client (the reply's text)."""
        return self.reply[2] if self.reply else self.action.name.lower()


ACCEPT = Verdict()
# RFC 3463 section 3.8: X.3.0 other mail system status, temporary.
CHECK_FAILED = (451, "4.3.0", "Temporary local problem, try again later")


@dataclass(frozen=True)
class Subject:
    """The message under check and its envelope. ``message`` is the cleaned
    message as received (no trace fields of ours), in memory or spooled."""

    flow: Flow
    message: Message
    mail_from: str
    recipients: tuple[str, ...]
    client_ip: str = ""
    helo: str = ""
    account: str | None = None  # the authenticated sender, if any


class Check(Protocol):
    """See the module docstring for the contract."""

    name: str

    async def check(self, subject: Subject) -> Verdict: ...


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """The one verdict of a message: the most severe action (the first such
    verdict's reply), with every verdict's header fields and symbols in
    order, the highest spam score and the verdicts themselves as ``parts``."""
    if not verdicts:
        return ACCEPT
    worst = max(verdicts, key=lambda v: v.action)  # max keeps the first of equals
    headers = b"".join(v.headers for v in verdicts)
    scores = [v.score for v in verdicts if v.score is not None]
    symbols = tuple(s for v in verdicts for s in v.symbols)
    return Verdict(
        worst.action,
        worst.reply,
        headers,
        worst.check,
        max(scores, default=None),
        tuple(verdicts),
        symbols,
    )


def printable(text: str, limit: int) -> str:
    """``text`` as printable ASCII (anything else a ``?``), at most ``limit``:
    safe in an SMTP reply and in a header field (what a check passes on
    from its server, such as rspamd's message or a DNS list's TXT)."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text[:limit]).strip()


# Outgoing mail has no Junk to go to: what a check would quarantine is
# refused (RFC 3463 section 3.8, X.7.1 delivery not authorized).
POLICY_REFUSED = (550, "5.7.1", "Message refused by content policy")


def for_flow(verdict: Verdict, flow: Flow) -> Verdict:
    """``verdict`` as ``flow`` applies it: on submission and the HTTP send a
    QUARANTINE is a REJECT (holding outgoing mail is a later feature)."""
    if flow is Flow.MX or verdict.action is not Action.QUARANTINE:
        return verdict
    return Verdict(
        Action.REJECT,
        POLICY_REFUSED,
        verdict.headers,
        verdict.check,
        verdict.score,
        verdict.parts,
        verdict.symbols,
    )


class CheckStage:
    """The checks every message passes (:meth:`run`); empty when none is on."""

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = tuple(checks)

    @classmethod
    def from_settings(
        cls, settings: Settings, resolver: ZoneResolver | None = None
    ) -> CheckStage:
        """The checks ``settings`` turns on: ``[antivirus]`` (clamd),
        ``[antispam]`` (rspamd; DNS lists with ``resolver``, the MX's: mtad
        passes its own, and the HTTP API, which has no MX flow, none)."""
        checks: list[Check] = []
        if settings.antispam.dnsbl_zones and resolver is not None:
            from delivery.checks_dnsbl import DnsblCheck

            checks.append(DnsblCheck.from_settings(settings, resolver))
        if settings.antivirus.enabled:
            from delivery.checks_clamd import ClamdCheck

            checks.append(ClamdCheck.from_settings(settings))
        if settings.antispam.rspamd_url:
            from delivery.checks_rspamd import RspamdCheck

            checks.append(RspamdCheck.from_settings(settings))
        return cls(checks)

    def __bool__(self) -> bool:
        return bool(self.checks)

    async def run(self, subject: Subject) -> Verdict:
        """Every check at once on ``subject``; their combined verdict."""
        if not self.checks:
            return ACCEPT
        results = await asyncio.gather(
            *(c.check(subject) for c in self.checks), return_exceptions=True
        )
        verdicts = []
        for check, result in zip(self.checks, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # cancellation and the like
                log.error("check %s failed", check.name, exc_info=result)
                result = Verdict(Action.TEMPFAIL, CHECK_FAILED, check=check.name)
            verdicts.append(result)
        return for_flow(combine(verdicts), subject.flow)


__all__ = [
    "ACCEPT",
    "Action",
    "Check",
    "CheckStage",
    "Flow",
    "Subject",
    "Verdict",
    "combine",
    "for_flow",
    "printable",
]

"""Per-account sending limits (``[limits]``): messages and recipients per
hour and per day, counted by every instance together in the shared state
(storage/shared.py: Redis with ``[redis] url``, this process otherwise, and
this process while Redis is unreachable: limits fail open, never crash).

Counted when a message from an authenticated account is about to be
queued for relay (SMTP submission and the API send; remote recipients
only: mail between our own accounts is not relayed), before anything is
stored. A message that would take the account past a limit in the current
window is **refused** with a temporary error naming the limit: SMTP
``450 4.7.1 Sending limit reached: ...`` (RFC 5321 section 4.2.5, a
transient failure the client retries later; RFC 3463 X.7.1, delivery not
authorized) and on the API ``429`` with Retry-After, the seconds to the
window's end (RFC 6585 section 4, RFC 9110 section 10.2.3). Nothing is
queued for it, and its count is taken back so that refused retries do not
use up the longer window.

The first time an account goes over a limit, the admin is told and what it
already queued stops: every entry of that sender still queued is put on
hold (one storage call), the account is flagged, a WARNING log line names
the account and the limit, and ``shardmail_outbound_held_total`` counts it.
While flagged (back under the limits in a later window) its mail is accepted
and queued **held**, as Postfix's hold queue, until an admin runs
``mailctl queue release --account ADDRESS``. The flag lives in the shared
state: in Redis it is one for the site; without ``[redis] url`` it is in
each daemon's process, out of reach of ``mailctl`` (a restart clears it).

Entries are matched to the account by their sender (MAIL FROM), as the
queue records no account: mail the account sent from another address is
not held. No per-account overrides yet: the directory has no field for them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from runtime.metrics import OUTBOUND_HELD
from storage.errors import StorageError
from storage.shared import shared_state

if TYPE_CHECKING:
    from conf.settings import Settings
    from storage.model import Account

log = logging.getLogger(__name__)

HOUR = 3600.0
DAY = 86400.0
# (setting in [limits], counts recipients rather than messages, window seconds)
LIMITS: tuple[tuple[str, bool, float], ...] = (
    ("user_messages_per_hour", False, HOUR),
    ("user_messages_per_day", False, DAY),
    ("user_recipients_per_hour", True, HOUR),
    ("user_recipients_per_day", True, DAY),
)
FLAGS = "limited"  # the shared set of accounts whose mail is held
REASON = "sending limit: {account}: {why}"


class LimitReached(Exception):
    """The message would take ``account`` past ``limit`` (a ``[limits]``
    setting whose value is ``allowed``); ``retry_after`` is the whole
    seconds until that limit's window ends. ``str(err)`` names the limit
    and is safe to show the client."""

    def __init__(self, account: str, limit: str, allowed: int, retry_after: int) -> None:
        unit, _, period = limit.removeprefix("user_").partition("_per_")
        super().__init__(
            f"Sending limit reached: {allowed} {unit} per {period} for {account}; try later"
        )
        self.account = account
        self.limit = limit
        self.allowed = allowed
        self.retry_after = retry_after


def reason_prefix(account: str) -> str:
    """What every hold reason of ``account`` begins with (``mailctl queue``
    release --account finds its entries by it)."""
    return REASON.format(account=account.lower(), why="")


def _window_left(window: float, now: float) -> int:
    """Whole seconds (at least 1) until the fixed window holding ``now`` ends
    (windows are ``floor(now / window)``, as storage/shared.py counts)."""
    return max(1, math.ceil((math.floor(now / window) + 1) * window - now))


async def hold_reason(
    storage: Any, settings: Settings, account: Account, recipients: int
) -> str | None:
    """Counts one message to ``recipients`` remote recipients from
    ``account``: None to send it, or the reason to queue it held (the
    account is flagged). Raises :class:`LimitReached` if it would go past
    a limit, first holding the account's queued mail if that is the first
    time. Never raises for an unreachable Redis (counts fall back to this
    process)."""
    shared = shared_state(storage, settings.redis)
    address = account.address.lower()
    active = [
        (name, limit, per_rcpt, window)
        for name, per_rcpt, window in LIMITS
        if (limit := getattr(settings.limits, name))
    ]
    items = [
        (f"send:{name}:{address}", window, recipients if per_rcpt else 1)
        for name, _, per_rcpt, window in active
    ]
    counts = await shared.counts.add(items)
    over = [
        (name, limit, window)
        for (name, limit, _, window), count in zip(active, counts, strict=True)
        if count > limit
    ]
    flags = shared.flags(FLAGS)
    flagged = await flags.has(address)
    if over:
        # Refused: it takes back its counts, so only sent mail uses the windows.
        await shared.counts.add([(key, window, -amount) for key, window, amount in items])
        now = time.time()
        # Name the limit that keeps the account waiting longest (ties: the first).
        name, limit, window = max(over, key=lambda o: _window_left(o[2], now))
        if not flagged:
            await _trip(storage, flags, address, f"{name} = {limit}")
        raise LimitReached(address, name, limit, _window_left(window, now))
    if flagged:
        OUTBOUND_HELD.inc(limit="flagged")
        return REASON.format(account=address, why="account held after going over a limit")
    return None


async def _trip(storage: Any, flags: Any, address: str, why: str) -> None:
    """The first time ``address`` goes over a limit: flag it, hold what it
    has queued, tell the admin."""
    await flags.add(address)
    try:
        held = await storage.queue.hold_sender(
            address, REASON.format(account=address, why=f"over {why}")
        )
    except StorageError as exc:  # the refusal stands; the flag holds new mail
        log.error("account %s: holding its queued mail failed: %s", address, exc)
        held = 0
    log.warning(
        "account %s is over its sending limit %s: %d queued message(s) and its further "
        "outbound mail held until `mailctl queue release --account %s`",
        address, why, held, address,
    )
    OUTBOUND_HELD.inc(limit=why.partition(" ")[0].removeprefix("user_"))


async def release_account(storage: object, settings: Settings, address: str) -> bool:
    """Clears the flag of ``address``; True if it was set."""
    return await shared_state(storage, settings.redis).flags(FLAGS).remove(address.lower())


__all__ = ["LIMITS", "LimitReached", "hold_reason", "reason_prefix", "release_account"]

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
already queued stops: the account is flagged and every entry of that
sender still queued is put on hold (storage ``queue.flag``: the flag and
its home partition's entries in one transaction), a WARNING log line names
the account and the limit, and ``shardmail_outbound_held_total`` counts it.
While flagged (back under the limits in a later window) its mail is accepted
and queued **held**, as Postfix's hold queue, until an admin runs
``mailctl queue release --account ADDRESS``, which releases its entries
and clears the flag in one transaction. The flag is kept in the site's
database beside the queue (``queue_held_senders``), with or without Redis:
every instance and ``mailctl`` see the same one, and a restart keeps it.
Reading it is one primary-key read per message; the database unreachable
there is a StorageError (a temporary error to the client), as for the
enqueue that would follow.

Entries are matched to the account by their sender (MAIL FROM), as the
queue records no account: mail the account sent from another address is
not held. No per-account overrides yet: the directory has no field for them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
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
    a limit, first flagging the account and holding its queued mail if
    that is the first time. Never raises for an unreachable Redis (counts
    fall back to this process); raises StorageError (TEMPORARY) when the
    flag cannot be read, before counting anything."""
    address = account.address.lower()
    flagged = await storage.queue.is_flagged(address)
    shared = shared_state(storage, settings.redis)
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
    if over:
        # Refused: it takes back its counts, so only sent mail uses the windows.
        await shared.counts.add([(key, window, -amount) for key, window, amount in items])
        now = time.time()
        # Name the limit that keeps the account waiting longest (ties: the first).
        name, limit, window = max(over, key=lambda o: _window_left(o[2], now))
        if not flagged:
            await _trip(storage, address, f"{name} = {limit}")
        raise LimitReached(address, name, limit, _window_left(window, now))
    if flagged:
        OUTBOUND_HELD.inc(limit="flagged")
        return REASON.format(account=address, why="account held after going over a limit")
    return None


async def _trip(storage: Any, address: str, why: str) -> None:
    """The first time ``address`` goes over a limit: flag it and hold what
    it has queued (one storage call), tell the admin."""
    try:
        held = await storage.queue.flag(address, REASON.format(account=address, why=f"over {why}"))
    except StorageError as exc:  # the refusal stands; the next one over tries again
        log.error("account %s: flagging it and holding its queued mail failed: %s", address, exc)
        return
    log.warning(
        "account %s is over its sending limit %s: %d queued message(s) and its further "
        "outbound mail held until `mailctl queue release --account %s`",
        address,
        why,
        held,
        address,
    )
    OUTBOUND_HELD.inc(limit=why.partition(" ")[0].removeprefix("user_"))


async def release_account(
    storage: Any, address: str
) -> Mapping[str, tuple[int, bool] | StorageError]:
    """Releases the entries held for ``address``'s limit and clears its
    flag, each partition in one transaction: by partition, (entries
    released, flag cleared there) or the error it answered with."""
    return await storage.queue.release_account(address.lower(), reason_prefix(address))


__all__ = ["LIMITS", "LimitReached", "hold_reason", "reason_prefix", "release_account"]

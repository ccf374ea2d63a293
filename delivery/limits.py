"""Per-account sending limits (``[limits]``): messages and recipients per
hour and per day, counted by every instance together in the shared state
(storage/shared.py: Redis with ``[redis] url``, this process otherwise, and
this process while Redis is unreachable: limits fail open, never refuse).

Counted when a message from an authenticated account is accepted for relay
(SMTP submission and the API send; remote recipients only: mail between our
own accounts is not relayed). Over a limit the message is still accepted
(it is never lost, the client gets its 250 / 202) but queued **held**, as
Postfix's hold queue; the account is flagged, so its further mail is held
too until an admin runs ``mailctl queue release --account ADDRESS``, and
the admin is told: a WARNING log line naming the account and the limit,
the metric ``shardmail_outbound_held_total`` and the reason on each entry
in ``mailctl queue list``. Counting happens before the queue commit, so a
message that then fails with a temporary error has still counted (an
over-count, the safe direction).

Accepting then holding, rather than refusing, keeps the promise of the 250
(RFC 5321 section 6.1: once accepted, the message must not be lost) and
tells an abuser nothing. The flag lives in the shared state: in Redis it
is one for the site; without ``[redis] url`` it is in each daemon's process,
out of reach of ``mailctl`` (a restart clears it there).

No per-account overrides yet: the directory has no field for them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from runtime.metrics import OUTBOUND_HELD
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


def reason_prefix(account: str) -> str:
    """What every hold reason of ``account`` begins with (``mailctl queue``
    release --account finds its entries by it)."""
    return REASON.format(account=account.lower(), why="")


async def hold_reason(
    storage: object, settings: Settings, account: Account, recipients: int
) -> str | None:
    """Counts one message to ``recipients`` remote recipients from
    ``account``; the reason to hold it, or None to send it. Never raises
    for an unreachable Redis (the counts fall back to this process)."""
    shared = shared_state(storage, settings.redis)
    address = account.address.lower()
    active = [
        (name, limit, per_rcpt, window)
        for name, per_rcpt, window in LIMITS
        if (limit := getattr(settings.limits, name))
    ]
    counts = await shared.counts.add(
        [(f"send:{name}:{address}", window, recipients if per_rcpt else 1)
         for name, _, per_rcpt, window in active]
    )
    over = [
        f"{name} = {limit} (now {count})"
        for (name, limit, _, _), count in zip(active, counts, strict=True)
        if count > limit
    ]
    flags = shared.flags(FLAGS)
    if over:
        await flags.add(address)
        why = ", ".join(over)
        log.warning(
            "account %s is over its sending limit %s: its outbound mail is held "
            "until `mailctl queue release --account %s`", address, why, address,
        )
        OUTBOUND_HELD.inc(limit=over[0].partition(" ")[0].removeprefix("user_"))
        return REASON.format(account=address, why=f"over {why}")
    if await flags.has(address):
        OUTBOUND_HELD.inc(limit="flagged")
        return REASON.format(account=address, why="account held after going over a limit")
    return None


async def release_account(storage: object, settings: Settings, address: str) -> bool:
    """Clears the flag of ``address``; True if it was set."""
    return await shared_state(storage, settings.redis).flags(FLAGS).remove(address.lower())


__all__ = ["LIMITS", "hold_reason", "reason_prefix", "release_account"]

"""The caller's own anti-spam settings (issue #22, delivery/acctpolicy.py).

``GET /v1/settings/spam`` answers ``{"allow": [...], "block": [...],
"junk_threshold": number | null}``: the sender lists (entries as stored:
``user@example.com``, ``example.com`` or ``*.example.com``, lower case,
domains in IDNA A-label form) and the spam score from which the caller's
mail goes to Junk (null: the spam filter's own action decides).

``PUT /v1/settings/spam`` replaces all three with the body's (a missing
key is an empty list or null, as PUT replaces the whole resource, RFC 9110
section 9.3.4) and answers as GET. Every entry is checked first: 400
``invalid_entry`` naming the first bad one, ``invalid_field`` for a wrong
type, an unknown key or an entry given twice or on both lists, and
nothing changes. Bodies are capped at :data:`SPAM_BODY_LIMIT` (413).
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from delivery.acctpolicy import EntryError, parse_entry
from httpapi.body import json_body
from httpapi.context import account_of, context
from httpapi.errors import bad_request
from httpapi.views import json_response
from storage.model import MAX_SPAM_ENTRIES as MAX_ENTRIES
from storage.model import SPAM_THRESHOLD_LIMIT as THRESHOLD_LIMIT
from storage.model import SpamPolicy

routes = web.RouteTableDef()

# Room for the storage cap of entries at their longest (an address of 320
# characters, quoted and escaped): a body past it could not be stored anyway.
SPAM_BODY_LIMIT = 384 * 1024
FIELDS = frozenset({"allow", "block", "junk_threshold"})


def policy_view(policy: SpamPolicy) -> dict[str, Any]:
    return {
        "allow": list(policy.allow),
        "block": list(policy.block),
        "junk_threshold": policy.junk_threshold,
    }


def _entries(body: dict[str, Any], name: str) -> tuple[str, ...]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"{name} must be a list of strings", "invalid_field")
    if len(value) > MAX_ENTRIES:
        raise bad_request(f"at most {MAX_ENTRIES} entries", "invalid_field")
    entries = []
    for text in value:
        try:
            entries.append(parse_entry(text))
        except EntryError as exc:
            raise bad_request(f"{name}: {text[:100]!r}: {exc}", "invalid_entry") from None
    return tuple(sorted(entries))


def _threshold(body: dict[str, Any]) -> float | None:
    value = body.get("junk_threshold")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request("junk_threshold must be a number or null", "invalid_field")
    if not math.isfinite(value) or abs(value) > THRESHOLD_LIMIT:
        raise bad_request(
            f"junk_threshold must be from -{THRESHOLD_LIMIT:g} to {THRESHOLD_LIMIT:g}",
            "invalid_field",
        )
    return float(value)


def policy_from(body: dict[str, Any]) -> SpamPolicy:
    """The policy a PUT body asks for; 400 for anything else (module docstring)."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise bad_request(f"unknown field {unknown[0][:40]!r}", "invalid_field")
    policy = SpamPolicy(_entries(body, "allow"), _entries(body, "block"), _threshold(body))
    seen: set[str] = set()
    for entry in (*policy.allow, *policy.block):
        if entry in seen:
            raise bad_request(f"{entry} is given twice or on both lists", "invalid_field")
        seen.add(entry)
    return policy


@routes.get("/v1/settings/spam", name="get_spam_settings")
async def get_spam_settings(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    return json_response(policy_view(await ctx.storage.mail(account).spam_policy(account.id)))


@routes.put("/v1/settings/spam", name="put_spam_settings")
async def put_spam_settings(request: web.Request) -> web.Response:
    ctx, account = context(request), account_of(request)
    policy = policy_from(await json_body(request, SPAM_BODY_LIMIT))
    mail = ctx.storage.mail(account)
    await mail.put_spam_policy(account.id, policy)
    return json_response(policy_view(await mail.spam_policy(account.id)))

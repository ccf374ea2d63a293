"""``mailctl spam ...``: an account's own anti-spam choices (issue #22,
delivery/acctpolicy.py).

* ``show ACCOUNT [--json]``: its allow and block lists and Junk threshold.
* ``allow ACCOUNT ENTRY...`` / ``block ACCOUNT ENTRY...``: puts each entry
  (``user@example.com``, ``example.com`` or ``*.example.com``) on that
  list, taking it off the other one.
* ``remove ACCOUNT ENTRY...``: takes each entry off whichever list holds it.
* ``threshold ACCOUNT SCORE|none``: the spam score from which its mail
  goes to Junk; ``none`` leaves it to the spam filter's own action.

Exit 2 for an entry or a score that is not one (every entry is checked
before anything changes), 1 for an unknown account or a refusal of
storage (the entry cap), as every mailctl command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

from conf.settings import Settings

ACTIONS = ("show", "allow", "block", "remove", "threshold")


def _usage(message: str) -> int:
    print(f"mailctl spam: {message}", file=sys.stderr)
    return 2


def _threshold(text: str) -> float | None:
    """``none`` or a finite number; ValueError otherwise."""
    if text.lower() in ("none", "off", "default"):
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def cmd_spam(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``mailctl spam`` action; see the module docstring."""
    from delivery.acctpolicy import EntryError, parse_entry
    from mailctl.cli import with_storage

    values: list[str] = args.values
    entries: list[str] = []
    threshold: float | None = None
    if args.action in ("allow", "block", "remove"):
        if not values:
            return _usage(f"{args.action}: give at least one entry")
        for value in values:
            try:
                entries.append(parse_entry(value))
            except EntryError as exc:
                return _usage(f"{value!r}: {exc}")
    elif args.action == "threshold":
        if len(values) != 1:
            return _usage("threshold: give one score, or none")
        try:
            threshold = _threshold(values[0])
        except ValueError:
            return _usage(f"threshold: {values[0]!r} is not a number (or none)")
    elif values:
        return _usage("show takes no entries")

    async def act(storage: Any) -> int:
        account = await storage.directory.get_account(args.account)
        mail = storage.mail(account)
        if args.action == "threshold":
            await mail.set_junk_threshold(account.id, threshold)
            shown = "the spam filter's own" if threshold is None else f"{threshold:g}"
            print(f"Junk threshold of {account.address}: {shown}")
        elif args.action != "show":
            to_list = None if args.action == "remove" else args.action
            for entry in entries:
                was = await mail.set_sender_entry(account.id, entry, to_list)
                if to_list is None:
                    print(
                        f"{entry}: removed from the {was} list" if was else f"{entry}: on no list"
                    )
                else:
                    moved = f" (was on the {was} list)" if was and was != to_list else ""
                    print(f"{entry}: on the {to_list} list of {account.address}{moved}")
        else:
            policy = await mail.spam_policy(account.id)
            if args.json:
                print(
                    json.dumps(
                        {
                            "allow": list(policy.allow),
                            "block": list(policy.block),
                            "junk_threshold": policy.junk_threshold,
                        }
                    )
                )
                return 0
            for entry in policy.allow:
                print(f"allow\t{entry}")
            for entry in policy.block:
                print(f"block\t{entry}")
            if policy.junk_threshold is not None:
                print(f"threshold\t{policy.junk_threshold:g}")
        return 0

    return with_storage(settings, act)


def add_spam_parser(
    command: Callable[[str, Callable[..., int], str], argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``spam`` with mailctl's ``command(name, func, help)`` helper."""
    parser = command("spam", cmd_spam, "an account's sender allow/block lists and Junk threshold")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("account")
    parser.add_argument(
        "values",
        nargs="*",
        metavar="ENTRY|SCORE",
        help="user@example.com, example.com or *.example.com; a score or none for threshold",
    )
    parser.add_argument("--json", action="store_true", help="with show: as one JSON object")
    return parser

"""``mailctl acl ...``: who may use an account's mailboxes (RFC 4314
rights, kept in the owner's shard: storage/sql/acl.py).

* ``grant OWNER MAILBOX GRANTEE RIGHTS``: sets GRANTEE's rights on
  OWNER's MAILBOX, as IMAP SETACL does: ``lrswi`` replaces them, ``+te``
  adds, ``-- -w`` removes (``--``: what follows is no option; letters of
  ``lrswipkxtea``, ``c`` and ``d`` as RFC 4314 section 2.1.1 says).
  GRANTEE is an address or ``anyone``.
* ``revoke OWNER MAILBOX GRANTEE``: takes all of them away.
* ``list OWNER [MAILBOX] [--json]``: the entries of one mailbox or of all.

The grantee then sees the mailbox as ``Other Users/OWNER/MAILBOX`` in
IMAP. Exit 2 for an unknown right, 1 for an unknown account or mailbox.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from conf.settings import Settings

ACTIONS = ("grant", "revoke", "list")


def _usage(message: str) -> int:
    print(f"mailctl acl: {message}", file=sys.stderr)
    return 2


async def _grantee_id(storage: Any, name: str) -> int:
    from storage import acl

    if name.lower() == acl.ANYONE_NAME:
        return acl.ANYONE_ID
    return int((await storage.directory.get_account(name)).id)


async def _name_of(storage: Any, grantee_id: int) -> str | None:
    from storage import acl
    from storage.errors import ErrorKind, StorageError

    if grantee_id == acl.ANYONE_ID:
        return acl.ANYONE_NAME
    try:
        return str((await storage.directory.get_account_by_id(grantee_id)).address)
    except StorageError as err:
        if err.kind is ErrorKind.NOT_FOUND:
            return None  # being removed
        raise


def cmd_acl(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``mailctl acl`` action; see the module docstring."""
    from mailctl.cli import with_storage
    from storage import acl
    from storage.errors import StorageError

    values: list[str] = args.values
    wanted = {"grant": 3, "revoke": 2}.get(args.action)
    if wanted is not None and len(values) != wanted:
        shape = "MAILBOX GRANTEE RIGHTS" if args.action == "grant" else "MAILBOX GRANTEE"
        return _usage(f"{args.action}: give OWNER {shape}")
    if args.action == "list" and len(values) > 1:
        return _usage("list: give OWNER [MAILBOX]")
    if args.action == "grant":
        try:
            acl.parse_rights(values[2])
        except StorageError as err:
            return _usage(f"{values[2]!r}: {err.message} (rights are letters of {acl.RIGHTS})")

    async def act(storage: Any) -> int:
        owner = await storage.directory.get_account(args.owner)
        mail = storage.mail(owner)
        if args.action != "list":
            box = await mail.get_mailbox(owner.id, values[0])
            grantee = await _grantee_id(storage, values[1])
            mod = values[2] if args.action == "grant" else ""
            now = await acl.change_rights(mail, owner.id, box.id, grantee, mod)
            print(f"{values[1]} on {owner.address} {box.name}: {now or 'no rights'}")
            return 0
        boxes = await mail.list_mailboxes(owner.id)
        if values:
            boxes = [await mail.get_mailbox(owner.id, values[0])]
        rows = []
        for box in sorted(boxes, key=lambda b: b.name):
            for grantee, held in sorted((await mail.acl(owner.id, box.id)).items()):
                name = await _name_of(storage, grantee)
                if name is not None:
                    rows.append({"mailbox": box.name, "grantee": name, "rights": held})
        if args.json:
            print(json.dumps(rows))
        for row in [] if args.json else rows:
            print(f"{row['mailbox']}\t{row['grantee']}\t{row['rights']}")
        return 0

    return with_storage(settings, act)


def add_acl_parser(
    command: Callable[[str, Callable[..., int], str], argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``acl`` with mailctl's ``command(name, func, help)`` helper."""
    parser = command("acl", cmd_acl, "who may use an account's mailboxes (RFC 4314 rights)")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("owner", help="the account whose mailbox it is")
    parser.add_argument(
        "values", nargs="*", metavar="MAILBOX|GRANTEE|RIGHTS",
        help="MAILBOX, then GRANTEE (an address or anyone), then RIGHTS (lrswi, +t, or -- -w)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="with list: as one JSON array")
    return parser

"""ACL (RFC 4314): SETACL, DELETEACL, GETACL, LISTRIGHTS, MYRIGHTS.

Identifiers are account addresses and "anyone" (section 2); negative
rights ("-name", section 2) are not offered: such an identifier is
refused. The owner's rights are implicit, all of them, and cannot be
changed (section 2: a server may make the owner's rights implicit);
GETACL lists them first. The rights live in the owner's shard
(storage/sql/acl.py) and are enforced in storage/acl.py.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from imapd.imap.session import Reply, bad, no, ok
from imapd.imap.wire import encode
from storage import acl as rights
from storage.errors import ErrorKind, StorageError

if TYPE_CHECKING:
    from imapd.imap.session import Session
    from imapd.imap.wire.commands import Acl
    from storage.acl import MailboxAccess


_ATOM = re.compile(r'[^(){ \x00-\x1f\x7f-\uffff%*"\\\]]+')


def _astring(value: str) -> bytes:
    """An identifier or rights as an atom where it can be (as the RFC's
    examples show them), else a quoted string or literal."""
    return value.encode() if _ATOM.fullmatch(value) else encode.string(value)


async def _grantee(s: Session, identifier: str) -> int | None:
    """The account id an identifier names (0 for "anyone"), None if none."""
    if identifier.lower() == rights.ANYONE_NAME:
        return rights.ANYONE_ID
    try:
        return (await s.storage.directory.get_account(identifier)).id
    except StorageError as err:
        if err.kind is ErrorKind.NOT_FOUND:
            return None
        raise


async def _administered(s: Session, cmd: Acl, what: str) -> tuple[MailboxAccess, int] | Reply:
    """The mailbox and the grantee a SETACL, DELETEACL or LISTRIGHTS
    names, once the caller is known to hold "a" on it (section 4); the
    NO to answer otherwise."""
    assert cmd.identifier is not None
    access = await s.open_access(cmd.mailbox)
    access.require("a", what)
    grantee = await _grantee(s, cmd.identifier)
    if grantee is None:
        return no(f"No such user {cmd.identifier}", "NONEXISTENT")
    return access, grantee


async def handle_setacl(s: Session, cmd: Acl) -> Reply:
    """SETACL and DELETEACL (sections 3.1, 3.2): need "a" (section 4)."""
    assert cmd.identifier is not None
    if cmd.identifier.startswith("-"):
        return no("Negative rights are not supported", "CANNOT")
    if cmd.rights is not None:
        try:
            rights.parse_rights(cmd.rights)
        except StorageError as err:
            return bad(err.message)  # section 3.1: an unknown right is BAD
    found = await _administered(s, cmd, "administer this mailbox")
    if isinstance(found, Reply):
        return found
    access, grantee = found
    if grantee == access.owner.id:
        return no("The owner's rights cannot be changed", "CANNOT")
    store = access.store.store
    # DELETEACL is SETACL to no rights (section 3.2).
    mod = "" if cmd.name == "DELETEACL" else (cmd.rights or "")
    await rights.change_rights(store, access.owner.id, access.mailbox.id, grantee, mod)
    return ok(f"{cmd.name} completed")


async def handle_getacl(s: Session, cmd: Acl) -> Reply:
    """GETACL (section 3.3): the owner, then every entry; needs "a"."""
    access = await s.open_access(cmd.mailbox)
    access.require("a", "read this mailbox's ACL")
    acl = await access.store.store.acl(access.owner.id, access.mailbox.id)
    names = {rights.ANYONE_ID: rights.ANYONE_NAME}
    for grantee in acl:
        if grantee == rights.ANYONE_ID:
            continue
        try:
            names[grantee] = (await s.storage.directory.get_account_by_id(grantee)).address
        except StorageError as err:
            if err.kind is not ErrorKind.NOT_FOUND:
                raise  # NOT_FOUND: the grantee is being removed, its rows next
    parts = [encode.mailbox(cmd.mailbox, s.utf8)]
    parts += [_astring(access.owner.address), _astring(rights.render(rights.ALL))]
    for grantee, held in sorted(acl.items()):
        if grantee in names:
            parts += [_astring(names[grantee]), _astring(held)]
    s.untagged(b"ACL " + b" ".join(parts))
    return ok("GETACL completed")


async def handle_listrights(s: Session, cmd: Acl) -> Reply:
    """LISTRIGHTS (section 3.4): the owner always holds every right; any
    other identifier none for sure, each right grantable alone. Needs "a"."""
    assert cmd.identifier is not None
    found = await _administered(s, cmd, "list rights on this mailbox")
    if isinstance(found, Reply):
        return found
    access, grantee = found
    if grantee == access.owner.id:
        granted = [_astring(rights.render(rights.ALL))]
    else:
        granted = [b'""', *(r.encode() for r in rights.RIGHTS)]
    head = [encode.mailbox(cmd.mailbox, s.utf8), _astring(cmd.identifier)]
    s.untagged(b"LISTRIGHTS " + b" ".join(head + granted))
    return ok("LISTRIGHTS completed")


async def handle_myrights(s: Session, cmd: Acl) -> Reply:
    """MYRIGHTS (section 3.5): allowed with any right at all (section 4);
    holding none, the mailbox is as good as absent (storage.acl)."""
    access = await s.open_access(cmd.mailbox)
    held = _astring(rights.render(access.rights))
    s.untagged(b"MYRIGHTS " + encode.mailbox(cmd.mailbox, s.utf8) + b" " + held)
    return ok("MYRIGHTS completed")

"""QUOTA (RFC 9208): GETQUOTAROOT, GETQUOTA and a refused SETQUOTA.

Each account has one quota root, named "" as in RFC 9208's examples, that
covers every mailbox of the account. Its one resource is STORAGE (section
5.1): the sum of the account's message sizes against ``quota_bytes``, both
in units of 1024 octets. An account without a limit has no quota root
(section 4.1.2 allows a QUOTAROOT response that names none). Quotas are set
by the administrator (``mailctl``), so SETQUOTA is refused and QUOTASET is
not advertised (section 4.1.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imapd.imap.session import Reply, no, ok
from imapd.imap.wire import encode

if TYPE_CHECKING:
    from imapd.imap.session import Session
    from imapd.imap.wire.commands import Quota

# The one quota root of every account (RFC 9208 section 3.2: a server-chosen name).
ROOT = ""
_KIB = 1024


async def _storage_resource(s: Session) -> tuple[int, int] | None:
    """(usage, limit) of STORAGE in KiB, or None when the account has no limit.

    The account row is read again, not taken from login, so a limit the
    administrator changed shows at once. Usage rounds up (a few octets are
    not "0 used") and the limit down, so usage == limit means full.
    """
    assert s.account is not None and s.mail is not None
    account = await s.storage.directory.get_account_by_id(s.account.id)
    if account.quota_bytes is None:
        return None
    used = await s.mail.quota_used(account.id)
    return -(-used // _KIB), account.quota_bytes // _KIB


def _quota_line(root: str, usage: int, limit: int) -> bytes:
    # RFC 9208 sections 4.2.1 and 7: "QUOTA" SP quota-root-name SP quota-list,
    # quota_resource = resource-name SP resource-usage SP resource-limit.
    return b"QUOTA " + encode.string(root) + b" (STORAGE %d %d)" % (usage, limit)


async def handle_getquotaroot(s: Session, cmd: Quota) -> Reply:
    """RFC 9208 section 4.1.2: QUOTAROOT (section 4.2.2), then each root's QUOTA."""
    box = await s.mailbox_id_of(cmd.root)  # NO [NONEXISTENT] for an unknown mailbox
    storage = await _storage_resource(s)
    line = b"QUOTAROOT " + encode.mailbox(box.name, s.utf8)
    if storage is None:
        s.untagged(line)
        return ok("GETQUOTAROOT completed")
    s.untagged(line + b" " + encode.string(ROOT))
    s.untagged(_quota_line(ROOT, *storage))
    return ok("GETQUOTAROOT completed")


async def handle_getquota(s: Session, cmd: Quota) -> Reply:
    """RFC 9208 section 4.1.1: the root's resources; NO for a root that does not exist."""
    storage = await _storage_resource(s) if cmd.root == ROOT else None
    if storage is None:
        return no("No such quota root", "NONEXISTENT")
    s.untagged(_quota_line(ROOT, *storage))
    return ok("GETQUOTA completed")


async def handle_setquota(s: Session, cmd: Quota) -> Reply:
    """RFC 9208 section 4.1.3: NO when the limits cannot be set (an administrator's job)."""
    return no("Quotas are set by the administrator", "NOPERM")

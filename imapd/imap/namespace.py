"""The session's namespaces (RFC 2342) and where their names lead.

* Personal, prefix "" : the account's own mailboxes.
* Other Users, prefix "Other Users/" : another account's mailbox on which
  this account holds rights (RFC 4314) is named
  ``Other Users/<owner address>/<mailbox>``; an address has no "/", so
  the owner is the first level below the prefix.
* Shared: none. Every mailbox here belongs to an account; a team's
  mailbox is one account's (a role address such as team@example.org)
  shared with the others, and appears under Other Users.
"""

from __future__ import annotations

from storage.model import HIERARCHY_DELIMITER

OTHER_USERS = "Other Users"  # RFC 2342 section 4: the prefix, without the delimiter
_PREFIX = OTHER_USERS + HIERARCHY_DELIMITER

# RFC 2342 section 5: personal, other users', shared namespaces.
_D = HIERARCHY_DELIMITER
NAMESPACE_LINE = f'NAMESPACE (("" "{_D}")) (("{_PREFIX}" "{_D}")) NIL'


def other_user_name(owner: str, mailbox: str) -> str:
    """The name another account's ``mailbox`` has in this namespace."""
    return f"{_PREFIX}{owner}{HIERARCHY_DELIMITER}{mailbox}"


def split_other_user(name: str) -> tuple[str, str] | None:
    """(owner address, mailbox) for a name in Other Users, else None
    (the personal namespace; also the levels "Other Users" and
    "Other Users/<owner>" themselves, which are no mailboxes)."""
    if not name.startswith(_PREFIX):
        return None
    owner, _, rest = name[len(_PREFIX) :].partition(HIERARCHY_DELIMITER)
    if not owner or not rest:
        return None
    return owner, rest


def in_other_users(name: str) -> bool:
    """Whether ``name`` is "Other Users" or below it (not a personal name)."""
    return name == OTHER_USERS or name.startswith(_PREFIX)

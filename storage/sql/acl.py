"""RFC 4314 access control lists in the mail shard (issue #24).

The rows live in the owner's shard (``mailbox_acl``, schema step 32)
beside its mailboxes, keyed by the mailbox's id, so a RENAME keeps them
and DELETE drops them (``SqlMailStore.delete_mailbox``); an account move
copies them (:func:`copy_acl`), removing the owner deletes them
(:func:`delete_acl`), removing a grantee deletes its grants in every
shard (:func:`delete_grants`). A grantee is an account id, 0 for
"anyone" (RFC 4314 section 2), so renaming an account keeps its grants.
Writes take the owner's lock like every other write of its mail store
and record a MAILBOX change ``{"op": "acl"}``, which the event bus
carries to the owner's sessions and to grantees' sessions on the
mailbox (they re-read their rights). What the rights allow is decided
in one place for every backend: :mod:`storage.acl`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from storage import errors
from storage.model import ChangeKind
from storage.sql.db import Database, execute
from storage.sql.metadata import delete_grantee_metadata
from storage.sql.schema import mailbox_acl as T
from storage.sql.schema import mailboxes

ANYONE = 0  # the grantee id of RFC 4314's "anyone"


@dataclass(frozen=True)
class Grant:
    """Rights ``rights`` on the mailbox ``mailbox_id`` (named ``name``,
    owned by ``owner_id``) for ``grantee_id`` (:data:`ANYONE`: everyone)."""

    owner_id: int
    mailbox_id: int
    name: str
    grantee_id: int
    rights: str


# AclStore.grants_to's read (storage.sql.db.execute: a constant statement).
_GRANTS_TO = (
    select(T.c.account_id, T.c.mailbox_id, mailboxes.c.name, T.c.grantee_id, T.c.rights)
    .join(mailboxes, mailboxes.c.id == T.c.mailbox_id)
    .where(
        T.c.grantee_id.in_((bindparam("b_grantee"), bindparam("b_anyone"))),
        T.c.account_id != bindparam("b_grantee"),
    )
)


class _Locked(Protocol):
    """What :class:`AclStore` needs of the mail store it is mixed into."""

    db: Database

    def _write(self, account_id: int) -> AbstractAsyncContextManager[Any]: ...


class AclStore:
    """Mixed into ``SqlMailStore``: the ACLs of the shard's mailboxes."""

    async def acl(self: _Locked, account_id: int, mailbox_id: int) -> dict[int, str]:
        """The ACL of one of the account's mailboxes: grantee id -> rights
        (the owner's own rights are implicit and not stored)."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(T.c.grantee_id, T.c.rights).where(
                    T.c.account_id == account_id, T.c.mailbox_id == mailbox_id
                )
            )
            return {r.grantee_id: r.rights for r in rows}

    async def set_acl(
        self: _Locked, account_id: int, mailbox_id: int, grantee_id: int, rights: str
    ) -> None:
        """Sets the rights of ``grantee_id`` on the account's mailbox
        (``""``: removes its entry, RFC 4314 sections 3.1 and 3.2), and
        records a MAILBOX change ``{"op": "acl", "grantee": id}``.
        NOT_FOUND if the mailbox is not the account's."""
        await AclStore.change_acl(self, account_id, mailbox_id, grantee_id, lambda _: rights)

    async def change_acl(
        self: _Locked,
        account_id: int,
        mailbox_id: int,
        grantee_id: int,
        change: Callable[[str], str],
    ) -> str:
        """:meth:`set_acl` to ``change(current rights)``, read and written
        under the owner's lock, so two concurrent changes ("+t" and "+e")
        both hold; returns the rights set."""
        async with self._write(account_id) as tx:
            conn: AsyncConnection = tx.conn
            found = await conn.execute(
                select(mailboxes.c.name).where(
                    mailboxes.c.id == mailbox_id, mailboxes.c.account_id == account_id
                )
            )
            row = found.first()
            if row is None:
                raise errors.not_found("no such mailbox")
            key = (T.c.mailbox_id == mailbox_id) & (T.c.grantee_id == grantee_id)
            current = (await conn.execute(select(T.c.rights).where(key))).scalar()
            rights = change(current or "")
            await conn.execute(delete(T).where(key))
            if rights:
                await conn.execute(
                    insert(T).values(
                        mailbox_id=mailbox_id,
                        grantee_id=grantee_id,
                        account_id=account_id,
                        rights=rights,
                    )
                )
            tx.change(
                ChangeKind.MAILBOX,
                mailbox_id,
                data={"op": "acl", "name": row.name, "grantee": grantee_id},
            )
        return rights

    async def grants_to(self: _Locked, grantee_id: int) -> list[Grant]:
        """Every grant of this shard to ``grantee_id`` or to "anyone", on
        mailboxes of accounts other than the grantee, with each mailbox's
        current name: one indexed read (what LIST of "Other Users" needs,
        at every LIST: a statement compiled once, run on the reader)."""
        params = {"b_grantee": grantee_id, "b_anyone": ANYONE}
        rows = await self.db.read_sync(lambda conn: execute(conn, _GRANTS_TO, params).all())
        return [Grant(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def remove_grants(self: _Locked, grantee_id: int) -> None:
        """Removes every right granted to ``grantee_id`` on this shard's
        mailboxes, and the /private METADATA entries it kept on them
        (RFC 5464 section 3.3): the grantee's account is being removed."""
        async with self.db.write() as conn:
            await delete_grants(conn, grantee_id)
            await delete_grantee_metadata(conn, grantee_id)


async def delete_mailbox_acl(conn: AsyncConnection, mailbox_id: int) -> None:
    """Removes the ACL of a mailbox being deleted."""
    await conn.execute(delete(T).where(T.c.mailbox_id == mailbox_id))


async def delete_acl(conn: AsyncConnection, account_id: int) -> None:
    """Removes the ACLs of every mailbox of the account from this shard."""
    await conn.execute(delete(T).where(T.c.account_id == account_id))


async def delete_grants(conn: AsyncConnection, grantee_id: int) -> None:
    """Removes every right granted to ``grantee_id`` in this shard (the
    grantee's account is being removed)."""
    await conn.execute(delete(T).where(T.c.grantee_id == grantee_id))


async def copy_acl(
    source: AsyncConnection, target: AsyncConnection, account_id: int, boxes: Mapping[int, int]
) -> None:
    """The ACLs of the account's mailboxes on ``target`` made those of
    ``source`` (an account move's round, whole), mailbox ids mapped by
    ``boxes`` (source id -> target id); a mailbox not in it is left out."""
    await delete_acl(target, account_id)
    rows = (await source.execute(select(T).where(T.c.account_id == account_id))).all()
    out = [{**r._mapping, "mailbox_id": boxes[r.mailbox_id]} for r in rows if r.mailbox_id in boxes]
    if out:
        await target.execute(insert(T), out)


__all__ = [
    "ANYONE",
    "AclStore",
    "Grant",
    "copy_acl",
    "delete_acl",
    "delete_grants",
    "delete_mailbox_acl",
]

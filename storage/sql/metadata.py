"""RFC 5464 METADATA entries in the mail shard (issue #24).

The rows live in the account's shard (``metadata_entries``, schema step
29) beside its mailboxes: keyed by the mailbox's id (0 for the server's
entries), so a RENAME keeps them and DELETE removes them
(``SqlMailStore.delete_mailbox``); an account move copies them
(:func:`copy_metadata`), removing the account deletes them
(:func:`delete_metadata`). Writes take the account's lock like every other
write of the mail store, so the per-account entry limit is checked against
a count no concurrent write can change, and a write during a move's fence
fails TEMPORARY. The protocol rules (entry syntax, MAXSIZE, DEPTH) are
imapd's; storage keeps names and values as given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from storage import errors
from storage.errors import ErrorKind, StorageError
from storage.model import ChangeKind
from storage.sql.db import Database
from storage.sql.schema import mailboxes
from storage.sql.schema import metadata_entries as T

SERVER = 0  # the mailbox_id of the server's entries
# Characters of entry names a metadata change carries on the bus: it stays
# well below what one PostgreSQL NOTIFY or datagram takes (storage/events.py).
METADATA_CHANGE_CHARS = 2000


class _Locked(Protocol):
    """What :class:`MetadataStore` needs of the mail store it is mixed into."""

    db: Database

    def _write(self, account_id: int) -> AbstractAsyncContextManager[Any]: ...


class MetadataStore:
    """Mixed into ``SqlMailStore``: the account's METADATA entries."""

    async def metadata(self: _Locked, account_id: int, mailbox_id: int | None) -> dict[str, bytes]:
        """Every entry of the server (``mailbox_id`` None) or of one
        mailbox of the account, name -> value. The caller resolved the
        mailbox (a deleted one simply has none)."""
        box = SERVER if mailbox_id is None else mailbox_id
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(T.c.name, T.c.value).where(
                    T.c.account_id == account_id, T.c.mailbox_id == box
                )
            )
            return {r.name: bytes(r.value) for r in rows}

    async def mailboxes_metadata(
        self: _Locked, account_id: int, names: Sequence[str]
    ) -> dict[int, dict[str, bytes]]:
        """The entries called ``names`` of every mailbox of the account
        (the server's left out), mailbox id -> name -> value: one read,
        whatever the number of mailboxes (RFC 9590 LIST RETURN (METADATA)
        asks it once for all the mailboxes it lists). Only entries that
        hold a value are there; the account's entries are bounded
        (``set_metadata``'s ``max_entries``), so is the answer."""
        if not names:
            return {}
        out: dict[int, dict[str, bytes]] = {}
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(T.c.mailbox_id, T.c.name, T.c.value).where(
                    T.c.account_id == account_id,
                    T.c.mailbox_id != SERVER,
                    T.c.name.in_(list(dict.fromkeys(names))),
                )
            )
            for r in rows:
                out.setdefault(r.mailbox_id, {})[r.name] = bytes(r.value)
        return out

    async def set_metadata(
        self: _Locked,
        account_id: int,
        mailbox_id: int | None,
        values: Sequence[tuple[str, bytes | None]],
        max_entries: int,
    ) -> None:
        """Sets (bytes) or removes (None) entries of the server or of one
        mailbox, all or none (RFC 5464 section 4.3). NOT_FOUND if the
        mailbox is not the account's; OVER_QUOTA, nothing changed, if the
        account would then hold more than ``max_entries`` entries in all."""
        box = SERVER if mailbox_id is None else mailbox_id
        async with self._write(account_id) as tx:
            conn: AsyncConnection = tx.conn
            if mailbox_id is not None:
                found = await conn.execute(
                    select(mailboxes.c.id).where(
                        mailboxes.c.id == mailbox_id, mailboxes.c.account_id == account_id
                    )
                )
                if found.first() is None:
                    raise errors.not_found("no such mailbox")
            final = dict(values)  # the last value given for a name wins
            mine = (T.c.account_id == account_id) & (T.c.mailbox_id == box)
            names = list(final)
            for i in range(0, len(names), 500):
                await conn.execute(delete(T).where(mine, T.c.name.in_(names[i : i + 500])))
            rows = [
                {"account_id": account_id, "mailbox_id": box, "name": n, "value": v}
                for n, v in final.items()
                if v is not None
            ]
            # On the bus for NOTIFY (RFC 5465 sections 5.6 and 5.7): which
            # entries of which mailbox (None: the server's) changed.
            tx.change(
                ChangeKind.MAILBOX, mailbox_id, data={"op": "metadata", "entries": _some(names)}
            )
            if rows:
                await conn.execute(insert(T), rows)
                count = (
                    await conn.execute(
                        select(func.count()).select_from(T).where(T.c.account_id == account_id)
                    )
                ).scalar_one()
                if count > max_entries:
                    raise StorageError(
                        ErrorKind.OVER_QUOTA, f"at most {max_entries} metadata entries"
                    )


def _some(names: list[str]) -> list[str]:
    """The first of ``names`` that fit in METADATA_CHANGE_CHARS (one at least)."""
    out: list[str] = []
    size = 0
    for name in names:
        size += len(name) + 3  # its JSON quotes and comma
        if out and size > METADATA_CHANGE_CHARS:
            break
        out.append(name)
    return out


async def delete_mailbox_metadata(conn: AsyncConnection, mailbox_id: int) -> None:
    """Removes the entries of a mailbox being deleted."""
    await conn.execute(delete(T).where(T.c.mailbox_id == mailbox_id))


async def delete_metadata(conn: AsyncConnection, account_id: int) -> None:
    """Removes every entry of the account from this shard database."""
    await conn.execute(delete(T).where(T.c.account_id == account_id))


async def copy_metadata(
    source: AsyncConnection, target: AsyncConnection, account_id: int, boxes: Mapping[int, int]
) -> None:
    """The account's entries on ``target`` made those of ``source`` (an
    account move's round, whole), mailbox ids mapped by ``boxes`` (source
    id -> target id); entries of a mailbox not in it are left out."""
    await delete_metadata(target, account_id)
    rows = (await source.execute(select(T).where(T.c.account_id == account_id))).all()
    out = [
        {**r._mapping, "mailbox_id": SERVER if r.mailbox_id == SERVER else boxes[r.mailbox_id]}
        for r in rows
        if r.mailbox_id == SERVER or r.mailbox_id in boxes
    ]
    if out:
        await target.execute(insert(T), out)


__all__ = [
    "SERVER",
    "MetadataStore",
    "copy_metadata",
    "delete_mailbox_metadata",
    "delete_metadata",
]

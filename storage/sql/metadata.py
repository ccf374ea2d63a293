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

Another account's mailbox (shared through RFC 4314, who may is decided in
``storage.acl``): its /shared entries are the mailbox's, the rows above,
read and written by every user who may; its /private entries are per user
(RFC 5464 section 3.3), so a grantee's are its own rows of
``grantee_metadata`` (schema step 35), in the owner's shard beside the
mailbox, never the owner's. Reached through ``user_id`` (the grantee) on
:meth:`MetadataStore.metadata` and :meth:`MetadataStore.set_metadata`,
and :meth:`MetadataStore.granted_metadata` for LIST. The owner's entry
limit counts the /shared entries grantees set; a grantee's /private
entries on one owner's mailboxes have a limit of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from sqlalchemy import and_, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from storage import errors
from storage.errors import ErrorKind, StorageError
from storage.model import ChangeKind
from storage.sql.db import Database
from storage.sql.schema import grantee_metadata as G
from storage.sql.schema import mailboxes
from storage.sql.schema import metadata_entries as T

SERVER = 0  # the mailbox_id of the server's entries
SHARED = "/shared"  # RFC 5464 section 3.2: the entries every user of a mailbox sees
# Characters of entry names a metadata change carries on the bus: it stays
# well below what one PostgreSQL NOTIFY or datagram takes (storage/events.py).
METADATA_CHANGE_CHARS = 2000


class _Locked(Protocol):
    """What :class:`MetadataStore` needs of the mail store it is mixed into."""

    db: Database

    def _write(self, account_id: int) -> AbstractAsyncContextManager[Any]: ...


class MetadataStore:
    """Mixed into ``SqlMailStore``: the account's METADATA entries."""

    async def metadata(
        self: _Locked, account_id: int, mailbox_id: int | None, user_id: int | None = None
    ) -> dict[str, bytes]:
        """Every entry of the server (``mailbox_id`` None) or of one
        mailbox of the account, name -> value. The caller resolved the
        mailbox (a deleted one simply has none). ``user_id``: another
        account reading the mailbox (a grantee, whose rights the caller
        checked): the mailbox's /shared entries and that user's own
        /private ones."""
        box = SERVER if mailbox_id is None else mailbox_id
        async with self.db.read() as conn:
            if user_id is None or user_id == account_id:
                rows = await conn.execute(
                    select(T.c.name, T.c.value).where(
                        T.c.account_id == account_id, T.c.mailbox_id == box
                    )
                )
                return {r.name: bytes(r.value) for r in rows}
            found = await _granted(conn, user_id, [box], None)
            return found.get(box, {})

    async def granted_metadata(
        self: _Locked, user_id: int, mailbox_ids: Sequence[int], names: Sequence[str]
    ) -> dict[int, dict[str, bytes]]:
        """The entries called ``names`` of other accounts' mailboxes of
        this shard as ``user_id`` sees them (their /shared entries, its
        own /private ones), mailbox id -> name -> value, only entries that
        hold a value: two reads whatever the number of mailboxes (RFC 9590
        LIST RETURN (METADATA) of the shared mailboxes it lists). The
        caller checked the user's rights on each mailbox."""
        if not names or not mailbox_ids:
            return {}
        async with self.db.read() as conn:
            return await _granted(conn, user_id, mailbox_ids, names)

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
        user_id: int | None = None,
    ) -> None:
        """Sets (bytes) or removes (None) entries of the server or of one
        mailbox, all or none (RFC 5464 section 4.3). NOT_FOUND if the
        mailbox is not the account's; OVER_QUOTA, nothing changed, if the
        account would then hold more than ``max_entries`` entries in all.

        ``user_id``: another account writing (a grantee, whose rights the
        caller checked) on one of the account's mailboxes: /shared entries
        are the mailbox's (counted in the account's limit), /private ones
        that user's own, at most ``max_entries`` of them on this account's
        mailboxes. Still one transaction under the owner's lock."""
        grantee = user_id is not None and user_id != account_id
        if grantee and mailbox_id is None:
            raise errors.not_found("no such mailbox")  # another account's server entries
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
            # A grantee's /private entries are its own rows (RFC 5464 section 3.3).
            own = {n: v for n, v in final.items() if not grantee or _is_shared(n)}
            theirs = {n: v for n, v in final.items() if n not in own}
            if own:
                key = {"account_id": account_id, "mailbox_id": box}
                if await _replace(conn, T, key, own):
                    await _check_count(conn, T.c.account_id == account_id, max_entries)
                # On the bus for NOTIFY (RFC 5465 sections 5.6 and 5.7): which
                # entries of which mailbox (None: the server's) changed; never
                # a grantee's /private ones, which no other user sees.
                names = list(own)
                tx.change(
                    ChangeKind.MAILBOX, mailbox_id, data={"op": "metadata", "entries": _some(names)}
                )
            if theirs:
                key = {"account_id": account_id, "mailbox_id": box, "grantee_id": user_id}
                if await _replace(conn, G, key, theirs):
                    where = (G.c.account_id == account_id) & (G.c.grantee_id == user_id)
                    await _check_count(conn, where, max_entries, G)


def _is_shared(name: str) -> bool:
    return name == SHARED or name.startswith(SHARED + "/")


async def _replace(
    conn: AsyncConnection, table: Any, key: dict[str, Any], final: dict[str, bytes | None]
) -> bool:
    """The rows of ``table`` matching ``key`` named in ``final`` set to
    its values (None: removed); whether any row was inserted."""
    mine = and_(*(table.c[k] == v for k, v in key.items()))
    names = list(final)
    for i in range(0, len(names), 500):
        await conn.execute(delete(table).where(mine, table.c.name.in_(names[i : i + 500])))
    rows = [{**key, "name": n, "value": v} for n, v in final.items() if v is not None]
    if rows:
        await conn.execute(insert(table), rows)
    return bool(rows)


async def _granted(
    conn: AsyncConnection, user_id: int, boxes: Sequence[int], names: Sequence[str] | None
) -> dict[int, dict[str, bytes]]:
    """:meth:`MetadataStore.granted_metadata`'s reads (``names`` None: every entry)."""
    out: dict[int, dict[str, bytes]] = {}
    wanted = None if names is None else list(dict.fromkeys(names))
    shared = None if wanted is None else [n for n in wanted if _is_shared(n)]
    private = None if wanted is None else [n for n in wanted if not _is_shared(n)]
    for i in range(0, len(boxes), 500):
        chunk = list(boxes[i : i + 500])
        if shared is None or shared:
            query = select(T.c.mailbox_id, T.c.name, T.c.value).where(T.c.mailbox_id.in_(chunk))
            if shared is None:
                query = query.where(T.c.name.like(SHARED + "/%"))
            else:
                query = query.where(T.c.name.in_(shared))
            for r in await conn.execute(query):
                out.setdefault(r.mailbox_id, {})[r.name] = bytes(r.value)
        if private is None or private:
            query = select(G.c.mailbox_id, G.c.name, G.c.value).where(
                G.c.grantee_id == user_id, G.c.mailbox_id.in_(chunk)
            )
            if private is not None:
                query = query.where(G.c.name.in_(private))
            for r in await conn.execute(query):
                out.setdefault(r.mailbox_id, {})[r.name] = bytes(r.value)
    return out


async def _check_count(conn: AsyncConnection, where: Any, limit: int, table: Any = T) -> None:
    """OVER_QUOTA (the transaction then rolls back) if more than ``limit`` rows match."""
    count = (await conn.execute(select(func.count()).select_from(table).where(where))).scalar_one()
    if count > limit:
        raise StorageError(ErrorKind.OVER_QUOTA, f"at most {limit} metadata entries")


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
    """Removes the entries of a mailbox being deleted, grantees' too."""
    await conn.execute(delete(T).where(T.c.mailbox_id == mailbox_id))
    await conn.execute(delete(G).where(G.c.mailbox_id == mailbox_id))


async def delete_metadata(conn: AsyncConnection, account_id: int) -> None:
    """Removes every entry of the account from this shard database, and
    those grantees keep on its mailboxes."""
    await conn.execute(delete(T).where(T.c.account_id == account_id))
    await conn.execute(delete(G).where(G.c.account_id == account_id))


async def delete_grantee_metadata(conn: AsyncConnection, grantee_id: int) -> None:
    """Removes the /private entries ``grantee_id`` keeps on other accounts'
    mailboxes in this shard database (the grantee's account is being removed)."""
    await conn.execute(delete(G).where(G.c.grantee_id == grantee_id))


async def copy_metadata(
    source: AsyncConnection, target: AsyncConnection, account_id: int, boxes: Mapping[int, int]
) -> None:
    """The account's entries on ``target`` made those of ``source`` (an
    account move's round, whole), grantees' /private entries on its
    mailboxes with them, mailbox ids mapped by ``boxes`` (source id ->
    target id); entries of a mailbox not in it are left out."""
    await delete_metadata(target, account_id)
    rows = (await source.execute(select(T).where(T.c.account_id == account_id))).all()
    out = [
        {**r._mapping, "mailbox_id": SERVER if r.mailbox_id == SERVER else boxes[r.mailbox_id]}
        for r in rows
        if r.mailbox_id == SERVER or r.mailbox_id in boxes
    ]
    if out:
        await target.execute(insert(T), out)
    rows = (await source.execute(select(G).where(G.c.account_id == account_id))).all()
    kept = [
        {**r._mapping, "mailbox_id": boxes[r.mailbox_id]} for r in rows if r.mailbox_id in boxes
    ]
    if kept:
        await target.execute(insert(G), kept)


__all__ = [
    "SERVER",
    "MetadataStore",
    "copy_metadata",
    "delete_grantee_metadata",
    "delete_mailbox_metadata",
    "delete_metadata",
]
